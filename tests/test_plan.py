"""satconv.plan: the campaign's plan (book/campaign.yaml) is checked, expanded into specs, and matched
against finished run folders exactly as ``satconv.campaign run`` names and skips them."""
from __future__ import annotations

import json

import pytest
import yaml

from satconv.campaign import CampaignError, Spec, parse_spec, run_state
from satconv.config import REPO_ROOT, load
from satconv.plan import PLAN_FILE, PlannedRun, load_plan, main, parse_plan, progress, progress_lines
from satconv.rundir import RunLock


def entry(**kw):
    return {"id": "1", "config": "paper_resnet18", "epochs": 300, "seeds": [42], **kw}


def finished(out, name, status="completed", exception=None, checkpoint=False):
    """A run folder as ``campaign run`` leaves it: ``<out>/<name>/run.json`` beside ``<out>/<name>.ipynb``."""
    d = out / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        (d / "last.pt").write_bytes(b"x")
    nb = {"cells": [], "metadata": {"papermill": {"exception": exception}}, "nbformat": 4, "nbformat_minor": 5}
    (out / f"{name}.ipynb").write_text(json.dumps(nb))


def test_the_books_plan_loads_and_names_issue_18s_runs():
    plan = load_plan(PLAN_FILE)
    specs = [s for run in plan for s in run.specs]
    assert len({s.name for s in specs}) == len(specs)
    # issue 18's table: ResNet18, quadratic and learned at 300 epochs for three seeds, the rest on one seed
    by_config = {(r.config, r.overrides): r for r in plan}
    for config in ("paper_resnet18", "paper_quadratic", "paper_learned"):
        assert by_config[(config, ())].seeds == (42, 43, 44) and by_config[(config, ())].epochs == 300
    assert by_config[("paper_quadratic", ("data.val_size=0",))].epochs == 300
    assert {r.config for r in plan if r.epochs == 100} >= {"paper_learned_content", "re_vit", "paper_quadratic_16heads",
                                                             "sasa", "fcvit", "re_gaussian_hier",
                                                             "re_learned2d_withcontent_9heads_hier"}
    assert [r.id for r in plan] == sorted((r.id for r in plan), key=int)  # in the issue's order


def test_the_books_comparison_runs_share_one_rate_setting():
    """Runs 7-11 compare models on one common schedule (issue 18), and the results chapter says they all
    set the rate per batch: per-epoch steps over their short warm-up sent runs 7 and 9 to chance."""
    comparison = [r for r in load_plan(PLAN_FILE) if int(r.id) >= 7]
    assert {r.id for r in comparison} == {"7", "8", "9", "10", "11"}
    steps = {r.config: load(REPO_ROOT / "configs" / f"{r.config}.yaml", list(r.overrides)).train.lr_step
             for r in comparison}
    assert set(steps.values()) == {"step"}, steps
    # the paper configs among them set per-epoch steps themselves: the plan's override is what changes them
    assert load(REPO_ROOT / "configs" / "paper_quadratic_16heads.yaml").train.lr_step == "epoch"


def test_an_entry_expands_into_one_spec_per_seed_named_as_the_campaign_names_runs():
    [run] = parse_plan({"runs": [entry(seeds=[44, 42], overrides=["data.val_size=0"], note="paper protocol")]})
    assert run == PlannedRun("1", "paper_resnet18", 300, (44, 42), ("data.val_size=0",), "paper protocol")
    assert run.specs == (Spec("paper_resnet18", 44, 300, ("data.val_size=0",)),
                         Spec("paper_resnet18", 42, 300, ("data.val_size=0",)))
    assert [s.name for s in run.specs] == ["paper_resnet18_e300_s44_val_size-0", "paper_resnet18_e300_s42_val_size-0"]
    assert all(parse_spec(s.text) == s for s in run.specs)  # the printed specs feed campaign run
    assert run.schedule == "300 epochs, data.val_size=0"


