"""Data-parallel training across processes started by ``torchrun``: which process this is, and the few
collective operations a run needs (issue 21).

``torchrun --nproc_per_node N`` starts N copies of a command and tells each, through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), where it stands.  A data-parallel
run is meant to be the *same experiment* as one process at the same global batch:

* the global batch stays ``train.batch_size``: every rank draws the same batch indices and the same random
  numbers of the augmentation (a function of the seed and the epoch, not of N), then gathers, augments and
  trains on its own contiguous slice of the rows only, :func:`batch_rows`
  (:meth:`satconv.augmentation.DeviceLoader.batch`'s ``rows``); a batch that does not divide by N is refused
  (:func:`check_divisible`);
* the gradients are averaged over the ranks (each rank's loss is the mean over its equal slice, so the
  average of the ranks' gradients is the gradient of the global batch's mean loss);
* the epoch's sums (loss, correct predictions, images) are added over the ranks (:func:`sum_over_ranks`);
* a stop asked of any rank stops all of them at the same step, and so does a non-finite loss on any rank
  (:func:`any_ranks`: one all-reduce for both).

One process (``WORLD_SIZE`` unset or 1) is :data:`SINGLE`, and every function here is then the identity or
a no-op: the single-process path stays exactly what it was.
"""
from __future__ import annotations

import inspect
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Sequence

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A data-parallel setting that cannot work (a bad environment, a batch that does not divide)."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks of one run.

    Attributes:
        rank: this process's index, ``0 <= rank < size`` (``RANK``).
        size: how many processes train the model (``WORLD_SIZE``).
        local_rank: its index on its machine (``LOCAL_RANK``): the CUDA device it uses.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise DistributedError(f"rank {self.rank}, local rank {self.local_rank} of a world of {self.size} "
                                   f"processes: need 0 <= rank < size and local rank >= 0")

    @property
    def main(self) -> bool:
        """The rank that writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """More than one process."""
        return self.size > 1


SINGLE = World()


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The :class:`World` that ``torchrun`` describes in ``env`` (``os.environ`` by default); :data:`SINGLE`
    without ``WORLD_SIZE``.

    Raises:
        DistributedError: a variable that is not a non-negative integer, or ``RANK`` missing in a world of
            several processes.
    """
    env = os.environ if env is None else env

    def read(name: str, default: int | None) -> int:
        text = env.get(name)
        if text is None or text == "":
            if default is None:
                raise DistributedError(f"WORLD_SIZE is {env.get('WORLD_SIZE')} but {name} is not set: start the "
                                       f"processes with torchrun, which sets both")
            return default
        if not text.isdigit():
            raise DistributedError(f"{name}={text!r} is not a non-negative integer")
        return int(text)

    size = read("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    rank = read("RANK", None)
    return World(rank=rank, size=size, local_rank=read("LOCAL_RANK", rank))


def start(world: World, device: torch.device) -> bool:
    """Join the process group of a parallel ``world`` (``nccl`` on CUDA, ``gloo`` on the CPU), through the
    ``MASTER_ADDR``/``MASTER_PORT`` rendezvous ``torchrun`` sets.  Returns whether this call created it
    (``False``: one process, or a group that already exists)."""
    if not world.parallel or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    return True


def stop() -> None:
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(batch_size: int, world: World, key: str = "train.batch_size") -> int:
    """The per-rank share of a global batch.

    Returns:
        ``batch_size // world.size``.

    Raises:
        DistributedError: ``batch_size`` is not a multiple of the number of processes (the message says which
            sizes would do).
    """
    if batch_size % world.size:
        lower = batch_size - batch_size % world.size
        raise DistributedError(f"{key}={batch_size} does not split evenly over {world.size} processes: the global "
                               f"batch is kept and divided among them; use a multiple of {world.size}, e.g. "
                               f"{key}={lower or world.size} or {lower + world.size}, or another number of processes")
    return batch_size // world.size


def check_last_batch(images: int, batch_size: int, world: World) -> None:
    """Refuse an epoch of ``images`` whose shorter last batch (``images % batch_size``) does not split evenly over
    the ranks (each rank's loss is the mean over an equal share: that is what makes DDP's average right).

    Raises:
        DistributedError: saying how many images the last batch holds.
    """
    last = images % batch_size
    if world.parallel and last % world.size:
        raise DistributedError(f"the epoch's last batch holds {last} images ({images} training images, "
                               f"train.batch_size={batch_size}), which do not split evenly over {world.size} "
                               f"processes; change data.val_size or train.batch_size so that they do")


def batch_rows(rows: int, world: World) -> slice:
    """This rank's contiguous rows of a global batch of ``rows`` (``rows`` divisible by ``world.size``): rank
    ``r`` of ``N`` takes ``[r * rows / N, (r + 1) * rows / N)``, so that the ranks together hold every row once,
    in order.  Raises :class:`DistributedError` when ``rows`` does not divide."""
    share = check_divisible(rows, world, key="the batch")
    return slice(world.rank * share, (world.rank + 1) * share)


def sum_over_ranks(values: Sequence[float], world: World, device: torch.device | str = "cpu") -> list[float]:
    """``values`` added element-wise over the ranks (float64), in one all-reduce; themselves in one process."""
    if not world.parallel:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, world: World, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce of one number); ``flag`` itself in one process."""
    return any_ranks([flag], world, device)[0]


def any_ranks(flags: Sequence[bool], world: World, device: torch.device | str = "cpu") -> list[bool]:
    """For each of ``flags``, whether it is true on any rank, in one all-reduce of ``len(flags)`` numbers (every
    rank passes as many, in the same order); the flags themselves in one process."""
    if not world.parallel:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (per-rank random states for a
    checkpoint); ``[obj]`` in one process."""
    if not world.parallel:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: torch.nn.Module, world: World, device: torch.device, step_graph: bool = False):
    """The module that trains ``model`` in ``world``: ``model`` itself in one process; otherwise its BatchNorm
    layers made :class:`torch.nn.SyncBatchNorm` (statistics of the global batch) and the whole wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged over the ranks).

    Returns:
        ``(model, trainer)``: the (converted) bare model, for evaluation, snapshots and checkpoints, and the
        module whose forward the training step calls.

    Raises:
        DistributedError: ``train.step_graph`` (a CUDA graph of the whole step cannot hold the all-reduce yet;
            set ``train.step_graph=false``), or a BatchNorm model on the CPU (``SyncBatchNorm`` runs on CUDA only).
    """
    if not world.parallel:
        return model, model
    if step_graph and device.type == "cuda":
        raise DistributedError("train.step_graph=true cannot run on several processes (its CUDA graph would have "
                               "to hold the gradients' all-reduce); add --set train.step_graph=false")
    batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if any(isinstance(m, batch_norms) for m in model.modules()):
        if device.type != "cuda":
            raise DistributedError("a model with BatchNorm trains on several processes only on CUDA (SyncBatchNorm "
                                   "keeps the global batch's statistics, and runs on CUDA only); use one process")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    # no buffer broadcast before each forward: the buffers are position caches that a layer may create lazily
    # (rank 0 alone runs the snapshots' forward passes, so the ranks' buffer lists may differ) and SyncBatchNorm's
    # running statistics, already those of the global batch on every rank
    # (newer torch versions name the switch forward_sync_buffers; both still broadcast the buffers once, at the start)
    named = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **{"forward_sync_buffers" if named else "broadcast_buffers": False})


