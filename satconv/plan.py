"""The reproduction campaign's plan: which runs the book needs, and which of them it has.

``book/campaign.yaml`` lists the runs of the reproduction (issue 18's table), in the order they are to be
trained.  Each entry is one config on one schedule, for one or more seeds::

    runs:
      - {id: "2", config: paper_quadratic, epochs: 300, seeds: [42, 43, 44]}
      - {id: "6", config: paper_quadratic, epochs: 300, seeds: [42], overrides: [data.val_size=0]}
      - {id: "4", config: paper_quadratic_anisotropic, epochs: 300, seeds: [42], note: "several GPUs"}

An entry expands into one :class:`satconv.campaign.Spec` per seed (``config:seed:epochs[:overrides]``), and a
spec is *done* when ``book/runs/<spec name>/`` holds a completed run beside its executed notebook
(:func:`satconv.campaign.run_state`).  ``python -m satconv.plan [--plan FILE] [--runs DIR]`` prints the progress
and the specs still to run, in order, ready for ``campaign run``; the results chapter shows the same table.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .campaign import CampaignError, Spec, parse_spec, run_state
from .config import REPO_ROOT

#: the plan of the book's campaign
PLAN_FILE = REPO_ROOT / "book" / "campaign.yaml"
_KEYS = {"id", "config", "epochs", "seeds", "overrides", "note"}


@dataclass(frozen=True)
class PlannedRun:
    """One entry of the plan: ``config`` for ``epochs`` epochs, once per seed in ``seeds``.

    Attributes:
        id: the entry's label in the plan (issue 18's run number; entries may share one).
        config: ``configs/<config>.yaml``.
        epochs: the schedule's length.
        seeds: the seeds, in order.
        overrides: dotted ``key=value`` overrides of every run of the entry (part of the run's name).
        note: why the entry waits, or anything a reader of the plan should know (empty: none).
        specs: one :class:`satconv.campaign.Spec` per seed, in order (derived; the constructor checks them).

    Raises:
        CampaignError: an unknown config, a non-positive ``epochs`` or a bad override (:func:`parse_spec`).
    """

    id: str
    config: str
    epochs: int
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    note: str = ""
    specs: tuple[Spec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        extra = ":" + ",".join(self.overrides) if self.overrides else ""
        object.__setattr__(self, "specs", tuple(parse_spec(f"{self.config}:{s}:{self.epochs}{extra}")
                                                for s in self.seeds))

    @property
    def schedule(self) -> str:
        """``"<epochs> epochs"``, then the overrides, e.g. ``"300 epochs, data.val_size=0"``."""
        return ", ".join([f"{self.epochs} epochs", *self.overrides])


def parse_plan(data, source: str = "plan") -> list[PlannedRun]:
    """The entries of a plan's YAML data (``{"runs": [entry, ...]}``), checked.

    Raises:
        CampaignError: a missing or unknown key, a seed that is not a non-negative integer, a repeated seed, an
            unknown config, a bad override, or two entries naming the same run; the message names ``source`` and
            the entry.
    """
    if not isinstance(data, dict) or set(data) != {"runs"} or not isinstance(data["runs"], list) or not data["runs"]:
        raise CampaignError(f"{source}: expected one key, 'runs', holding a non-empty list of entries")
    plan, seen = [], {}
    for i, entry in enumerate(data["runs"]):
        where = f"{source}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise CampaignError(f"{where}: expected a mapping, got {entry!r}")
        missing, unknown = {"id", "config", "epochs", "seeds"} - set(entry), set(entry) - _KEYS
        if missing or unknown:
            raise CampaignError(f"{where}: " + "; ".join(
                ([f"missing {', '.join(sorted(missing))}"] if missing else [])
                + ([f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KEYS))})"]
                   if unknown else [])))
        seeds, overrides = entry["seeds"], entry.get("overrides") or []
        if (not isinstance(seeds, list) or not seeds
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
            raise CampaignError(f"{where}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise CampaignError(f"{where}: seeds {seeds} repeat a seed")
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "," not in o for o in overrides):
            raise CampaignError(f"{where}: overrides must be a list of key=value strings, got {overrides!r}")
        epochs = entry["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise CampaignError(f"{where}: epochs must be an integer, got {epochs!r}")
        try:
            run = PlannedRun(str(entry["id"]), str(entry["config"]), epochs, tuple(seeds), tuple(overrides),
                             str(entry.get("note") or ""))
        except CampaignError as exc:
            raise CampaignError(f"{where}: {exc}") from None
        for spec in run.specs:
            if spec.name in seen:
                raise CampaignError(f"{where}: the run {spec.name} is already planned by entry {seen[spec.name]}")
            seen[spec.name] = i + 1
        plan.append(run)
    return plan


def load_plan(path: str | Path = PLAN_FILE) -> list[PlannedRun]:
    """:func:`parse_plan` of a YAML file.

    Raises:
        CampaignError: the file is missing, is not YAML, or fails :func:`parse_plan`.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CampaignError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise CampaignError(f"{path}: not valid YAML ({exc})") from None
    return parse_plan(data, str(path))


def progress(plan: list[PlannedRun], runs: str | Path) -> list[dict]:
    """Each entry's seeds split by whether ``runs`` holds them done.

    Args:
        plan: the entries (:func:`load_plan`).
        runs: the folder of the finished runs (``book/runs``, or a campaign's ``--out``).

    Returns:
        One dict per entry, in plan order: ``run`` (the :class:`PlannedRun`), ``done`` and ``todo`` (lists of
        seeds), ``todo_specs`` (the specs of ``todo`` as ``config:seed:epochs[:overrides]`` strings) and
        ``states`` (seed -> :func:`satconv.campaign.run_state`: ``done``, ``resume``, ``stale``, ``busy`` or
        ``new``).
    """
    runs, rows = Path(runs), []
    for run in plan:
        states = {spec.seed: run_state(runs, spec) for spec in run.specs}
        todo = [s for s in run.seeds if states[s] != "done"]
        rows.append({"run": run, "states": states, "done": [s for s in run.seeds if states[s] == "done"],
                     "todo": todo, "todo_specs": [sp.text for sp in run.specs if sp.seed in todo]})
    return rows


def progress_lines(rows: list[dict]) -> list[str]:
    """:func:`progress` as text: one line per entry, then the specs still to run (the waiting entries' too)."""
    lines = []
    for r in rows:
        run = r["run"]
        done = ", ".join(map(str, r["done"])) or "none"
        todo = ", ".join(map(str, r["todo"])) or "none"
        lines.append(f"{run.id:>3} {run.config} ({run.schedule}): done seeds {done}; to run {todo}"
                     + (f" [{run.note}]" if run.note else ""))
    todo = [s for r in rows for s in r["todo_specs"]]
    lines.append(f"to run, in order ({len(todo)}): " + (" ".join(todo) if todo else "nothing"))
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m satconv.plan``: print :func:`progress_lines`; exit 0, or 2 with the error of a bad plan."""
    p = argparse.ArgumentParser(prog="python -m satconv.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=PLAN_FILE, help="default: book/campaign.yaml")
    p.add_argument("--runs", type=Path, default=REPO_ROOT / "book" / "runs",
                   help="the finished runs (default: book/runs)")
    a = p.parse_args(argv)
    try:
        if not a.runs.is_dir():
            raise CampaignError(f"--runs {a.runs}: no such directory")
        print("\n".join(progress_lines(progress(load_plan(a.plan), a.runs))))
    except CampaignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["PLAN_FILE", "PlannedRun", "parse_plan", "load_plan", "progress", "progress_lines", "main"]

if __name__ == "__main__":
    sys.exit(main())
