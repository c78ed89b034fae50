"""Small sums over the training processes of one machine, through shared memory.

Agreeing error norms (:func:`cnf.ode.agreeing_norms`) sum a handful of numbers over the
processes at every solver step. Through gloo one such all-reduce costs 0.7-1.5 ms on a 2-core
machine (thread hand-offs and socket wake-ups), as much as several field evaluations; through
a shared page it costs about 15 us. :class:`SharedSums` is that page: each process writes its
numbers into its own slot, raises its slot's sequence number, and waits until every slot has
reached it; then each adds up all the slots itself, in rank order, so every process gets the
same bits. Two alternating sets of slots let a process that finished one sum write the next
while a slower one still reads the last.

Only for processes on one machine, and only on x86-64, whose stores become visible in the
order they are made (the sequence number after the numbers); :func:`cnf.distributed.current`
falls back to gloo everywhere else, and for sums too long for a slot.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SharedSums", "supported"]

CAPACITY = 4096
"""The most numbers one sum may hold (float64); longer ones go through gloo."""


def supported() -> bool:
    """Whether this machine orders its stores as :class:`SharedSums` needs (x86-64)."""
    return platform.machine().lower() in ("x86_64", "amd64")


class SharedSums:
    """Sums over ``size`` processes of one machine in a shared file mapping.

    Made in two phases, with the processes' own group between them: rank 0 calls
    :meth:`create` and hands the path to the others, who call :meth:`attach`; once all have
    attached (a barrier), rank 0 calls :meth:`forget`, which unlinks the file: the mapping
    lives on, and nothing is left behind when a process dies.

    Args:
        path: the file to map.
        rank, size: this process's rank and the number of processes.
        timeout: seconds a sum waits for the others before it fails.
    """

    def __init__(self, path: str, rank: int, size: int, timeout: float):
        self.path, self.rank, self.size, self.timeout = path, rank, size, timeout
        numbers = 2 * size * (CAPACITY + 1)
        table = torch.from_file(path, shared=True, size=numbers, dtype=torch.float64)
        self.slots = table.view(2, size, CAPACITY + 1)  # parity, rank, [sequence, numbers...]
        self.sequence = 0

    @staticmethod
    def create(size: int) -> str:
        """A new, zeroed file for ``size`` processes (in ``/dev/shm`` where there is one);
        returns its path."""
        folder = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        path = os.path.join(folder, f"cnf-sums-{uuid.uuid4().hex}")
        with open(path, "wb") as f:
            f.truncate(8 * 2 * size * (CAPACITY + 1))
        return path

    def forget(self) -> None:
        """Unlink the file (rank 0, after every process attached); the mapping stays."""
        Path(self.path).unlink(missing_ok=True)

    def reduce(self, values: Tensor, op: str = "sum") -> None:
        """Replace the 1-D float64 host tensor ``values`` (at most :data:`CAPACITY` numbers)
        by its elementwise sum (``"sum"``) or maximum (``"max"``) over the processes.

        Raises:
            RuntimeError: the other processes did not come within ``timeout`` seconds.
        """
        self.sequence += 1
        n = values.numel()
        mine = self.slots[self.sequence % 2]
        mine[self.rank, 1 : 1 + n].copy_(values)
        mine[self.rank, 0] = float(self.sequence)  # after the numbers: x86 keeps store order
        self._wait(mine[:, 0])
        parts = mine[:, 1 : 1 + n]
        values.copy_(parts.sum(0) if op == "sum" else parts.max(0).values)

    def _wait(self, sequences: Tensor) -> None:
        """Spin until every process's sequence number reached ours, yielding the core (more
        processes than cores must not starve the one being waited for)."""
        target, start = float(self.sequence), time.perf_counter()
        spins = 0
        while not bool((sequences >= target).all()):
            spins += 1
            if spins % 64 == 0:
                waited = time.perf_counter() - start
                if waited > self.timeout:
                    raise RuntimeError(
                        f"the other training processes did not reach sum {self.sequence} within "
                        f"{self.timeout:.0f} s: one of them has stopped or hangs"
                    )
                if waited > 0.02:  # a long wait (a peer computing): stop spinning hard
                    time.sleep(5e-5)
            os.sched_yield()
