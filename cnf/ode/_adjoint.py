"""Gradients of ODE solutions without storing the solver's autograd graph.

:class:`AdjointSolve` runs the forward solve inside one ``torch.autograd.Function`` and, in its
backward pass, either replays the recorded steps (:class:`~cnf.ode.Checkpoint`) or solves the
augmented adjoint ODE backwards (:class:`~cnf.ode.Backsolve`); the strategies' docstrings give
the equations. Gradients with respect to the output times come from :mod:`cnf.ode._time`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._callbacks import callbacks_of
from ._control import Config
from ._integrate import Counts, integrate
from ._keep import GraphKeep
from ._landmarks import step_sides
from ._output import Record
from ._problem import Problem, make_config, tolerance_vector
from ._rk import dense_output, rk_step
from ._strategies import AdjointStrategy, Backsolve
from ._time import time_gradient

__all__ = ["AdjointSolve"]


class AdjointSolve:
    """One solve with adjoint gradients: settings checked on construction, run by :meth:`run`.

    Args:
        problem: the checked problem.
        config: the forward solver's settings.
        strategy: :class:`~cnf.ode.Checkpoint` or :class:`~cnf.ode.Backsolve`.
        params: the tensors to differentiate with respect to, besides ``y0`` and ``t``.
    """

    def __init__(
        self,
        problem: Problem,
        config: Config,
        strategy: AdjointStrategy,
        params: tuple[Tensor, ...],
    ) -> None:
        self.problem, self.config, self.params = problem, config, params
        # Built now, not in the backward pass, so that bad settings fail at the call.
        self.backward_config = (
            _backsolve_config(problem, config, strategy, params)
            if isinstance(strategy, Backsolve)
            else None
        )
        # bytes of graph the checkpoint's forward solve keeps (cnf.ode._keep); 0: replay all
        self.graph_memory = 0 if self.backward_config is not None else strategy.graph_memory
        self.forward_counts = Counts()
        self.on_backward: Callable[[Counts], None] = lambda counts: None
        # func's callback_step_adjoint & co.: on each replayed step (checkpoint) or with the
        # backward solve's own steps (backsolve), as the state [y, a, g] in the user's shapes
        self.callbacks = callbacks_of(
            problem.func, suffix="_adjoint", to_user=self._augmented_to_user, adaptive=True
        )
        if self.backward_config is not None and self.callbacks is not None:
            self.backward_config = replace(self.backward_config, callbacks=self.callbacks)
        if self.callbacks is not None:  # they are called on the replayed steps
            self.graph_memory = 0

    def _augmented_to_user(self, z: Tensor) -> tuple:
        """A flat state ``y`` (checkpoint replay) or ``[y, a, g]`` (backsolve) for callbacks."""
        problem = self.problem
        n = problem.y0.numel()
        if z.numel() == n:
            return problem.to_user(z.reshape(problem.y0.shape))
        y, a, g = z[:n], z[n : 2 * n], z[2 * n :]
        shape = problem.y0.shape
        return (problem.to_user(y.view(shape)), problem.to_user(a.view(shape)), g)

    def run(self, on_backward: Callable[[Counts], None]) -> tuple[Tensor, Counts]:
        """Solve; returns the stacked flat outputs ``(T, *y0.shape)`` and the forward counts.

        ``on_backward(counts)`` receives the backward pass's counts once it has run.
        """
        self.on_backward = on_backward
        ys = _AdjointFunction.apply(self, self.problem.t, self.problem.y0, *self.params)
        return ys, self.forward_counts


def _backsolve_config(
    problem: Problem, config: Config, strategy: Backsolve, params: tuple[Tensor, ...]
) -> Config:
    """The backward solver's settings for the augmented state ``[y, a, g]``.

    ``y`` and ``a`` take the adjoint tolerances (per state tensor, like the forward), ``g`` the
    tightest of them. The error norm is the largest RMS over the sections (each tensor of
    ``y``, of ``a``, and ``g``), so the many gradient entries cannot average away the error of
    the few state entries; the seminorm leaves ``g`` out. With ``options["norm"] ==
    "sample"``: the largest RMS over the sections and the samples of ``y`` and ``a``, and
    ``g``'s RMS as one section (it has no samples).
    """
    n_params = sum(p.numel() for p in params)
    tol_y = [
        forward.reshape(-1)
        if tol is None
        else tolerance_vector(name, tol, problem.sizes, problem.is_tuple, problem.y0)
        for name, tol, forward in (
            ("adjoint_atol", strategy.atol, problem.atol),
            ("adjoint_rtol", strategy.rtol, problem.rtol),
        )
    ]
    tols = [torch.cat([v, v, v.new_full((n_params,), v.min().item())]) for v in tol_y]
    leave_out_g = strategy.norm == "seminorm" or not n_params
    sections = (*problem.sizes, *problem.sizes) + (() if leave_out_g else (n_params,))
    method = strategy.method if strategy.method is not None else config.tableau.name
    if callable(strategy.norm):
        cfg = make_config(method, *tols, strategy.options, time_eps=problem.time_eps)
        return replace(cfg, norm=_user_adjoint_norm(problem, strategy.norm, params))
    # the per-sample norm (options["norm"] == "sample"): y and a by the forward's samples, g
    # (no batch dimension: a sum over the samples) measured whole, as one more row
    rows = problem.rows()
    rows = None if rows is None else (*rows, *rows) + (() if leave_out_g else (1,))
    cfg = make_config(
        method, *tols, strategy.options, time_eps=problem.time_eps, norm_sizes=sections,
        rows=rows,
    )  # fmt: skip
    # data-parallel processes each hold their shard's part of the gradient sum g: agreeing
    # norms add those parts up before measuring them (cnf.ode._agree)
    return cfg if leave_out_g else replace(cfg, shared=n_params)


def _user_adjoint_norm(problem: Problem, norm: Callable, params: tuple[Tensor, ...]):
    """A user's adjoint norm on the flat scaled error of ``[y, a, g]``, called as torchdiffeq
    calls it: with ``(t, *y, *adj_y, *adj_params)`` in the user's shapes."""
    n, shape = problem.y0.numel(), problem.y0.shape
    sizes = [p.numel() for p in params]

    def parts(tensor: Tensor) -> tuple[Tensor, ...]:
        user = problem.to_user(tensor.view(shape))
        return user if problem.is_tuple else (user,)

    def apply(z: Tensor):
        gs = [g.view_as(p) for g, p in zip(z[2 * n :].split(sizes), params)]
        t = z.new_zeros(())
        return norm((t, *parts(z[:n]), *parts(z[n : 2 * n]), *gs))

    return apply


