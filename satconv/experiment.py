"""From a config file and the command line to the resolved config of a run, and its run directory.

Where the settings of a run come from, lowest precedence first:

1. the config file (``configs/<name>.yaml``);
2. the environment: ``$SATCONV_DATA_ROOT`` replaces the file's ``data.root`` (:data:`DATA_ROOT_ENV`);
3. the command line: a ``--profile`` (``quick``, ...), then the ``--set key=value`` overrides, so an explicit
   ``--set data.root=DIR`` wins over the environment.

:func:`resolve_config` applies them in that order; :func:`run_dir_for` places the run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .config import REPO_ROOT, ExperimentConfig, apply_profile, load, override, replace

#: the environment variable naming the data directory; it replaces the config file's ``data.root`` and
#: yields to an explicit ``--set data.root=...``
DATA_ROOT_ENV = "SATCONV_DATA_ROOT"


def resolve_config(cfg: ExperimentConfig | str | Path, overrides=(), profile: str | None = None,
                   environ: Mapping[str, str] | None = None) -> ExperimentConfig:
    """A validated config: the file (or the config given), then ``$SATCONV_DATA_ROOT``, then the profile,
    then the ``--set`` overrides (command line over environment over file).

    Args:
        cfg: a config, or the path of a YAML config file.
        overrides: ``"key=value"`` strings (:func:`satconv.config.override`).
        profile: a :data:`satconv.config.PROFILES` name, or ``None``.
        environ: the environment to read :data:`DATA_ROOT_ENV` from (``None``: ``os.environ``).

    Raises:
        ConfigError: a bad file, profile or override.
        FileNotFoundError: no such config file.
    """
    if isinstance(cfg, (str, Path)):
        cfg = load(cfg)
    env_root = (os.environ if environ is None else environ).get(DATA_ROOT_ENV)
    if env_root:
        cfg = replace(cfg, data=replace(cfg.data, root=env_root))
    if profile is not None:
        cfg = apply_profile(cfg, profile)
    if overrides:
        cfg = override(cfg, overrides)
    return cfg


def run_dir_for(cfg: ExperimentConfig, out_dir: str | Path | None = None) -> Path:
    """``out_dir`` (relative to the current directory), else ``train.out_dir``, else ``runs/<name>``;
    the latter two relative to the repository root in a source checkout.  Returns an absolute path."""
    if out_dir is not None:
        return Path(out_dir).expanduser().resolve()
    p = Path(cfg.train.out_dir).expanduser() if cfg.train.out_dir else Path("runs") / cfg.name
    base = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return (p if p.is_absolute() else base / p).resolve()
