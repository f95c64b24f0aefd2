"""satconv.distributed: the world torchrun describes, the split of a global batch over ranks, and the
collectives, run for real on two CPU processes (gloo); data parallelism over those pieces trains the same
weights as one process at the same global batch."""
import json
import os
import socket
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from satconv.config import REPO_ROOT
from satconv.distributed import (SINGLE, DistributedError, World, any_rank, any_ranks, barrier, batch_rows,
                                 check_divisible, gather_objects, start, stop, sum_over_ranks, world_from_env)
from tests.helpers import wait_for_epoch


def test_world_from_env():
    assert world_from_env({}) is SINGLE and world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is SINGLE
    w = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.main, w.parallel) == (3, 4, 1, False, True)
    assert world_from_env({"WORLD_SIZE": "2", "RANK": "0"}) == World(0, 2, 0)  # LOCAL_RANK defaults to RANK
    with pytest.raises(DistributedError, match="RANK is not set"):
        world_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="'x' is not a non-negative integer"):
        world_from_env({"WORLD_SIZE": "x"})
    with pytest.raises(DistributedError, match="need 0 <= rank < size"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_the_ranks_split_a_global_batch_into_its_rows_in_order():
    for size in (1, 2, 4, 5):
        parts = [list(range(100))[batch_rows(100, World(r, size))] for r in range(size)]
        assert sum(parts, []) == list(range(100)) and len({len(p) for p in parts}) == 1
    assert check_divisible(100, World(1, 4)) == 25
    with pytest.raises(DistributedError, match=r"train.batch_size=100 does not split evenly over 3 processes.*"
                                               r"train.batch_size=99 or 102"):
        check_divisible(100, World(0, 3))
    with pytest.raises(DistributedError, match="does not split evenly over 8"):
        batch_rows(100, World(0, 8))


def test_one_process_needs_no_group():
    assert start(SINGLE, torch.device("cpu")) is False
    assert sum_over_ranks([1, 2.5], SINGLE) == [1.0, 2.5] and any_rank(True, SINGLE) and not any_rank(0, SINGLE)
    assert any_ranks([True, 0, False], SINGLE) == [True, False, False]
    assert gather_objects({"a": 1}, SINGLE) == [{"a": 1}]
    barrier(SINGLE)
    stop()  # no group: nothing to leave


# --- two real processes -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def _sgd_steps(model: nn.Module, world: World) -> dict:
    """Three SGD steps (momentum, weight decay) on this rank's rows of the same global batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    for x, y in _batches():
        rows = batch_rows(len(x), world)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    world = world_from_env()
    try:
        assert start(world, torch.device("cpu"))
        sums = sum_over_ranks([rank + 1, 0.5], world)
        anyone = (any_rank(rank == 1, world), any_rank(False, world), *any_ranks([rank == 0, False, True], world))
        gathered = gather_objects({"rank": rank}, world)
        barrier(world)
        model = DistributedDataParallel(_model())  # averages the ranks' gradients
        # plain lists: a tensor sent through the queue lives in this process's shared memory, gone when it exits
        weights = {k.removeprefix("module."): v.tolist() for k, v in _sgd_steps(model, world).items()}
        queue.put((rank, sums, anyone, gathered, weights))
    finally:
        stop()


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one_at_the_same_global_batch():
    """Each of two ranks trains on its half of every global batch with DistributedDataParallel; the weights
    after three SGD steps equal those of one process on the whole batches (float64, to round-off)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _sgd_steps(_model(), SINGLE)
    for rank, sums, anyone, gathered, weights in results:
        assert sums == [3.0, 1.0] and anyone == (True, False, True, False, True)
        assert gathered == [{"rank": 0}, {"rank": 1}]
        for k, v in single.items():
            torch.testing.assert_close(torch.tensor(weights[k], dtype=torch.float64), v, rtol=0, atol=1e-12)
    assert not dist.is_initialized()


# --- a whole run under torchrun -----------------------------------------------------------------------
#: the quick profile on 8x8 synthetic images, no dropout (its draws differ between ranks by design), 2 epochs
#: of 3 steps of 16 images
RUN = ["--config", str(REPO_ROOT / "configs" / "paper_quadratic.yaml"), "--profile", "quick", "--no-progress",
       "--device", "cpu"] + [a for kv in ("data.source=synthetic", "data.synthetic_train=64", "data.synthetic_test=32",
                                          "data.val_size=16", "model.image_size=8", "train.batch_size=16",
                                          "train.eval_batch_size=8", "train.epochs=2", "train.atlas_images=1",
                                          "model.dropout=0", "model.attention.dropout=0", "train.test_every=1")
                             for a in ("--set", kv)]


def _train(out, processes: int, *extra, timeout=240):
    if processes == 1:
        cmd = [sys.executable, "-m", "satconv", "train", "--out", str(out), *RUN, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(_free_port()), "-m", "satconv", "train", "--out", str(out), *RUN, *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})