@contextmanager
def main_rank_opens(world: World, prepare: Callable[[], Path], lock: Callable[[Path], ContextManager]):
    """Rank 0 prepares the run directory (``prepare() -> Path``) and holds ``lock(path)`` for the block; the
    other ranks wait for it and get the same path.  A failure on rank 0 (a busy or bad directory) is raised
    there and reported on the other ranks as :class:`DistributedError`, so that no rank waits forever.

    Yields:
        The run directory.
    """
    if not world.parallel:
        path = prepare()
        with lock(path):
            yield path
        return
    with ExitStack() as stack:
        error, path = None, None
        if world.main:
            try:
                path = prepare()
                stack.enter_context(lock(path))
            except Exception as exc:  # shared with the other ranks below, then raised here
                error = exc
        failed = any_rank(error is not None, world)
        path = gather_objects(None if path is None else str(path), world)[0]
        if error is not None:
            raise error
        if failed:
            raise DistributedError("rank 0 could not open the run directory (its error says why)")
        yield Path(path)


def barrier(world: World) -> None:
    """Wait until every rank gets here (rank 0 has written a checkpoint the others will read)."""
    if world.parallel:
        dist.barrier()


__all__ = ["World", "SINGLE", "DistributedError", "world_from_env", "start", "stop", "check_divisible",
           "check_last_batch", "batch_rows", "sum_over_ranks", "any_rank", "any_ranks", "gather_objects",
           "wrap_model", "main_rank_opens", "barrier"]
