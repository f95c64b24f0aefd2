"""The bench command (satconv.bench.cli): JSON lines, --out, bad arguments."""
import json

import pytest

from satconv.bench import cli
from satconv.config import REPO_ROOT

QUADRATIC_YAML = str(REPO_ROOT / "configs" / "paper_quadratic.yaml")


def test_bench_main_prints_json_lines(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    argv = ["--config", QUADRATIC_YAML, "--profile", "quick", "--batch", "4", "--warmup", "1", "--repeats", "3",
            "--out", str(out)]
    assert cli.bench_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["batch"] == 4 and row["device_type"] == "cpu" and row["train_img_s"] > 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == [row]


def test_append_jsonl_appends(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    cli.append_jsonl(out, [{"a": 1}])
    cli.append_jsonl(out, [{"b": 2}, {"c": 3}])
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert list(out.parent.iterdir()) == [out]  # no temp files left


@pytest.mark.parametrize("argv", [
    [],  # --config is required
    ["--config", QUADRATIC_YAML, "--batch", "0"],
    ["--config", QUADRATIC_YAML, "--batch", "many"],
    ["--config", QUADRATIC_YAML, "--warmup", "0"],
    ["--config", QUADRATIC_YAML, "--repeats", "1"],
    ["--config", QUADRATIC_YAML, "--precision", "fp16"],
    ["--config", "configs/does_not_exist.yaml"],
    ["--config", QUADRATIC_YAML, "--set", "model.num_layers=zero"],
    ["--config", QUADRATIC_YAML, "--set", "train.attention_route=flash"],
    ["--config", QUADRATIC_YAML, "--compile", "reduce-overhead", "--set", "train.step_graph=true"],
])


def test_bench_main_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.bench_main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
