"""Gradients: gradcheck, adjoint against backpropagation, seminorm, time gradients, statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cnf

F64 = torch.float64
MODES = ["checkpoint", "backsolve"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def _max_rel(grads_a, grads_b) -> float:
    return max(_rel(a, b) for a, b in zip(grads_a, grads_b))


def _gradients(solver, field, y0, t, weights, **kwargs):
    """d/d(y0, t, params) of sum(weights * solution): every output time contributes."""
    y0 = y0.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    ys = solver(field, y0, t, **kwargs)
    return torch.autograd.grad((ys * weights).sum(), (y0, t, *field.parameters()))


def _adjoint(mode, **options):
    def solver(field, y0, t, **kwargs):
        return cnf.odeint_adjoint(
            field, y0, t, adjoint_options=dict(mode=mode, **options), **kwargs
        )

    return solver


# --- gradcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_adjoint(time_mlp, mode):
    field = time_mlp(dim=2, width=4)
    y0 = torch.randn(1, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    params = tuple(field.parameters())

    def fn(y0, t, *params):  # gradcheck perturbs the parameters in place; field reads them
        return cnf.odeint_adjoint(
            field, y0, t, rtol=1e-10, atol=1e-10, adjoint_options=dict(mode=mode)
        )

    assert torch.autograd.gradcheck(fn, (y0, t, *params))


def test_gradcheck_plain_odeint(time_mlp):
    field = time_mlp(dim=2, width=4)
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)

    def fn(y0, t, *params):
        return cnf.odeint(field, y0, t, rtol=1e-10, atol=1e-10)

    assert torch.autograd.gradcheck(fn, (y0, t, *field.parameters()))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_adjoint_decreasing_time_and_explicit_params(mode):
    """A plain function with adjoint_params, integrated backwards in time."""
    w = torch.randn(2, 2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)

    def field(t, y):
        return torch.tanh(y @ w.T + b * t)

    y0 = torch.randn(2, dtype=F64, requires_grad=True)
    t = torch.tensor([1.0, 0.3, -0.5], dtype=F64, requires_grad=True)

    def fn(y0, t, w, b):
        return cnf.odeint_adjoint(
            field,
            y0,
            t,
            rtol=1e-10,
            atol=1e-10,
            adjoint_params=(w, b),
            adjoint_options=dict(mode=mode),
        )

    assert torch.autograd.gradcheck(fn, (y0, t, w, b))


# --- adjoint against backpropagation -----------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4", "euler"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["forward", "backward"])
def test_checkpoint_equals_backprop(time_mlp, method, decreasing):
    """Checkpointing differentiates the very steps the forward pass took: equal to rounding."""
    field = time_mlp(dim=3, width=16, scale=1.5)
    y0 = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0.0, 0.23, 0.5, 0.61, 1.5], dtype=F64)  # interior outputs: dense output
    if decreasing:
        t = -t
    weights = torch.randn(len(t), 5, 3, dtype=F64)
    kwargs = dict(method=method, rtol=1e-6, atol=1e-6)
    if method in ("rk4", "euler"):
        kwargs["options"] = dict(step_size=0.1)
    ref = _gradients(cnf.odeint, field, y0, t, weights, **kwargs)
    got = _gradients(_adjoint("checkpoint"), field, y0, t, weights, **kwargs)
    assert _max_rel(got, ref) < 1e-12


def test_checkpoint_equals_backprop_on_the_grid_of_t(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(4, 2, dtype=F64)
    t = torch.linspace(0, 1, 11, dtype=F64)
    weights = torch.randn(11, 4, 2, dtype=F64)
    ref = _gradients(cnf.odeint, field, y0, t, weights, method="midpoint")
    got = _gradients(_adjoint("checkpoint"), field, y0, t, weights, method="midpoint")
    assert _max_rel(got, ref) < 1e-12


@pytest.mark.parametrize("norm", ["rms", "seminorm"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["forward", "backward"])
def test_backsolve_matches_backprop_to_the_tolerance(time_mlp, norm, decreasing):
    field = time_mlp(dim=3, width=16, scale=1.5)
    y0 = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0.0, 0.23, 0.5, 0.61, 1.5], dtype=F64)
    if decreasing:
        t = -t
    weights = torch.randn(len(t), 5, 3, dtype=F64)
    ref = _gradients(cnf.odeint, field, y0, t, weights, rtol=1e-10, atol=1e-10)
    errs = []
    for tol in (1e-5, 1e-8):
        got = _gradients(
            _adjoint("backsolve", norm=norm), field, y0, t, weights, rtol=tol, atol=tol
        )
        errs.append(_max_rel(got, ref))
        assert errs[-1] < 100 * tol, (tol, errs[-1])
    assert errs[1] < errs[0]


def test_backsolve_with_its_own_method_and_tolerances(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ref = _gradients(cnf.odeint, field, y0, t, 1.0, rtol=1e-10, atol=1e-10)[2:]

    def run(**kwargs):
        sol = cnf.solve(field, y0, t, rtol=1e-10, atol=1e-10, adjoint=True, **kwargs)
        grads = torch.autograd.grad(sol.ys.sum(), tuple(field.parameters()))
        return _max_rel(grads, ref), sol.stats

    err, stats = run(adjoint_method="rk4", adjoint_options=dict(mode="backsolve", step_size=0.01))
    assert stats.n_accepted_backward == 100  # 50 steps on each of the two intervals
    assert stats.nfe_backward == 4 * 100
    assert err < 1e-7
    err_tight, tight = run(adjoint_options=dict(mode="backsolve"))
    err_loose, loose = run(
        adjoint_rtol=1e-4, adjoint_atol=1e-4, adjoint_options=dict(mode="backsolve")
    )
    assert loose.nfe_backward < tight.nfe_backward
    assert err_tight < 1e-8 and err_loose < 1e-4


class _TupleField(nn.Module):
    """A state and its log-density: x' = g(t, x), logp' = -sum(x * g(t, x)) * s."""

    def __init__(self, time_mlp) -> None:
        super().__init__()
        self.g = time_mlp(dim=2, width=8)
        self.s = nn.Parameter(torch.tensor(0.7, dtype=F64))

    def forward(self, t, state):
        x, logp = state
        dx = self.g(t, x)
        return dx, -(x * dx).sum(-1) * self.s


@pytest.mark.parametrize("mode", MODES)
def test_tuple_state_gradients(time_mlp, mode):
    field = _TupleField(time_mlp)
    x0 = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64, requires_grad=True)
    wx, wl = torch.randn(3, 4, 2, dtype=F64), torch.randn(3, 4, dtype=F64)

    def grads(solver, **kwargs):
        x = x0.clone().requires_grad_(True)
        logp = torch.zeros(4, dtype=F64, requires_grad=True)
        xs, logps = solver(field, (x, logp), t, rtol=1e-9, atol=1e-9, **kwargs)
        assert xs.shape == (3, 4, 2) and logps.shape == (3, 4)
        loss = (xs * wx).sum() + (logps * wl).sum()
        return torch.autograd.grad(loss, (x, logp, t, *field.parameters()))

    ref = grads(cnf.odeint)
    got = grads(cnf.odeint_adjoint, adjoint_options=dict(mode=mode))
    assert _max_rel(got, ref) < (1e-12 if mode == "checkpoint" else 1e-6)
    # logp does not feed back into the dynamics: its gradient is exactly the summed weights.
    assert torch.allclose(ref[1], wl.sum(0), rtol=0, atol=1e-12)


# --- seminorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, scale, span, tol, batch",
    [
        (32, 1.0, 2.0, 1e-8, 16),  # 1250 parameters, 32 state entries
        (16, 2.0, 3.0, 1e-6, 8),  # 370 parameters, 16 state entries, a stiffer field
    ],
    ids=["wide", "stiff"],
)
def test_seminorm_same_gradients_fewer_backward_evaluations(
    time_mlp, width, scale, span, tol, batch
):
    """With many parameters, leaving their gradient channels out of the error norm saves steps
    without losing accuracy (Kidger, Chen & Lyons 2021)."""
    field = time_mlp(dim=2, width=width, depth=2, scale=scale)
    assert sum(p.numel() for p in field.parameters()) > 10 * 2 * batch
    y0 = torch.randn(batch, 2, dtype=F64)
    t = torch.tensor([0.0, span], dtype=F64)
    ref = _gradients(cnf.odeint, field, y0, t, 1.0, rtol=1e-12, atol=1e-12)[2:]

    def run(norm):
        sol = cnf.solve(
            field,
            y0,
            t,
            rtol=tol,
            atol=tol,
            adjoint=True,
            adjoint_options=dict(mode="backsolve", norm=norm),
        )
        grads = torch.autograd.grad(sol.ys.sum(), tuple(field.parameters()))
        return grads, sol.stats

    g_rms, s_rms = run("rms")
    g_semi, s_semi = run("seminorm")
    assert s_semi.nfe == s_rms.nfe  # the forward solve is the same
    assert _max_rel(g_rms, ref) < 100 * tol
    assert _max_rel(g_semi, ref) < 100 * tol
    assert 0 < s_semi.nfe_backward < s_rms.nfe_backward


# --- time gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [cnf.odeint, _adjoint("checkpoint"), _adjoint("backsolve")],
    ids=["odeint", "checkpoint", "backsolve"],
)
def test_time_gradient_matches_closed_form(solver):
    """y' = -k y: y(t_i) = y0 exp(-k (t_i - t_0)), so dy_i/dt_i = -k y_i and dy_i/dt_0 = k y_i."""

    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.8, dtype=F64))

        def forward(self, t, y):
            return -self.k * y

    field = Decay()
    t = torch.tensor([0.2, 0.7, 1.5], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.3], dtype=F64, requires_grad=True)
    ys = solver(field, y0, t, rtol=1e-10, atol=1e-10)
    y1, y2 = ys[1, 0], ys[2, 0]
    g_t, g_y0, g_k = torch.autograd.grad(y1 + 2 * y2, (t, y0, field.k))
    k = 0.8
    e1, e2 = math.exp(-k * 0.5), math.exp(-k * 1.3)
    expected_t = [k * (y1 + 2 * y2).item(), -k * y1.item(), -2 * k * y2.item()]
    assert g_t.tolist() == pytest.approx(expected_t, rel=1e-8)
    assert g_y0.item() == pytest.approx(e1 + 2 * e2, rel=1e-8)
    assert g_k.item() == pytest.approx(-1.3 * (0.5 * e1 + 2 * 1.3 * e2), rel=1e-8)


