"""A user's mistake gets a one-line error naming the thing at fault and a nonzero exit, never a traceback.

Issue 17, item 6: undecodable config files, non-finite numbers, image sides a model cannot take, too few
epochs to time, a missing data folder, an unwritable --out (all refused before anything is benchmarked)
and Ctrl-C during start-up.
"""
import os
import subprocess
import sys

import pytest

from satconv import config as C
from satconv.bench import cli as bench_cli
from satconv.bench import throughput
from satconv.config import REPO_ROOT, config_keys
from satconv.config_types import non_negative, positive
from tests.test_cli import QUADRATIC, exit_code

BINARY = bytes(range(128, 256)) + b"\x00\x01model: {}\n"  # no UTF-8 text: 0x80 cannot start a character


def cli(*argv, cwd=None):
    """Run ``python -m satconv ARGV`` in a subprocess; returns ``(exit code, stderr)``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "satconv", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO_ROOT, env=env)
    return proc.returncode, proc.stderr


def assert_usage_error(code, err, *fragments):
    """Exit 2, one ``error:`` line holding every fragment, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1, err
    for fragment in fragments:
        assert fragment in line[0], err


@pytest.fixture
def binary_yaml(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(BINARY)
    return path


@pytest.fixture
def no_benchmark(monkeypatch):
    """Make every benchmark entry point fail the test: the argument checks must come first."""
    def ran(*args, **kwargs):
        raise AssertionError("a benchmark ran before the arguments were checked")
    for name in ("bench_batch", "scaling", "epoch_timing", "fused_launch_sweep", "kernel_breakdown"):
        monkeypatch.setattr(bench_cli, name, ran)  # what the command calls
    for name in ("bench_model", "largest_batch"):
        monkeypatch.setattr(throughput, name, ran)  # what bench_batch and epoch_timing call


# ---------------------------------------------------------------------------------------------
# Config files that are not UTF-8 text
# ---------------------------------------------------------------------------------------------
def test_binary_config_file_is_a_config_error(binary_yaml, capsys):
    code, err = exit_code(["train", "--config", str(binary_yaml)], capsys)
    assert_usage_error(code, err, f"{binary_yaml}: <file>: got b'\\x80'", "not UTF-8 text")
    code, err = exit_code(["train", "--config", str(binary_yaml), "--set", "train.epochs=2", "--profile", "quick"],
                          capsys)
    assert_usage_error(code, err, str(binary_yaml), "not UTF-8 text")
    with pytest.raises(C.ConfigError, match="not UTF-8 text") as exc:
        C.load(binary_yaml, overrides=["train.epochs=2"])
    assert exc.value.source == str(binary_yaml) and exc.value.key == "<file>"


def test_binary_config_file_through_the_module_entry_point(binary_yaml):
    code, err = cli("train", "--config", str(binary_yaml))
    assert_usage_error(code, err, str(binary_yaml), "not UTF-8 text")


def test_binary_config_file_in_bench(binary_yaml, capsys, no_benchmark):
    code, err = exit_code(["bench", "--config", QUADRATIC, str(binary_yaml), "--set", "train.batch_size=4"], capsys)
    assert_usage_error(code, err, str(binary_yaml), "not UTF-8 text")


def test_set_value_that_is_not_utf8(capsys):
    # a non-UTF-8 argv byte reaches Python as a lone surrogate (os.fsdecode)
    code, err = exit_code(["train", "--config", QUADRATIC, "--set", "name=run\udcff"], capsys)
    assert_usage_error(code, err, "--set: name:", "not UTF-8 text")


def test_unreadable_yaml_is_still_named(tmp_path, capsys):
    path = tmp_path / "nul.yaml"
    path.write_text("train:\n  lr: 0.1\x00\n")  # UTF-8, but not YAML
    code, err = exit_code(["train", "--config", str(path)], capsys)
    assert_usage_error(code, err, f"{path}: <yaml>", "not valid YAML")


# ---------------------------------------------------------------------------------------------
# Non-finite numbers
# ---------------------------------------------------------------------------------------------
NUMBER_KEYS = [k for k, t, _ in config_keys() if t == "a number"]
LIST_KEYS = {"data.mean": 3, "data.std": 3, "data.augment.color_jitter": 4}


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e999"])
def test_lr_must_be_finite(value, capsys):
    code, err = exit_code(["train", "--config", QUADRATIC, "--set", f"train.lr={value}"], capsys)
    assert_usage_error(code, err, "--set: train.lr: got", "expected a finite number")


def test_lr_inf_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "inf.yaml"
    path.write_text("train:\n  lr: .inf\n")
    code, err = exit_code(["train", "--config", str(path)], capsys)
    assert_usage_error(code, err, f"{path}: train.lr: got inf; expected a finite number")


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_every_number_field_must_be_finite(key, value):
    assert "train.lr" in NUMBER_KEYS and len(NUMBER_KEYS) >= 12
    with pytest.raises(C.ConfigError, match="expected a finite number") as exc:
        C.load(QUADRATIC, overrides=[f"{key}={value}"])
    assert exc.value.key == key


@pytest.mark.parametrize("key, n", LIST_KEYS.items())
def test_every_number_list_must_be_finite(key, n):
    values = ", ".join([".nan"] + ["0.5"] * (n - 1))
    with pytest.raises(C.ConfigError, match="expected a finite number") as exc:
        C.load(QUADRATIC, overrides=[f"{key}=[{values}]"])
    assert exc.value.key == f"{key}[0]"


def test_positive_and_non_negative_fields_refuse_infinity_themselves():
    for f in (positive(default=1.0), non_negative(default=1.0)):
        check = f.metadata["check"]
        assert check(1.0) and not check(float("inf")) and not check(float("nan"))


def test_std_zero_and_huge_integers(capsys):
    code, err = exit_code(["train", "--config", QUADRATIC, "--set", "data.std=[0.2, 0, 0.2]"], capsys)
    assert_usage_error(code, err, "data.std: got [0.2, 0.0, 0.2]; must be > 0 in every channel")
    code, err = exit_code(["train", "--config", QUADRATIC, "--set", f"train.lr={10 ** 400}"], capsys)
    assert_usage_error(code, err, "train.lr", "expected a finite number")


# ---------------------------------------------------------------------------------------------
# bench: every argument is checked before anything runs
# ---------------------------------------------------------------------------------------------
def test_bench_side_the_encoder_cannot_take(capsys, no_benchmark):
    code, err = exit_code(["bench", "--config", QUADRATIC, "--sides", "16", "15"], capsys)
    assert_usage_error(code, err, "--sides 15:", "paper_quadratic.yaml", "model.downsample is 2",
                       "allowed: multiples of 2")


def test_bench_side_through_the_module_entry_point():
    code, err = cli("bench", "--config", "configs/paper_quadratic.yaml", "--sides", "15")
    assert_usage_error(code, err, "--sides 15:", "allowed: multiples of 2")


@pytest.mark.parametrize("config, side, fragment", [
    ("vit_patch.yaml", 18, "(model.vit.patch_size is 4); allowed: multiples of 4"),
    ("re_vit.yaml", 15, "(model.vit.patch_size is 2); allowed: multiples of 2"),
    ("sasa.yaml", 2, "allowed: sides >= 4"),
])
def test_bench_sides_of_other_networks(config, side, fragment, capsys, no_benchmark):
    code, err = exit_code(["bench", "--config", str(REPO_ROOT / "configs" / config), "--sides", str(side)], capsys)
    assert_usage_error(code, err, f"--sides {side}:", fragment)


@pytest.mark.parametrize("config", ["paper_quadratic.yaml", "paper_learned.yaml", "re_vit.yaml", "vit_patch.yaml",
                                    "sasa.yaml", "re_san_pairwise.yaml", "fcvit.yaml", "paper_resnet18.yaml"])
def test_side_rule_matches_the_networks(config):
    """Every side the rule allows builds and runs; the first side it refuses is refused by the network too."""
    import torch
    from satconv.models import build_model
    cfg = C.load(REPO_ROOT / "configs" / config, profile="quick")
    step, minimum, _ = throughput.image_side_rule(cfg)
    allowed = [s for s in range(minimum, minimum + 2 * step + 1) if s % step == 0][:2]
    for side in allowed:
        model = build_model(throughput.with_image_side(cfg, side).model).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, side, side)).shape == (1, cfg.model.num_classes)
    if minimum > 1:  # the side just below the rule's minimum fails in the network (or its config)
        with pytest.raises((C.ConfigError, RuntimeError, ValueError)):
            c = throughput.with_image_side(cfg, minimum - 1)
            with torch.no_grad():
                build_model(c.model).eval()(torch.zeros(1, 3, minimum - 1, minimum - 1))


