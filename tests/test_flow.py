"""Tests of cnf.flow: the CNF's joint ODE, its public API, composition and bad input.

Convention under test: base at t = 0, data at t = T; ``log_prob(x)`` integrates the joint ODE
``dz/dt = f``, ``d logdet/dt = -tr(df/dz)`` from T down to 0, ``transform(x) -> (z, logdet)`` with
``log_prob(x) == base.log_prob(z) + logdet``.
"""

import io
import math
import re

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

import cnf
from cnf.fields import ConcatSquashMLP
from cnf.flow import CNF, Flow, FlowOutput, SequentialFlow
from cnf.trace import NOISE_KINDS

F32, F64 = torch.float32, torch.float64


# --------------------------------------------------------------------------- helpers


def _mlp(seed=0, hidden=(16, 16), dtype=F64, scale=None, activation="tanh"):
    """A small ConcatSquashMLP on R^2; ``scale`` replaces the default init by N(0, scale^2)."""
    torch.manual_seed(seed)
    field = ConcatSquashMLP(2, hidden=hidden, activation=activation)
    if scale is not None:
        with torch.no_grad():
            for p in field.parameters():
                p.copy_(scale * torch.randn_like(p))
    return field.to(dtype)


class _Hidden(nn.Module):
    """The same field without ``forward_with_divergence``: forces the generic (vmap) trace."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, z):
        return self.inner(t, z)


class _Linear(nn.Module):
    """f(t, z) = A z."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, z):
        return z @ self.a.T


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _jacobians(field, t, z):
    """Per-sample Jacobians df/dz by torch.autograd.functional.jacobian: (batch, D, D)."""
    t = torch.as_tensor(t, dtype=z.dtype)
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], zi) for zi in z]
    )


def _along_trajectory(flow, x, quantity, n=101):
    """int_0^T quantity(J(t, z(t))) dt along the trajectory ending at x, by Simpson's rule.

    The states come from ``trajectory`` (tight tolerance), the Jacobians from autograd.
    """
    T = float(flow.T.detach())
    times = torch.linspace(T, 0.0, n, dtype=x.dtype)
    with torch.no_grad():
        zs = flow.trajectory(x, times, direction="normalizing", rtol=1e-11, atol=1e-11)
    values = torch.stack([quantity(_jacobians(flow.field, t, z)) for t, z in zip(times, zs)])
    # times decrease: flip to integrate over [0, T]
    return torch.from_numpy(
        scipy.integrate.simpson(values.flip(0).numpy(), x=times.flip(0).numpy(), axis=0)
    )


def _trace(jac):
    return torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)


def _frobenius_sq(jac):
    return jac.square().sum((-2, -1))


# --------------------------------------------------------------------------- contract

STRUCTURES = ["cnf", "seq"]
TRACES = ["exact", "hutchinson"]
# float32 at 1e-5 is what training uses; float64 at 1e-7 checks the round trips more tightly
TOL = {F32: 1e-5, F64: 1e-7}
ROUNDTRIP = {F32: 2e-3, F64: 1e-5}


def _build(structure, dtype, seed=0, **kwargs):
    tol = TOL[dtype]
    kwargs = {"rtol": tol, "atol": tol, **kwargs}
    if structure == "cnf":
        flow = CNF(_mlp(seed, dtype=F32), (2,), **kwargs)
    else:
        flow = SequentialFlow(
            [CNF(_mlp(seed + k, dtype=F32), (2,), T=0.5, **kwargs) for k in range(2)]
        )
    return flow.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
