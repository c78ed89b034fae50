"""Multi-process training on ``torch.distributed``: the process group, the shards, the launcher.

Run any training under ``torchrun`` (or ``cnf train --nproc N``, which launches it on this
machine) and :func:`cnf.training.fit` trains data-parallel by itself:

* the model is wrapped in ``DistributedDataParallel``; gloo is the backend on CPU, NCCL on CUDA
  (one process per GPU, ``cuda:LOCAL_RANK``);
* ``batch_size`` stays the *global* batch. Every process draws batch ``i`` from the seeds of
  one process and trains on its rows ``start:stop`` of it (:meth:`World.rows`), and the noise
  drawn per sample is cut the same way (:mod:`cnf.shards`), so the processes' shards together
  are the one-process batch;
* each process's loss is its rows' share of the global mean, and the gradients are *summed*
  over the processes (a DDP communication hook), so the gradient is that of the global batch;
* with ``agree_steps`` (the default) every adaptive solve adds the processes' error norms
  together (:func:`cnf.ode.agreeing_norms`): all processes take the steps one process would
  take on the whole batch. N processes then train as one process does with the same global
  batch: the same steps, the same gradients, to rounding;
* evaluation is sharded and summed; the progress bar, checkpoints and pictures come from rank 0;
  a resume reads rank 0's checkpoint and hands it to every process.

From Python, call :func:`init` first (it joins the group ``torchrun`` describes, and does
nothing in a plain process), then train as usual::

    # torchrun --nproc-per-node 2 train.py
    world = cnf.distributed.init()
    flow = cnf.recipes.get("8gaussians").new_model(data).to(world.device if world else "cpu")
    cnf.training.fit(flow, data.sampler(), iters=1000, checkpoint_dir="runs/x")

A process group you created yourself works as well: :func:`current` finds it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import shared_sums
from .ode import agreeing_norms
from .shards import batch_shard
from .shared_sums import CAPACITY, SharedSums

__all__ = [
    "TIMEOUT",
    "World",
    "current",
    "finish",
    "free_port",
    "init",
    "launch",
    "launched",
    "loopback_interface",
    "parallel_model",
    "share_rows",
    "sum_over",
]

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a silent peer before it fails (:func:`init`'s default).

A peer that dies closes its sockets, and ``torchrun`` stops the others at once; the timeout is
the last guard, for a peer that hangs alive."""

_world: World | None = None
_evaluating: World | None = None


@dataclass(frozen=True, eq=False)
class World:
    """This process's place among the training processes.

    Attributes:
        rank, size: this process's rank and the number of processes.
        local_rank: its rank on this machine (which GPU it uses).
        device: where it trains: ``cuda:local_rank`` under NCCL, else the CPU.
        control: a gloo group of the same processes for the small host-side sums (error
            norms, losses, metrics), apart from the group DDP reduces gradients on.
        sums: the same sums through shared memory (:mod:`cnf.shared_sums`), when every
            process runs on this machine; None: through ``control``.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    control: Any
    sums: SharedSums | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes."""
        return self.rank == 0

    def rows(self, total: int) -> tuple[int, int]:
        """This process's rows ``start, stop`` of a batch of ``total`` rows: consecutive
        blocks, the first ``total % size`` of them one row longer."""
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def reduce(self, values: Tensor, op: str = "sum") -> None:
        """Replace the 1-D host tensor ``values`` by its elementwise sum or maximum over the
        processes (the :data:`cnf.ode._agree.Reduce` of agreeing norms)."""
        if self.sums is not None and values.numel() <= CAPACITY:
            self.sums.reduce(values, op)
            return
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(values, op=reduce_op, group=self.control)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process got here."""
        dist.barrier(group=self.control)

    @contextmanager
    def training_step(self, start: int, stop: int, total: int, agree: bool) -> Iterator[None]:
        """Within the block, noise is drawn for rows ``start:stop`` of ``total`` and, with
        ``agree``, adaptive solves agree on their steps."""
        agreeing = agreeing_norms(self.reduce) if agree else nullcontext()
        with batch_shard(start, stop, total), agreeing:
            yield

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Within the block, :func:`cnf.training.evaluate_nll` and
        :func:`cnf.training.evaluate_bits_per_dim` score this process's rows and sum over the
        processes (:func:`share_rows`)."""
        global _evaluating
        previous, _evaluating = _evaluating, self
        try:
            yield
        finally:
            _evaluating = previous