def test_time_gradient_with_no_other_inputs_requiring_grad():
    t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    ys = cnf.odeint(lambda t, y: torch.cos(t) * torch.ones_like(y), torch.zeros(2, dtype=F64), t)
    (g,) = torch.autograd.grad(ys[-1].sum(), t)
    assert g.tolist() == pytest.approx([-2.0, 2 * math.cos(1.0)], rel=1e-12)


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_adjoint_with_no_parameters_requiring_grad(time_mlp, mode):
    field = time_mlp(dim=2, width=8).requires_grad_(False)
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    (ref,) = torch.autograd.grad(cnf.odeint(field, y0, t, rtol=1e-9, atol=1e-9).sum(), y0)
    ys = cnf.odeint_adjoint(field, y0, t, rtol=1e-9, atol=1e-9, adjoint_options=dict(mode=mode))
    (got,) = torch.autograd.grad(ys.sum(), y0)
    assert _rel(got, ref) < 1e-6
    # A plain function with adjoint_params=() works too.
    ys = cnf.odeint_adjoint(
        lambda t, y: field(t, y),
        y0,
        t,
        rtol=1e-9,
        atol=1e-9,
        adjoint_params=(),
        adjoint_options=dict(mode=mode),
    )
    (got,) = torch.autograd.grad(ys.sum(), y0)
    assert _rel(got, ref) < 1e-6


