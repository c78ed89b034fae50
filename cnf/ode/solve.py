"""Public entry points of the solver core: :func:`solve`, :func:`odeint`, :func:`odeint_adjoint`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adjoint import adjoint_solve, attach_time_gradient, make_adjoint_settings
from .problem import Problem, State, check_adjoint_params
from .stepping import Counts, integrate

__all__ = ["Solution", "SolverStats", "odeint", "odeint_adjoint", "solve"]


@dataclass
class SolverStats:
    """What a solve cost.

    The ``*_backward`` fields stay zero until a backward pass through an adjoint solve has run;
    that pass fills them in (backpropagation through a plain solve has no solver of its own).

    Attributes:
        nfe: evaluations of ``func`` in the forward solve.
        n_accepted, n_rejected: forward steps.
        step_size: the step size the controller would take next (the last step for fixed-step
            methods).
        nfe_backward: evaluations of ``func`` in the backward pass (each one with a
            vector-Jacobian product).
        n_accepted_backward, n_rejected_backward: steps of the backward pass (for the
            checkpoint adjoint: the replayed steps).
    """

    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    step_size: float = float("nan")
    nfe_backward: int = 0
    n_accepted_backward: int = 0
    n_rejected_backward: int = 0

    def _add_backward(self, counts: Counts) -> None:
        self.nfe_backward += counts.nfe
        self.n_accepted_backward += counts.n_accepted
        self.n_rejected_backward += counts.n_rejected


@dataclass
class Solution:
    """Result of :func:`solve`.

    Attributes:
        ys: the solution at every time of ``t``, shape ``(len(t), *y0.shape)`` (a tuple of such
            tensors for a tuple ``y0``).
        stats: function evaluations and steps; see :class:`SolverStats`.
    """

    ys: State
    stats: SolverStats


def solve(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Sequence[float] = 1e-7,
    atol: float | Sequence[float] = 1e-9,
    options: dict | None = None,
    adjoint: bool = False,
    adjoint_params: Sequence[Tensor] | None = None,
    adjoint_rtol: float | Sequence[float] | None = None,
    adjoint_atol: float | Sequence[float] | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
) -> Solution:
    r"""Solve :math:`dy/dt = f(t, y)`, :math:`y(t_0) = y_0` and return the solution with statistics.

    :func:`odeint` and :func:`odeint_adjoint` are this function returning ``.ys`` only.

    Args:
        func: ``func(t, y) -> dy/dt`` with ``t`` a 0-dim tensor and ``dy/dt`` of ``y``'s shape
            and dtype (a tuple of tensors for a tuple state).
        y0: initial state, a floating-point tensor of any shape or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or strictly decreasing;
            ``t[0]`` is the initial time.
        method: ``"dopri5"``, ``"tsit5"``, ``"bosh3"`` (adaptive) or ``"rk4"``, ``"midpoint"``,
            ``"euler"`` (fixed step).
        rtol, atol: relative and absolute tolerances of the local error, a number or one per
            tensor of a tuple state. A step is accepted when the RMS over all entries of
            ``err / (atol + rtol * max(|y_n|, |y_{n+1}|))`` is at most 1.
        options: solver options. Every method: ``step_size`` (fixed steps; for fixed-step
            methods without it, the steps are the intervals of ``t``), ``max_num_steps``
            (default 10000). Adaptive methods: ``first_step`` (default: Hairer-Wanner's
            estimate), ``min_step``, ``max_step``, and the PI controller's ``safety`` (0.9),
            ``ifactor`` (10), ``dfactor`` (0.2), ``pcoeff`` (0.2), ``icoeff`` (0.65):
            ``h_new = h * safety * r_n^(-(pcoeff + icoeff)/q) * r_{n-1}^(pcoeff/q)`` with ``q``
            the method's order, clipped to ``[dfactor, ifactor]``.
        adjoint: compute gradients with the adjoint method instead of backpropagating through
            the solver's operations.
        adjoint_params: tensors to differentiate with respect to in adjoint mode (default: the
            parameters of ``func``, which must then be an ``nn.Module``).
        adjoint_rtol, adjoint_atol, adjoint_method: tolerances and method of the backward solve
            (``mode="backsolve"`` only; default: the forward ones).
        adjoint_options: ``mode``: ``"checkpoint"`` (default) or ``"backsolve"``; with
            backsolve, ``norm``: ``"rms"`` or ``"seminorm"`` and solver options for the
            backward solve.

    Returns:
        :class:`Solution` with ``ys`` of shape ``(len(t), *y0.shape)``.

    Raises:
        ValueError: invalid input (the message says what to change).
        SolverError: the solve could not finish (step size underflow, ``max_num_steps``,
            non-finite solution).

    Example:
        >>> sol = solve(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
        >>> sol.ys.shape, sol.stats.nfe > 0
        (torch.Size([5, 3]), True)
    """
    problem = Problem(func, y0, t, rtol, atol)
    config = problem.config(method, options)
    stats = SolverStats()

    if adjoint:
        params = check_adjoint_params(func, adjoint_params)
        settings = make_adjoint_settings(
            problem,
            adjoint_method if adjoint_method is not None else method,
            adjoint_rtol if adjoint_rtol is not None else rtol,
            adjoint_atol if adjoint_atol is not None else atol,
            adjoint_options,
            sum(p.numel() for p in params),
        )
        if settings.mode == "checkpoint" and (
            adjoint_method is not None or adjoint_rtol is not None or adjoint_atol is not None
        ):
            raise ValueError(
                "adjoint_method/adjoint_rtol/adjoint_atol only apply to "
                "adjoint_options=dict(mode='backsolve'); checkpoint replays the forward steps"
            )
        needs_grad = torch.is_grad_enabled() and (
            problem.y0.requires_grad or problem.t.requires_grad or len(params) > 0
        )
        if needs_grad:
            ys, counts = adjoint_solve(problem, config, settings, params, stats._add_backward)
            return Solution(problem.unflatten(ys), _stats(stats, counts))

    def plain(y0: Tensor) -> tuple[Tensor, Counts]:
        outs, counts = integrate(problem.rhs, y0, problem.ts, config)
        return torch.stack(outs), counts

    if torch.is_grad_enabled() and problem.t.requires_grad:
        ys, counts = attach_time_gradient(problem, plain)
    else:
        ys, counts = plain(problem.y0)
    return Solution(problem.unflatten(ys), _stats(stats, counts))


def _stats(stats: SolverStats, counts: Counts) -> SolverStats:
    stats.nfe, stats.n_accepted, stats.n_rejected = counts.nfe, counts.n_accepted, counts.n_rejected
    stats.step_size = counts.step_size
    return stats


def odeint(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Sequence[float] = 1e-7,
    atol: float | Sequence[float] = 1e-9,
    options: dict | None = None,
) -> State:
    """Solve an ODE; a drop-in for ``torchdiffeq.odeint``. See :func:`solve` for the arguments.

    Gradients come from backpropagation through the solver's operations (the steps' sizes are
    constants), and reach ``y0``, the parameters ``func`` uses, and ``t``.

    Returns:
        the solution at every time of ``t``: shape ``(len(t), *y0.shape)``, or a tuple.
    """
    return solve(func, y0, t, method=method, rtol=rtol, atol=atol, options=options).ys


def odeint_adjoint(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Sequence[float] = 1e-7,
    atol: float | Sequence[float] = 1e-9,
    options: dict | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    adjoint_rtol: float | Sequence[float] | None = None,
    adjoint_atol: float | Sequence[float] | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
) -> State:
    """Solve an ODE with adjoint gradients; a drop-in for ``torchdiffeq.odeint_adjoint``.

    Gradients reach ``y0``, ``t`` and ``adjoint_params`` (default: ``func.parameters()``)
    without storing the solver's autograd graph; ``adjoint_options=dict(mode=...)`` picks
    ``"checkpoint"`` (default) or ``"backsolve"``. See :func:`solve` and
    :mod:`cnf.ode.adjoint`.
    """
    return solve(
        func,
        y0,
        t,
        method=method,
        rtol=rtol,
        atol=atol,
        options=options,
        adjoint=True,
        adjoint_params=adjoint_params,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
    ).ys