class _AdjointFunction(torch.autograd.Function):
    """``ys = solve(y0)`` with a hand-written backward pass."""

    @staticmethod
    def forward(ctx, solve: AdjointSolve, t: Tensor, y0: Tensor, *params: Tensor) -> Tensor:
        record = Record() if solve.backward_config is None else None
        problem = solve.problem
        if record is not None and solve.graph_memory > 0:
            record.keep = GraphKeep(solve.graph_memory)
            y0 = y0.detach().requires_grad_(True)  # where the kept graph starts
            with torch.enable_grad():
                outs, solve.forward_counts = integrate(
                    record.keep.measured(problem.rhs), y0, problem.ts, solve.config, record=record
                )
            keep = record.keep
            keep.finish(len(record.steps))
            # the kept graph goes into saved tensors, which autograd frees with the caller's
            # graph (and keeps for a retain_graph=True caller), never into attributes of ctx
            kept = (y0, keep.cut_state, *outs) if keep.kept else ()
            keep.cut_state = None
            outs = [y.detach() for y in outs]
        else:
            kept = ()
            outs, solve.forward_counts = integrate(
                problem.rhs, y0, problem.ts, solve.config, record=record
            )
        ys = torch.stack(outs)
        ctx.solve, ctx.record = solve, record
        ctx.save_for_backward(ys, *kept)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        solve: AdjointSolve = ctx.solve
        ys, *kept = ctx.saved_tensors
        if ctx.record is not None:
            grad_y0, grad_params, counts = _checkpoint_backward(
                solve, ctx.record, grad_ys, kept or None
            )
        else:
            grad_y0, grad_params, counts = _backsolve_backward(solve, ys, grad_ys)
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t, nfe = time_gradient(solve.problem, ys, grad_ys, grad_y0)
            counts.nfe += nfe
        solve.on_backward(counts)
        return (None, grad_t, grad_y0, *grad_params)


def _vjp_filler(params: tuple[Tensor, ...]) -> Callable[[tuple], list[Tensor]]:
    """Replaces the ``None`` gradients of unused parameters by zeros (allocated once)."""
    zeros = [torch.zeros_like(p) for p in params]

    def fill(grads) -> list[Tensor]:
        return [z if g is None else g for g, z in zip(grads, zeros)]

    return fill


