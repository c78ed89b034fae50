"""Gradients of ODE solutions without storing the solver's autograd graph.

Two strategies, chosen with ``adjoint_options=dict(mode=...)``:

``"checkpoint"`` (default)
    The forward solve keeps the accepted states ``y_n`` and step sizes ``h_n`` (not the
    autograd graph). Going backwards, each step is recomputed from ``y_n`` under autograd and
    differentiated at once: ``a_n = (d y_{n+1} / d y_n)^T a_{n+1}``. This is the exact gradient
    of the discrete solution the forward pass returned, so it matches backpropagation through
    the solver to rounding, and it is stable where the continuous adjoint is not (stiff or
    dissipative fields, whose reverse-time dynamics blow up). Memory grows with the number of
    steps only by one state vector per step.

``"backsolve"`` (Chen et al. 2018)
    Solves the augmented adjoint ODE backwards between consecutive output times,

        dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta,

    from ``[y(t_i), a_i, g]``, restarting ``y`` from the stored forward output at each output
    time. Memory is constant in the number of steps. ``norm="seminorm"`` (Kidger, Chen & Lyons
    2021) leaves the ``g`` channels out of the error norm: they do not feed back into the
    dynamics, so controlling their error only costs steps.

Gradients with respect to the output times use ``dL/dt_i = <dL/dy_i, f(t_i, y_i)>`` and, for
the initial time, ``dL/dt_0 -= <dL/dy_0, f(t_0, y_0)>`` (shifting ``t_0`` with ``y_0`` fixed
moves the whole trajectory), so no extra channel is integrated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .problem import Problem, make_config, tolerance_vector
from .stepping import Config, Counts, Record, dense_output, integrate, rk_step

__all__ = ["AdjointSettings", "adjoint_solve", "attach_time_gradient"]

_MODES = ("checkpoint", "backsolve")
_NORMS = ("rms", "seminorm")


@dataclass(frozen=True)
class AdjointSettings:
    """Validated adjoint settings; ``backward`` is the backsolve solver's config (else None)."""

    mode: str
    backward: Config | None


def make_adjoint_settings(
    problem: Problem,
    method: str,
    rtol,
    atol,
    options: dict | None,
    n_params: int,
) -> AdjointSettings:
    """Check ``adjoint_*`` arguments. ``method``/``rtol``/``atol`` are already defaulted."""
    options = dict(options or {})
    mode = options.pop("mode", "checkpoint")
    norm = options.pop("norm", "rms")
    if mode not in _MODES:
        raise ValueError(f"unknown adjoint mode {mode!r}; choose one of {', '.join(_MODES)}")
    if norm not in _NORMS:
        raise ValueError(f"unknown adjoint norm {norm!r}; choose one of {', '.join(_NORMS)}")
    if mode == "checkpoint":
        extra = sorted(options) + (["norm"] if norm != "rms" else [])
        if extra:
            raise ValueError(
                "adjoint_options other than mode only apply to mode='backsolve' (checkpoint "
                f"replays the forward steps); got {extra}"
            )
        return AdjointSettings(mode=mode, backward=None)
    # The augmented state [y, a, g] is solved with the adjoint tolerances (per state tensor,
    # like the forward) for y and a, and the tightest of them for g. Its error norm is the
    # largest RMS over the sections (each tensor of y, of a, and g), so the many gradient
    # entries cannot average away the error of the few state entries; the seminorm drops g.
    fwd = problem
    tol_y = [
        tolerance_vector(name, tol, fwd.sizes, fwd.is_tuple, fwd.y0)
        for name, tol in (("adjoint_atol", atol), ("adjoint_rtol", rtol))
    ]
    tols = [torch.cat([v, v, v.new_full((n_params,), v.min().item())]) for v in tol_y]
    sections = (*fwd.sizes, *fwd.sizes) + (
        () if norm == "seminorm" or not n_params else (n_params,)
    )
    cfg = make_config(method, *tols, options, time_eps=fwd.time_eps, norm_sizes=sections)
    return AdjointSettings(mode=mode, backward=cfg)