def init(backend: str | None = None, timeout: datetime.timedelta = TIMEOUT) -> World | None:
    """Join the process group ``torchrun`` describes; None in a plain process.

    Reads ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``). The backend is NCCL when CUDA is available, gloo otherwise; a CUDA
    process uses the GPU of its local rank. A group that is already initialized is used as it
    is.

    Args:
        backend: ``"gloo"`` or ``"nccl"`` instead of the automatic choice.
        timeout: how long a collective waits for a silent peer (:data:`TIMEOUT`).

    Returns:
        The :class:`World` (also :func:`current`), or None when there is one process.

    Raises:
        ValueError: ``"nccl"`` without CUDA, or an unknown backend.
    """
    if not dist.is_initialized():
        if not launched():
            return None
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown backend {backend!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("the nccl backend needs CUDA; use gloo on CPU")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return current()


def finish() -> None:
    """Leave the process group (at the end of a torchrun process)."""
    global _world
    _world = None
    if dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> World | None:
    """The :class:`World` of the initialized process group, or None (no group, or a group of
    one process: nothing to share)."""
    global _world
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    if _world is None or _world.size != dist.get_world_size():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
        control = dist.new_group(backend="gloo") if nccl else dist.new_group()
        rank, size = dist.get_rank(), dist.get_world_size()
        sums = _shared_sums(rank, size, control)
        _world = World(rank, size, local_rank, device, control, sums)
    return _world


def _shared_sums(rank: int, size: int, control) -> SharedSums | None:
    """Shared-memory sums when all ``size`` processes run on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``) and it is x86-64; None otherwise (and with ``CNF_SHARED_SUMS=0``)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == size
    wanted = os.environ.get("CNF_SHARED_SUMS", "1") != "0"
    if not (local and wanted and shared_sums.supported()):
        return None
    box = [SharedSums.create(size) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control)
    sums = SharedSums(box[0], rank, size, TIMEOUT.total_seconds())
    dist.barrier(group=control)  # every process has mapped the file: it can go
    if rank == 0:
        sums.forget()
    return sums


def share_rows(total: int) -> tuple[slice, World | None]:
    """The rows of ``total`` points this process evaluates, and the world to sum over (None:
    all rows, nothing to sum)."""
    world = _evaluating
    if world is None:
        return slice(0, total), None
    start, stop = world.rows(total)
    return slice(start, stop), world


def sum_over(world: World | None, *values: float) -> list[float]:
    """``values`` summed over ``world``'s processes (as they are without a world)."""
    if world is None:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64)
    world.reduce(totals, "sum")
    return totals.tolist()


class _ObjectiveStep(nn.Module):
    """The objective as a module's forward: ``DistributedDataParallel`` wraps this, so that
    every objective's pass (also flow matching's, which calls the field directly) runs inside
    DDP's forward and its gradients are reduced."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Tensor, generator, given: dict):
        return self.objective(self.model, batch, generator, **given)


def _sum_gradients(process_group, bucket):  # unannotated: DDP checks annotations by value
    """DDP communication hook: the gradients' *sum* over the processes (DDP's default is the
    mean): each process's loss is already its share of the global batch's mean."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def parallel_model(model: nn.Module, objective, world: World) -> nn.Module:
    """``DistributedDataParallel`` around ``objective(model, ...)``: calling the result with
    ``(batch, generator, given)`` returns the objective's ``(loss, metrics)``, and the backward
    pass sums the gradients over the processes.

    Buffers are not synchronised each step (none changes in training); DDP copies rank 0's
    parameters and buffers once, when it is made.
    """
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(
        _ObjectiveStep(model, objective), device_ids=device_ids, forward_sync_buffers=False
    )
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m cnf <argv>`` in ``nproc`` processes on this machine through torchrun
    (``cnf train --nproc N``); returns the exit code (non-zero when a process failed: torchrun
    then stops the others and prints the failing process's error).

    Each process gets ``cores // nproc`` threads unless ``OMP_NUM_THREADS`` is set, and the
    processes talk over the loopback interface.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not (isinstance(nproc, int) and nproc >= 1):
        raise ValueError(f"--nproc must be a positive number of processes, got {nproc!r}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    loopback = loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    args = [
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "--module",
        "cnf",
        *argv,
    ]
    try:
        torchrun.main(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()] or [1]
        code = codes[0] if isinstance(codes[0], int) and codes[0] > 0 else 1
        print(f"error: a training process failed (exit code {codes[0]})", file=sys.stderr)
        return code
    return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a one-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)