@pytest.mark.parametrize("trace", TRACES)
def test_contract(trace, adjoint, structure, dtype):
    flow = _build(structure, dtype, trace=trace, adjoint=adjoint)
    x = torch.randn(8, 2, dtype=dtype)

    # shapes and dtypes
    lp = flow.log_prob(x, generator=_gen(1))
    z, logdet = flow.transform(x, generator=_gen(1))
    assert lp.shape == logdet.shape == (8,) and z.shape == (8, 2)
    assert lp.dtype == z.dtype == logdet.dtype == dtype
    assert bool(torch.isfinite(lp).all())
    assert flow.inverse(z).shape == (8, 2)
    assert flow.sample(5).shape == (5, 2) and flow.sample(5).dtype == dtype
    assert flow.sample((3, 4)).shape == (3, 4, 2)
    xs, lps = flow.sample_with_log_prob((3, 2), generator=_gen(2))
    assert xs.shape == (3, 2, 2) and lps.shape == (3, 2) and lps.dtype == dtype
    torch.testing.assert_close(flow.sample(4, generator=_gen(5)), flow.sample(4, generator=_gen(5)))
    out = flow.evaluate(x, generator=_gen(1))
    assert isinstance(out, FlowOutput) and out.kinetic is None and out.jacobian is None
    assert out.nfe > 0 and len(out.stats) == (1 if structure == "cnf" else 2)
    torch.testing.assert_close(out.log_prob, lp, rtol=0, atol=0)

    with torch.no_grad():  # no graph unless the caller records one
        assert not flow.log_prob(x, generator=_gen(1)).requires_grad
        assert not flow.sample(3).requires_grad

    # log_prob(x) == base.log_prob(z) + logdet (same noise: the same computation)
    torch.testing.assert_close(flow.base.log_prob(z) + logdet, lp, rtol=0, atol=1e-12)
    # transform then inverse returns x
    torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=ROUNDTRIP[dtype])
    # sample_with_log_prob's density is the density of its samples
    xs, lps = flow.sample_with_log_prob(6, generator=_gen(3), trace="exact")
    torch.testing.assert_close(flow.log_prob(xs, trace="exact"), lps, rtol=0, atol=ROUNDTRIP[dtype])

    # gradients of the NLL reach every parameter
    flow.zero_grad()
    (-flow.log_prob(x, generator=_gen(1)).mean()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().max() > 0, name

    # state_dict round trip into a freshly built model
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh = _build(structure, dtype, seed=10, trace=trace, adjoint=adjoint)
    with torch.no_grad():
        before = fresh.log_prob(x, generator=_gen(1))
        assert (before - lp).abs().max() > 1e-3  # a different model until loaded
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(fresh.log_prob(x, generator=_gen(1)), lp.detach())


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_trajectory_contract(structure, dtype):
    """trajectory is part of the flows' shared API (issue: SequentialFlow has "the same API")."""
    flow = _build(structure, dtype)
    z = torch.randn(8, 2, dtype=dtype)
    assert hasattr(flow, "trajectory"), f"{type(flow).__name__} has no trajectory()"
    times = torch.linspace(0, 1, 5, dtype=dtype)
    traj = flow.trajectory(z, times)
    assert traj.shape == (5, 8, 2) and traj.dtype == dtype
    torch.testing.assert_close(traj[0], z)
    if structure == "cnf":
        torch.testing.assert_close(traj[-1], flow.inverse(z), rtol=0, atol=ROUNDTRIP[dtype])
        x = traj[-1]
        back = flow.trajectory(x, times.flip(0), direction="normalizing")
        assert back.shape == (5, 8, 2)
        torch.testing.assert_close(back[-1], flow.transform(x)[0], rtol=0, atol=ROUNDTRIP[dtype])
        torch.testing.assert_close(back.flip(0), traj, rtol=0, atol=ROUNDTRIP[dtype])


def test_public_api_is_exported_from_the_package():
    """The issue's API is ``cnf.CNF`` (and ``cnf.SequentialFlow``)."""
    for name in ("CNF", "SequentialFlow", "Flow", "FlowOutput", "StandardNormal"):
        assert hasattr(cnf, name), f"cnf.{name} is not exported"


# --------------------------------------------------------------------------- analytic densities

# non-symmetric, with a non-zero trace
A = torch.tensor([[0.3, -0.9], [0.5, -0.6]], dtype=F64)


def _linear_log_prob(x, T, base_log_prob):
    """log p(x) = log p_base(expm(-A T) x) - T tr(A) for dz/dt = A z."""
    m = torch.from_numpy(scipy.linalg.expm(-A.numpy() * T))
    return base_log_prob(x @ m.T) - T * A.trace(), x @ m.T


@pytest.mark.parametrize("T", [0.4, 1.7])
def test_linear_field_matches_closed_form(T):
    flow = CNF(_Linear(A.clone()), (2,), T=T, rtol=1e-10, atol=1e-10).to(F64)
    x = 2 * torch.randn(16, 2, dtype=F64)
    expected, z_expected = _linear_log_prob(x, T, flow.base.log_prob)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-6)
    z, logdet = flow.transform(x)
    torch.testing.assert_close(z, z_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logdet, torch.full_like(logdet, -T * A.trace().item()), atol=1e-6, rtol=0
    )
    # the generative direction: x = expm(A T) z, log p(x) = log N(z) - T tr(A)
    xs, lps = flow.sample_with_log_prob(16, generator=_gen(0))
    torch.testing.assert_close(
        lps, _linear_log_prob(xs, T, flow.base.log_prob)[0], rtol=0, atol=1e-6
    )


