r"""Gradients with respect to the output times, by formula rather than through the solver.

The solver steps with float step sizes, so autograd cannot see how the solution depends on
``t``; the dependence is exact and simple, though. An output :math:`y_i = y(t_i)` moves with
its time at the rate :math:`f(t_i, y_i)`, and shifting the initial time :math:`t_0` with
:math:`y_0` held fixed shifts the whole trajectory, so

.. math::
    \frac{\partial L}{\partial t_i} = \Big\langle \frac{\partial L}{\partial y_i},
        f(t_i, y_i) \Big\rangle, \qquad
    \frac{\partial L}{\partial t_0} \mathrel{-}= \Big\langle \frac{\partial L}{\partial y_0},
        f(t_0, y_0) \Big\rangle,

where :math:`\partial L / \partial y_0` in the second term is the gradient reaching the
initial state through the whole solve. No extra channel is integrated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._integrate import Counts
from ._problem import Problem

__all__ = ["attach_time_gradient", "time_gradient", "with_initial_time_gradient"]


def _inner(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def time_gradient(
    problem: Problem, ys: Tensor, grad_ys: Tensor, grad_y0: Tensor | None = None
) -> tuple[Tensor, int]:
    """``dL/dt``, shape ``(T,)``, from the outputs ``ys`` ``(T, *y0.shape)`` and their gradients.

    ``grad_y0``, the gradient reaching the initial state, adds the initial-time term. Returns
    the gradient in ``t``'s dtype and the number of evaluations of ``f`` it took.
    """
    with torch.no_grad():
        fs = [problem.rhs(t, y) for t, y in zip(problem.ts, ys)]
        grad = torch.stack([_inner(g, f) for g, f in zip(grad_ys, fs)])
        if grad_y0 is not None:
            grad[0] -= _inner(grad_y0, fs[0])
    return grad.to(problem.t.dtype), len(fs)


def _initial_time_gradient(problem: Problem, y0: Tensor, grad_y0: Tensor) -> Tensor:
    """``dL/dt``, shape ``(T,)``: only the initial-time term, ``-<dL/dy_0, f(t_0, y_0)>``."""
    with torch.no_grad():
        grad = torch.zeros(len(problem.ts), dtype=problem.t.dtype, device=grad_y0.device)
        grad[0] = -_inner(grad_y0, problem.rhs(problem.ts[0], y0))
    return grad


class _RouteToTime(torch.autograd.Function):
    """The identity on ``x`` whose backward also sends ``dL/dt = rule(dL/dx, x)`` to ``t``."""

    @staticmethod
    def forward(ctx, rule: Callable[[Tensor, Tensor], Tensor], t: Tensor, x: Tensor) -> Tensor:
        ctx.rule = rule
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor):
        (x,) = ctx.saved_tensors
        return None, ctx.rule(grad_x, x), grad_x


def with_initial_time_gradient(problem: Problem, y0: Tensor) -> Tensor:
    """``y0`` itself, whose backward also sends ``-<dL/dy_0, f(t_0, y_0)>`` to ``t[0]``: the
    initial-time term, for solves whose outputs carry no time gradient of their own."""
    return _RouteToTime.apply(lambda g, y: _initial_time_gradient(problem, y, g), problem.t, y0)


def attach_time_gradient(
    problem: Problem, solve: Callable[[Tensor], tuple[Tensor, Counts]]
) -> tuple[Tensor, Counts]:
    """Run ``solve(y0) -> (ys, counts)`` so that backpropagation also reaches ``problem.t``.

    For solves differentiated by autograd: the output-time terms are attached to ``ys``, the
    initial-time term to ``y0``, where the gradient through the whole solve arrives.
    """
    ys, counts = solve(with_initial_time_gradient(problem, problem.y0))
    ys = _RouteToTime.apply(lambda g, ys: time_gradient(problem, ys, g)[0], problem.t, ys)
    return ys, counts
