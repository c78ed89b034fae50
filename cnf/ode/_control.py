"""Step-size control: the solver's settings, the error norm, the first step and the controllers.

A controller decides where the next step goes (:meth:`propose`) and whether a step just taken
stands (:meth:`accept`). There are three:

* :class:`PIController` for adaptive tableaus: steps sized from the embedded error estimate;
* :class:`FixedSteps`: ``options["step_size"]``, the last step shortened to land on the end;
* :class:`GridSteps`: fixed-step methods without a step size step from one output time to the
  next.

Times and step sizes are Python floats (double precision), so controlling the step costs one
host synchronisation per step (reading the error norm) and nothing else. The error estimate
and its norm run under ``no_grad``: they steer the step size only, and step sizes are
constants to autograd (gradients are those of the discrete solution for the steps taken).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._agree import current_reduce
from ._callbacks import Callbacks
from ._errors import SolverError, describe_non_finite
from ._landmarks import Landmarks
from .tableaus import ButcherTableau

__all__ = [
    "Config",
    "FixedSteps",
    "GridSteps",
    "ListSteps",
    "PIController",
    "check_finite_start",
    "check_step",
    "make_controller",
    "rms_norm",
    "rms_norms",
]

Rhs = Callable[[float, Tensor], Tensor]

# A step that ends within this fraction of a step before the final time ends on it instead, so
# rounding in the accumulated time never leaves a sliver of a step to take.
_LANDING_SLACK = 1e-9


@dataclass(frozen=True)
class Config:
    """Validated solver settings (built by :func:`cnf.ode._problem.make_config`).

    ``atol`` and ``rtol`` are tensors of shape ``(N,)`` (one entry per state element, so that
    tuple states can carry per-state tolerances). ``norm_sizes`` splits a flat state into
    consecutive sections (the tensors of a tuple state; ``y``, ``a`` of the adjoint): the error
    norm is the largest of the sections' RMS norms, so a small, tightly controlled section is
    not averaged away by a large one, and entries past the last section are left out of the
    norm (the adjoint's seminorm). ``None``: one RMS norm over the whole state. ``parts``: the
    shapes of a tuple state's tensors, so that errors can say where a value went non-finite.
    ``sample_rows`` (``options["norm"] == "sample"``): for each section (or the whole state),
    how many samples its entries split into, row-major: the norm is then the largest RMS over
    the sections and the samples (:func:`rms_norm`); a section of one row (the adjoint's ``g``)
    is measured whole. None: the sections' RMS over all their samples together.
    ``sample_steps`` (``options["steps"] == "sample"``): every sample steps on its own
    (:mod:`cnf.ode._per_sample`), its error measured by its own RMS.

    torchdiffeq's options (see :mod:`cnf.ode`): ``norm`` replaces the error norm (a function of
    the scaled error in the state's structure, wrapped by the caller to take the flat state);
    ``landmarks`` holds ``step_t`` and ``jump_t``; ``perturb``, ``grid`` (what
    ``grid_constructor`` returned) and ``interp`` shape fixed steps; ``callbacks`` are
    ``func``'s step callbacks. ``shared``: how many trailing entries of the norm's part of the
    state are, across data-parallel processes, parts of one sum rather than rows of a split
    batch (the adjoint's parameter gradients; see :mod:`cnf.ode._agree`).
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
    parts: tuple[tuple[int, ...], ...] | None = None
    norm: Callable[[Tensor], Tensor] | None = None
    shared: int = 0
    sample_rows: tuple[int, ...] | None = None
    sample_steps: bool = False
    landmarks: Landmarks | None = None
    perturb: bool = False
    grid_constructor: Callable | None = None
    grid: tuple[float, ...] | None = None
    interp: str | None = None
    callbacks: Callbacks | None = None

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive and self.step_size is None

    @property
    def norm_size(self) -> int | None:
        """How many leading entries of the state the error norm reads (None: all)."""
        return None if self.norm_sizes is None else sum(self.norm_sizes)


def rms_norm(cfg: Config, x: Tensor) -> float:
    r"""The error norm of a scaled error ``x`` (the norm's part of the flat state).

    Default: the largest RMS over the sections ``x_s`` of the state (``N_s`` entries each),
    :math:`\max_s \|x_s\|_2 / \sqrt{N_s}`. Per-sample (``cfg.sample_rows``): each section as
    ``B_s`` rows of ``N_s / B_s`` entries, the largest RMS over sections and rows,
    :math:`\max_{s,b} \|x_{s,b}\|_2 / \sqrt{N_s / B_s}`. Or the user's ``norm``. Inside
    :func:`cnf.ode._agree.agreeing_norms`: the RMS of every process's sections together; the
    per-sample and the user's norms, the largest over the processes.
    """
    reduce = current_reduce()
    if cfg.norm is not None:
        value = abs(float(cfg.norm(x)))
        return value if reduce is None else _agreed_max(reduce, [value])[0]
    if cfg.sample_rows is not None:
        return _sample_norms(cfg, (x,), reduce)[0]
    if reduce is not None:
        return _agreed_rms(cfg, (x,), reduce)[0]
    if cfg.norm_sizes is None or len(cfg.norm_sizes) == 1:
        return torch.linalg.vector_norm(x).item() / math.sqrt(x.numel())
    norms = torch.stack([torch.linalg.vector_norm(part) for part in x.split(cfg.norm_sizes)])
    return max(v / math.sqrt(size) for v, size in zip(norms.tolist(), cfg.norm_sizes) if size > 0)


def rms_norms(cfg: Config, *xs: Tensor) -> list[float]:
    """:func:`rms_norm` of each of ``xs``; agreeing processes combine them in one collective."""
    reduce = current_reduce()
    if cfg.sample_rows is not None and cfg.norm is None:
        return _sample_norms(cfg, xs, reduce)
    if reduce is None or cfg.norm is not None:
        return [rms_norm(cfg, x) for x in xs]
    return _agreed_rms(cfg, xs, reduce)


def _sample_norms(cfg: Config, xs: tuple[Tensor, ...], reduce) -> list[float]:
    """The per-sample norm of each of ``xs``: the largest RMS over sections and samples.

    Each section ``(N_s,)`` is viewed as ``(B_s, N_s / B_s)`` (the state's tensors are
    batch-first, so a sample's entries are one row). One host read for all of ``xs``; when
    norms agree, one collective taking the maximum over the processes, which is the maximum
    over the whole batch (rows are never split between processes).
    """
    sizes = _section_sizes(cfg, xs[0])
    sections = [(n, rows) for n, rows in zip(sizes, cfg.sample_rows) if n > 0]
    # each section's largest row norm, read in one transfer; the division by the row's
    # sqrt(size) in Python (a few fewer tensor operations per step: small states feel each)
    maxima = [
        torch.linalg.vector_norm(p.reshape(rows, -1), dim=1).amax()
        for x in xs
        for p, rows in zip(_sections(x, sizes), cfg.sample_rows)
        if p.numel() > 0
    ]
    found = [maxima[0].item()] if len(maxima) == 1 else torch.stack(maxima).tolist()
    k = len(sections)
    values = [
        max(v / math.sqrt(n // rows) for v, (n, rows) in zip(found[j : j + k], sections))
        for j in range(0, len(found), k)
    ]
    return values if reduce is None else _agreed_max(reduce, values)


def _agreed_rms(cfg: Config, xs: tuple[Tensor, ...], reduce) -> list[float]:
    """For each of ``xs``: the sections' sums of squares and sizes, added over the processes,
    then the largest RMS. One collective of ``2 * sections * len(xs)`` numbers, in float64,
    so that the sum of the processes' squares is the one-process sum to rounding."""
    sizes = _section_sizes(cfg, xs[0])
    k = len(sizes)
    squares = [
        torch.linalg.vector_norm(p, dtype=torch.float64) for x in xs for p in _sections(x, sizes)
    ]
    counts = torch.tensor(sizes * len(xs), dtype=torch.float64, device=xs[0].device)
    totals = torch.cat([torch.stack(squares).square(), counts]).cpu()
    reduce(totals, "sum")
    values = totals.tolist()
    m = k * len(xs)
    sums, ns = values[:m], values[m:]
    return [
        max(math.sqrt(s / n) for s, n in zip(sums[j : j + k], ns[j : j + k]) if n > 0)
        for j in range(0, m, k)
    ]


def _agreed_max(reduce, values: list[float]) -> list[float]:
    """``values``, each the largest over the processes (one collective)."""
    totals = torch.tensor(values, dtype=torch.float64)
    reduce(totals, "max")
    return totals.tolist()


def _section_sizes(cfg: Config, x: Tensor) -> tuple[int, ...]:
    """The sizes of the norm's sections of ``x`` (one section: all of it)."""
    return (x.numel(),) if cfg.norm_sizes is None else cfg.norm_sizes


def _sections(x: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """The flat ``x`` cut into sections of ``sizes`` (no split for one section)."""
    return x.reshape(-1).split(sizes) if len(sizes) > 1 else (x,)


def _shared(cfg: Config, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` (the norm's part of states or errors) with their last ``cfg.shared``
    entries summed over the processes (one collective for all), when norms agree; as they
    are otherwise. The others' parts of a sum make the whole batch's sum."""
    reduce = current_reduce()
    if reduce is None or not cfg.shared:
        return tensors
    p = cfg.shared
    totals = torch.cat([t[-p:].to(torch.float64) for t in tensors]).cpu()
    reduce(totals, "sum")
    summed = totals.to(tensors[0].device).split(p)
    return tuple(torch.cat([t[:-p], s.to(t.dtype)]) for t, s in zip(tensors, summed))


def _error_ratio(
    cfg: Config, ks: list[Tensor], y_abs: Tensor, y1: Tensor, h: float
) -> tuple[float, Tensor]:
    """Mixed RMS norm of the local error estimate relative to ``atol + rtol * max(|y0|, |y1|)``.

    The estimate is ``err = h sum_i e_i k_i``. Returns the ratio (``<= 1`` accepts the step;
    NaN or inf when the step produced non-finite values) and ``|y1|``, which the next step
    reuses as its ``|y0|``.
    """
    with torch.no_grad():
        n = cfg.norm_size
        err = None
        for k, e in zip(ks, cfg.tableau.b_err):
            if e != 0.0:
                # h inside the coefficients: the sum is then of the size of a step's change,
                # which cannot overflow where sum_i e_i k_i alone does (stiff, fast fields)
                kk = k if n is None else k[:n]
                err = kk * (h * e) if err is None else torch.add(err, kk, alpha=h * e)
        err, y1n = _shared(cfg, err, y1 if n is None else y1[:n])
        y1_abs = y1n.abs()
        scale = torch.addcmul(cfg.atol, cfg.rtol, torch.maximum(y_abs, y1_abs))
        ratio = rms_norm(cfg, err.div_(scale))
    return ratio, y1_abs


def _initial_step(
    f: Rhs, cfg: Config, t0: float, y0: Tensor, f0: Tensor, direction: float, span: float
) -> float:
    """Hairer, Norsett & Wanner (1993), Solving ODEs I, section II.4: an automatic first step.

    Costs one extra evaluation of ``f``. With the per-sample norm, each of the estimate's
    norms ``d0, d1, d2`` is the largest over the samples, so the second estimate
    ``(0.01 / max(d1, d2))^(1/q)`` is the smallest over the samples: the hardest sets the step.
    """
    with torch.no_grad():
        n = cfg.norm_size
        y, fy = _shared(cfg, *((y0, f0) if n is None else (y0[:n], f0[:n])))
        # the norms in float64: in float32, |f| ~ 1e20 overflows the sum of squares
        scale = torch.addcmul(cfg.atol, cfg.rtol, y.abs()).double()
        d0, d1 = rms_norms(cfg, y.double() / scale, fy.double() / scale)
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        if not h0 > 0:  # d1 so large that the ratio underflows: start as small as time allows
            h0 = 64 * cfg.time_eps * max(abs(t0), span)
        h0 = min(h0, span)
        f1 = f(t0 + direction * h0, y0 + (direction * h0) * f0)
        (f1,) = _shared(cfg, f1 if n is None else f1[:n])
        d2 = rms_norm(cfg, (f1.double() - fy.double()) / scale) / h0
    dmax = max(d1, d2)
    if not math.isfinite(dmax):
        h1 = h0 * 1e-3
    elif dmax <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / dmax) ** (1.0 / (cfg.tableau.order))
    return min(100 * h0, h1, span)


def _toward(t: float, h: float, t_end: float, direction: float) -> tuple[float, float]:
    """The step of signed size ``h`` from ``t``, or the rest of the way if that nearly ends."""
    if direction * (t + h - t_end) >= -_LANDING_SLACK * abs(h):
        return t_end - t, t_end
    return h, t + h


def check_step(cfg: Config, t: float, h: float, t_next: float, failure=None) -> None:
    """Refuse a step too small for the time's precision to tell ``t`` and ``t + h`` apart.

    ``failure``: the non-finite stage that made the last steps fail (:class:`NonFinite`), which
    the error then names instead of guessing at a blow-up or stiffness.
    """
    if abs(h) <= cfg.time_eps * max(abs(t), abs(t_next)) * 4 or t_next == t:
        if failure is not None:
            raise failure.error(cfg, f"every step from t={t:.17g} down to h={abs(h):.3g}", h)
        raise SolverError(
            f"step size underflow at t={t:.17g} (h={h:.3g}): the solution may blow up "
            "near this time or the problem is too stiff for an explicit method; check the "
            "vector field, shorten the time span or loosen rtol/atol",
            t=t,
            step_size=h,
        )


class NonFinite:
    """A step with a non-finite error estimate: the first non-finite stage's time and values.

    ``values`` is None when every stage was finite and only the step's sum or its error
    estimate overflowed.
    """

    def __init__(self, tab: ButcherTableau, ks: list[Tensor], t: float, h: float) -> None:
        self.t, self.values = t + h, None
        for k, c in zip(ks, tab.c):
            if not bool(torch.isfinite(k).all()):
                self.t, self.values = t + c * h, k
                break

    def error(self, cfg: Config, tried: str, h: float) -> SolverError:
        """The error that names the time, the entries and the likely cause."""
        if self.values is None:
            return SolverError(
                f"the solution overflows near t={self.t:.17g} ({tried}): it may blow up near "
                "this time; check the vector field or shorten the time span",
                t=self.t,
                step_size=h,
            )
        where = describe_non_finite(self.values, cfg.parts)
        if where.startswith("NaN"):
            cause = (
                "the vector field produces NaN there (e.g. a log or square root of a negative "
                "number, 0/0, or NaN weights): check it at that time and state"
            )
        else:
            cause = "the solution overflows: it may blow up near this time"
        return SolverError(
            f"func(t, y) returned {where} at t={self.t:.17g} ({tried}); {cause}",
            t=self.t,
            step_size=h,
        )


def check_finite_start(cfg: Config, k0: Tensor, t: float) -> None:
    """Refuse a solve whose very first evaluation ``f(t0, y0)`` is not finite."""
    if not bool(torch.isfinite(k0).all()):
        raise NonFinite(cfg.tableau, [k0], t, 0.0).error(cfg, "at the initial state", 0.0)


class PIController:
    r"""Adaptive steps from the embedded error estimate (Gustafsson, Lundh & Soderlind 1988).

    With ``r_n`` the error ratio of step ``n`` (:func:`_error_ratio`) and ``q`` the order,

    .. math::
        h_{n+1} = h_n \cdot \mathrm{clip}\big(
            s\, r_n^{-(\beta_P + \beta_I)/q}\, r_{n-1}^{\beta_P/q},\ d,\ i\big)

    with ``s, beta_P, beta_I, d, i`` the options ``safety, pcoeff, icoeff, dfactor, ifactor``;
    a rejected step only shrinks, and steps stay within ``[min_step, max_step]``.
    """

    def __init__(
        self, cfg: Config, f: Rhs, t0: float, y0: Tensor, k0: Tensor, t_end: float
    ) -> None:
        self.cfg, self.t_end = cfg, t_end
        self.direction = 1.0 if t_end > t0 else -1.0
        h = cfg.first_step
        if h is None:
            h = _initial_step(f, cfg, t0, y0, k0, self.direction, abs(t_end - t0))
        self.h = min(max(h, cfg.min_step), cfg.max_step)
        exponent = 1.0 / cfg.tableau.order
        self.beta1 = (cfg.pcoeff + cfg.icoeff) * exponent
        self.beta2 = cfg.pcoeff * exponent
        self.prev_ratio = 1.0
        self.failure: NonFinite | None = None  # why the steps since the last accepted failed
        self.warned = False
        n = cfg.norm_size
        with torch.no_grad():
            self.y_abs = _shared(cfg, y0 if n is None else y0[:n])[0].abs()

    @property
    def step_size(self) -> float:
        """The size of the step the controller would take next."""
        return abs(self.h)

    def propose(self, t: float, t_out: float) -> tuple[float, float]:
        """The next step from ``t``: ``(h, t + h)``; output times do not shorten it."""
        return _toward(t, self.direction * abs(self.h), self.t_end, self.direction)

    def accept(self, ks: list[Tensor], y1: Tensor, h: float, t: float) -> bool:
        """Judge the step ``t -> t + h`` with stages ``ks`` and size the next one.

        A step of at most ``min_step`` stands whatever its error, as in torchdiffeq (the
        option trades accuracy for a bounded cost); one with non-finite values never does.
        """
        cfg = self.cfg
        ratio, y1_abs = _error_ratio(cfg, ks, self.y_abs, y1, h)
        at_min = abs(h) <= cfg.min_step * (1 + _LANDING_SLACK)  # a landing step may round up
        accepted = ratio <= 1.0 or (at_min and math.isfinite(ratio))
        if not math.isfinite(ratio):
            self.failure = NonFinite(cfg.tableau, ks, t, h)
            if self.failure.values is ks[0]:  # f(t, y) at an accepted point: no step can help
                raise self.failure.error(cfg, "at a point the solve had reached", h)
            if at_min:
                raise self.failure.error(cfg, f"a step of min_step={cfg.min_step:g}", h)
            factor = cfg.dfactor
        elif ratio == 0.0:
            factor = cfg.ifactor
        else:
            factor = cfg.safety * ratio**-self.beta1 * self.prev_ratio**self.beta2
            factor = min(cfg.ifactor, max(cfg.dfactor, factor))
        if not accepted:
            factor = min(factor, 1.0)
        h_new = min(max(abs(h) * factor, cfg.min_step), cfg.max_step)
        if not accepted:
            self.h = h_new
            return False
        if ratio > 1.0 and not self.warned:  # accepted at min_step: say so once per solve
            self.warned = True
            warnings.warn(
                f"steps of min_step={cfg.min_step:g} accepted above the tolerance (error ratio "
                f"{ratio:.3g} at t={t:.6g}): the solution is less accurate than rtol/atol ask; "
                "lower options['min_step'] or loosen rtol/atol",
                stacklevel=5,
            )
        self.failure = None
        self.prev_ratio = max(ratio, 1e-4)  # a tiny ratio would make the next step explode
        self.h = h_new
        self.y_abs = y1_abs
        return True


class FixedSteps:
    """Steps of ``options["step_size"]``; the last one shortened to land on the final time."""

    def __init__(self, cfg: Config, t0: float, t_end: float) -> None:
        h, span = cfg.step_size, abs(t_end - t0)
        # Refuse up front rather than after max_num_steps steps of work.
        if math.ceil(span / h * (1 - 1e-12)) > cfg.max_num_steps:
            raise SolverError(
                f"step_size={h:g} over [{t0:g}, {t_end:g}] needs more than max_num_steps="
                f"{cfg.max_num_steps} steps; increase step_size or options['max_num_steps']",
                t=t0,
                step_size=h,
            )
        self.t_end = t_end
        self.direction = 1.0 if t_end > t0 else -1.0
        self.h = self.direction * h
        self.step_size = h

    def propose(self, t: float, t_out: float) -> tuple[float, float]:
        h, t_next = _toward(t, self.h, self.t_end, self.direction)
        self.step_size = abs(h)
        return h, t_next

    def accept(self, ks: list[Tensor], y1: Tensor, h: float, t: float) -> bool:
        return True


class GridSteps:
    """Fixed-step methods without a step size: one step from each output time to the next."""

    def __init__(self, t0: float, t_end: float) -> None:
        self.step_size = abs(t_end - t0)

    def propose(self, t: float, t_out: float) -> tuple[float, float]:
        self.step_size = abs(t_out - t)
        return t_out - t, t_out

    def accept(self, ks: list[Tensor], y1: Tensor, h: float, t: float) -> bool:
        return True


class ListSteps:
    """Fixed-step methods stepping through a given grid (torchdiffeq's ``grid_constructor``)."""

    def __init__(self, grid: tuple[float, ...]) -> None:
        self.grid, self.index = grid, 1
        self.step_size = abs(grid[1] - grid[0]) if len(grid) > 1 else 0.0

    def propose(self, t: float, t_out: float) -> tuple[float, float]:
        t_next = self.grid[self.index]
        self.step_size = abs(t_next - t)
        return t_next - t, t_next

    def accept(self, ks: list[Tensor], y1: Tensor, h: float, t: float) -> bool:
        self.index += 1
        return True


def make_controller(
    cfg: Config, f: Rhs, t0: float, y0: Tensor, k0: Tensor, t_end: float
) -> PIController | FixedSteps | GridSteps | ListSteps:
    """The controller ``cfg`` asks for; ``k0 = f(t0, y0)`` seeds the first-step estimate."""
    if cfg.adaptive:
        return PIController(cfg, f, t0, y0, k0, t_end)
    if cfg.grid is not None:
        return ListSteps(cfg.grid)
    if cfg.step_size is not None:
        return FixedSteps(cfg, t0, t_end)
    return GridSteps(t0, t_end)