def test_linear_field_with_a_torch_distribution_base():
    loc = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.5, 0.3], [0.3, 0.7]], dtype=F64)
    base = torch.distributions.MultivariateNormal(loc, cov)
    flow = CNF(_Linear(A.clone()), (2,), T=0.8, base=base, rtol=1e-10, atol=1e-10).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    expected, _ = _linear_log_prob(x, 0.8, base.log_prob)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-6)
    xs, lps = flow.sample_with_log_prob(5)
    assert xs.shape == (5, 2) and xs.dtype == F64
    torch.testing.assert_close(lps, _linear_log_prob(xs, 0.8, base.log_prob)[0], rtol=0, atol=1e-6)


def test_nonlinear_field_matches_scipy_reference():
    """State and exact trace integrated by scipy's DOP853 at rtol 1e-10, T -> 0."""
    field = _mlp(seed=1, hidden=(8, 8), scale=0.6)
    T = 1.3
    flow = CNF(field, (2,), T=T, rtol=1e-10, atol=1e-10).to(F64)
    x = torch.randn(3, 2, dtype=F64)

    def rhs(t, y):
        z = torch.from_numpy(y[:2])
        tt = torch.tensor(t, dtype=F64)
        with torch.no_grad():
            f = field(tt, z[None])[0]
        jac = torch.autograd.functional.jacobian(lambda v: field(tt, v[None])[0], z)
        # the joint ODE carries d logdet/dt = tr(df/dz); integrated from T to 0 it gives
        # logdet = -int_0^T tr dt
        return np.concatenate([f.numpy(), [float(jac.trace())]])

    expected = []
    for xi in x:
        sol = scipy.integrate.solve_ivp(
            rhs,
            (T, 0.0),
            np.concatenate([xi.numpy(), [0.0]]),
            method="DOP853",
            rtol=1e-10,
            atol=1e-12,
        )
        assert sol.success
        z0, logdet = torch.from_numpy(sol.y[:2, -1]), sol.y[2, -1]
        expected.append(float(flow.base.log_prob(z0[None])[0]) + logdet)
    expected = torch.tensor(expected, dtype=F64)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-6)
    # the field is far from trivial: the density differs from the base's by O(1)
    assert (expected - flow.base.log_prob(x)).abs().max() > 0.1


