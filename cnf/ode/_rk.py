"""One generic explicit Runge-Kutta step and its dense output, for every tableau.

Everything here works on one state tensor ``y`` (any shape) and a right-hand side
``f(t: float, y: Tensor) -> Tensor``; :mod:`cnf.ode._problem` adapts the user's function and
state to that form.

The per-step work is kept to a handful of tensor operations, because for small states (a
batch of 2-D points) the cost of an ODE solve is dominated by per-operation overhead, not by
arithmetic: stage inputs are accumulated with ``torch.add(y, k, alpha=h * a_ij)``, skipping
zero coefficients, rather than by stacking the stages, which costs more than it saves below
~10^4 entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .tableaus import ButcherTableau

__all__ = ["dense_output", "dense_output_rows", "rk_step"]

Rhs = Callable[[float, Tensor], Tensor]


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

    Args:
        f: the right-hand side.
        tab: the method.
        t, y: where the step starts; ``y`` of any shape.
        k0: ``f(t, y)``, shaped like ``y``.
        h: the signed step size.
        last_stage: whether to evaluate an FSAL tableau's last stage.
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


def dense_output_rows(tab: ButcherTableau, y: Tensor, hks: list[Tensor], theta: Tensor) -> Tensor:
    """:func:`dense_output` with a step and a ``theta`` per row (per-sample steps).

    ``y`` is ``(R, ...)``, ``theta`` ``(R,)`` and ``hks`` the stages already multiplied by each
    row's step, ``h_r k_i`` (plus ``h_r f(t + h_r, y1)`` for a tableau that is not FSAL):
    ``y_r + sum_i b_i(theta_r) h_r k_i``, with the tableau's own weights ``b_i(theta)``.
    """
    weights = torch.as_tensor(tab.dense, dtype=theta.dtype, device=theta.device)
    powers = theta[:, None] ** torch.arange(
        1, weights.shape[1] + 1, dtype=theta.dtype, device=theta.device
    )
    w = (powers @ weights.T).to(y.dtype)  # (R, stages)
    out = y
    for i, k in enumerate(hks):
        out = out + w[:, i].view(-1, *(1,) * (y.ndim - 1)) * k
    return out


def _axpy_sum(y: Tensor, ks: list[Tensor], coeffs, h: float) -> Tensor:
    """``y + h sum_i coeffs_i k_i``, skipping zero coefficients."""
    out = y
    for k, a in zip(ks, coeffs):
        if a != 0.0:
            out = torch.add(out, k, alpha=h * a)
    return out