class _Adjoint(torch.autograd.Function):
    """``ys = solve(y0)`` with a hand-written backward; see the module docstring."""

    @staticmethod
    def forward(ctx, run: _Run, t: Tensor, y0: Tensor, *params: Tensor) -> Tensor:
        record = Record() if run.settings.mode == "checkpoint" else None
        outs, counts = integrate(run.problem.rhs, y0, run.problem.ts, run.config, record=record)
        run.forward_counts = counts
        ys = torch.stack(outs)
        ctx.run, ctx.record = run, record
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        run: _Run = ctx.run
        (ys,) = ctx.saved_tensors
        if run.settings.mode == "checkpoint":
            grad_y0, grad_params, counts = _checkpoint_backward(run, ctx.record, grad_ys)
        else:
            grad_y0, grad_params, counts = _backsolve_backward(run, ys, grad_ys)
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t, nfe = _time_gradient(run.problem, ys, grad_ys, grad_y0)
            counts.nfe += nfe
        run.on_backward(counts)
        return (None, grad_t, grad_y0, *grad_params)


@dataclass
class _Run:
    problem: Problem
    config: Config
    settings: AdjointSettings
    params: tuple[Tensor, ...]
    on_backward: Callable[[Counts], None]
    forward_counts: Counts | None = None


def adjoint_solve(
    problem: Problem,
    config: Config,
    settings: AdjointSettings,
    params: tuple[Tensor, ...],
    on_backward: Callable[[Counts], None],
) -> tuple[Tensor, Counts]:
    """Solve with adjoint gradients; returns stacked flat outputs ``(T, N)`` and the counts."""
    run = _Run(problem, config, settings, params, on_backward)
    ys = _Adjoint.apply(run, problem.t, problem.y0, *params)
    return ys, run.forward_counts


def _vjp_inputs(params: tuple[Tensor, ...]):
    zeros = [torch.zeros_like(p) for p in params]

    def fill(grads) -> list[Tensor]:
        return [z if g is None else g for g, z in zip(grads, zeros)]

    return fill


def _checkpoint_backward(run: _Run, record: Record, grad_ys: Tensor):
    problem, tab = run.problem, run.config.tableau
    params = run.params
    fill = _vjp_inputs(params)
    counts = Counts()

    def rhs(t: float, y: Tensor) -> Tensor:
        counts.nfe += 1
        return problem.rhs(t, y)

    by_step: dict[int, list[tuple[int, float | None]]] = defaultdict(list)
    for i, (n, theta) in enumerate(record.outputs):
        by_step[n].append((i, theta))

    a = torch.zeros_like(grad_ys[0])
    grad_params = [torch.zeros_like(p) for p in params]
    for n in range(len(record.steps) - 1, -1, -1):
        t, h, y = record.steps[n]
        interior = []
        for i, theta in by_step.get(n, ()):
            if theta is None:
                a = a + grad_ys[i]
            else:
                interior.append((i, theta))
        with torch.enable_grad():
            yv = y.detach().requires_grad_(True)
            y1, ks = rk_step(rhs, tab, t, yv, rhs(t, yv), h, last_stage=bool(interior))
            outputs, cotangents = [y1], [a]
            if interior:
                stages = ks if tab.fsal else ks + [rhs(t + h, y1)]
                for i, theta in interior:
                    outputs.append(dense_output(tab, yv, stages, h, theta))
                    cotangents.append(grad_ys[i])
            grads = torch.autograd.grad(outputs, (yv, *params), cotangents, allow_unused=True)
        a = grads[0] if grads[0] is not None else torch.zeros_like(a)
        for acc, g in zip(grad_params, fill(grads[1:])):
            acc.add_(g)
        counts.n_accepted += 1
    for i, _ in by_step.get(-1, ()):
        a = a + grad_ys[i]
    return a, grad_params, counts


