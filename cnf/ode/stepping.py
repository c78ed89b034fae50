"""One generic Runge-Kutta step, its dense output, step-size control and the integration loop.

Everything here works on one state tensor ``y`` (any shape) and a right-hand side
``f(t: float, y: Tensor) -> Tensor``; :mod:`cnf.ode.problem` adapts the user's function and
state to that form. Times and step sizes are Python floats (double precision), so controlling
the step costs one host synchronisation per step (reading the error norm) and nothing else.

The per-step work is kept to a handful of tensor operations, because for small states (a
batch of 2-D points) the cost of an ODE solve is dominated by per-operation overhead, not by
arithmetic:

* stage inputs are accumulated with ``torch.add(y, k, alpha=h * a_ij)``, skipping zero
  coefficients (no stacking of the stages, which costs more than it saves below ~10^4 entries);
* the error estimate and the error norm run under ``no_grad``: they steer the step size only,
  and the step size is not differentiated (gradients are those of the discrete solution for the
  steps taken);
* ``|y|`` of an accepted step is reused as ``|y0|`` of the next one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import SolverError
from .tableaus import ButcherTableau

__all__ = ["Config", "Record", "integrate", "rk_step", "dense_output"]

Rhs = Callable[[float, Tensor], Tensor]


@dataclass(frozen=True)
class Config:
    """Validated solver settings (built by :func:`cnf.ode.problem.make_config`).

    ``atol`` and ``rtol`` are tensors of shape ``(N,)`` (one entry per state element, so that
    tuple states can carry per-state tolerances). ``norm_sizes`` splits a flat state into
    consecutive sections (the tensors of a tuple state; ``y``, ``a`` of the adjoint): the error
    norm is the largest of the sections' RMS norms, so a small, tightly controlled section is
    not averaged away by a large one, and entries past the last section are left out of the
    norm (the adjoint's seminorm). ``None``: one RMS norm over the whole state.
    """

    tableau: ButcherTableau
    atol: Tensor
    rtol: Tensor
    step_size: float | None = None
    first_step: float | None = None
    max_num_steps: int = 10_000
    min_step: float = 0.0
    max_step: float = math.inf
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.2
    icoeff: float = 0.65
    norm_sizes: tuple[int, ...] | None = None
    time_eps: float = 2.0**-52

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive and self.step_size is None

    @property
    def norm_size(self) -> int | None:
        """How many leading entries of the state the error norm reads (None: all)."""
        return None if self.norm_sizes is None else sum(self.norm_sizes)


@dataclass
class Record:
    """What checkpoint-mode adjoints need to replay a solve step by step.

    ``steps[n] = (t_n, h_n, y_n)`` for every accepted step; ``outputs[i] = (n, theta)`` says
    that output ``i`` was read from step ``n`` at ``t_n + theta h_n`` (``theta is None``: the
    step's end point exactly; ``n == -1``: the initial value).
    """

    steps: list[tuple[float, float, Tensor]] = field(default_factory=list)
    outputs: list[tuple[int, float | None]] = field(default_factory=list)


@dataclass
class Counts:
    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    step_size: float = math.nan


def rk_step(
    f: Rhs,
    tab: ButcherTableau,
    t: float,
    y: Tensor,
    k0: Tensor,
    h: float,
    last_stage: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """One explicit Runge-Kutta step: returns ``y1`` and the stages ``[k_0, ..., k_{s-1}]``.

    ``y1 = y + h sum_i b_i k_i`` with ``k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j)``; for an
    FSAL tableau the last stage input is ``y1`` itself, so its stage is ``f(t + h, y1)``, and
    ``last_stage=False`` skips that evaluation where only ``y1`` is wanted (checkpoint replay).
    """
    ks = [k0]
    yi = y
    s = tab.stages if (last_stage or not tab.fsal) else tab.stages - 1
    for i in range(1, s):
        yi = _axpy_sum(y, ks, tab.a[i], h)
        ks.append(f(t + tab.c[i] * h, yi))
    if tab.fsal:
        y1 = yi if last_stage else _axpy_sum(y, ks, tab.a[s], h)
    else:
        y1 = _axpy_sum(y, ks, tab.b, h)
    return y1, ks


def dense_output(
    tab: ButcherTableau, y: Tensor, ks: list[Tensor], h: float, theta: float
) -> Tensor:
    """``y(t + theta h) = y + h sum_i b_i(theta) k_i`` inside an accepted step.

    ``ks`` holds the stages, plus ``f(t + h, y1)`` for a tableau that is not FSAL.
    """
    return _axpy_sum(y, ks, tab.dense_weights(theta).tolist(), h)


def _axpy_sum(y: Tensor, ks: list[Tensor], coeffs, h: float) -> Tensor:
    out = y
    for k, a in zip(ks, coeffs):
        if a != 0.0:
            out = torch.add(out, k, alpha=h * a)
    return out


def _error_ratio(
    cfg: Config, ks: list[Tensor], y_abs: Tensor, y1: Tensor, h: float
) -> tuple[float, Tensor]:
    """Mixed RMS norm of the local error estimate relative to ``atol + rtol * max(|y0|, |y1|)``.

    Returns the ratio (``<= 1`` accepts the step; NaN or inf when the step produced non-finite
    values) and ``|y1|`` for reuse by the next step.
    """
    with torch.no_grad():
        n = cfg.norm_size
        err = None
        for k, e in zip(ks, cfg.tableau.b_err):
            if e != 0.0:
                kk = k if n is None else k[:n]
                err = kk * e if err is None else torch.add(err, kk, alpha=e)
        y1_abs = (y1 if n is None else y1[:n]).abs()
        scale = torch.addcmul(cfg.atol, cfg.rtol, torch.maximum(y_abs, y1_abs))
        ratio = _rms(cfg, err.div_(scale))
    return abs(h) * ratio, y1_abs


def _rms(cfg: Config, x: Tensor) -> float:
    """The mixed RMS norm of a scaled error: the largest RMS over the sections of the state."""
    if cfg.norm_sizes is None or len(cfg.norm_sizes) == 1:
        return torch.linalg.vector_norm(x).item() / math.sqrt(x.numel())
    norms = torch.stack([torch.linalg.vector_norm(part) for part in x.split(cfg.norm_sizes)])
    return max(v / math.sqrt(size) for v, size in zip(norms.tolist(), cfg.norm_sizes) if size > 0)


def _initial_step(
    f: Rhs, cfg: Config, t0: float, y0: Tensor, f0: Tensor, direction: float, span: float
) -> float:
    """Hairer, Norsett & Wanner (1993), Solving ODEs I, section II.4: an automatic first step.

    Costs one extra evaluation of ``f``.
    """
    with torch.no_grad():
        n = cfg.norm_size
        y, fy = (y0, f0) if n is None else (y0[:n], f0[:n])
        scale = torch.addcmul(cfg.atol, cfg.rtol, y.abs())
        d0 = _rms(cfg, y / scale)
        d1 = _rms(cfg, fy / scale)
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5 or not math.isfinite(d0 / d1)) else 0.01 * d0 / d1
        h0 = min(h0, span)
        f1 = f(t0 + direction * h0, y0 + (direction * h0) * f0)
        f1 = f1 if n is None else f1[:n]
        d2 = _rms(cfg, (f1 - fy) / scale) / h0
    dmax = max(d1, d2)
    if not math.isfinite(dmax):
        h1 = h0 * 1e-3
    elif dmax <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / dmax) ** (1.0 / (cfg.tableau.order))
    return min(100 * h0, h1, span)


def integrate(
    f: Rhs, y0: Tensor, ts: list[float], cfg: Config, *, record: Record | None = None
) -> tuple[list[Tensor], Counts]:
    """Solve ``dy/dt = f(t, y)``, ``y(ts[0]) = y0`` and return ``y`` at every time in ``ts``.

    ``ts`` is strictly monotonic (increasing or decreasing). Adaptive tableaus pick their steps
    with a PI controller and reach output times by dense output, so outputs never shorten a
    step; fixed-step methods take ``cfg.step_size`` (outputs by dense output too) or, without
    it, step from one output time to the next.

    Raises:
        SolverError: the step size fell below ``min_step`` or below what the time's precision
            can resolve, more than ``max_num_steps`` steps were needed, or a fixed-step solve
            produced non-finite values.
    """
    tab = cfg.tableau
    counts = Counts()
    outs = [y0]
    if record is not None:
        record.outputs.append((-1, None))
    if len(ts) == 1:
        return outs, counts

    t, t_end = ts[0], ts[-1]
    direction = 1.0 if t_end > t else -1.0
    span = abs(t_end - t)
    adaptive = cfg.adaptive
    grid = cfg.step_size is None and not adaptive

    def rhs(tt: float, yy: Tensor) -> Tensor:
        counts.nfe += 1
        return f(tt, yy)

    k0 = rhs(t, y0)
    if adaptive:
        h = (
            cfg.first_step
            if cfg.first_step is not None
            else _initial_step(rhs, cfg, t, y0, k0, direction, span)
        )
        h = min(max(h, cfg.min_step), cfg.max_step)
        exponent = 1.0 / tab.order
        beta1 = (cfg.pcoeff + cfg.icoeff) * exponent
        beta2 = cfg.pcoeff * exponent
        prev_ratio = 1.0
        n = cfg.norm_size
        with torch.no_grad():
            y_abs = (y0 if n is None else y0[:n]).abs()
    elif not grid:
        h = cfg.step_size
        if math.ceil(span / h * (1 - 1e-12)) > cfg.max_num_steps:
            raise SolverError(
                f"step_size={h:g} over [{t:g}, {t_end:g}] needs more than max_num_steps="
                f"{cfg.max_num_steps} steps; increase step_size or options['max_num_steps']",
                t=t,
                step_size=h,
            )

    y = y0
    i_out = 1
    while i_out < len(ts):
        if grid:
            t_next = ts[i_out]
            h_try = t_next - t
        else:
            h_try = direction * abs(h)
            # Land exactly on the final time; absorb a remainder below 1e-9 of a step.
            if direction * (t + h_try - t_end) >= -1e-9 * abs(h_try):
                h_try = t_end - t
                t_next = t_end
            else:
                t_next = t + h_try
        if abs(h_try) <= cfg.time_eps * max(abs(t), abs(t_next)) * 4 or t_next == t:
            raise SolverError(
                f"step size underflow at t={t:.17g} (h={h_try:.3g}): the solution may blow up "
                "near this time or the problem is too stiff for an explicit method; check the "
                "vector field, shorten the time span or loosen rtol/atol",
                t=t,
                step_size=h_try,
            )

        y1, ks = rk_step(rhs, tab, t, y, k0, h_try)

        if adaptive:
            ratio, y1_abs = _error_ratio(cfg, ks, y_abs, y1, h_try)
            accepted = ratio <= 1.0
            if not math.isfinite(ratio):
                factor = cfg.dfactor
            elif ratio == 0.0:
                factor = cfg.ifactor
            else:
                factor = cfg.safety * ratio**-beta1 * prev_ratio**beta2
                factor = min(cfg.ifactor, max(cfg.dfactor, factor))
            if not accepted:
                factor = min(factor, 1.0)
            h_new = min(abs(h_try) * factor, cfg.max_step)
            if not accepted:
                counts.n_rejected += 1
                if h_new < cfg.min_step:
                    raise SolverError(
                        f"step size {h_new:.3g} at t={t:.17g} fell below min_step="
                        f"{cfg.min_step:g} (error ratio {ratio:.3g}); loosen rtol/atol or lower "
                        "options['min_step']",
                        t=t,
                        step_size=h_new,
                    )
                h = h_new
                continue
            prev_ratio = max(ratio, 1e-4)
            h = max(h_new, cfg.min_step)
            y_abs = y1_abs

        counts.n_accepted += 1
        if counts.n_accepted > cfg.max_num_steps:
            raise SolverError(
                f"more than max_num_steps={cfg.max_num_steps} steps before reaching "
                f"t={t_end:g} (at t={t:.17g}, h={h_try:.3g}); raise options['max_num_steps'], "
                "loosen rtol/atol, or check the vector field for stiffness",
                t=t,
                step_size=h_try,
            )

        # Outputs inside (t, t_next]: the end point exactly, interior ones by dense output.
        k_end = ks[-1] if tab.fsal else None
        step_index = counts.n_accepted - 1
        while i_out < len(ts) and direction * (ts[i_out] - t_next) <= 0:
            if ts[i_out] == t_next:
                outs.append(y1)
                loc = None
            else:
                if k_end is None:
                    k_end = rhs(t_next, y1)
                loc = (ts[i_out] - t) / h_try
                outs.append(dense_output(tab, y, ks if tab.fsal else ks + [k_end], h_try, loc))
            if record is not None:
                record.outputs.append((step_index, loc))
            i_out += 1
        if record is not None:
            record.steps.append((t, h_try, y))

        t, y = t_next, y1
        if i_out < len(ts):
            k0 = k_end if k_end is not None else rhs(t, y)

    counts.step_size = abs(h) if adaptive else abs(h_try)
    # Adaptive steps reject non-finite error estimates; this also catches fixed steps that
    # overflowed (and the exotic adaptive case of a finite estimate with an overflowing sum).
    if not bool(torch.isfinite(outs[-1]).all()):
        raise SolverError(
            f"the solution is not finite at t={t_end:g} (last step {abs(h_try):.3g}); "
            + (
                "reduce the step size or use an adaptive method"
                if not adaptive
                else "check the vector field for a finite-time blow-up"
            ),
            t=t_end,
            step_size=h_try,
        )
    return outs, counts
