"""Input validation and the single-tensor view of an ODE problem.

The integration loop works on one state tensor. :class:`Problem` checks the user's ``func``,
``y0``, ``t``, tolerances and options once, up front, with errors that say what to do, and
adapts ``func(t: Tensor, y) -> dy/dt`` to ``rhs(t: float, y: Tensor) -> Tensor``. A
single-tensor state keeps its shape (no reshapes per evaluation: for small states every tensor
operation's overhead counts); a tuple state is concatenated into one flat vector.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ._callbacks import callbacks_of
from ._control import Config
from ._landmarks import Landmarks, check_times
from .tableaus import METHODS, TABLEAUS, ButcherTableau

__all__ = [
    "SAMPLE_NORM",
    "SAMPLE_STEPS",
    "SCIPY_SOLVER",
    "Problem",
    "State",
    "check_adjoint_params",
    "check_options",
    "check_precision",
    "check_sample_steps",
    "get_tableau",
    "make_config",
    "number",
    "positive",
    "tolerance_vector",
]

State = Tensor | tuple[Tensor, ...]

_COMMON_OPTIONS = {"step_size", "max_num_steps", "norm"}
_FIXED_OPTIONS = _COMMON_OPTIONS | {"grid_constructor", "interp", "perturb"}
_ADAPTIVE_OPTIONS = _COMMON_OPTIONS | {
    "first_step",
    "min_step",
    "max_step",
    "safety",
    "ifactor",
    "dfactor",
    "pcoeff",
    "icoeff",
    "step_t",
    "jump_t",
    "dtype",
    "steps",
}
_TIME_DTYPES = (torch.float32, torch.float64)
_RENAMED = {
    "step_locations": "step_t",
    "jump_locations": "jump_t",
    "grid_points": "jump_t",
    "eps": "jump_t",
}
"""Options of older torchdiffeq versions and their current names (refused with the hint)."""


def number(name: str, value) -> float:
    """``value`` as a float if it is a real number; a ``ValueError`` naming ``name`` otherwise.

    The one rule for numeric settings across the package: ints, floats, numpy scalars and
    one-element real tensors are numbers; strings and bools are not (``"1e-3"`` is refused rather
    than parsed, so that a setting read from a file fails where it is read, not deep in a solve).
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        if not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (write it without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")
    return float(value)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def positive(name: str, value, *, optional: bool = False) -> float | None:
    """``value`` as a positive, finite float (see :func:`number`); None passes if ``optional``."""
    if value is None and optional:
        return None
    value = number(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
    return value


SCIPY_SOLVER = "scipy_solver"
SAMPLE_NORM = "sample"
"""``options["norm"]`` of the per-sample norm: every sample's RMS error, the largest counts."""
SAMPLE_STEPS = "sample"
"""``options["steps"]`` of per-sample steps: every sample its own time, step size and error
control (:mod:`cnf.ode._per_sample`); ``"shared"``, the default, steps the batch together."""

_ADAMS = (
    "it is a multistep method, and cnf's methods are one-step Runge-Kutta methods (no history "
    "of past steps: a step can be rejected, replayed by the checkpoint adjoint or started "
    "anywhere); use 'rk4' with options=dict(step_size=...) for fixed steps, or 'dopri5'"
)
_IMPLICIT = (
    "it is an implicit method for stiff problems, and cnf's methods are explicit (no Newton "
    f"iterations, no Jacobians); for a stiff forward solve use method={SCIPY_SOLVER!r} with "
    "options=dict(solver='Radau') (no gradients), or 'dopri5' for a non-stiff problem"
)
# torchdiffeq's methods that cnf does not offer, and why.
_NOT_OFFERED = {
    "explicit_adams": _ADAMS,
    "implicit_adams": _ADAMS,
    "fixed_adams": _ADAMS,
    **dict.fromkeys(
        (
            "implicit_euler",
            "implicit_midpoint",
            "trapezoid",
            "radauIIA3",
            "radauIIA5",
            "gl4",
            "gl6",
            "sdirk2",
            "trbdf2",
        ),
        _IMPLICIT,
    ),  # fmt: skip
    SCIPY_SOLVER: (
        "it is scipy's solve_ivp, not a Runge-Kutta method: solve() and odeint() take it for "
        "forward solves without gradients, but it cannot be the method of an adjoint, a "
        "backward solve or a CNF block"
    ),
}
# scipy's method names (lower case) and cnf's closest explicit method.
_SCIPY_NAMES = dict(rk23="bosh3", rk45="dopri5", dop853="dopri8", radau=None, bdf=None, lsoda=None)


def get_tableau(method: str) -> ButcherTableau:
    """Look a method up by name.

    A method torchdiffeq has but cnf does not offer is a ``ValueError`` that says why and names
    the closest one cnf has; any other unknown name, one listing the valid names.
    """
    try:
        return TABLEAUS[method]
    except (KeyError, TypeError):
        pass
    if isinstance(method, str) and method in _NOT_OFFERED:
        here = " here" if method == SCIPY_SOLVER else ""
        raise ValueError(f"method {method!r} is not offered{here}: {_NOT_OFFERED[method]}")
    raise ValueError(
        f"unknown method {method!r}{_hint(method)}; choose one of {', '.join(METHODS)}"
    )


def _hint(method) -> str:
    """A close valid name, or where a scipy method name leads."""
    if not isinstance(method, str):
        return ""
    if method.lower() in _SCIPY_NAMES:
        ours = _SCIPY_NAMES[method.lower()]
        return (
            f" (scipy's name: method={SCIPY_SOLVER!r} with options=dict(solver=...) runs "
            "scipy's solver, without gradients" + (f"; cnf's closest is {ours!r})" if ours else ")")
        )
    close = difflib.get_close_matches(method.lower(), METHODS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_options(options, method: str | None, adaptive: bool = True) -> dict:
    """Validate solver ``options`` for ``method`` (adaptive or not) and drop None values.

    ``method=None`` checks the options every adaptive method takes (the method is not known
    yet: a backward solve that defaults to the forward's).
    """
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict of solver options, got {options!r}")
    options = dict(options or {})
    valid = _ADAPTIVE_OPTIONS if adaptive else _FIXED_OPTIONS
    unknown = set(options) - valid
    if unknown:
        other, kind = (
            (_FIXED_OPTIONS, "fixed-step") if adaptive else (_ADAPTIVE_OPTIONS, "adaptive")
        )
        extra = (
            f" ({', '.join(sorted(unknown & other))} only apply to {kind} methods)"
            if unknown & other
            else ""
        )
        renamed = [f"{old!r} is now {new!r}" for old, new in _RENAMED.items() if old in unknown]
        extra += f" ({'; '.join(renamed)}, as in torchdiffeq 0.2)" if renamed else ""
        for_method = f" for method {method!r}" if method is not None else ""
        raise ValueError(
            f"unknown option(s) {sorted(unknown)}{for_method}{extra}; "
            f"valid options: {sorted(valid)}"
        )
    out = {key: _option_value(key, value) for key, value in options.items() if value is not None}
    if out.get("dfactor", 0.2) >= 1 or out.get("ifactor", 10.0) <= 1:
        raise ValueError("options need dfactor < 1 < ifactor")
    if out.get("min_step", 0.0) > out.get("max_step", math.inf):
        raise ValueError("options['min_step'] must not exceed options['max_step']")
    if "step_size" in out and "grid_constructor" in out:
        raise ValueError("options['step_size'] and options['grid_constructor'] exclude each other")
    if set(out.get("step_t", ())) & set(out.get("jump_t", ())):
        raise ValueError("options['step_t'] and options['jump_t'] must not share times")
    return out


def _option_value(key: str, value):
    """One option's value, checked (and normalised: times as tuples, ``"rms"`` as None)."""
    name = f"options[{key!r}]"
    if key in ("step_t", "jump_t"):
        return check_times(key, value)
    if key in ("norm", "grid_constructor"):
        if key == "norm" and value == "rms":
            return None  # the default norm, named
        if key == "norm" and value == SAMPLE_NORM:
            return value
        if not callable(value):
            what = "'rms', 'sample' or a function" if key == "norm" else "a function"
            raise ValueError(f"{name} must be {what}, got {value!r}")
        return value
    if key == "steps":
        if value not in ("shared", SAMPLE_STEPS):
            raise ValueError(f"{name} must be 'shared' (the default) or 'sample', got {value!r}")
        return value
    if key == "interp":
        if value not in ("linear", "cubic"):
            raise ValueError(f"{name} must be 'linear' or 'cubic', got {value!r}")
        return value
    if key == "perturb":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    if key == "dtype":
        if value not in _TIME_DTYPES:
            raise ValueError(f"{name} must be torch.float32 or torch.float64, got {value!r}")
        return value
    if key == "max_num_steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        return value
    if key not in ("min_step", "max_step", "pcoeff"):
        return positive(name, value)
    number_ = number(name, value)
    # min_step and pcoeff may be zero, max_step infinite.
    if not (number_ > 0 if key == "max_step" else number_ >= 0):
        raise ValueError(f"{name} must be {'> 0' if key == 'max_step' else '>= 0'}, got {value!r}")
    return number_


def make_config(
    method: str,
    atol: Tensor,
    rtol: Tensor,
    options: dict | None,
    *,
    time_eps: float,
    norm_sizes: tuple[int, ...] | None = None,
    parts: tuple[tuple[int, ...], ...] | None = None,
    rows: tuple[int, ...] | None = None,
) -> Config:
    """Validate ``method`` and ``options`` and pack them with per-element tolerances.

    ``rows``: the samples in each section of the norm (:attr:`Config.sample_rows`), which the
    per-sample norm (``options["norm"] == "sample"``) takes; None where the state has no
    batch dimension, which that norm then refuses.
    """
    tab = get_tableau(method)
    options = check_options(options, tab.name, tab.adaptive)
    if options.pop("steps", "shared") == SAMPLE_STEPS:
        check_sample_steps(options, rows)
        options.pop("norm", None)  # each sample's own error is what per-sample steps control
        options["sample_steps"] = True
    if options.get("norm") == SAMPLE_NORM:
        if rows is None:
            raise ValueError(
                "options['norm']='sample' needs every tensor of the state to have the batch "
                "as its first dimension, of the same size; use 'rms' for this state"
            )
        del options["norm"]
        options["sample_rows"] = rows
    # Times are Python floats (double precision) whatever dtype asks for: the option only
    # names torchdiffeq's choice, and double precision is its default and the safe one.
    options.pop("dtype", None)
    marks = Landmarks(options.pop("step_t", ()), options.pop("jump_t", ()))
    if norm_sizes is not None:  # the error norm only reads the leading entries
        atol, rtol = atol[: sum(norm_sizes)], rtol[: sum(norm_sizes)]
    return replace(
        Config(
            tableau=tab,
            atol=atol,
            rtol=rtol,
            time_eps=time_eps,
            norm_sizes=norm_sizes,
            parts=parts,
            landmarks=marks if marks else None,
        ),  # fmt: skip
        **options,
    )


def check_sample_steps(options: dict, rows: tuple[int, ...] | None) -> None:
    """Refuse what per-sample steps (``options["steps"] == "sample"``) cannot combine with."""
    if rows is None:
        raise ValueError(
            "options['steps']='sample' needs every tensor of the state to have the batch as "
            "its first dimension, of the same size; use steps='shared' for this state"
        )
    norm = options.get("norm", SAMPLE_NORM)
    if norm != SAMPLE_NORM:
        raise ValueError(
            "options['steps']='sample' controls each sample's own error (its RMS, the largest "
            f"over the state's tensors); it takes no other norm, got norm={norm!r}: leave "
            "options['norm'] out or use steps='shared'"
        )
    for key in ("step_t", "jump_t", "step_size"):
        if options.get(key):
            raise ValueError(
                f"options['steps']='sample' does not support options[{key!r}]; use "
                "steps='shared' (the default) with it"
            )


_HALF = (torch.float16, torch.bfloat16)


def check_precision(name: str, x: Tensor) -> None:
    """Refuse tensors the solver cannot control its error in: meta, integer, half precision.

    Half precision is refused rather than solved: float16's rounding (about 1e-3) is above any
    useful tolerance, so error control cannot hold it and the answer comes out wrong without a
    word, and bfloat16 rounds small steps ``y + h k`` back to ``y``, so the state never moves.
    """
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (a shape without values); the solver needs values: "
            "create it on 'cpu' or 'cuda'"
        )
    if x.dtype in _HALF:
        raise ValueError(
            f"{name} is {x.dtype}: the solver's error control needs float32 or float64 (half "
            f"precision rounds away the steps it controls); pass {name}.float()"
            + (" (and a model in float32: model.float())" if name != "t" else "")
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (float32 or float64), got {x.dtype}")


def _check_times(t) -> tuple[Tensor, list[float]]:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"t must be a 1-D tensor of times, got {type(t).__name__}") from None
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(
            f"t must be a non-empty 1-D tensor of times, got shape {tuple(t.shape)}; "
            "pass torch.tensor([t0, t1]) for a single interval"
        )
    if t.is_complex():
        raise ValueError(f"t must hold real times, got {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    check_precision("t", t)
    ts = t.detach().tolist()
    if not all(math.isfinite(x) for x in ts):
        raise ValueError("t contains NaN or Inf")
    diffs = [b - a for a, b in zip(ts[:-1], ts[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(
            "t must be strictly increasing or strictly decreasing (no repeated times); "
            f"got {ts[:8]}{' ...' if len(ts) > 8 else ''}"
        )
    return t, ts


def tolerance_vector(name: str, tol, sizes: list[int], is_tuple: bool, like: Tensor) -> Tensor:
    """One tolerance per state entry, shape ``(sum(sizes),)``: from a number, one per tensor of
    a tuple state, or (as torchdiffeq documents) a tensor with one per entry of the state."""
    if isinstance(tol, Tensor) and tol.numel() > 1:
        if tol.numel() != sum(sizes) or tol.is_complex() or not tol.is_floating_point():
            raise ValueError(
                f"{name} as a tensor must be real and hold one tolerance per state entry "
                f"({sum(sizes)}), got {tol.dtype} of shape {tuple(tol.shape)}"
            )
        flat = tol.detach().reshape(-1).to(dtype=like.dtype, device=like.device)
        if not bool(((flat > 0) & torch.isfinite(flat)).all()):
            raise ValueError(f"{name} must be positive and finite in every entry")
        return flat
    if isinstance(tol, (tuple, list)):
        if not is_tuple:
            raise ValueError(f"{name} is a sequence, which is only allowed for a tuple state")
        if len(tol) != len(sizes):
            raise ValueError(
                f"{name} has {len(tol)} entries but the state has {len(sizes)} tensors; "
                "give one tolerance per tensor or a single number"
            )
        values = [positive(f"{name}[{i}]", x) for i, x in enumerate(tol)]
    else:
        values = [positive(name, tol)] * len(sizes)
    return torch.cat(
        [torch.full((n,), v, dtype=like.dtype, device=like.device) for v, n in zip(values, sizes)]
    )


class Problem:
    """``func``, ``y0`` and ``t`` checked and packed into one state tensor.

    Attributes:
        y0: the initial state: the user's tensor, or a tuple's tensors concatenated into shape
            ``(N,)``; differentiable with respect to the user's ``y0``.
        ts: output times as Python floats.
        t: the time tensor as given (floating point).
        rhs: ``rhs(t: float, y: Tensor) -> Tensor`` on states shaped like ``y0``.
        atol, rtol: per-element tolerances, shaped like ``y0``.
    """

    def __init__(self, func: Callable, y0: State, t, rtol, atol) -> None:
        if not callable(func):
            raise ValueError(f"func must be callable as func(t, y), got {type(func).__name__}")
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise ValueError("y0 must be a tensor or a non-empty tuple of tensors")
        first = parts[0]
        check_precision("y0", first)
        for p in parts[1:]:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "all tensors of a tuple state must share dtype and device; got "
                    f"{[(q.dtype, str(q.device)) for q in parts]}"
                )
        self.dtype, self.device = first.dtype, first.device
        self.shapes = [p.shape for p in parts]
        self.sizes = [p.numel() for p in parts]
        self.y0 = torch.cat([p.reshape(-1) for p in parts]) if self.is_tuple else first
        if not bool(torch.isfinite(self.y0).all()):
            raise ValueError("y0 contains NaN or Inf; the initial state must be finite")

        self.t, self.ts = _check_times(t)
        self.t_dtype = self.t.dtype
        self.atol = tolerance_vector("atol", atol, self.sizes, self.is_tuple, self.y0)
        self.rtol = tolerance_vector("rtol", rtol, self.sizes, self.is_tuple, self.y0)
        self.atol, self.rtol = self.atol.view_as(self.y0), self.rtol.view_as(self.y0)
        self.time_eps = torch.finfo(self.t_dtype).eps
        self.func = func
        self.rhs = self._make_rhs(func)

    def config(self, method: str, options: dict | None) -> Config:
        """The solver settings of this problem: ``method``, ``options`` and what ``func``
        brings (its step callbacks), with a user's ``norm`` and ``grid_constructor`` bound to
        the problem's structure."""
        sizes = tuple(self.sizes) if self.is_tuple and len(self.sizes) > 1 else None
        parts = tuple(tuple(s) for s in self.shapes) if self.is_tuple else None
        cfg = make_config(
            method, self.atol, self.rtol, options, time_eps=self.time_eps, norm_sizes=sizes,
            parts=parts, rows=self.rows() if self.y0.numel() else self.empty_rows(),
        )  # fmt: skip
        changes = {}
        if cfg.norm is not None:
            user_norm, to_user = cfg.norm, self.to_user
            changes["norm"] = lambda x: user_norm(to_user(x))
        if cfg.grid_constructor is not None:
            changes["grid"] = self._grid(cfg.grid_constructor)
        callbacks = callbacks_of(self.func, to_user=self.to_user, adaptive=cfg.adaptive)
        if callbacks is not None:
            changes["callbacks"] = callbacks
        return replace(cfg, **changes) if changes else cfg

    def rows(self) -> tuple[int, ...] | None:
        """The batch size ``B`` once per tensor of the state, if every tensor is ``(B, ...)``
        with one ``B > 0`` (the per-sample norm's samples); None otherwise."""
        batch = {s[0] if len(s) else 0 for s in self.shapes}
        if len(batch) != 1 or 0 in batch:
            return None
        return (batch.pop(),) * len(self.shapes)

    def empty_rows(self) -> tuple[int, ...] | None:
        """An empty batch, ``(0, ...)`` in every tensor: zero rows each (the per-sample norm
        and steps then solve it to an empty solution); None for any other empty state."""
        if all(len(s) and s[0] == 0 for s in self.shapes):
            return (0,) * len(self.shapes)
        return None

    def to_user(self, y: Tensor) -> State:
        """One flat state (shaped like ``self.y0``) in the user's structure."""
        if not self.is_tuple:
            return y
        return tuple(p.view(s) for p, s in zip(y.split(self.sizes), self.shapes))

    def _grid(self, grid_constructor) -> tuple[float, ...]:
        """torchdiffeq's ``grid_constructor(func, y0, t)``: the fixed steps' times, checked."""
        y0 = self.to_user(self.y0)
        grid = grid_constructor(self.func, y0, self.t)
        grid_t, times = _check_times(grid)
        if times[0] != self.ts[0] or times[-1] != self.ts[-1]:
            raise ValueError(
                "grid_constructor must return a grid that starts at t[0] and ends at t[-1]; "
                f"got {times[0]!r} ... {times[-1]!r} for t from {self.ts[0]!r} to {self.ts[-1]!r}"
            )
        if len(times) > 1 and (times[1] > times[0]) != (self.ts[-1] > self.ts[0]):
            raise ValueError("grid_constructor's grid must run in the direction of t")
        return tuple(times)

    def unflatten(self, ys: Tensor) -> State:
        """Stacked states ``(T, *y0.shape)`` back to the user's structure, each ``(T, *shape)``."""
        if not self.is_tuple:
            return ys
        return tuple(
            part.reshape(ys.shape[0], *shape)
            for part, shape in zip(ys.split(self.sizes, dim=1), self.shapes)
        )

    def _make_rhs(self, func: Callable) -> Callable[[float, Tensor], Tensor]:
        dtype, device = self.dtype, self.device
        checked = False

        def check(out) -> None:
            nonlocal checked
            outs = out if self.is_tuple else (out,)
            ok = isinstance(outs, (tuple, list)) and len(outs) == len(self.shapes)
            ok = ok and all(
                isinstance(o, Tensor) and o.shape == s and o.dtype == dtype
                for o, s in zip(outs, self.shapes)
            )
            if not ok:
                expected = "; ".join(f"shape {tuple(s)}" for s in self.shapes)
                raise ValueError(
                    f"func(t, y) must return dy/dt with the state's structure ({expected}) and "
                    f"dtype {dtype}; it returned {describe_result(out)}"
                )
            checked = True

        def time(t: float, side: float) -> Tensor:
            # In the state's dtype, as torchdiffeq hands it to func: a float64 t with a float32
            # state must not turn func's result into float64. side: the neighbouring float.
            tt = torch.full((), t, dtype=dtype, device=device)
            return torch.nextafter(tt, torch.full_like(tt, side * math.inf)) if side else tt

        if not self.is_tuple:

            def rhs(t: float, y: Tensor, side: float = 0.0) -> Tensor:
                out = func(time(t, side), y)
                if not checked:
                    check(out)
                return out

        else:
            to_user = self.to_user

            def rhs(t: float, y: Tensor, side: float = 0.0) -> Tensor:
                out = func(time(t, side), to_user(y))
                if not checked:
                    check(out)
                return torch.cat([o.reshape(-1) for o in out])

        return rhs


def describe_result(x) -> str:
    """What ``func`` returned, for an error message: shapes and dtypes, nested as returned."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return "(" + "; ".join(describe_result(v) for v in x) + ")"
    return type(x).__name__


def check_adjoint_params(func, adjoint_params: Sequence[Tensor] | None) -> tuple[Tensor, ...]:
    """The tensors whose gradients the adjoint computes (default: ``func``'s parameters)."""
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError(
                "odeint_adjoint needs to know func's parameters: make func an nn.Module, or pass "
                "adjoint_params=(...) explicitly (adjoint_params=() if it has none)"
            )
        return tuple(p for p in func.parameters() if p.requires_grad)
    params = tuple(adjoint_params)
    if not all(isinstance(p, Tensor) for p in params):
        raise ValueError("adjoint_params must be a sequence of tensors")
    return tuple(p for p in params if p.requires_grad)
