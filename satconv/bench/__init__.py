"""Benchmarks of satconv's models (``python -m satconv bench`` or ``python -m satconv.bench``; issue 5,
measurement side).  One job per module, imported as ``satconv.bench.<module>``:

- :mod:`satconv.bench.harness`: what every benchmark shares: the training step it times (the training's
  own step body), timing primitives (B9), device peaks, the options a row records;
- :mod:`satconv.bench.throughput`: training, evaluation and batch-1 throughput of a config
  (:func:`~satconv.bench.throughput.bench_model`), at the largest batch, over image sides, and whole
  training epochs against the model alone;
- :mod:`satconv.bench.memory`: activations saved for the backward pass, and the largest batch that fits;
- :mod:`satconv.bench.kernels`: where a training step's time goes, by kernel category;
- :mod:`satconv.bench.fused_launch`: launch shapes of the fused softmax-dropout kernels, timed;
- :mod:`satconv.bench.cli`: the command line.

FLOP counting is :mod:`satconv.flops`.  Imports run one way: ``harness`` <- ``memory`` <- ``throughput``;
``harness`` <- ``kernels``, ``fused_launch``; all of them <- ``cli``.  This package imports none of them
itself.
"""