@pytest.mark.slow
def test_torchrun_with_two_processes_is_the_run_of_one(tmp_path):
    """python -m satconv train under torchrun with 2 CPU processes (gloo) at the same global batch as one process:
    the same epochs in metrics.jsonl, the numbers equal to 1e-6 (float32 sums in another order), the final weights
    to 1e-5; rank 0 alone writes the directory, and run.json and metrics.jsonl say how many processes trained."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        done = _train(out, n)
        assert done.returncode == 0, done.stdout + done.stderr
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["epoch"] for r in rows[0]] == [r["epoch"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):
        assert b["world_size"] == 2 and "world_size" not in a
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    wa, wb = (torch.load(d / "last.pt", weights_only=True) for d in (one, two))
    assert wb["world_size"] == 2 and len(wb["rng_ranks"]) == 2
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=1e-5, atol=1e-5)
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "completed" and info["processes"]["world_size"] == 2
    assert len(info["processes"]["devices"]) == 2 and "processes" not in json.loads((one / "run.json").read_text())


@pytest.mark.slow
def test_torchrun_refuses_what_it_cannot_do(tmp_path):
    """A global batch that does not split over the processes is refused before anything trains, and so is an epoch
    whose shorter last batch does not; so is resuming a run with another number of processes."""
    bad = _train(tmp_path / "odd", 2, "--set", "train.batch_size=15")
    assert bad.returncode != 0 and "train.batch_size=15 does not split evenly over 2 processes" in bad.stderr
    assert not (tmp_path / "odd" / "last.pt").exists()
    short = _train(tmp_path / "short", 2, "--set", "data.synthetic_train=57")  # 41 images: a last batch of 9
    assert short.returncode != 0 and "the epoch's last batch holds 9 images (41 training images" in short.stderr
    done = _train(tmp_path / "run", 1)
    assert done.returncode == 0, done.stderr
    again = _train(tmp_path / "run", 2)
    assert again.returncode != 0 and "resume with the same number" in again.stderr, again.stderr


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun child (of ``parent``) whose environment says RANK=``rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if _parent_of(stat) != parent:
            continue
        try:
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_rerun_resumes(tmp_path):
    """SIGKILL one rank mid-run: torchrun ends the job (non-zero); the same command then resumes from the last
    checkpoint rank 0 wrote and completes every epoch, with the metrics of an uninterrupted run."""
    out, epochs = tmp_path / "run", ["--set", "train.epochs=40", "--set", "data.synthetic_train=32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "satconv", "train", "--out", str(out), *RUN, *epochs]
    job = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    wait_for_epoch(job, out, 3, timeout=120)
    victim = _rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, job.stdout.read() if job.poll() is not None else "no rank 1"
    os.kill(victim, signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    before = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 0 < before < 40
    again = _train(out, 2, *epochs, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    whole = _train(tmp_path / "whole", 2, *epochs, timeout=600)
    assert whole.returncode == 0, whole.stderr
    reference = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, reference):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["epoch"], key)


@pytest.mark.slow
def test_the_notebook_route_trains_on_two_processes(tmp_path, capsys):
    """satconv.torchrun.train_processes (chapters/train.py's ``processes`` parameter) runs the torchrun job, relays
    its output and returns the run as train() would; bad arguments are refused before anything starts."""
    from satconv.distributed import DistributedError
    from satconv.torchrun import torchrun_command, train_processes

    sets = [RUN[i + 1] for i, flag in enumerate(RUN) if flag == "--set"]
    config = str(REPO_ROOT / "configs" / "paper_quadratic.yaml")
    result = train_processes(config, sets, "quick", tmp_path / "run", processes=2, device="cpu")
    assert result.completed and result.run_dir == tmp_path / "run" and [m["epoch"] for m in result.metrics] == [1, 2]
    assert result.results["final"]["test_acc"] is not None and result.config.train.epochs == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["processes"]["world_size"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        torchrun_command(config, sets, "quick", tmp_path / "x", processes=1)
    with pytest.raises(DistributedError, match="does not split evenly over 3 processes"):
        torchrun_command(config, sets, "quick", tmp_path / "x", processes=3)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_ddp_times_the_step_on_each_number_of_processes(tmp_path):
    """python -m satconv bench --ddp 1 2 on the CPU: one row per N with the global batch split over the ranks,
    images/s from the slowest rank's median step, the efficiency against N = 1; a batch that does not split is
    refused before any job starts.  (CPU ranks share two cores: the mechanics, not the speed.)"""
    from satconv.bench.cli import bench_main

    out = tmp_path / "ddp.jsonl"
    args = ["--config", str(REPO_ROOT / "configs" / "paper_quadratic.yaml"), "--profile", "quick", "--device", "cpu",
            "--set", "model.image_size=8", "--warmup", "1", "--repeats", "3", "--out", str(out)]
    assert bench_main(["--ddp", "1", "2", "--batch", "16", *args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["processes"], r["per_rank_batch"], len(r["devices"])) for r in rows] == [(1, 16, 1), (2, 8, 2)]
    for r in rows:
        assert r["img_s"] == pytest.approx(16 / r["step_s"]) and r["step_s"] > 0
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["img_s"] / (2 * rows[0]["img_s"]))
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--ddp", "1", "3", "--batch", "16", *args])
    assert exit_.value.code == 2 and len(out.read_text().splitlines()) == 2


def test_a_short_last_batch_must_split_too():
    from satconv.distributed import check_last_batch

    check_last_batch(45000, 100, World(0, 4))  # no short batch
    check_last_batch(41, 16, World(0, 3))  # a last batch of 9
    check_last_batch(41, 16, SINGLE)
    with pytest.raises(DistributedError, match=r"last batch holds 9 images \(41 training images, "
                                               r"train.batch_size=16\), which do not split evenly over 2"):
        check_last_batch(41, 16, World(1, 2))


#: a Python process that trains through satconv.torchrun.train_processes and exits 128 + signum when stopped
_NOTEBOOK_ROUTE = """
import sys
from satconv.rundir import Interrupted
from satconv.torchrun import train_processes
try:
    result = train_processes(sys.argv[1], sys.argv[3:], "quick", sys.argv[2], processes=2, device="cpu")
except Interrupted as exc:
    print(f"INTERRUPTED {exc.signum}: {exc}", flush=True)
    sys.exit(128 + exc.signum)
print(f"COMPLETED {result.completed} {len(result.metrics)}", flush=True)
"""


@pytest.mark.slow
def test_sigterm_to_the_notebook_route_reaches_every_rank_and_the_same_call_resumes(tmp_path):
    """SIGTERM to the process running train_processes (papermill's kernel, a batch scheduler's job) is passed on to
    the torchrun job: the ranks checkpoint mid-run and stop, the caller gets Interrupted (exit 143 here), no rank is
    left running, and the same call resumes from the checkpoint and completes every epoch once."""
    sets = [RUN[i + 1] for i, flag in enumerate(RUN) if flag == "--set"] + ["train.epochs=40",
                                                                             "data.synthetic_train=32"]
    out, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    cmd = [sys.executable, "-c", _NOTEBOOK_ROUTE, str(REPO_ROOT / "configs" / "paper_quadratic.yaml"), str(out), *sets]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    job = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wait_for_epoch(job, out, 2, timeout=120)
    torchrun = next((int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                     if _parent_of(p) == job.pid), None)
    ranks = [_rank_pid(torchrun, r) for r in (0, 1)] if torchrun else []
    assert job.poll() is None and len(ranks) == 2 and None not in ranks, job.stdout.read() if job.poll() else ranks
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 143, output
    assert f"INTERRUPTED {int(signal.SIGTERM)}: the torchrun job was stopped" in output
    for pid in ranks:  # every rank has ended (a zombie reaped by torchrun or gone)
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    stopped = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 0 < stopped < 40 and json.loads((out / "run.json").read_text())["status"] != "completed"
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "COMPLETED True 40" in again.stdout, again.stdout + again.stderr
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(1, 41))


def _parent_of(stat: Path) -> int | None:
    """The parent pid in a ``/proc/<pid>/stat`` file, ``None`` when it is gone or unreadable."""
    try:
        return int(stat.read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None