def _checkpoint_backward(solve: AdjointSolve, record: Record, grad_ys: Tensor, kept):
    """``a_n = (d y_{n+1} / d y_n)^T a_{n+1}`` over the recorded steps, last to first.

    An output read inside step ``n`` by dense output adds its own vector-Jacobian product;
    one at a step's end point joins ``a`` before that step is replayed. With ``kept = [y0,
    cut_state, *outputs]``, the forward solve kept the graph of its first ``record.keep.kept``
    steps: those are not replayed but backpropagated through, from ``cut_state`` (where
    replaying ended; None if no step was replayed) and from their outputs.
    """
    params = solve.params
    fill = _vjp_filler(params)
    counts = Counts()

    def rhs(t: float, y: Tensor, side: float = 0.0) -> Tensor:
        counts.nfe += 1
        return solve.problem.rhs(t, y, side)

    cb = solve.callbacks
    by_step: dict[int, list[tuple[int, float | None]]] = defaultdict(list)
    for i, (n, theta) in enumerate(record.outputs):
        by_step[n].append((i, theta))

    a = torch.zeros_like(grad_ys[0])
    grad_params = [torch.zeros_like(p) for p in params]
    first = record.keep.kept if kept is not None else 0  # the first step replayed
    for n in range(len(record.steps) - 1, first - 1, -1):
        interior = []
        for i, theta in by_step.get(n, ()):
            if theta is None:
                a = a + grad_ys[i]
            else:
                interior.append((i, theta))
        if cb is not None:
            t_n, h_n, y_n = record.steps[n]
            cb.step(t_n, y_n, h_n)
            cb.accept(t_n, y_n, h_n)
        grads = _replay_step(
            solve, rhs, record.steps[n], a, [(grad_ys[i], th) for i, th in interior]
        )
        a = grads[0] if grads[0] is not None else torch.zeros_like(a)
        for acc, g in zip(grad_params, fill(grads[1:])):
            acc.add_(g)
        counts.n_accepted += 1
    if kept is not None:
        a = _through_kept_graph(solve, record, grad_ys, kept, a, by_step, grad_params, fill)
        return a, grad_params, counts
    for i, _ in by_step.get(-1, ()):
        a = a + grad_ys[i]
    return a, grad_params, counts


def _through_kept_graph(solve, record, grad_ys, kept, a, by_step, grad_params, fill) -> Tensor:
    """Backpropagate through the kept steps: from the state where replaying stopped (with
    cotangent ``a``) and from the outputs read in those steps; adds to ``grad_params`` (unused
    parameters' ``None`` filled in by ``fill``) and returns the gradient of ``y0``."""
    y0, cut_state, *outs = kept
    outputs, cotangents = [], []
    if cut_state is not None:
        outputs.append(cut_state)
        cotangents.append(a)
    for n in range(-1, record.keep.kept):
        for i, _ in by_step.get(n, ()):
            outputs.append(outs[i])
            cotangents.append(grad_ys[i])
    # retain_graph: a caller's retain_graph=True may call this backward again; the graph is
    # freed with the saved tensors that hold it
    grads = torch.autograd.grad(
        outputs, (y0, *solve.params), cotangents, retain_graph=True, allow_unused=True
    )
    for acc, g in zip(grad_params, fill(grads[1:])):
        acc.add_(g)
    return grads[0] if grads[0] is not None else torch.zeros_like(y0)


def _replay_step(solve: AdjointSolve, rhs, step, a: Tensor, interior: list[tuple[Tensor, float]]):
    """Recompute step ``(t, h, y)`` under autograd; the VJPs of its outputs w.r.t. ``y``, params.

    ``a`` is the cotangent of the step's end point, ``interior`` the cotangents of the outputs
    read inside the step at ``t + theta h``.
    """
    t, h, y = step
    cfg = solve.config
    tab = cfg.tableau
    # the forward's reading of f at jumps and with perturb (see cnf.ode._landmarks)
    marks = cfg.landmarks if cfg.adaptive else None
    step_f, start_f = step_sides(rhs, marks, cfg.perturb, t, t + h)
    with torch.enable_grad():
        yv = y.detach().requires_grad_(True)
        # Without interior outputs an FSAL tableau's last stage, f(t + h, y1), is not needed.
        y1, ks = rk_step(step_f, tab, t, yv, start_f(t, yv), h, last_stage=bool(interior))
        outputs, cotangents = [y1], [a]
        if interior:
            linear = cfg.interp == "linear"
            stages = ks if (tab.fsal or linear) else ks + [step_f(t + h, y1)]
            for cotangent, theta in interior:
                out = (
                    torch.lerp(yv, y1, theta) if linear else dense_output(tab, yv, stages, h, theta)
                )
                outputs.append(out)
                cotangents.append(cotangent)
        return torch.autograd.grad(outputs, (yv, *solve.params), cotangents, allow_unused=True)


def _backsolve_backward(solve: AdjointSolve, ys: Tensor, grad_ys: Tensor):
    """Integrate ``[y, a, g]`` backwards over each interval of ``t``, restarting ``y`` there."""
    problem, params = solve.problem, solve.params
    shape = ys.shape[1:]
    n = ys[0].numel()
    fill = _vjp_filler(params)
    sizes = [p.numel() for p in params]

    def aug_rhs(t: float, z: Tensor, side: float = 0.0) -> Tensor:
        with torch.enable_grad():
            y = z[:n].detach().view(shape).requires_grad_(True)
            fy = problem.rhs(t, y, side)
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
        config = replace(solve.backward_config, first_step=h)  # go on where the last one ended
        outs, counts = integrate(aug_rhs, z0, [ts[i], ts[i - 1]], config)
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
