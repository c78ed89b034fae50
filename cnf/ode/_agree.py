"""Error norms that several processes agree on, for data-parallel training.

When each process solves the same ODE on its own shard of a batch, each would choose its own
steps from its own error estimate. Inside :func:`agreeing_norms`, every adaptive solve of this
process instead combines its error norm with the other processes' through ``reduce`` before it
decides anything: the sums of squares and the entry counts of each section of the state are
added over the processes, so every process gets the RMS of the whole batch, bit for bit the
same number everywhere. All of them then accept, reject and size the same steps, as one
process solving the whole batch would (to rounding).

Sections whose entries are not split by rows but are each process's part of one sum (the
adjoint's parameter gradients, :attr:`cnf.ode._control.Config.shared`) are summed entry by
entry first, so their norm is that of the whole batch's gradient.

The setting is process-wide (not per thread): CUDA runs the backward pass, and with it the
adjoint's solve, on a thread of its own. The solver core knows nothing of
``torch.distributed``; :mod:`cnf.distributed` supplies ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["Reduce", "agreeing_norms", "current_reduce"]

Reduce = Callable[[Tensor, str], None]
"""``reduce(values, op)``: replace the 1-D tensor ``values`` in place by its elementwise sum
(``op == "sum"``) or maximum (``"max"``) over the processes."""

_reduce: Reduce | None = None


@contextmanager
def agreeing_norms(reduce: Reduce) -> Iterator[None]:
    """Within the block, every adaptive step's error norm is combined with ``reduce``.

    Every process must run the same solves in the same order inside the block, since each
    norm is a collective operation; solves outside the block are untouched.

    Example:
        >>> def alone(values, op):  # one process: the sum over processes is the value itself
        ...     pass
        >>> with agreeing_norms(alone):
        ...     pass
    """
    global _reduce
    previous, _reduce = _reduce, reduce
    try:
        yield
    finally:
        _reduce = previous


def current_reduce() -> Reduce | None:
    """The ``reduce`` of the innermost :func:`agreeing_norms` block, or None outside one."""
    return _reduce