def test_adjoint_without_any_gradient_is_a_plain_solve(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        ys = cnf.odeint_adjoint(field, y0, t)
    assert not ys.requires_grad
    assert torch.equal(ys, cnf.odeint(field, y0, t).detach())


@pytest.mark.parametrize("mode", MODES)
def test_unused_adjoint_param_gets_zero_gradient(mode):
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    unused = torch.tensor(2.0, dtype=F64, requires_grad=True)
    ys = cnf.odeint_adjoint(
        lambda t, y: -w * y,
        torch.ones(2, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        adjoint_params=(w, unused),
        adjoint_options=dict(mode=mode),
    )
    g_w, g_unused = torch.autograd.grad(ys[-1].sum(), (w, unused))
    assert g_unused.item() == 0.0
    assert g_w.item() == pytest.approx(-2 * math.exp(-0.5), rel=1e-5)


def test_plain_function_without_adjoint_params_is_rejected():
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint_params"):
        cnf.odeint_adjoint(
            lambda t, y: -w * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
        )


# --- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_backward_statistics_are_filled_in(time_mlp, mode):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)  # no interior output: no dense output to replay
    # the checkpoint replaying every step (by default this small graph is kept instead)
    adjoint = cnf.ode.Checkpoint(graph_memory=0) if mode == "checkpoint" else cnf.ode.Backsolve()
    sol = cnf.solve(field, y0, t, adjoint=adjoint)
    stats = sol.stats
    assert stats.nfe > 0 and stats.n_accepted > 0
    assert stats.nfe_backward == stats.n_accepted_backward == stats.n_rejected_backward == 0
    sol.ys.sum().backward()
    assert stats.nfe_backward > 0
    assert stats.n_accepted_backward > 0
    if mode == "checkpoint":
        # One replay per forward step: f(t_n) and the 5 stages dopri5 needs for y_{n+1}.
        assert stats.n_accepted_backward == stats.n_accepted
        assert stats.nfe_backward == 6 * stats.n_accepted
        assert stats.n_rejected_backward == 0
    # Forward statistics are not touched by the backward pass.
    plain = cnf.solve(field, y0.detach(), t).stats
    assert (stats.nfe, stats.n_accepted) == (plain.nfe, plain.n_accepted)


def test_plain_solve_has_no_backward_statistics(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    sol = cnf.solve(field, y0, torch.tensor([0.0, 1.0], dtype=F64))
    sol.ys.sum().backward()
    assert sol.stats.nfe_backward == 0
    assert y0.grad is not None


# --- stiff-ish: Van der Pol mu = 5 -------------------------------------------------------------


def test_checkpoint_is_stable_on_van_der_pol_mu5(van_der_pol):
    """The continuous adjoint of Van der Pol (mu=5) blows up in reverse time; checkpointing
    replays the forward steps and stays exact."""
    field = van_der_pol(5.0)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-0.5, 2.0]], dtype=F64)
    t = torch.tensor([0.0, 2.5, 5.0], dtype=F64)
    weights = torch.randn(3, 3, 2, dtype=F64)
    ref = _gradients(cnf.odeint, field, y0, t, weights, rtol=1e-6, atol=1e-6)
    got = _gradients(_adjoint("checkpoint"), field, y0, t, weights, rtol=1e-6, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in got)
    assert _max_rel(got, ref) < 1e-12
    # ... and the gradient itself is right: it agrees with a much finer solve.
    fine = _gradients(cnf.odeint, field, y0, t, weights, rtol=1e-9, atol=1e-9)
    assert _max_rel(got, fine) < 1e-3


