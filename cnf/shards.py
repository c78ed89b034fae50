"""Which rows of a global batch this process holds, so that per-sample noise is sharded too.

In data-parallel training (:mod:`cnf.distributed`) each process trains on rows
``start:stop`` of every global batch of ``total`` rows. The batch itself is cut by the
training loop; the noise drawn for it inside an objective or a solve (Hutchinson probes, flow
matching's times and base draws) is cut here. :func:`draw_rows` draws the noise of the whole
batch from the iteration's generator, exactly as one process would, and keeps this process's
rows, so that N processes see the same probes and times as one process does for the same
rows. Drawing ``total`` rows instead of ``stop - start`` costs a few random numbers per
sample; the solve costs far more.

Outside :func:`batch_shard` (one process, evaluation, sampling) nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["batch_shard", "current_shard", "draw_rows"]

_shard: tuple[int, int, int] | None = None


@contextmanager
def batch_shard(start: int, stop: int, total: int) -> Iterator[None]:
    """Within the block, this process holds rows ``start:stop`` of batches of ``total`` rows.

    Raises:
        ValueError: not ``0 <= start < stop <= total``.
    """
    global _shard
    if not 0 <= start < stop <= total:
        raise ValueError(f"a shard needs 0 <= start < stop <= total, got {start}, {stop}, {total}")
    previous, _shard = _shard, (start, stop, total)
    try:
        yield
    finally:
        _shard = previous


def current_shard() -> tuple[int, int, int] | None:
    """``(start, stop, total)`` of the innermost :func:`batch_shard`, or None outside one."""
    return _shard


def draw_rows(draw: Callable[[int], Tensor], rows: int, dim: int = 0) -> Tensor:
    """``draw(rows)``: noise with ``rows`` rows along ``dim``, the same as one process draws.

    Within a :func:`batch_shard` whose size is ``rows``, draws the whole batch's ``total`` rows
    and returns this process's ``start:stop``; otherwise just ``draw(rows)``.

    Args:
        draw: ``draw(n)``, a tensor with ``n`` rows along ``dim`` (drawn from the caller's
            generator).
        rows: the rows this process needs.
        dim: the batch dimension of the draw.

    Example:
        >>> import torch
        >>> def noise(n):
        ...     return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
        >>> with batch_shard(2, 4, 6):
        ...     mine = draw_rows(noise, 2)
        >>> torch.equal(mine, noise(6)[2:4])
        True
    """
    shard = _shard
    if shard is None or shard[1] - shard[0] != rows:
        return draw(rows)
    start, stop, total = shard
    return draw(total).narrow(dim, start, stop - start)
