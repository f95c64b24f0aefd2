"""Where a run's settings come from: command line over environment over file (satconv.experiment)."""
import pytest

from satconv.config import ConfigError, to_dict
from satconv.experiment import DATA_ROOT_ENV, resolve_config, run_dir_for
from tests.helpers import tiny_config

QUADRATIC = "configs/paper_quadratic.yaml"


def test_file_root_without_environment_or_command_line(tmp_path):
    cfg = tiny_config("data.root=/from/file")
    assert resolve_config(cfg, environ={}).data.root == "/from/file"


def test_environment_beats_the_file(tmp_path):
    cfg = tiny_config("data.root=/from/file")
    assert resolve_config(cfg, environ={DATA_ROOT_ENV: "/from/env"}).data.root == "/from/env"


def test_command_line_beats_the_environment():
    cfg = tiny_config("data.root=/from/file")
    got = resolve_config(cfg, ["data.root=/from/cli"], environ={DATA_ROOT_ENV: "/from/env"})
    assert got.data.root == "/from/cli"


def test_command_line_beats_the_environment_after_a_profile():
    got = resolve_config(QUADRATIC, ["data.root=/from/cli"], profile="quick", environ={DATA_ROOT_ENV: "/from/env"})
    assert got.data.root == "/from/cli"
    assert resolve_config(QUADRATIC, profile="quick", environ={DATA_ROOT_ENV: "/from/env"}).data.root == "/from/env"


def test_empty_environment_variable_is_ignored():
    cfg = tiny_config("data.root=/from/file")
    assert resolve_config(cfg, environ={DATA_ROOT_ENV: ""}).data.root == "/from/file"


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, "/from/process")
    assert resolve_config(tiny_config("data.root=/from/file")).data.root == "/from/process"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_config(tiny_config("data.root=/from/file")).data.root == "/from/file"


def test_only_data_root_changes():
    cfg = tiny_config("data.root=/from/file")
    a, b = to_dict(cfg), to_dict(resolve_config(cfg, environ={DATA_ROOT_ENV: "/from/env"}))
    a["data"].pop("root"), b["data"].pop("root")
    assert a == b


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError):
        resolve_config(tiny_config(), ["train.lr=-1"], environ={})


def test_run_dir_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    assert run_dir_for(cfg, "x") == (tmp_path / "x").resolve()
    assert run_dir_for(cfg).name == cfg.name and run_dir_for(cfg).parent.name == "runs"