def _backsolve_backward(run: _Run, ys: Tensor, grad_ys: Tensor):
    problem, params = run.problem, run.params
    cfg = run.settings.backward
    shape = ys.shape[1:]
    n = ys[0].numel()
    fill = _vjp_inputs(params)
    sizes = [p.numel() for p in params]

    def aug_rhs(t: float, z: Tensor) -> Tensor:
        with torch.enable_grad():
            y = z[:n].detach().view(shape).requires_grad_(True)
            fy = problem.rhs(t, y)
            cotangent = -z[n : 2 * n].view(shape)
            grads = torch.autograd.grad(fy, (y, *params), cotangent, allow_unused=True)
        vjp_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
        return torch.cat(
            [fy.detach().reshape(-1), vjp_y.reshape(-1), *(g.reshape(-1) for g in fill(grads[1:]))]
        )

    total = Counts()
    a = grad_ys[-1]
    g = ys.new_zeros(sum(sizes))
    ts = problem.ts
    h = None
    for i in range(len(ts) - 1, 0, -1):
        z0 = torch.cat([ys[i].reshape(-1), a.reshape(-1), g])
        outs, counts = integrate(aug_rhs, z0, [ts[i], ts[i - 1]], replace(cfg, first_step=h))
        h = counts.step_size
        z1 = outs[-1]
        a = z1[n : 2 * n].view(shape) + grad_ys[i - 1]
        g = z1[2 * n :]
        total.nfe += counts.nfe
        total.n_accepted += counts.n_accepted
        total.n_rejected += counts.n_rejected
    if len(ts) == 1:
        a = grad_ys[0]
    grad_params = [part.view_as(p) for part, p in zip(g.split(sizes), params)]
    return a, grad_params, total


def _inner(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _time_gradient(problem: Problem, ys: Tensor, grad_ys: Tensor, grad_y0: Tensor):
    """``dL/dt_i = <g_i, f(t_i, y_i)>``, and ``dL/dt_0 -= <dL/dy_0, f(t_0, y_0)>``."""
    with torch.no_grad():
        fs = [problem.rhs(t, y) for t, y in zip(problem.ts, ys)]
        grad = torch.stack([_inner(g, f) for g, f in zip(grad_ys, fs)])
        grad[0] -= _inner(grad_y0, fs[0])
    return grad.to(problem.t.dtype), len(fs)


class _TimeOutputs(torch.autograd.Function):
    """Identity on ``ys`` that routes ``dL/dt_i = <g_i, f(t_i, y_i)>`` to ``t``."""

    @staticmethod
    def forward(ctx, problem: Problem, t: Tensor, ys: Tensor) -> Tensor:
        ctx.problem = problem
        ctx.save_for_backward(ys)
        return ys.view_as(ys)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        (ys,) = ctx.saved_tensors
        problem = ctx.problem
        with torch.no_grad():
            grad_t = torch.stack(
                [_inner(g, problem.rhs(t, y)) for t, g, y in zip(problem.ts, grad_ys, ys)]
            )
        return None, grad_t.to(problem.t.dtype), grad_ys


class _TimeInitial(torch.autograd.Function):
    """Identity on ``y0`` that routes ``dL/dt_0 = -<dL/dy_0, f(t_0, y_0)>`` to ``t``."""

    @staticmethod
    def forward(ctx, problem: Problem, t: Tensor, y0: Tensor) -> Tensor:
        ctx.problem = problem
        ctx.save_for_backward(y0)
        return y0.view_as(y0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y0: Tensor):
        (y0,) = ctx.saved_tensors
        problem = ctx.problem
        with torch.no_grad():
            grad_t = torch.zeros(len(problem.ts), dtype=problem.t.dtype, device=grad_y0.device)
            grad_t[0] = -_inner(grad_y0, problem.rhs(problem.ts[0], y0))
        return None, grad_t, grad_y0


def attach_time_gradient(
    problem: Problem, solve: Callable[[Tensor], tuple[Tensor, Counts]]
) -> tuple[Tensor, Counts]:
    """Run ``solve(y0) -> (ys, counts)`` so that backpropagation also reaches ``problem.t``.

    For solves differentiated by autograd: the steps are taken with float step sizes, so the
    dependence on the output times is attached here, exactly, by the formulas above.
    """
    y0 = _TimeInitial.apply(problem, problem.t, problem.y0)
    ys, counts = solve(y0)
    return _TimeOutputs.apply(problem, problem.t, ys), counts