def test_density_integrates_to_one():
    """Riemann sum of exp(log_prob) over [-7, 7]^2 at 200 x 200 points."""
    field = _mlp(seed=2, hidden=(16,), scale=0.5)
    flow = CNF(field, (2,), T=1.0, rtol=1e-6, atol=1e-6).to(F64)
    n, L = 200, 7.0
    h = 2 * L / n
    g = torch.linspace(-L + h / 2, L - h / 2, n, dtype=F64)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        chunks = [flow.evaluate(chunk) for chunk in grid.split(20000)]
    log_prob = torch.cat([c.log_prob for c in chunks])
    logdet = torch.cat([c.logdet for c in chunks])
    mass = float(log_prob.exp().sum() * h * h)
    assert abs(mass - 1) < 5e-3, mass
    # the test can fail: the log-determinant carries a substantial part of the mass
    mass_without_logdet = float((log_prob - logdet).exp().sum() * h * h)
    assert abs(mass_without_logdet - 1) > 0.05, mass_without_logdet


# --------------------------------------------------------------------------- traces


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_hutchinson_is_unbiased_with_nonzero_variance(kind):
    """Each copy of a point in the batch gets its own probe: N independent estimates per point."""
    field = _mlp(seed=3, hidden=(16, 16), scale=0.5)
    flow = CNF(field, (2,), T=0.8, trace="hutchinson", noise=kind, rtol=1e-7, atol=1e-7)
    flow = flow.to(F64)
    x = torch.randn(4, 2, dtype=F64)
    n = 500
    with torch.no_grad():
        exact = flow.log_prob(x, trace="exact")
        one = flow.log_prob(x.repeat(n, 1), generator=_gen(11)).reshape(n, 4)
        four = flow.log_prob(x.repeat(n, 1), probes=4, generator=_gen(12)).reshape(n, 4)
    for est in (one, four):
        mean, se = est.mean(0), est.std(0) / math.sqrt(n)
        assert bool((se > 1e-4).all()), se  # non-zero variance
        assert bool(((mean - exact).abs() < 4 * se + 1e-6).all()), (mean - exact) / se
    if kind == "rademacher":
        # in 2-D, e^T M e = tr M + e_1 e_2 (M_12 + M_21): with the probe held fixed over the
        # whole solve, the estimates of each point take exactly two values
        for column in one.T:
            gaps = column.sort().values.diff()
            assert int((gaps > 1e-6).sum()) == 1, column.unique()
    # K probes average: the standard deviation shrinks by sqrt(K)
    ratio = four.std(0) / one.std(0)
    assert bool(((ratio > 0.38) & (ratio < 0.65)).all()), ratio


