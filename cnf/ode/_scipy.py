"""Forward solves by scipy's ``solve_ivp``: torchdiffeq's ``method="scipy_solver"``.

This is for stiff problems (``solver="Radau"``, ``"BDF"`` or ``"LSODA"``, the default), which
cnf's explicit methods can only solve in very many tiny steps. scipy integrates float64 NumPy
arrays on the CPU: ``func`` is called one state at a time on tensors of ``y0``'s dtype and
device (a tuple state as its tuple), and the solution comes back in ``y0``'s dtype and device.

A non-finite ``f`` stops the solve at once with a :class:`SolverError` naming the time (LSODA
would otherwise retry it without end), as does a failure scipy reports.

No gradients flow through scipy, so a solve that would need them (an adjoint, or autograd
enabled while ``y0``, ``t`` or what ``func`` computes with requires grad) is refused with a
``ValueError`` that says what to do instead, rather than answered with detached tensors.

Options (``options=``): ``solver`` (one of solve_ivp's methods, default ``"LSODA"``),
``first_step``, ``max_step``, ``min_step`` (LSODA only), and the Jacobian settings of the
implicit solvers (``jac``, ``jac_sparsity`` for Radau and BDF; ``jac``, ``lband``, ``uband``
for LSODA), which act on the flattened state as a float64 array. Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ._errors import SolverError
from ._problem import SCIPY_SOLVER, Problem, number, positive

__all__ = ["scipy_solve"]

_STEPS = frozenset({"first_step", "max_step"})
_IMPLICIT = _STEPS | {"jac", "jac_sparsity"}
# The options of each of solve_ivp's methods that a solve here can use (its documented keywords,
# less those that change what comes back: events, dense_output, vectorized, args).
SOLVER_OPTIONS: Mapping[str, frozenset[str]] = {
    "RK23": _STEPS,
    "RK45": _STEPS,
    "DOP853": _STEPS,
    "Radau": _IMPLICIT,
    "BDF": _IMPLICIT,
    "LSODA": _STEPS | {"min_step", "jac", "lband", "uband"},
}
_NO_GRADIENTS = (
    f"method={SCIPY_SOLVER!r} propagates no gradients (scipy works on NumPy arrays); run it "
    "under torch.no_grad() (or detach) for a forward solve, or use an explicit method such as "
    "'dopri5' (or 'dopri8') with odeint or odeint_adjoint for gradients"
)


def scipy_solve(problem: Problem, options: Mapping | None, adjoint: bool) -> tuple[Tensor, int]:
    """Solve ``problem`` with ``solve_ivp``: the stacked solution ``(len(t), *y0.shape)``, NFE.

    ``adjoint``: whether an adjoint (or its settings) was asked for; that is refused, as is a
    solve that autograd would need to differentiate.

    Raises:
        ValueError: unknown options, or a solve that would need gradients.
        SolverError: scipy could not finish (its message is quoted), or a non-finite solution.
    """
    solver, kwargs = _check_options(options)
    if adjoint:
        raise ValueError(
            f"method={SCIPY_SOLVER!r} has no adjoint: it propagates no gradients (scipy works on "
            "NumPy arrays); use odeint for a forward solve, or an explicit method such as "
            "'dopri5' (or 'dopri8') with odeint_adjoint for gradients"
        )
    if torch.is_grad_enabled() and (problem.y0.requires_grad or problem.t.requires_grad):
        what = "y0" if problem.y0.requires_grad else "t"
        raise ValueError(f"{what} requires grad, but {_NO_GRADIENTS}")
    y0 = problem.y0.detach()
    if y0.numel() == 0 or len(problem.ts) == 1:  # nothing to integrate
        return y0.unsqueeze(0).expand(len(problem.ts), *y0.shape).clone(), 0
    field = _NumpyField(problem)
    rtol = _to_numpy(problem.rtol)
    if not (rtol == rtol[0]).all():
        raise ValueError(
            f"method={SCIPY_SOLVER!r} takes one rtol for the whole state (solve_ivp's rtol is a "
            f"number); pass a single rtol (atol may still differ per tensor), e.g. "
            f"rtol={float(rtol.min()):g}"
        )
    sol = solve_ivp(
        field,
        (problem.ts[0], problem.ts[-1]),
        _to_numpy(y0),
        method=solver,
        t_eval=problem.ts,
        rtol=float(rtol[0]),
        atol=_to_numpy(problem.atol),
        **kwargs,
    )
    if not sol.success or not np.isfinite(sol.y).all():
        reason = sol.message if not sol.success else "the solution is not finite"
        raise SolverError(
            f"scipy's solve_ivp ({solver}) stopped near t={field.t_last:.17g}: {reason}",
            t=field.t_last,
            step_size=float("nan"),
        )
    ys = torch.tensor(sol.y.T, dtype=y0.dtype, device=y0.device).reshape(-1, *y0.shape)
    ys[0] = y0  # exactly the initial state, not its float64 round trip
    return ys, field.nfe


def _check_options(options: Mapping | None) -> tuple[str, dict]:
    """``options`` as ``solve_ivp``'s method and keywords; unknown keys are refused."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict of solver options, got {options!r}")
    kwargs = {key: value for key, value in (options or {}).items() if value is not None}
    solver = kwargs.pop("solver", "LSODA")
    if solver not in SOLVER_OPTIONS:
        raise ValueError(
            f"options['solver'] must be one of solve_ivp's methods {list(SOLVER_OPTIONS)}, "
            f"got {solver!r}"
        )
    valid = SOLVER_OPTIONS[solver]
    unknown = set(kwargs) - valid
    if unknown:
        elsewhere = sorted(unknown & set().union(*SOLVER_OPTIONS.values()))
        note = f" (other solvers take {', '.join(elsewhere)})" if elsewhere else ""
        if "steps" in unknown:  # per-sample steps are the Runge-Kutta methods' option
            note += " (options['steps'] is for cnf's adaptive methods, e.g. 'dopri5')"
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method={SCIPY_SOLVER!r} with "
            f"solver={solver!r}{note}; valid options: {sorted(valid | {'solver'})}"
        )
    if "first_step" in kwargs:
        kwargs["first_step"] = positive("options['first_step']", kwargs["first_step"])
    for key in ("max_step", "min_step"):  # max_step may be infinite, min_step zero
        if key in kwargs:
            value = kwargs[key] = number(f"options[{key!r}]", kwargs[key])
            if not (value > 0 if key == "max_step" else value >= 0):
                bound = "> 0" if key == "max_step" else ">= 0"
                raise ValueError(f"options[{key!r}] must be {bound}, got {value!r}")
    return solver, kwargs