def test_vit_patch_must_divide_the_image_side_in_the_config(capsys):
    code, err = exit_code(["train", "--config", str(REPO_ROOT / "configs" / "vit_patch.yaml"),
                           "--set", "model.image_size=30"], capsys)
    assert_usage_error(code, err, "model.vit.patch_size: got 4; must divide image_size (30)")


@pytest.mark.parametrize("epochs", ["1"])
def test_bench_epoch_needs_two_epochs(epochs, capsys, no_benchmark):
    code, err = exit_code(["bench", "--config", QUADRATIC, "--epoch", "--epochs", epochs], capsys)
    assert_usage_error(code, err, f"--epochs {epochs}: --epoch trains at least 2 epochs", "warm-up")


def test_bench_epoch_missing_data_folder(tmp_path, capsys, no_benchmark):
    missing = tmp_path / "missing"
    code, err = exit_code(["bench", "--config", QUADRATIC, "--epoch", "--data", str(missing)], capsys)
    assert_usage_error(code, err, f"--data {missing}: no such directory", "DIR/train/<class>")
    (tmp_path / "half" / "train").mkdir(parents=True)
    code, err = exit_code(["bench", "--config", QUADRATIC, "--epoch", "--data", str(tmp_path / "half")], capsys)
    assert_usage_error(code, err, "no test/ folder in it")
    code, err = exit_code(["bench", "--config", QUADRATIC, "--data", str(tmp_path / "half")], capsys)
    assert_usage_error(code, err, "--data applies only with --epoch")