def test_hutchinson_noise_is_reproducible_and_fixed_per_solve():
    flow = CNF(_mlp(seed=3, scale=0.5), (2,), trace="hutchinson", rtol=1e-7, atol=1e-7).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        a = flow.log_prob(x, generator=_gen(1))
        b = flow.log_prob(x, generator=_gen(1))
        c = flow.log_prob(x, generator=_gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_exact_trace_through_the_joint_ode_equals_autograd_jacobian_trace():
    """logdet from the joint ODE == -int_0^T tr(J) along the trajectory (autograd J, Simpson)."""
    field = _mlp(seed=4, hidden=(8, 8), scale=0.6)
    flow = CNF(field, (2,), T=1.0, rtol=1e-10, atol=1e-10).to(F64)
    x = torch.randn(4, 2, dtype=F64)
    _, logdet = flow.transform(x)
    expected = -_along_trajectory(flow, x, _trace)
    torch.testing.assert_close(logdet.detach(), expected, rtol=0, atol=1e-6)
    assert expected.abs().min() > 1e-2


@pytest.mark.parametrize("activation", ["tanh", "swish"])
def test_field_aware_trace_equals_generic_when_integrated(activation):
    field = _mlp(seed=5, hidden=(8, 8, 8), scale=0.5, activation=activation)
    aware = CNF(field, (2,), rtol=1e-8, atol=1e-8).to(F64)
    generic = CNF(_Hidden(field), (2,), rtol=1e-8, atol=1e-8).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    params = list(field.parameters())

    def run(flow):
        out = flow.evaluate(x, regularizers=True, generator=_gen(3))
        loss = -out.log_prob.mean() + out.kinetic.mean() + out.jacobian.mean()
        return out, torch.autograd.grad(loss, params)

    (a, grads_a), (g, grads_g) = run(aware), run(generic)
    for name in ("log_prob", "z", "kinetic", "jacobian"):
        torch.testing.assert_close(getattr(a, name), getattr(g, name), rtol=0, atol=1e-9)
    for ga, gg in zip(grads_a, grads_g):
        torch.testing.assert_close(ga, gg, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- gradients


def _grads(flow, x, **overrides):
    x = x.clone().requires_grad_(True)
    out = flow.evaluate(x, **overrides)
    loss = -out.log_prob.mean()
    return torch.autograd.grad(loss, [x, *flow.parameters()])


@pytest.mark.parametrize("trace", TRACES)
def test_adjoint_gradients_equal_backprop(trace):
    flow = CNF(_mlp(seed=6, scale=0.5), (2,), trace=trace, rtol=1e-8, atol=1e-8).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    direct = _grads(flow, x, adjoint=False, generator=_gen(4))
    checkpoint = _grads(
        flow, x, adjoint=True, adjoint_options={"mode": "checkpoint"}, generator=_gen(4)
    )
    backsolve = _grads(
        flow, x, adjoint=True, adjoint_options={"mode": "backsolve"}, generator=_gen(4)
    )
    assert max(float(g.abs().max()) for g in direct) > 1e-2
    for d, c, b in zip(direct, checkpoint, backsolve):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trace", TRACES)
def test_adjoint_gradients_with_regularizers_equal_backprop(trace):
    flow = CNF(_mlp(seed=6, scale=0.5), (2,), trace=trace, rtol=1e-8, atol=1e-8).to(F64)
    x = torch.randn(5, 2, dtype=F64)

    def grads(adjoint):
        out = flow.evaluate(x, regularizers=True, adjoint=adjoint, generator=_gen(2))
        loss = -out.log_prob.mean() + 0.1 * out.kinetic.mean() + 0.1 * out.jacobian.mean()
        return torch.autograd.grad(loss, list(flow.parameters()))

    for a, d in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("train_T", [False, True])
@pytest.mark.parametrize("T", [0.4, 1.7, 0.1])
def test_T_is_exact_in_float64(T, train_T):
    """A float64 model integrates to T itself, not to T rounded through float32."""
    flow = CNF(_Linear(A.clone()), (2,), T=T, train_T=train_T).to(F64)
    assert flow.T.dtype == F64
    err = float(flow.T.detach()) - T
    assert abs(err) < 1e-14 * T, err


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_gradient_with_respect_to_T_matches_finite_differences(adjoint):
    flow = CNF(
        _mlp(seed=7, hidden=(8, 8), scale=0.5),
        (2,),
        T=0.8,
        train_T=True,
        adjoint=adjoint,
        rtol=1e-10,
        atol=1e-10,
    ).to(F64)
    assert any(p is flow.T_scale for p in flow.parameters())
    x = torch.randn(4, 2, dtype=F64)
    loss = -flow.log_prob(x).mean()
    (grad,) = torch.autograd.grad(loss, [flow.T_scale])
    eps = 1e-5
    with torch.no_grad():
        s = flow.T_scale.clone()
        flow.T_scale.copy_(s + eps)
        up = -flow.log_prob(x).mean()
        flow.T_scale.copy_(s - eps)
        down = -flow.log_prob(x).mean()
        flow.T_scale.copy_(s)
    fd = (up - down) / (2 * eps)
    assert abs(float(fd)) > 1e-2
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- regularizers


def test_regularizers_shapes_and_kinetic_energy():
    field = _mlp(seed=8, hidden=(16, 16), scale=0.5)
    T = 0.9
    flow = CNF(field, (2,), T=T, rtol=1e-8, atol=1e-8).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        out = flow.evaluate(x, regularizers=True, generator=_gen(0))
    assert out.kinetic.shape == out.jacobian.shape == (5,)
    assert bool((out.kinetic >= 0).all()) and bool((out.jacobian >= 0).all())

    # independent: integrate |f|^2 with fixed-step rk4 alongside the state, T -> 0
    def func(t, state):
        f = field(t, state[0])
        return f, f.square().sum(-1)

    with torch.no_grad():
        _, k = cnf.odeint(
            func,
            (x, torch.zeros(5, dtype=F64)),
            torch.tensor([T, 0.0], dtype=F64),
            method="rk4",
            options={"step_size": T / 200},
        )
    torch.testing.assert_close(out.kinetic, -k[-1], rtol=1e-5, atol=1e-8)
    assert out.kinetic.min() > 1e-2


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("trace", TRACES)
def test_jacobian_regularizer_is_unbiased_for_the_frobenius_integral(trace, kind):
    field = _mlp(seed=9, hidden=(8, 8), scale=1.0)
    flow = CNF(field, (2,), T=0.7, trace=trace, noise=kind, probes=2, rtol=1e-8, atol=1e-8)
    flow = flow.to(F64)
    x = torch.randn(3, 2, dtype=F64)
    expected = _along_trajectory(flow, x, _frobenius_sq)
    n = 400
    with torch.no_grad():
        out = flow.evaluate(x.repeat(n, 1), regularizers=True, generator=_gen(21))
    est = out.jacobian.reshape(n, 3)
    mean, se = est.mean(0), est.std(0) / math.sqrt(n)
    assert bool((se > 0).all()), se
    assert bool(((mean - expected).abs() < 4 * se + 1e-5 * expected).all()), (mean - expected) / se


@pytest.mark.parametrize("trace", TRACES)
def test_regularizers_leave_log_prob_unchanged(trace):
    flow = CNF(_mlp(seed=10, scale=0.5), (2,), trace=trace, rtol=1e-7, atol=1e-7).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    with torch.no_grad():
        plain = flow.evaluate(x, generator=_gen(5))
        reg = flow.evaluate(x, regularizers=True, generator=_gen(5))
    torch.testing.assert_close(reg.log_prob, plain.log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(reg.z, plain.z, rtol=0, atol=1e-6)


def test_sequential_regularizers_add_up():
    blocks = [CNF(_mlp(seed=k, scale=0.4), (2,), T=0.5, rtol=1e-8, atol=1e-8) for k in (11, 12)]
    flow = SequentialFlow(blocks).to(F64)
    x = torch.randn(4, 2, dtype=F64)
    with torch.no_grad():
        out = flow.evaluate(x, regularizers=True, generator=_gen(0))
        first = blocks[0].evaluate(x, regularizers=True)
        second = blocks[1].evaluate(first.z, regularizers=True)
    torch.testing.assert_close(out.kinetic, first.kinetic + second.kinetic, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.logdet, first.logdet + second.logdet, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.z, second.z, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- per-call overrides


def test_per_call_trace_override_is_not_a_silent_switch():
    field = _mlp(seed=13, scale=0.5)
    flow = CNF(field, (2,), trace="hutchinson", rtol=1e-7, atol=1e-7).to(F64)
    exact_flow = CNF(field, (2,), trace="exact", rtol=1e-7, atol=1e-7).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    with torch.no_grad():
        exact = exact_flow.log_prob(x)
        torch.testing.assert_close(flow.log_prob(x, trace="exact"), exact, rtol=0, atol=1e-12)
        # the default is still Hutchinson: noisy, different from the exact value
        a = flow.log_prob(x, generator=_gen(1))
        b = flow.log_prob(x, generator=_gen(2))
    assert (a - b).abs().max() > 1e-4 and (a - exact).abs().max() > 1e-4


def test_per_call_solver_overrides_apply_to_that_call_only():
    flow = CNF(_mlp(seed=13, scale=0.5), (2,), rtol=1e-4, atol=1e-4).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    with torch.no_grad():
        nfe = flow.evaluate(x).nfe
        tight = flow.evaluate(x, rtol=1e-9, atol=1e-9)
        rk4 = flow.evaluate(x, method="rk4", options={"step_size": 0.1})
        assert flow.evaluate(x).nfe == nfe
    assert tight.nfe > nfe
    assert rk4.nfe == 40  # 10 steps of 4 stages
    torch.testing.assert_close(rk4.log_prob, tight.log_prob, rtol=0, atol=1e-4)
    # adjoint off for one call: no backward solve
    out = flow.evaluate(x, adjoint=False)
    out.log_prob.sum().backward()
    assert out.nfe_backward == 0
    # the checkpoint adjoint replaying its steps (a 2-D batch keeps its graph by default)
    out = flow.evaluate(x, adjoint=cnf.ode.Checkpoint(graph_memory=0))
    out.log_prob.sum().backward()
    assert out.nfe_backward > 0


# --------------------------------------------------------------------------- bad input


def _small(dtype=F32, **kwargs):
    return CNF(_mlp(seed=0, hidden=(4,), dtype=F32), (2,), **kwargs).to(dtype)


@pytest.mark.parametrize("method", ["log_prob", "transform", "evaluate", "inverse", "trajectory"])
@pytest.mark.parametrize("shape", [(4, 3), (4,), (4, 2, 1)])
def test_wrong_event_shape_names_the_expected_shape(method, shape):
    flow = _small()
    args = (torch.linspace(0, 1, 3),) if method == "trajectory" else ()
    with pytest.raises(ValueError) as info:
        getattr(flow, method)(torch.randn(*shape), *args)
    message = str(info.value)
    assert re.search(r"\(\s*'?batch'?\s*,\s*2\s*\)", message), message
    assert str(tuple(shape)) in message, message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["log_prob", "transform", "inverse", "trajectory"])
def test_non_finite_input_is_rejected(method, bad):
    flow = _small()
    x = torch.randn(3, 2)
    x[1, 0] = bad
    args = (torch.linspace(0, 1, 3),) if method == "trajectory" else ()
    with pytest.raises(ValueError, match="NaN or Inf"):
        getattr(flow, method)(x, *args)


@pytest.mark.parametrize("method", ["log_prob", "transform", "inverse"])
def test_dtype_mismatch_is_rejected(method):
    flow = _small(F32)
    with pytest.raises(ValueError, match="float64"):
        getattr(flow, method)(torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="float32"):
        getattr(_small(F64), method)(torch.randn(3, 2, dtype=F32))


def test_sequential_flow_validates_input_too():
    flow = SequentialFlow([_small(), _small()])
    with pytest.raises(ValueError, match="batch"):
        flow.log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="float64"):
        flow.inverse(torch.randn(3, 2, dtype=F64))


def test_float64_field_in_a_default_cnf_samples_or_is_rejected_up_front():
    """A float64 field in an un-converted CNF: sample() must not die with an internal error.

    Either the model refuses the mixed dtypes with a ValueError, or it samples in float64.
    """
    try:
        flow = CNF(_mlp(seed=0, hidden=(4,), dtype=F64), (2,))
        x = flow.sample(3)
    except ValueError:
        return
    assert x.dtype == F64


def test_generator_is_not_silently_ignored_with_a_distribution_base():
    """sample(n, generator=g) is reproducible, or refuses the generator: never ignores it."""
    base = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    flow = CNF(_mlp(seed=0, hidden=(4,), dtype=F32), (2,), base=base)
    try:
        a = flow.sample(3, generator=_gen(0))
        b = flow.sample(3, generator=_gen(0))
    except ValueError:
        return
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("trace", "exakt", ["exact", "hutchinson"]),
        ("noise", "uniform", ["rademacher", "gaussian"]),
        ("method", "rk45", ["dopri5", "tsit5", "rk4", "euler"]),
    ],
)
def test_unknown_names_list_the_valid_ones(key, value, valid):
    x = torch.randn(3, 2)
    for call in (lambda: _small(**{key: value}), lambda: _small().log_prob(x, **{key: value})):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert value in message and all(v in message for v in valid), message