class _NumpyField:
    """``func`` as scipy calls it: float64 arrays in and out, without autograd; counts NFE.

    The first evaluation, at ``(t0, y0)``, runs before scipy starts and with autograd as the
    caller left it, to find out whether ``func`` computes with tensors that require grad (its
    parameters, or tensors it closes over); scipy's own first call, at the same point, is then
    answered from it rather than evaluated again.
    """

    def __init__(self, problem: Problem) -> None:
        self.rhs, self.nfe = problem.rhs, 0
        self.dtype, self.device, self.shape = problem.dtype, problem.device, problem.y0.shape
        self.t0, y0 = problem.ts[0], problem.y0.detach()
        self.t_last = self.t0  # the time of the latest evaluation: where a failed solve stopped
        f0 = self.rhs(self.t0, y0)
        self.nfe += 1
        if torch.is_grad_enabled() and f0.requires_grad:
            raise ValueError(
                f"func's output requires grad (its parameters or tensors it uses do), but "
                f"{_NO_GRADIENTS}"
            )
        self.first: tuple[np.ndarray, np.ndarray] | None = (_to_numpy(y0), _to_numpy(f0))

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        if self.first is not None:
            y0, f0 = self.first
            self.first = None
            if t == self.t0 and np.array_equal(y, y0):
                return f0
        self.nfe += 1
        self.t_last = float(t)
        state = torch.tensor(y, dtype=self.dtype, device=self.device).view(self.shape)
        with torch.no_grad():
            out = _to_numpy(self.rhs(self.t_last, state))
        if not np.isfinite(out).all():
            # Stop here: scipy's solvers may otherwise retry a non-finite field without end
            # (LSODA on a solution that blows up).
            raise SolverError(
                f"func(t, y) returned NaN or Inf at t={self.t_last:.17g} (the state "
                f"{'is' if np.isfinite(y).all() else 'is not'} finite there); the solution may "
                "blow up near this time: check the vector field or shorten the time span",
                t=self.t_last,
                step_size=float("nan"),
            )
        return out


def _to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().reshape(-1).to("cpu", torch.float64).numpy()
