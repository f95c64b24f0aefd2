"""python -m satconv: argument and config errors exit 2 with a usage message; train, eval, bench dispatch."""
import json
import subprocess
import sys

import pytest

from satconv import train as T
from satconv.__main__ import main
from satconv.config import REPO_ROOT
from satconv.data import DataError

QUADRATIC = str(REPO_ROOT / "configs" / "paper_quadratic.yaml")
#: shrinks the quick profile further: 8x8 synthetic images, 2 steps
TINY = ["--profile", "quick", "--set", "data.source=synthetic", "--set", "data.synthetic_train=48",
        "--set", "data.synthetic_test=16", "--set", "data.val_size=16", "--set", "model.image_size=8",
        "--set", "train.batch_size=16", "--set", "train.atlas_images=1"]


def exit_code(argv, capsys):
    """Run main(argv); returns (code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "a command is required"),
    (["train"], "the following arguments are required: --config"),
    (["train", "--config", "configs/no_such.yaml"], "config file not found: configs/no_such.yaml"),
    (["train", "--config", QUADRATIC, "--set", "train.epoch=2"], "train.epoch: got 2; unknown key"),
    (["train", "--config", QUADRATIC, "--set", "train.lr=-1"], "train.lr: got -1; must be > 0"),
    (["train", "--config", QUADRATIC, "--set", "train.lr"], "expected KEY=VALUE"),
    (["train", "--config", QUADRATIC, "--profile", "huge"], "invalid choice: 'huge'"),
    (["train", "--config", QUADRATIC, "--device", "gpu0"], "--device 'gpu0': not a device"),
    (["eval"], "the following arguments are required: --run"),
    (["eval", "--run", "/nonexistent/run"], "not a run directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_usage(argv, message, capsys):
    code, err = exit_code(argv, capsys)
    assert code == 2 and "usage:" in err and message in err and "Traceback" not in err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "satconv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage: python -m satconv" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_without_the_bench_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "satconv.bench.cli", None)  # import of satconv.bench.cli now fails
    code, err = exit_code(["bench", "--anything"], capsys)
    assert code == 2 and "satconv.bench is not part of this installation" in err


def test_bench_dispatches(monkeypatch):
    import types
    seen = []
    monkeypatch.setitem(sys.modules, "satconv.bench.cli", types.SimpleNamespace(bench_main=lambda a: seen.append(a) or 0))
    assert main(["bench", "--batch", "8"]) == 0 and seen == [["--batch", "8"]]


@pytest.mark.parametrize("error, code", [(T.NonFiniteLoss("loss became NaN"), 1), (T.OutOfMemory("oom"), 1),
                                         (DataError("cannot decode image x.jpg"), 1),
                                         (KeyboardInterrupt("checkpoint saved"), 130),
                                         (ValueError("data.val_size=9 must be smaller"), 2)])
def test_run_failures_exit_without_traceback(monkeypatch, capsys, error, code):
    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(T, "train", failing)
    got, err = exit_code(["train", "--config", QUADRATIC], capsys)
    assert got == code and str(error) in err and "Traceback" not in err


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", QUADRATIC, "--out", str(out), "--no-progress", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"run: {out}" in printed and "final (epoch 1)" in printed
    assert main(["eval", "--run", str(out), "--weights", "last", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["images"] == 16
    assert result["acc"] == T.read_metrics(out)[-1]["test_acc"]
