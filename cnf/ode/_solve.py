"""Entry points: :func:`solve`, and torchdiffeq's :func:`odeint` and :func:`odeint_adjoint`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor

from ._adjoint import AdjointSolve
from ._control import Config
from ._integrate import Counts, integrate
from ._per_sample import solve_per_sample
from ._problem import SCIPY_SOLVER, Problem, State, check_adjoint_params
from ._scipy import scipy_solve
from ._strategies import ADJOINT_KEYWORDS, AdjointStrategy, to_strategy
from ._time import attach_time_gradient

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; annotations are not evaluated at runtime
    from typing_extensions import Unpack

__all__ = [
    "AdjointKeywords",
    "Solution",
    "SolverKeywords",
    "SolverStats",
    "odeint",
    "odeint_adjoint",
    "solve",
]

VectorField = Callable[[Tensor, State], State]
Tolerance = float | Sequence[float]


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

    def _set_forward(self, counts: Counts) -> SolverStats:
        self.nfe, self.n_accepted, self.n_rejected = (
            counts.nfe,
            counts.n_accepted,
            counts.n_rejected,
        )
        self.step_size = counts.step_size
        return self

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


class SolverKeywords(TypedDict, total=False):
    """The keywords :func:`odeint` and :func:`odeint_adjoint` pass on to :func:`solve`."""

    method: str
    rtol: Tolerance
    atol: Tolerance
    options: Mapping | None


class AdjointKeywords(SolverKeywords, total=False):
    """The keywords of :func:`odeint_adjoint`: :func:`solve`'s, but for ``adjoint``."""

    adjoint_params: Sequence[Tensor] | None
    adjoint_rtol: Tolerance | None
    adjoint_atol: Tolerance | None
    adjoint_method: str | None
    adjoint_options: Mapping | None


def solve(
    func: VectorField,
    y0: State,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: Tolerance = 1e-7,
    atol: Tolerance = 1e-9,
    options: Mapping | None = None,
    adjoint: bool | AdjointStrategy = False,
    adjoint_params: Sequence[Tensor] | None = None,
    adjoint_rtol: Tolerance | None = None,
    adjoint_atol: Tolerance | None = None,
    adjoint_method: str | None = None,
    adjoint_options: Mapping | None = None,
) -> Solution:
    r"""Solve :math:`dy/dt = f(t, y)`, :math:`y(t_0) = y_0`; the solution and its statistics.

    Args:
        func: ``func(t, y) -> dy/dt``, ``t`` a 0-dim tensor (``options["steps"]="sample"``: one
            per row of ``y``), ``dy/dt`` of ``y``'s shape and dtype (a tuple for a tuple state).
        y0: initial state, a floating-point tensor of any shape or a tuple of tensors.
        t: output times, shape ``(T,)``, strictly monotonic; ``t[0]`` is the initial time.
        method: one of :data:`METHODS`, or ``"scipy_solver"`` (stiff, no gradients; :mod:`cnf.ode`).
        rtol, atol: local error tolerances, a number or one per tensor of a tuple state: a step
            is accepted when the RMS of ``err / (atol + rtol * max(|y_n|, |y_{n+1}|))`` is <= 1.
        options: solver options; see :mod:`cnf.ode`.
        adjoint: ``False`` to backpropagate through the solver's operations, or an adjoint
            strategy (:class:`Checkpoint`, :class:`Backsolve`; ``True`` is ``Checkpoint()``).
        adjoint_params: what the adjoint differentiates besides ``y0`` and ``t`` (default:
            ``func.parameters()``, for an ``nn.Module``).
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: torchdiffeq's adjoint
            settings with ``adjoint=True``; all but ``mode`` need ``mode="backsolve"`` (see
            :func:`adjoint_strategy`).

    Returns:
        :class:`Solution` with ``ys`` of shape ``(T, *y0.shape)`` (a tuple for a tuple state).

    Raises:
        ValueError: invalid input (the message says what to change).
        SolverError: the solve could not finish (step size underflow, ``max_num_steps``,
            non-finite solution).

    Example:
        >>> solve(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5)).ys.shape
        torch.Size([5, 3])
    """
    problem = Problem(func, y0, t, rtol, atol)
    strategy = to_strategy(adjoint, adjoint_options, adjoint_rtol, adjoint_atol, adjoint_method)
    if method == SCIPY_SOLVER:
        return _scipy_solve(problem, options, strategy is not None or adjoint_params is not None)
    config = problem.config(method, options)
    if problem.y0.numel() == 0:
        return _empty_solve(problem)
    if strategy is None:
        if adjoint_params is not None:
            raise ValueError("adjoint_params only apply to adjoint solves; pass adjoint=True")
        return _plain_solve(problem, config)
    params = check_adjoint_params(func, adjoint_params)
    return _adjoint_solve(AdjointSolve(problem, config, strategy, params))


def _scipy_solve(problem: Problem, options: Mapping | None, adjoint: bool) -> Solution:
    """A forward solve by scipy's ``solve_ivp``, for stiff problems; no gradients, no adjoint."""
    ys, nfe = scipy_solve(problem, options, adjoint)
    return Solution(problem.unflatten(ys), SolverStats(nfe=nfe))