@pytest.mark.parametrize("data, says", [
    ([], "one key, 'runs'"),
    ({"runs": []}, "one key, 'runs'"),
    ({"runs": [entry()], "extra": 1}, "one key, 'runs'"),
    ({"runs": ["paper_resnet18"]}, "entry 1: expected a mapping"),
    ({"runs": [{"id": "1", "config": "paper_resnet18", "seeds": [1]}]}, "entry 1: missing epochs"),
    ({"runs": [entry(seed=[1])]}, "unknown key(s) seed"),
    ({"runs": [entry(seeds=42)]}, "seeds must be a non-empty list"),
    ({"runs": [entry(seeds=[])]}, "seeds must be a non-empty list"),
    ({"runs": [entry(seeds=[-1])]}, "seeds must be a non-empty list"),
    ({"runs": [entry(seeds=[True])]}, "seeds must be a non-empty list"),
    ({"runs": [entry(seeds=[42, 43, 42])]}, "repeat a seed"),
    ({"runs": [entry(epochs="300")]}, "epochs must be an integer"),
    ({"runs": [entry(epochs=0)]}, "the epochs '0' are not a positive integer"),
    ({"runs": [entry(config="paper_resnet")]}, "no config configs/paper_resnet.yaml"),
    ({"runs": [entry(overrides="data.val_size=0")]}, "overrides must be a list"),
    ({"runs": [entry(overrides=["data.val_size=0,train.lr=1"])]}, "overrides must be a list"),
    ({"runs": [entry(overrides=["train.seed=1"])]}, "is not a dotted key=value override"),
    ({"runs": [entry(), entry(id="2", seeds=[43, 42])]}, "entry 2: the run paper_resnet18_e300_s42 is already planned "
                                                          "by entry 1"),
])
def test_bad_plans_are_refused_with_the_entry_and_the_reason(data, says):
    with pytest.raises(CampaignError) as err:
        parse_plan(data, "book/campaign.yaml")
    assert says in str(err.value) and str(err.value).startswith("book/campaign.yaml")


def test_load_plan_errors(tmp_path):
    with pytest.raises(CampaignError, match="cannot read the plan"):
        load_plan(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("runs: [\n")
    with pytest.raises(CampaignError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")


def test_progress_counts_a_seed_done_exactly_when_campaign_run_would_skip_it(tmp_path):
    runs = tmp_path / "runs"
    plan = parse_plan({"runs": [entry(seeds=[42, 43, 44, 45, 46]),
                                entry(id="6", seeds=[42], overrides=["data.val_size=0"])]})
    finished(runs, "paper_resnet18_e300_s42")
    finished(runs, "paper_resnet18_e300_s43", exception=True)  # the notebook failed after training: not done
    finished(runs, "paper_resnet18_e300_s44", status="interrupted", checkpoint=True)  # resumable
    finished(runs, "paper_resnet18_e100_s45")  # another schedule: not this entry's run
    (runs / "paper_resnet18_e300_s46").mkdir()
    with RunLock(runs / "paper_resnet18_e300_s46"):  # a live runner holds it
        rows = progress(plan, runs)
        for run, row in zip(plan, rows):
            assert row["states"] == {s.seed: run_state(runs, s) for s in run.specs}
    assert rows[0]["states"] == {42: "done", 43: "stale", 44: "resume", 45: "new", 46: "busy"}
    assert rows[0]["done"] == [42] and rows[0]["todo"] == [43, 44, 45, 46]
    assert rows[0]["todo_specs"] == ["paper_resnet18:43:300", "paper_resnet18:44:300", "paper_resnet18:45:300",
                                     "paper_resnet18:46:300"]
    # the plain seed-42 run does not count for the data.val_size=0 entry
    assert rows[1]["done"] == [] and rows[1]["todo_specs"] == ["paper_resnet18:42:300:data.val_size=0"]
    lines = progress_lines(rows)
    assert lines[0] == "  1 paper_resnet18 (300 epochs): done seeds 42; to run 43, 44, 45, 46"
    assert lines[1] == "  6 paper_resnet18 (300 epochs, data.val_size=0): done seeds none; to run 42"
    assert lines[-1] == ("to run, in order (5): paper_resnet18:43:300 paper_resnet18:44:300 paper_resnet18:45:300 "
                         "paper_resnet18:46:300 paper_resnet18:42:300:data.val_size=0")
    finished(runs, "paper_resnet18_e300_s42_val_size-0")
    assert progress(plan, runs)[1]["done"] == [42] and progress_lines(progress(plan, runs)[1:])[-1].endswith("nothing")


def test_command_line(tmp_path, capsys):
    plan, runs = tmp_path / "plan.yaml", tmp_path / "runs"
    plan.write_text(yaml.safe_dump({"runs": [entry(seeds=[42, 43], note="why it waits")]}))
    finished(runs, "paper_resnet18_e300_s43")
    assert main(["--plan", str(plan), "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "  1 paper_resnet18 (300 epochs): done seeds 43; to run 42 [why it waits]",
        "to run, in order (1): paper_resnet18:42:300"]
    assert main(["--plan", str(plan), "--runs", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    plan.write_text(yaml.safe_dump({"runs": [entry(seeds=[1, 1])]}))
    assert main(["--plan", str(plan), "--runs", str(runs)]) == 2
    assert "repeat a seed" in capsys.readouterr().err
