r"""Times steps must land on, and which side of a discontinuity ``f`` is read on.

torchdiffeq's options for fields that are not smooth in time:

* ``step_t`` (adaptive methods): times every solve steps exactly onto, e.g. kinks of ``f``
  (where its derivative jumps), which the controller would otherwise find by rejecting steps;
* ``jump_t`` (adaptive methods): times where ``f`` itself jumps. The solve steps onto them, and
  the step that ends at a jump reads ``f`` just before it while the next step starts from ``f``
  just after it (an FSAL tableau's last stage is not reused across a jump);
* ``perturb`` (fixed-step methods): every step reads ``f`` just after its start and just before
  its end, so a grid that steps onto a discontinuity integrates each side with its own values.

"Just before" and "just after" ``t`` are the neighbouring floating-point numbers in the dtype
``f`` receives its time in (``torch.nextafter``): the solver asks the right-hand side for the
side with ``rhs(t, y, side)``, ``side = -1, +1`` in the direction of integration.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Landmarks", "check_times", "side_rhs", "step_sides"]

# A stage time this close to a step's end (relative to the step) counts as the end: the stage
# time t + c h of c = 1 need not reproduce t_next in floating point.
_SAME_TIME = 1e-9


@dataclass(frozen=True)
class Landmarks:
    """The ``step_t`` and ``jump_t`` of a solve, as sorted times in the user's time frame."""

    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.step_t or self.jump_t)

    @functools.cached_property
    def times(self) -> tuple[float, ...]:
        """Every time a step must land on, sorted (once: :meth:`clip` reads it every step)."""
        return tuple(sorted(self.step_t + self.jump_t))

    def clip(self, t: float, h: float, t_next: float) -> tuple[float, float]:
        """The step ``t -> t_next`` (size ``h``), shortened to end on the first landmark
        strictly inside it, or as it is."""
        times = self.times
        if h > 0:
            i = bisect.bisect_right(times, t)
            if i < len(times) and times[i] < t_next:
                return times[i] - t, times[i]
        else:
            i = bisect.bisect_left(times, t) - 1
            if i >= 0 and times[i] > t_next:
                return times[i] - t, times[i]
        return h, t_next

    def is_jump(self, t: float) -> bool:
        """Whether ``f`` jumps at ``t`` (``t`` is one of ``jump_t``)."""
        i = bisect.bisect_left(self.jump_t, t)
        return i < len(self.jump_t) and self.jump_t[i] == t


def side_rhs(
    f: Callable, t0: float, t1: float, *, after_start: bool, before_end: bool
) -> Callable[[float, Tensor], Tensor]:
    """``f`` for one step ``t0 -> t1``, read just after ``t0`` and/or just before ``t1``.

    Stage times at the step's start (end) are read on the inner side of it: ``f(t, y, side)``
    with ``side`` pointing into the step. Returns ``f`` itself when neither is asked for.
    """
    if not (after_start or before_end):
        return f
    direction = 1.0 if t1 > t0 else -1.0
    slack = _SAME_TIME * abs(t1 - t0)

    def rhs(t: float, y: Tensor) -> Tensor:
        if after_start and direction * (t - t0) <= slack:
            return f(t0, y, direction)
        if before_end and direction * (t - t1) >= -slack:
            return f(t1, y, -direction)
        return f(t, y)

    return rhs


def check_times(name: str, values) -> tuple[float, ...]:
    """``step_t`` / ``jump_t`` as sorted, finite, distinct Python floats."""
    if isinstance(values, Tensor):
        if values.dim() > 1:
            raise ValueError(f"options[{name!r}] must be a 1-D tensor of times")
        values = values.detach().reshape(-1).tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"options[{name!r}] must be a 1-D tensor or sequence of times")
    try:
        times = sorted(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"options[{name!r}] must hold numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in times):
        raise ValueError(f"options[{name!r}] contains NaN or Inf")
    if any(a == b for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"options[{name!r}] has repeated times")
    return tuple(times)


def step_sides(
    rhs: Callable, marks: Landmarks | None, perturb: bool, t: float, t_next: float
) -> tuple[Callable, Callable]:
    """The right-hand sides of the step ``t -> t_next``: for its stages, and for its start.

    ``perturb`` reads ``f`` inside every step; a ``jump_t`` at either end is read on the inner
    side. The start's is ``f(t, y)`` just after ``t`` where that applies (the step must not
    reuse the last step's final stage then), else ``rhs`` itself.
    """
    after = perturb or (marks is not None and marks.is_jump(t))
    before = perturb or (marks is not None and marks.is_jump(t_next))
    stages = side_rhs(rhs, t, t_next, after_start=after, before_end=before)
    if not after:
        return stages, rhs
    direction = 1.0 if t_next > t else -1.0
    return stages, lambda s, y: rhs(s, y, direction)