def _empty_solve(problem: Problem) -> Solution:
    """A state without entries (an empty batch) stays empty: ``len(t)`` copies, no work.

    The copies stay connected to ``y0`` and ``t`` for autograd (with zero gradients).
    """
    ys = problem.y0.unsqueeze(0).expand(len(problem.ts), *problem.y0.shape)
    if problem.t.requires_grad:
        ys = ys + 0 * problem.t.sum().to(ys.dtype)
    return Solution(problem.unflatten(ys.clone()), SolverStats())


def _adjoint_solve(adjoint: AdjointSolve) -> Solution:
    """An adjoint solve, or a plain one where nothing needs gradients."""
    problem = adjoint.problem
    needs_grad = problem.y0.requires_grad or problem.t.requires_grad or len(adjoint.params) > 0
    if not (torch.is_grad_enabled() and needs_grad):
        return _plain_solve(problem, adjoint.config)
    if adjoint.config.sample_steps:  # no record of per-sample steps for an adjoint to replay
        raise ValueError(
            "options['steps']='sample' takes gradients by backpropagation through the solve "
            "only: use solve(..., adjoint=False) or odeint (not odeint_adjoint, Checkpoint or "
            "Backsolve; solves without gradients run), or steps='shared' for an adjoint"
        )
    stats = SolverStats()
    ys, counts = adjoint.run(stats._add_backward)
    return Solution(problem.unflatten(ys), stats._set_forward(counts))


def _plain_solve(problem: Problem, config: Config) -> Solution:
    """A solve that autograd differentiates step by step, if anything needs gradients."""
    if config.sample_steps:
        ys, counts = solve_per_sample(problem, config)
        return Solution(problem.unflatten(ys), SolverStats()._set_forward(counts))

    def run(y0: Tensor) -> tuple[Tensor, Counts]:
        outs, counts = integrate(problem.rhs, y0, problem.ts, config)
        return torch.stack(outs), counts

    if torch.is_grad_enabled() and problem.t.requires_grad:
        ys, counts = attach_time_gradient(problem, run)
    else:
        ys, counts = run(problem.y0)
    return Solution(problem.unflatten(ys), SolverStats()._set_forward(counts))


def odeint(
    func: VectorField,
    y0: State,
    t: Tensor,
    *,
    event_fn: Callable | None = None,
    **kwargs: Unpack[SolverKeywords],
) -> State | tuple[Tensor, State]:
    """Solve an ODE; a drop-in for ``torchdiffeq.odeint``.

    Takes :func:`solve`'s ``method``, ``rtol``, ``atol`` and ``options``. Gradients come from
    backpropagation through the solver's operations (the step sizes are constants), and reach
    ``y0``, the parameters ``func`` uses, and ``t``.

    With ``event_fn(t, y) -> Tensor``, ``t`` has 2 entries (the start and the direction) and
    the solve runs until ``event_fn`` crosses zero: see :mod:`cnf.ode._event`.

    Returns:
        the solution at every time of ``t``: shape ``(len(t), *y0.shape)``, or a tuple; with
        ``event_fn``, ``(event_t, solution at [t[0], event_t])``.
    """
    _default_method(kwargs)
    if event_fn is not None:
        from ._event import odeint_until_event  # _event builds on this module

        return odeint_until_event(func, y0, t, event_fn, adjoint=False, **kwargs)
    return solve(func, y0, t, adjoint=False, **kwargs).ys


def _default_method(kwargs: dict) -> None:
    """torchdiffeq's ``method=None``: its default, dopri5 (:func:`solve` takes names only)."""
    if "method" in kwargs and kwargs["method"] is None:
        kwargs["method"] = "dopri5"


def odeint_adjoint(
    func: VectorField,
    y0: State,
    t: Tensor,
    *,
    event_fn: Callable | None = None,
    **kwargs: Unpack[AdjointKeywords],
) -> State | tuple[Tensor, State]:
    """Solve an ODE with adjoint gradients; a drop-in for ``torchdiffeq.odeint_adjoint``.

    Takes :func:`solve`'s keywords but ``adjoint``. Gradients reach ``y0``, ``t`` and
    ``adjoint_params`` (default: ``func.parameters()``) without storing the solver's autograd
    graph.

    The adjoint settings read as torchdiffeq's, whose adjoint always solves backwards: with
    none of them, the gradients come from :class:`Checkpoint`; without a ``mode``, a backsolve
    setting (``norm`` or backward solver options in ``adjoint_options``, or any of
    ``adjoint_rtol``/``adjoint_atol``/``adjoint_method``) means :class:`Backsolve` with those
    settings, so ``adjoint_options=dict(norm="seminorm")`` works as it does there;
    ``mode="checkpoint"`` or ``"backsolve"`` chooses explicitly. :func:`solve` is stricter:
    there, backsolve settings need ``mode="backsolve"``.

    ``event_fn`` as in :func:`odeint`.

    Returns:
        the solution at every time of ``t``: shape ``(len(t), *y0.shape)``, or a tuple; with
        ``event_fn``, ``(event_t, solution at [t[0], event_t])``.
    """
    _default_method(kwargs)
    settings = {key: kwargs.pop(key, None) for key in ADJOINT_KEYWORDS}
    strategy = to_strategy(True, **settings, implied_backsolve=True)
    if event_fn is not None:
        from ._event import odeint_until_event  # _event builds on this module

        return odeint_until_event(func, y0, t, event_fn, adjoint=strategy, **kwargs)
    return solve(func, y0, t, adjoint=strategy, **kwargs).ys
