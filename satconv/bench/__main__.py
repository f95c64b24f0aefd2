"""``python -m satconv.bench ...``: the ``bench`` command (:func:`satconv.bench.cli.bench_main`)."""
import sys

from .cli import bench_main

sys.exit(bench_main(sys.argv[1:]))
