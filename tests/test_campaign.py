"""satconv.campaign: spec checks, a real papermill run on the CPU (skipped and tidied on the second
call), stopping a run by signal, status lines, pack (no checkpoints, locks or temporary files; size cap)
and install (round trip, no overwrite without --replace, no unsafe members)."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from satconv import campaign
from satconv.campaign import CampaignError, Spec, main, override_slug, parse_spec, validate
from satconv.config import REPO_ROOT
from satconv.rundir import RunLock


# --- specs ------------------------------------------------------------------------------------
def test_parse_spec():
    spec = parse_spec("paper_quadratic:42:300:train.compile_mode=reduce-overhead,train.lr=0.2")
    assert spec == Spec("paper_quadratic", 42, 300, ("train.compile_mode=reduce-overhead", "train.lr=0.2"))
    assert spec.name == "paper_quadratic_e300_s42_compile_mode-reduce-overhead_lr-0.2"
    assert spec.overrides("train.precision=bf16") == ["train.precision=bf16", "train.seed=42", "train.epochs=300",
                                                      "train.compile_mode=reduce-overhead", "train.lr=0.2"]
    assert parse_spec("paper_resnet18:0:1") == Spec("paper_resnet18", 0, 1)
    assert parse_spec("paper_resnet18:0:1").name == "paper_resnet18_e1_s0"
    assert spec.text == "paper_quadratic:42:300:train.compile_mode=reduce-overhead,train.lr=0.2"  # parse's input
    assert parse_spec("paper_resnet18:0:1").text == "paper_resnet18:0:1"


def test_a_variant_never_shares_the_plain_runs_folder():
    """A spec's own overrides name its run: ``data.val_size=0`` must not land in (or be skipped as) the
    folder of the plain run of the same config, seed and schedule."""
    plain, variant = parse_spec("paper_resnet18:42:300"), parse_spec("paper_resnet18:42:300:data.val_size=0")
    assert (plain.name, variant.name) == ("paper_resnet18_e300_s42", "paper_resnet18_e300_s42_val_size-0")
    assert override_slug(["train.init_from=runs/gpu/a b", "model.x.y=1"]) == "init_from-runs-gpu-a-b_y-1"
    long = ["train.init_from=runs/gpu/paper_quadratic_anisotropic_e300_s42", "train.lr=0.01"]
    expected = "x" + hashlib.sha1(",".join(long).encode()).hexdigest()[:10]
    assert override_slug(long) == expected and len(expected) == 11
    assert override_slug(long) != override_slug(long[:1])


@pytest.mark.parametrize("text, says", [
    ("no_such_config:1:10", "no config configs/no_such_config.yaml"),
    ("../configs/paper_resnet18:1:10", "no config"),
    ("paper_resnet18:x:10", "seed 'x' is not a non-negative integer"),
    ("paper_resnet18:-1:10", "seed '-1'"),
    ("paper_resnet18:1:0", "epochs '0' are not a positive integer"),
    ("paper_resnet18:1:ten", "epochs 'ten'"),
    ("paper_resnet18:1", "expected config:seed:epochs"),
    ("paper_resnet18:1:10:lr", "'lr' is not a dotted key=value override"),
    ("paper_resnet18:1:10:train.seed=3", "other than train.seed and train.epochs"),
])
def test_parse_spec_errors(text, says):
    with pytest.raises(CampaignError, match="bad spec") as err:
        parse_spec(text)
    assert says in str(err.value)


def test_validate_checks_everything_before_anything_starts(tmp_path, capsys):
    with pytest.raises(CampaignError, match="train.no_such_key"):
        validate(["paper_resnet18:1:1", "paper_resnet18:2:1:train.no_such_key=1"], "synthetic")
    with pytest.raises(CampaignError, match="must be > 0"):
        validate(["paper_resnet18:1:1"], "synthetic", common="train.lr=-1")
    with pytest.raises(CampaignError, match="are both the run paper_resnet18_e1_s1_lr-0.2"):
        validate(["paper_resnet18:1:1:train.lr=0.2", "paper_resnet18:1:1:train.lr=0.2"], "synthetic")
    with pytest.raises(CampaignError, match="no such directory"):
        validate(["paper_resnet18:1:1"], str(tmp_path / "missing"))
    out = tmp_path / "runs"
    assert main(["run", "--data", "synthetic", "--out", str(out), "paper_resnet18:1:1", "nope:1:1"]) == 2
    assert "no config configs/nope.yaml" in capsys.readouterr().err
    assert not out.exists()  # nothing started, not even the folder


def test_dry_run_prints_the_papermill_commands(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "runs"
    assert main(["run", "--data", str(images), "--out", str(out), "--dry-run", "paper_resnet18:42:300",
                 "paper_quadratic:1:30:train.compile_mode=reduce-overhead"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" ", 2)[2] == (
        f"[1/2] paper_resnet18_e300_s42: new: {sys.executable} -m papermill --log-output chapters/train.ipynb "
        f"{out}/paper_resnet18_e300_s42.ipynb -k python3 -p config configs/paper_resnet18.yaml -r profile '' "
        f"-r data {images} -r output_dir {out}/paper_resnet18_e300_s42 -r overrides 'train.precision=bf16 "
        f"train.compile=true train.eval_batch_size=100 train.seed=42 train.epochs=300'")
    assert lines[1].endswith("'train.precision=bf16 train.compile=true train.eval_batch_size=100 train.seed=1 "
                             "train.epochs=30 train.compile_mode=reduce-overhead'")
    assert not out.exists()
    assert main(["run", "--data", str(images), "--out", str(out), "--dry-run", "--processes", "4",
                 "paper_resnet18:42:300"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("train.seed=42 train.epochs=300' -p processes 4")
    assert main(["run", "--data", str(images), "--out", str(out), "--dry-run", "--processes", "3",
                 "paper_resnet18:42:300"]) == 2  # batch 100 does not split over 3 GPUs
    assert "train.batch_size=100 does not split evenly over 3 processes" in capsys.readouterr().err


def test_second_runner_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    with RunLock(out):
        assert main(["run", "--data", "synthetic", "--out", str(out), "paper_resnet18:1:1"]) == 2
    assert "in use by another process" in capsys.readouterr().err


# --- the real thing, on the CPU -----------------------------------------------------------------
def _campaign(*args, timeout):
    return subprocess.run([sys.executable, "-m", "satconv.campaign", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_run_end_to_end_then_skip(tmp_path):
    """papermill executes chapters/train.ipynb twice (quick profile, generated images; ~30-50 s on 2 CPUs):
    a run that fails inside the notebook, then one that completes without a validation split (data.val_size=0,
    the paper's protocol); a second call skips the latter."""
    out = tmp_path / "runs"
    args = ["run", "--profile", "quick", "--data", "synthetic", "--overrides", "", "--out", str(out)]
    done = _campaign(*args, "paper_resnet18:1:1:data.val_size=100000", "paper_quadratic:3:1:data.val_size=0",
                     timeout=150)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[1/2] paper_resnet18_e1_s1_val_size-100000: FAILED" in done.stdout
    assert "going on with the next spec" in done.stdout
    assert "data.val_size=100000 must be smaller" in (out / "paper_resnet18_e1_s1_val_size-100000.log").read_text()
    assert "[2/2] paper_quadratic_e1_s3_val_size-0: starting" in done.stdout and "done after" in done.stdout
    assert "1 of 2 runs fine; FAILED or not run: paper_resnet18_e1_s1_val_size-100000" in done.stdout
    run_dir, nb_path = out / "paper_quadratic_e1_s3_val_size-0", out / "paper_quadratic_e1_s3_val_size-0.ipynb"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["atlas.pt"]  # last/best/last.prev.pt removed
    assert sorted(p.name for p in (run_dir / "snapshots").glob("*.pt")) == ["epoch_0000.pt", "epoch_0001.pt"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (cfg["train"]["seed"], cfg["train"]["epochs"], cfg["data"]["source"]) == (3, 1, "synthetic")
    nb = json.loads(nb_path.read_text())
    assert "jupytext" not in nb["metadata"] and not nb["metadata"]["papermill"]["exception"]
    assert nb["metadata"]["papermill"]["parameters"]["output_dir"] == str(run_dir)
    sizes = json.loads((run_dir / "run.json").read_text())["data"]["sizes"]
    assert sizes["val"] == 0 and sizes["train"] > 0
    assert "".join(nb["cells"][0]["source"]).split("\n")[0] == (
        f"# Run: paper_quadratic, seed 3, 1 epochs (config: 300), all {sizes['train']:,} training images")
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "| final | 1 | none (no validation split) |" in shown  # no best-on-validation row either
    assert "best on validation" not in shown
    assert "Executing notebook" in (out / "paper_quadratic_e1_s3_val_size-0.log").read_text()
    before = nb_path.stat().st_mtime_ns
    again = _campaign(*args, "paper_quadratic:3:1:data.val_size=0", timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "completed earlier, skipped" in again.stdout and "starting" not in again.stdout
    assert nb_path.stat().st_mtime_ns == before  # already tidied: left as it was


# --- stopping -----------------------------------------------------------------------------------
FAKE_PAPERMILL = """
import subprocess, sys
kernel = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
sys.exit(1 if kernel.wait() else 0)
"""
FAKE_KERNEL = """
import os, signal, sys, time, pathlib
marker, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
def handler(signum, frame):
    marker.write_text(f"got {signum} {os.getpid()}")
    if mode == "cooperative":
        sys.exit(3)
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
marker.write_text(f"ready {os.getpid()}")
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("mode, signum", [("cooperative", signal.SIGTERM), ("cooperative", signal.SIGINT),
                                          ("stubborn", signal.SIGTERM)])
def test_signal_reaches_the_kernel_then_stops_everything(tmp_path, monkeypatch, capsys, mode, signum):
    """The kernel (its own session, as jupyter_client starts it) gets the signal first; one that keeps
    running past the grace period is killed; the runner exits 128 + signum."""
    marker = tmp_path / "marker"
    fake = [sys.executable, "-c", FAKE_PAPERMILL, FAKE_KERNEL, str(marker), mode]
    monkeypatch.setattr(campaign, "papermill_command", lambda *a, **k: fake)
    monkeypatch.setattr(campaign, "KILL_AFTER", 1.0)

    def send():
        for _ in range(400):
            if marker.is_file() and marker.read_text().startswith("ready"):
                break
            time.sleep(0.025)
        os.kill(os.getpid(), signum)

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    threading.Thread(target=send, daemon=True).start()
    t0 = time.monotonic()
    rc = main(["run", "--data", "synthetic", "--overrides", "", "--grace", "1", "--out", str(tmp_path / "runs"),
               "paper_resnet18:1:1", "paper_resnet18:2:1"])
    assert rc == 128 + signum
    text, pid = marker.read_text().rsplit(" ", 1)
    assert text == f"got {signum}"
    assert not campaign._alive(int(pid))
    assert time.monotonic() - t0 < 20
    printed = capsys.readouterr().out
    assert f"{signal.Signals(signum).name}: stopping the current run" in printed and "[2/2]" not in printed
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before  # main restored them


# --- run directories without papermill ----------------------------------------------------------
def fake_run(out, name, status="completed", planned=10, epochs=3, config="paper_resnet18"):
    d = out / name
    (d / "snapshots").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": config, "train": {"epochs": planned, "seed": 1}}))
    (d / "run.json").write_text(json.dumps({"status": status, "seed": 1}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e + 1, "val_acc": 0.5 + e / 100, "test_acc": 0.4 if e == 0 else None, "epoch_time_s": 6.0 * (e + 1)})
        + "\n" for e in range(epochs)))
    for f in ("last.pt", "last.prev.pt", "best.pt", "atlas.pt", "snapshots/epoch_0000.pt", ".lock",
              ".last.pt.tmp-123", "snapshots/.epoch_0001.pt.tmp-9"):
        (d / f).write_bytes(b"x" * 100)
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Training a model\n", "\n", "text"]}],
          "metadata": {"jupytext": {"formats": "ipynb,py:percent"}, "papermill": {"exception": None}},
          "nbformat": 4, "nbformat_minor": 5}
    (out / f"{name}.ipynb").write_text(json.dumps(nb))
    (out / f"{name}.log").write_text("log\n")
    return d


def test_status_lines(tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "paper_resnet18_e10_s1", status="running")
    fake_run(out, "paper_resnet18_e10_s2", status="running")
    fake_run(out, "paper_resnet18_e3_s1", planned=3)
    with RunLock(out / "paper_resnet18_e10_s1"):
        assert main(["status", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "runner: none",
        # running: 7 epochs left at (6+12+18)/3 = 12 s each
        "paper_resnet18_e10_s1: running, epochs 3/10, val_acc 0.5200, test_acc 0.4000, 12.0 s/epoch, ETA 1.4 min",
        "paper_resnet18_e10_s2: died, epochs 3/10, val_acc 0.5200, test_acc 0.4000, 12.0 s/epoch, ETA 1.4 min",
        "paper_resnet18_e3_s1: completed, epochs 3/3, val_acc 0.5200, test_acc 0.4000, 12.0 s/epoch"]
    with RunLock(out):
        assert campaign.status_lines(out)[0].startswith(f"runner: pid {os.getpid()}, started ")


def test_run_tidies_a_completed_run_and_refuses_a_stale_one(tmp_path, monkeypatch, capsys):
    """A completed run whose runner stopped before tidying it is tidied, not rerun; a completed run
    without notebook or checkpoint is not rerun (it would start over)."""
    monkeypatch.setattr(campaign, "papermill_command", lambda *a, **k: pytest.fail("must not start papermill"))
    out = tmp_path / "runs"
    done = fake_run(out, "paper_resnet18_e10_s1")
    stale = fake_run(out, "paper_resnet18_e10_s2")
    for f in ("last.pt", "last.prev.pt", "best.pt"):
        (stale / f).unlink()
    (out / "paper_resnet18_e10_s2.ipynb").unlink()
    assert main(["run", "--data", "synthetic", "--out", str(out), "paper_resnet18:1:10", "paper_resnet18:2:10"]) == 1
    printed = capsys.readouterr().out
    assert "[1/2] paper_resnet18_e10_s1: completed earlier, skipped" in printed
    assert "[2/2] paper_resnet18_e10_s2: NOT RUN: completed, but its notebook is missing" in printed
    assert sorted(p.name for p in done.glob("*.pt")) == ["atlas.pt"]
    assert (done / "snapshots" / "epoch_0000.pt").is_file()
    nb = json.loads((out / "paper_resnet18_e10_s1.ipynb").read_text())
    assert "jupytext" not in nb["metadata"]
    heading, rest = "".join(nb["cells"][0]["source"]).split("\n", 1)
    assert heading.startswith("# Run: paper_resnet18, seed 1, 3 epochs of 10") and rest == "\ntext"


def test_keep_checkpoints_leaves_last_pt_for_a_later_init_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(campaign, "papermill_command", lambda *a, **k: pytest.fail("must not start papermill"))
    out = tmp_path / "runs"
    done = fake_run(out, "paper_resnet18_e10_s1")
    assert main(["run", "--data", "synthetic", "--out", str(out), "--keep-checkpoints", "paper_resnet18:1:10"]) == 0
    assert sorted(p.name for p in done.glob("*.pt")) == sorted(["atlas.pt", "best.pt", "last.pt", "last.prev.pt"])
    assert "# Run: paper_resnet18" in "".join(json.loads((out / "paper_resnet18_e10_s1.ipynb").read_text())
                                               ["cells"][0]["source"])
    assert main(["run", "--data", "synthetic", "--out", str(out), "paper_resnet18:1:10"]) == 0  # now tidied
    assert sorted(p.name for p in done.glob("*.pt")) == ["atlas.pt"]


# --- pack and install ---------------------------------------------------------------------------
def _members(archive):
    with tarfile.open(archive) as tar:
        return sorted(m.name for m in tar.getmembers())


def test_pack_leaves_out_checkpoints_locks_and_unfinished_runs(tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "a_e3_s1", planned=3)
    fake_run(out, "b_e10_s1", status="running")  # died
    busy = fake_run(out, "c_e3_s1", planned=3)
    archive = tmp_path / "campaign.tar.gz"
    with RunLock(busy):  # completed, but a process is writing it again
        assert main(["pack", "--out", str(out), str(archive)]) == 0
    assert "campaign.tar.gz: 0.00 MiB, 1 runs: a_e3_s1" in capsys.readouterr().out
    assert _members(archive) == ["a_e3_s1", "a_e3_s1.ipynb", "a_e3_s1.log", "a_e3_s1/atlas.pt", "a_e3_s1/config.yaml",
                                 "a_e3_s1/metrics.jsonl", "a_e3_s1/run.json", "a_e3_s1/snapshots",
                                 "a_e3_s1/snapshots/epoch_0000.pt"]


def test_pack_respects_max_size(tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "a_e3_s1", planned=3)
    (out / "a_e3_s1" / "atlas.pt").write_bytes(os.urandom(3 * 2**20))  # incompressible
    archive = tmp_path / "campaign.tar.gz"
    assert main(["pack", "--out", str(out), "--max-mib", "2", str(archive)]) == 2
    assert "over --max-mib 2; nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert main(["pack", "--out", str(out), "--max-mib", "4", str(archive)]) == 0
    assert main(["pack", "--out", str(tmp_path / "nowhere"), str(archive)]) == 2


def test_install_round_trip_and_refusals(tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "a_e3_s1", planned=3)
    fake_run(out, "b_e3_s1", planned=3)
    archive = tmp_path / "campaign.tar.gz"
    assert main(["pack", "--out", str(out), str(archive)]) == 0
    book = REPO_ROOT / "_build" / "test-campaign-install" / str(os.getpid())
    try:
        assert main(["install", "--out", str(book), str(archive)]) == 0
        printed = capsys.readouterr().out.splitlines()
        rel = book.relative_to(REPO_ROOT).as_posix()
        assert printed[-2:] == [f"      - file: {rel}/a_e3_s1", f"      - file: {rel}/b_e3_s1"]
        for f in ("a_e3_s1.ipynb", "a_e3_s1.log", "a_e3_s1/metrics.jsonl", "a_e3_s1/atlas.pt"):
            assert (book / f).read_bytes() == (out / f).read_bytes()
        assert not (book / "a_e3_s1" / "last.pt").exists() and not (book / "a_e3_s1" / ".lock").exists()
        (book / "a_e3_s1" / "metrics.jsonl").write_text("changed\n")
        (book / "a_e3_s1" / "extra.txt").write_text("left over\n")
        assert main(["install", "--out", str(book), str(archive)]) == 2
        assert "already holds a_e3_s1, a_e3_s1.ipynb" in capsys.readouterr().err
        assert (book / "a_e3_s1" / "metrics.jsonl").read_text() == "changed\n"
        assert main(["install", "--out", str(book), "--replace", str(archive)]) == 0
        assert (book / "a_e3_s1" / "metrics.jsonl").read_bytes() == (out / "a_e3_s1" / "metrics.jsonl").read_bytes()
        assert not (book / "a_e3_s1" / "extra.txt").exists()
    finally:
        import shutil
        shutil.rmtree(book.parent, ignore_errors=True)


def test_pack_cuts_a_large_archive_into_parts_that_install_joins(tmp_path, capsys):
    """Over --part-mib: parts of at most that size and a manifest, and no whole archive (a GPU call returns files
    of at most 16 MiB); install takes the archive's name and joins them; a missing part installs nothing."""
    out = tmp_path / "runs"
    fake_run(out, "a_e3_s1", planned=3)
    (out / "a_e3_s1" / "atlas.pt").write_bytes(os.urandom(int(2.5 * 2**20)))  # incompressible
    archive = tmp_path / "campaign.tar.gz"
    archive.write_bytes(b"an older whole archive")
    assert main(["pack", "--out", str(out), "--part-mib", "1", str(archive)]) == 0
    assert "in 3 parts: campaign.tar.gz.part00, campaign.tar.gz.part01, campaign.tar.gz.part02, " \
           "campaign.tar.gz.parts" in capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["campaign.tar.gz.part00", "campaign.tar.gz.part01", "campaign.tar.gz.part02",
                     "campaign.tar.gz.parts", "runs"]
    assert all((tmp_path / n).stat().st_size <= 2**20 for n in names[:3])
    book = tmp_path / "book"
    assert main(["install", "--out", str(book), str(archive)]) == 0
    assert (book / "a_e3_s1" / "atlas.pt").read_bytes() == (out / "a_e3_s1" / "atlas.pt").read_bytes()
    (tmp_path / "campaign.tar.gz.part01").unlink()
    assert main(["install", "--out", str(tmp_path / "book2"), str(archive)]) == 2
    assert "its part campaign.tar.gz.part01 is missing" in capsys.readouterr().err
    assert not (tmp_path / "book2").exists()
    # a small archive is one file again, and the old manifest goes
    (out / "a_e3_s1" / "atlas.pt").write_bytes(b"x")
    assert main(["pack", "--out", str(out), "--part-mib", "1", str(archive)]) == 0
    assert archive.is_file() and not (tmp_path / "campaign.tar.gz.parts").exists()
    assert main(["install", "--out", str(tmp_path / "nowhere-else"), str(tmp_path / "none.tar.gz")]) == 2
    assert "no such file, and no manifest none.tar.gz.parts" in capsys.readouterr().err


def test_install_refuses_unsafe_members(tmp_path, capsys):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    assert main(["install", "--out", str(tmp_path / "book"), str(evil)]) == 2
    assert "refusing its member '../outside.txt'" in capsys.readouterr().err
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "book").exists()
    (tmp_path / "not.tar.gz").write_text("not an archive")
    assert main(["install", "--out", str(tmp_path / "book"), str(tmp_path / "not.tar.gz")]) == 2
    assert main(["install", "--out", str(tmp_path / "book"), str(tmp_path / "missing.tar.gz")]) == 2
    assert not (tmp_path / "book").exists()
