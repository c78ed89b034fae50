"""Exceptions raised by the solver core."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SolverError", "describe_non_finite"]


class SolverError(RuntimeError):
    """The solver could not finish: the step size underflowed, too many steps were needed, or
    the solution stopped being finite.

    Attributes:
        t: the time reached when the solve stopped.
        step_size: the last step size tried.
    """

    def __init__(self, message: str, *, t: float, step_size: float) -> None:
        super().__init__(message)
        self.t = t
        self.step_size = step_size


def describe_non_finite(values: Tensor, parts: tuple[tuple[int, ...], ...] | None) -> str:
    """Where ``values`` (a state or a stage, any shape) is not finite, in the user's terms.

    ``parts`` are the shapes of a tuple state that ``values`` concatenates (None: a single
    tensor, described with its own shape). Only called on the way to an error: it synchronises.
    """
    values = values.detach()
    bad = ~torch.isfinite(values)
    kind = "NaN" if bool(torch.isnan(values).any()) else "Inf"
    count, flat = int(bad.sum()), int(bad.reshape(-1).nonzero()[0, 0])
    where = f"index {_unravel(flat, values.shape)}"
    if parts is not None and len(parts) > 1 and values.numel() == sum(map(math.prod, parts)):
        for k, shape in enumerate(parts):
            if flat < math.prod(shape):
                where = f"tensor {k} of the state, index {_unravel(flat, shape)}"
                break
            flat -= math.prod(shape)
    return f"{kind} in {count} of {values.numel()} entries, the first at {where}"


def _unravel(flat: int, shape) -> tuple[int, ...]:
    index = []
    for size in reversed(tuple(shape)):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))