def test_bench_out_under_a_file(tmp_path, capsys, no_benchmark):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "rows.jsonl", blocker / "deeper" / "rows.jsonl"):
        code, err = exit_code(["bench", "--config", QUADRATIC, "--out", str(out)], capsys)
        assert_usage_error(code, err, f"--out {out}: cannot write the rows there: {blocker} is a file")
    code, err = exit_code(["bench", "--config", QUADRATIC, "--out", str(tmp_path)], capsys)
    assert_usage_error(code, err, f"{tmp_path} is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written, no probe left


def test_bench_out_under_a_file_through_the_module_entry_point(tmp_path):
    (tmp_path / "a_file").write_text("")
    code, err = cli("bench", "--config", "configs/paper_quadratic.yaml", "--out", str(tmp_path / "a_file" / "x.jsonl"))
    assert_usage_error(code, err, "cannot write the rows there", "is a file")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_bench_out_in_a_read_only_folder(tmp_path, capsys, no_benchmark):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, err = exit_code(["bench", "--config", QUADRATIC, "--out", str(folder / "rows.jsonl")], capsys)
    finally:
        folder.chmod(0o755)
    assert_usage_error(code, err, "cannot write the rows there", f"cannot create a file in {folder}")


def test_bench_out_probe_leaves_nothing(tmp_path):
    assert bench_cli.out_problem(str(tmp_path / "new" / "rows.jsonl")) is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Ctrl-C before training begins
# ---------------------------------------------------------------------------------------------
def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt  # what Python's default SIGINT handler raises


def test_ctrl_c_while_loading_data(monkeypatch, tmp_path, capsys):
    from satconv import train as T
    from tests.test_cli import TINY
    monkeypatch.setattr(T, "load_data", _ctrl_c)
    code, err = exit_code(["train", "--config", QUADRATIC, "--out", str(tmp_path / "run"), "--no-progress", *TINY],
                          capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "satconv: interrupted during start-up; nothing to resume"


def test_ctrl_c_while_building_the_model(monkeypatch, tmp_path, capsys):
    import satconv.models
    from tests.test_cli import TINY
    monkeypatch.setattr(satconv.models, "build_model", _ctrl_c)
    code, err = exit_code(["train", "--config", QUADRATIC, "--out", str(tmp_path / "run"), "--no-progress", *TINY],
                          capsys)
    assert code == 130 and err.strip() == "satconv: interrupted during start-up; nothing to resume"


def test_ctrl_c_at_start_up_of_a_resumable_run(monkeypatch, tmp_path, capsys):
    from satconv import train as T
    from tests.test_cli import TINY
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"an earlier attempt's checkpoint")
    monkeypatch.setattr(T, "load_data", _ctrl_c)
    code, err = exit_code(["train", "--config", QUADRATIC, "--out", str(run), "--no-progress", *TINY], capsys)
    assert code == 130 and "Traceback" not in err
    assert f"interrupted during start-up; {run / 'last.pt'} is as the previous attempt left it" in err
    assert "run again to resume" in err


def test_ctrl_c_while_reading_the_config(monkeypatch, capsys):
    from satconv import experiment
    monkeypatch.setattr(experiment, "resolve_config", _ctrl_c)
    code, err = exit_code(["train", "--config", QUADRATIC], capsys)
    assert code == 130 and err.strip() == "satconv: interrupted during start-up; nothing was written"


def test_ctrl_c_during_bench(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "bench_batch", _ctrl_c)
    code, err = exit_code(["bench", "--config", QUADRATIC, "--device", "cpu"], capsys)
    assert code == 130 and err.strip() == "satconv: interrupted; the rows printed so far are complete"


def test_real_sigint_while_loading_data(tmp_path):
    """A real SIGINT (Python's default handler) while the data loads: exit 130, one line, no traceback."""
    from tests.test_cli import TINY
    script = ("import os, signal, sys, time\n"
              "import satconv.train as T\n"
              "def load_data(cfg):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n"
              "T.load_data = load_data\n"
              "from satconv.__main__ import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv = ["train", "--config", QUADRATIC, "--out", str(tmp_path / "run"), "--no-progress", *TINY]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "satconv: interrupted during start-up; nothing to resume"