def test_unknown_keywords_raise_type_error():
    flow = _small()
    x = torch.randn(3, 2)
    with pytest.raises(TypeError, match="tol"):
        flow.log_prob(x, tol=1e-3)
    with pytest.raises(TypeError):
        flow.sample(3, rtl=1e-3)
    with pytest.raises(TypeError):
        flow.trajectory(x, [0.0, 1.0], step=3)
    with pytest.raises(TypeError):
        CNF(_mlp(hidden=(4,)), (2,), tol=1e-3)


@pytest.mark.parametrize("probes", [0, -1, 1.5, True, "2"])
def test_bad_probes(probes):
    with pytest.raises(ValueError, match="probes"):
        _small(trace="hutchinson", probes=probes)
    with pytest.raises(ValueError, match="probes"):
        _small(trace="hutchinson").log_prob(torch.randn(3, 2), probes=probes)


@pytest.mark.parametrize("T", [0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T"):
        _small(T=T)


@pytest.mark.parametrize(
    "key, value",
    [("rtol", 0), ("atol", -1e-5), ("rtol", "1e-5"), ("logp_rtol", 0), ("logp_atol", -1.0)],
)
def test_bad_tolerances(key, value):
    with pytest.raises(ValueError, match=key):
        _small(**{key: value})
    with pytest.raises(ValueError, match=key):
        _small().log_prob(torch.randn(3, 2), **{key: value})


@pytest.mark.parametrize("n", [-3, (-1,), (2, -1), ()])
def test_negative_sample_sizes(n):
    flow = _small()
    with pytest.raises(ValueError, match="samples"):
        flow.sample(n)
    with pytest.raises(ValueError, match="samples"):
        flow.sample_with_log_prob(n)


@pytest.mark.parametrize("n", [2.5, True, (2, 1.5)])
def test_non_integer_sample_sizes(n):
    """flow.py's _sample_shape means to reject these with its ValueError (it tests for bool)."""
    flow = _small()
    with pytest.raises(ValueError, match="samples"):
        flow.sample(n)
    with pytest.raises(ValueError, match="samples"):
        flow.sample_with_log_prob(n)


@pytest.mark.parametrize(
    "times, direction, match",
    [
        ([0.0, 0.5, 1.5], "generative", r"\[0, T\]"),
        ([-0.5, 0.5, 1.0], "generative", r"\[0, T\]"),
        ([1.0, 0.5, -0.1], "normalizing", r"\[0, T\]"),
        ([1.0, 0.5, 0.0], "generative", "increasing"),
        ([0.0, 0.5, 0.5], "generative", "increasing"),
        ([0.0, 0.5, 1.0], "normalizing", "decreasing"),
        ([0.0, 1.0], "forward", "generative"),
        ([0.5], "generative", "two"),
        ([[0.0, 1.0]], "generative", "1-D"),
    ],
)
def test_bad_trajectory_times(times, direction, match):
    flow = _small()
    with pytest.raises(ValueError, match=match):
        flow.trajectory(torch.randn(3, 2), times, direction=direction)


def test_bad_construction():
    with pytest.raises(ValueError, match="event_shape"):
        CNF(_mlp(hidden=(4,)), (2,), base=torch.distributions.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="event_shape"):
        CNF(_mlp(hidden=(4,)), ())
    with pytest.raises(ValueError, match="Module"):
        CNF(lambda t, z: z, (2,))
    with pytest.raises(ValueError, match="event_shape"):
        SequentialFlow([_small(), CNF(_Linear(torch.eye(3)), (3,))])
    with pytest.raises(ValueError, match="Flow"):
        SequentialFlow([])
    assert issubclass(CNF, Flow) and issubclass(SequentialFlow, Flow)
