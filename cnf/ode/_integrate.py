"""The integration loop: steps from a controller, outputs read off the accepted steps.

:func:`integrate` ties the pieces together: :mod:`cnf.ode._control` proposes and judges the
steps, :func:`cnf.ode._rk.rk_step` takes them, :mod:`cnf.ode._output` reads off the solution at
the requested times (and records the steps for the checkpoint adjoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._callbacks import NO_CALLBACKS
from ._control import Config, check_finite_start, check_step, make_controller
from ._errors import SolverError, describe_non_finite
from ._landmarks import step_sides
from ._output import Outputs, Record, RecordedOutputs
from ._rk import rk_step

__all__ = ["Counts", "integrate"]

# Consecutive rejections before a solve is called stuck. Each one shrinks the step at least
# by dfactor (0.2), so only steps held up by min_step or landing times can get this far.
_MAX_REJECTIONS = 100


@dataclass
class Counts:
    """Evaluations and steps of one solve, and the step size it would take next."""

    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    step_size: float = math.nan


def integrate(
    f: Callable[[float, Tensor], Tensor],
    y0: Tensor,
    ts: list[float],
    cfg: Config,
    *,
    record: Record | None = None,
) -> tuple[list[Tensor], Counts]:
    """Solve ``dy/dt = f(t, y)``, ``y(ts[0]) = y0``: ``[y(ts[0]), y(ts[1]), ...]`` and the counts.

    ``f(t, y[, side])`` works on states shaped like ``y0``; ``ts`` is strictly monotonic;
    ``record`` is filled in with the accepted steps, for the checkpoint adjoint.

    Raises:
        SolverError: the steps underflowed, ``f`` went non-finite, more than
            ``max_num_steps`` steps were needed, or the steps kept being rejected.
    """
    counts = Counts()
    tab = cfg.tableau
    out = _outputs(cfg, ts, y0, record)
    if out.done:
        return out.ys, counts

    def rhs(t: float, y: Tensor, side: float = 0.0) -> Tensor:
        counts.nfe += 1
        return f(t, y, side) if side else f(t, y)

    # step_t/jump_t/perturb (torchdiffeq's options for fields that jump in time) and the step
    # callbacks; without them the loop below is the plain one.
    sides = _Sides(cfg, rhs) if (cfg.landmarks and cfg.adaptive) or cfg.perturb else None
    cb = cfg.callbacks or NO_CALLBACKS
    t, y = ts[0], y0
    k0 = rhs(t, y)
    check_finite_start(cfg, k0, t)
    control = make_controller(cfg, rhs, t, y, k0, ts[-1])
    step_f, rejected = rhs, 0
    while not out.done:
        h, t_next = control.propose(t, out.next_time)
        if sides is not None:
            h, t_next, step_f, k0 = sides.plan(t, h, t_next, y, k0)
        check_step(cfg, t, h, t_next, getattr(control, "failure", None))
        if record is not None and record.keep is not None:  # see cnf.ode._keep
            y, k0 = record.keep.before_step(tab.stages, counts.n_accepted, y, k0)
        cb.step(t, y, h)
        y1, ks = rk_step(step_f, tab, t, y, k0, h)
        if not control.accept(ks, y1, h, t):
            rejected = _reject(counts, cb, t, y, h, rejected + 1)
            continue
        counts.n_accepted, rejected = counts.n_accepted + 1, 0
        if counts.n_accepted > cfg.max_num_steps:
            raise _too_many_steps(cfg, t, h, ts[-1])
        cb.accept(t, y, h)
        k_end = out.emit(step_f, t, y, h, t_next, y1, ks)
        t, y = t_next, y1
        if not out.done:
            k0 = k_end if k_end is not None else rhs(t, y)
    counts.step_size = control.step_size
    _check_finite_end(cfg, ts, out.ys, h)
    return out.ys, counts


def _reject(counts: Counts, cb, t: float, y: Tensor, h: float, rejected: int) -> int:
    """Count a rejected step (the ``rejected``-th in a row) and tell the callbacks."""
    counts.n_rejected += 1
    cb.reject(t, y, h)
    if rejected > _MAX_REJECTIONS:  # a guard: shrinking steps end in underflow first
        raise _stuck(t, h, rejected)
    return rejected


class _Sides:
    """Steps landing on ``step_t``/``jump_t`` and reading ``f`` on the inner side of jumps (or
    of every step, with ``perturb``): see :mod:`cnf.ode._landmarks`."""

    def __init__(self, cfg: Config, rhs) -> None:
        self.marks = cfg.landmarks if cfg.adaptive else None
        self.perturb, self.rhs, self.fresh_at = cfg.perturb, rhs, None

    def plan(self, t: float, h: float, t_next: float, y: Tensor, k0: Tensor):
        """The step from ``t`` as it will be taken: ``(h, t_next, its rhs, its k0)``."""
        if self.marks is not None:
            h, t_next = self.marks.clip(t, h, t_next)
        step_f, start_f = step_sides(self.rhs, self.marks, self.perturb, t, t_next)
        if start_f is not self.rhs and self.fresh_at != t:
            k0, self.fresh_at = start_f(t, y), t  # f just after t (a jump, or perturb), once
        return h, t_next, step_f, k0


def _check_finite_end(cfg: Config, ts: list[float], ys: list[Tensor], h: float) -> None:
    # Adaptive steps reject non-finite error estimates; this also catches fixed steps that
    # overflowed (and the exotic adaptive case of a finite estimate with an overflowing sum).
    if not bool(torch.isfinite(ys[-1]).all()):
        raise _not_finite(cfg, ts, ys, h)


def _outputs(cfg: Config, ts: list[float], y0: Tensor, record: Record | None) -> Outputs:
    if record is None:
        return Outputs(cfg.tableau, ts, y0, cfg.interp)
    return RecordedOutputs(cfg.tableau, ts, y0, record, cfg.interp)


def _stuck(t: float, h: float, rejected: int) -> SolverError:
    return SolverError(
        f"the step from t={t:.17g} was rejected {rejected} times in a row without shrinking "
        f"below h={abs(h):.3g}; check options['min_step'] and options['max_step'] against "
        "rtol/atol",
        t=t,
        step_size=h,
    )


def _too_many_steps(cfg: Config, t: float, h: float, t_end: float) -> SolverError:
    return SolverError(
        f"more than max_num_steps={cfg.max_num_steps} steps before reaching "
        f"t={t_end:g} (at t={t:.17g}, h={h:.3g}); raise options['max_num_steps'], "
        "loosen rtol/atol, or check the vector field for stiffness",
        t=t,
        step_size=h,
    )


def _not_finite(cfg: Config, ts: list[float], ys: list[Tensor], h: float) -> SolverError:
    """The solution went non-finite: name the first output time where it is, and where."""
    first = next(i for i, y in enumerate(ys) if not bool(torch.isfinite(y).all()))
    where = describe_non_finite(ys[first], cfg.parts)
    advice = (
        "check the vector field for a finite-time blow-up or NaN"
        if cfg.adaptive
        else "reduce the step size or use an adaptive method"
    )
    return SolverError(
        f"the solution is not finite at t={ts[first]:g} ({where}; last step {abs(h):.3g}); "
        f"{advice}",
        t=ts[first],
        step_size=h,
    )