# --- state layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_zero_dim_and_non_contiguous_states(mode):
    k = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def field(t, y):
        return -k * y * torch.cos(t)

    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for y0 in (torch.tensor(1.5, dtype=F64), torch.randn(4, 3, dtype=F64).T):
        y0 = y0.detach().requires_grad_(True)
        kwargs = dict(rtol=1e-10, atol=1e-10)
        ref = torch.autograd.grad(cnf.odeint(field, y0, t, **kwargs).sum(), (y0, k))
        ys = cnf.odeint_adjoint(
            field, y0, t, adjoint_params=(k,), adjoint_options=dict(mode=mode), **kwargs
        )
        assert ys.shape == (3, *y0.shape)
        got = torch.autograd.grad(ys.sum(), (y0, k))
        assert got[0].shape == y0.shape
        assert _max_rel(got, ref) < (1e-12 if mode == "checkpoint" else 1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_single_output_time_gradient_is_the_identity(mode):
    k = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0 = torch.randn(3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.3], dtype=F64, requires_grad=True)
    ys = cnf.odeint_adjoint(
        lambda t, y: -k * y, y0, t, adjoint_params=(k,), adjoint_options=dict(mode=mode)
    )
    g_y0, g_t, g_k = torch.autograd.grad((ys * 2.0).sum(), (y0, t, k))
    assert g_y0.tolist() == [2.0, 2.0, 2.0]
    assert g_t.item() == 0.0 and g_k.item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_float32_adjoint(mode):
    """y' = -k y: d/dk sum y(1) = -sum y0 exp(-k), d/dy0 = exp(-k)."""
    k = torch.tensor(0.5, requires_grad=True)
    y0 = torch.randn(3, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    ys = cnf.odeint_adjoint(
        lambda t, y: -k * y,
        y0,
        t,
        rtol=1e-5,
        atol=1e-6,
        adjoint_params=(k,),
        adjoint_options=dict(mode=mode),
    )
    assert ys.dtype == torch.float32
    g_y0, g_k = torch.autograd.grad(ys[-1].sum(), (y0, k))
    assert g_y0.dtype == g_k.dtype == torch.float32
    assert g_y0.tolist() == pytest.approx([math.exp(-0.5)] * 3, rel=1e-4)
    assert g_k.item() == pytest.approx(-y0.sum().item() * math.exp(-0.5), rel=1e-4, abs=1e-5)
