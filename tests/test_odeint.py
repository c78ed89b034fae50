"""Accuracy of cnf.odeint: convergence orders, closed forms, scipy references and solver options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import cnf

F64 = torch.float64
ADAPTIVE = ["bosh3", "dopri5", "tsit5"]
ORDER = {"euler": 1, "midpoint": 2, "bosh3": 3, "rk4": 4, "dopri5": 5, "tsit5": 5}


def rel_err(y: torch.Tensor, ref) -> float:
    """Largest error relative to the reference's scale (at least 1).

    (Plain tensor arithmetic: the first ``torch.testing.assert_close`` costs a second of imports.)
    """
    ref = torch.as_tensor(ref, dtype=F64)
    return ((y.to(F64) - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


# --- convergence order -------------------------------------------------------------------------

# A damped rotation y' = A y: its closed form is a matrix exponential, and unlike the nonlinear
# problems tried (whose leading error terms partly cancel at the end point), the fifth-order
# methods are in their asymptotic regime over these step ranges while the errors stay far above
# float64 round-off (~1e-14).
_A_ROT = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
_Y0_ROT = torch.tensor([1.0, 0.0], dtype=F64)
_T_ROT = 4.0
STEP_COUNTS = {
    "euler": [256, 512, 1024, 2048],
    "midpoint": [32, 64, 128, 256],
    "bosh3": [32, 64, 128, 256],
    "rk4": [16, 32, 64, 128],
    "dopri5": [24, 32, 48, 64, 96],
    "tsit5": [32, 48, 64, 96, 128],
}


def _rotation(t, y):
    return _A_ROT @ y


def _rotation_exact(t: float) -> torch.Tensor:
    return torch.linalg.matrix_exp(_A_ROT * t) @ _Y0_ROT


def _slope(hs, errs) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


@pytest.mark.parametrize("method", list(ORDER))
def test_convergence_order(method):
    hs, errs, dense_errs = [], [], []
    for n in STEP_COUNTS[method]:
        h = _T_ROT / n
        # An interior output at theta = 0.3 of the middle step checks the dense output too.
        t_mid = (n // 2 + 0.3) * h
        t = torch.tensor([0.0, t_mid, _T_ROT], dtype=F64)
        ys = cnf.odeint(_rotation, _Y0_ROT, t, method=method, options=dict(step_size=h))
        hs.append(h)
        errs.append((ys[-1] - _rotation_exact(_T_ROT)).norm().item())
        dense_errs.append((ys[1] - _rotation_exact(t_mid)).norm().item())
    assert min(errs) > 1e-13  # round-off does not spoil the slope
    assert abs(_slope(hs, errs) - ORDER[method]) < 0.3, (errs, _slope(hs, errs))
    # The interpolant's own error is O(h^4) (cubic Hermite) or O(h^5) (the quartic continuous
    # extensions of dopri5 and tsit5): outputs between steps keep min(order, 4) at least.
    assert _slope(hs, dense_errs) > min(ORDER[method], 4) - 0.3, dense_errs


# A non-linear, non-autonomous problem checks the time nodes c_i as well (a linear autonomous
# problem cannot see them): y' = 3 y (1 - y) cos t, y(0) = 1/2, y = 1 / (1 + exp(-3 sin t)).
# Parts of the fifth-order methods' leading error cancel here (measured slopes 5.4-6), so only
# a lower bound is asserted.
LOGISTIC_STEP_COUNTS = {
    "euler": [256, 512, 1024, 2048],
    "midpoint": [64, 128, 256, 512],
    "bosh3": [64, 128, 256, 512],
    "rk4": [32, 64, 128, 256],
    "dopri5": [32, 48, 64, 96, 128],
    "tsit5": [32, 48, 64, 96, 128],
}


def _logistic(t, y):
    return 3.0 * y * (1.0 - y) * torch.cos(t)


@pytest.mark.parametrize("method", list(ORDER))
def test_convergence_order_non_autonomous(method):
    span = 6.0
    exact = 1.0 / (1.0 + math.exp(-3.0 * math.sin(span)))
    hs, errs = [], []
    for n in LOGISTIC_STEP_COUNTS[method]:
        ys = cnf.odeint(
            _logistic,
            torch.tensor([0.5], dtype=F64),
            torch.tensor([0.0, span], dtype=F64),
            method=method,
            options=dict(step_size=span / n),
        )
        hs.append(span / n)
        errs.append(abs(ys[-1].item() - exact))
    assert min(errs) > 1e-13
    assert _slope(hs, errs) > ORDER[method] - 0.3, errs


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_error_follows_tolerance(method):
    """Global error of adaptive solves shrinks with the tolerance, at about the tolerance."""
    t = torch.linspace(0, _T_ROT, 9, dtype=F64)
    exact = torch.stack([_rotation_exact(s) for s in t.tolist()])
    errs = []
    for tol in (1e-4, 1e-6, 1e-8):
        ys = cnf.odeint(_rotation, _Y0_ROT, t, method=method, rtol=tol, atol=tol)
        errs.append(rel_err(ys, exact))
        assert errs[-1] < 30 * tol, (tol, errs[-1])
    assert errs[0] > errs[1] > errs[2]


# --- linear systems against the matrix exponential ---------------------------------------------


def _linear_exact(A: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``y(t) = expm(A (t - t0)) y0`` for a batch ``y0`` of shape ``(*batch, dim)``."""
    dt = (t - t[0]).to(F64)
    expm = torch.linalg.matrix_exp(A.to(F64) * dt[:, None, None])  # (T, dim, dim)
    return torch.einsum("tij,...j->t...i", expm, y0.to(F64))


@pytest.mark.parametrize("method", [*ADAPTIVE, "rk4"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_linear_system_matches_matrix_exponential(stable_matrix, method, decreasing, dtype):
    dim = 5
    A = stable_matrix(dim, dtype)
    y0 = torch.randn(3, 4, dim, dtype=dtype)
    # Many output times, unevenly spaced, so most are reached by dense output.
    t = torch.sort(torch.rand(40, dtype=F64) * 2.5).values
    t = torch.cat([t.new_zeros(1), t, t.new_full((1,), 2.5)]).to(dtype)
    if decreasing:
        t = t.flip(0)

    def f(t, y):
        return y @ A.T

    if method == "rk4":  # fixed steps, error ~ h^4
        kwargs = dict(options=dict(step_size=0.01 if dtype == F64 else 0.05))
        bound = 1e-8 if dtype == F64 else 1e-5
    else:
        # bosh3 would need 10^4 steps for rtol=1e-10; it meets 1e-8 as the others meet 1e-10.
        rtol = 1e-5 if dtype == torch.float32 else 1e-8 if method == "bosh3" else 1e-10
        kwargs = dict(rtol=rtol, atol=rtol / 10 if dtype == torch.float32 else rtol / 100)
        bound = 20 * rtol
    ys = cnf.odeint(f, y0, t, method=method, **kwargs)
    assert ys.shape == (len(t), 3, 4, dim)
    assert ys.dtype == dtype
    assert torch.equal(ys[0], y0)
    assert rel_err(ys, _linear_exact(A, y0, t)) < bound


def test_single_output_time_returns_the_initial_value():
    y0 = torch.randn(2, 3, dtype=F64)
    sol = cnf.solve(lambda t, y: -y, y0, torch.tensor([0.5], dtype=F64))
    assert sol.ys.shape == (1, 2, 3)
    assert torch.equal(sol.ys[0], y0)
    assert sol.stats.nfe == 0


# --- tuple states ------------------------------------------------------------------------------


def _oscillator_with_density(t, state):
    """x' = v, v' = -x, logp' = -sum(x v): a CNF-like tuple of state and log-density."""
    x, v, logp = state
    return v, -x, -(x * v).sum(-1)


def _oscillator_exact(x0, v0, t: torch.Tensor):
    c, s = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
    x = x0 * c + v0 * s
    v = -x0 * s + v0 * c
    c2, s2 = torch.cos(2 * t)[:, None], torch.sin(2 * t)[:, None]
    logp = -((v0**2 - x0**2).sum(-1) / 4 * (1 - c2) + (x0 * v0).sum(-1) * s2 / 2)
    return x, v, logp


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["forward", "backward"])
def test_tuple_state(method, decreasing):
    x0, v0 = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    logp0 = torch.zeros(3, dtype=F64)
    t = torch.linspace(0, 3, 7, dtype=F64)
    if decreasing:
        t = -t
    out = cnf.odeint(
        _oscillator_with_density, (x0, v0, logp0), t, method=method, rtol=1e-10, atol=1e-12
    )
    assert isinstance(out, tuple) and len(out) == 3
    assert [o.shape for o in out] == [(7, 3, 2), (7, 3, 2), (7, 3)]
    for y, ref in zip(out, _oscillator_exact(x0, v0, t)):
        assert rel_err(y, ref) < 1e-8


def test_list_state_is_treated_as_a_tuple():
    out = cnf.odeint(
        lambda t, s: (-s[0], s[1]), [torch.ones(2), torch.ones(1)], torch.tensor([0.0, 1.0])
    )
    assert isinstance(out, tuple)
    assert out[0][-1] == pytest.approx([math.exp(-1)] * 2, rel=1e-5)
    assert out[1][-1] == pytest.approx([math.e], rel=1e-5)


# --- non-linear problems against scipy ---------------------------------------------------------


def _van_der_pol(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x**2) * v - x], dim=-1)

    return f


def _lotka_volterra(t, y):
    x, z = y[..., 0], y[..., 1]
    return torch.stack([1.5 * x - x * z, -3.0 * z + x * z], dim=-1)


def _random_mlp_field():
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(16, 2, generator=gen, dtype=F64)
    b1 = torch.randn(16, generator=gen, dtype=F64)
    w2 = torch.randn(2, 16, generator=gen, dtype=F64) / 4

    def f(t, y):
        return torch.tanh(y @ w1.T + b1) @ w2.T

    return f


PROBLEMS = {
    "vdp1": (_van_der_pol(1.0), [2.0, 0.0], 5.0),
    # Van der Pol mu=5 in reverse time leaves its limit cycle; keep that span short.
    "vdp5": (_van_der_pol(5.0), [2.0, 0.0], 5.0),
    "lotka_volterra": (_lotka_volterra, [1.0, 1.0], 5.0),
    "mlp": (_random_mlp_field(), [0.5, -0.5], 5.0),
}


def _scipy_reference(f, y0, t: np.ndarray) -> np.ndarray:
    def rhs(s, y):
        return f(torch.tensor(s, dtype=F64), torch.from_numpy(y)).numpy()

    sol = solve_ivp(rhs, (t[0], t[-1]), y0, method="DOP853", rtol=1e-12, atol=1e-12, t_eval=t)
    assert sol.success
    return sol.y.T


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("decreasing", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_scipy_dop853(problem, decreasing, method):
    f, y0, span = PROBLEMS[problem]
    if decreasing:
        span = -1.0 if problem == "vdp5" else -span
    t = np.linspace(0.0, span, 11)
    ref = _scipy_reference(f, y0, t)
    # bosh3 (third order) needs far more steps at tight tolerances; keep it cheaper.
    tols = (1e-4, 1e-6) if method == "bosh3" else (1e-5, 1e-8)
    errs = []
    for tol in tols:
        ys = cnf.odeint(
            f, torch.tensor(y0, dtype=F64), torch.from_numpy(t), method=method, rtol=tol, atol=tol
        )
        errs.append(rel_err(ys, ref))
        assert errs[-1] < 100 * tol, (tol, errs[-1])
    assert errs[1] < errs[0]


def test_matches_scipy_in_float32():
    f, y0, span = PROBLEMS["vdp1"]
    t = np.linspace(0.0, span, 11)
    ref = _scipy_reference(f, y0, t)
    ys = cnf.odeint(
        f, torch.tensor(y0, dtype=torch.float32), torch.from_numpy(t).float(), rtol=1e-5, atol=1e-5
    )
    assert ys.dtype == torch.float32
    assert rel_err(ys, ref) < 1e-3


def test_batch_of_initial_states_matches_individual_solves():
    """A batch is one solve with a shared step sequence; each row still meets the tolerance."""
    f, _, _ = PROBLEMS["vdp1"]
    y0 = torch.randn(4, 2, dtype=F64)
    t = np.linspace(0.0, 3.0, 5)
    ys = cnf.odeint(f, y0, torch.from_numpy(t), rtol=1e-8, atol=1e-8)
    for i in range(4):
        assert rel_err(ys[:, i], _scipy_reference(f, y0[i].numpy(), t)) < 1e-6


# --- options -----------------------------------------------------------------------------------


def _decay(t, y):
    return -y * torch.cos(t)


def test_fixed_step_size_counts_and_values():
    """rk4 with step_size h takes ceil(T/h) steps of 4 evaluations and matches a manual loop."""
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    sol = cnf.solve(
        _decay, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options=dict(step_size=0.1)
    )
    assert sol.stats.n_accepted == 10
    assert sol.stats.nfe == 40
    assert sol.stats.n_rejected == 0
    y, h = y0.clone(), 0.1
    for n in range(10):
        t = torch.tensor(n * h, dtype=F64)
        k1 = _decay(t, y)
        k2 = _decay(t + h / 2, y + h / 2 * k1)
        k3 = _decay(t + h / 2, y + h / 2 * k2)
        k4 = _decay(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert rel_err(sol.ys[-1], y) < 1e-14


def test_step_size_that_does_not_divide_the_span_lands_on_the_end():
    sol = cnf.solve(
        lambda t, y: torch.ones_like(y),
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        method="euler",
        options=dict(step_size=0.3),
    )
    assert sol.stats.n_accepted == 4  # 0.3, 0.3, 0.3, 0.1
    assert sol.ys[-1].item() == pytest.approx(1.0, abs=1e-15)
    assert sol.stats.step_size == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_methods_step_on_the_grid_of_t(method):
    """Without step_size, the steps are the intervals of t (one step per interval)."""
    t = torch.tensor([0.0, 0.1, 0.3, 0.35, 1.0], dtype=F64)
    y0 = torch.tensor([1.0], dtype=F64)
    sol = cnf.solve(_decay, y0, t, method=method)
    assert sol.stats.n_accepted == 4
    assert sol.stats.nfe == 4 * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    if method == "euler":
        y = y0
        for i in range(4):
            y = y + (t[i + 1] - t[i]) * _decay(t[i], y)
            assert rel_err(sol.ys[i + 1], y) < 1e-15


@pytest.mark.parametrize("method", list(ORDER))
def test_output_times_do_not_change_the_steps(method):
    options = None if method in ADAPTIVE else dict(step_size=0.05)
    few = cnf.solve(
        _decay,
        torch.ones(3, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        method=method,
        options=options,
    )
    many = cnf.solve(
        _decay,
        torch.ones(3, dtype=F64),
        torch.linspace(0, 1, 50, dtype=F64),
        method=method,
        options=options,
    )
    assert many.stats.n_accepted == few.stats.n_accepted
    assert many.stats.n_rejected == few.stats.n_rejected
    assert torch.equal(many.ys[-1], few.ys[-1])
    if method != "euler" and method != "midpoint":  # dense output is accurate to the method
        exact = torch.exp(-torch.sin(torch.linspace(0, 1, 50, dtype=F64)))[:, None]
        assert rel_err(many.ys, exact.expand(50, 3)) < 1e-5


@pytest.mark.parametrize("method, evals_per_step", [("dopri5", 6), ("tsit5", 6), ("bosh3", 3)])
def test_nfe_accounting(method, evals_per_step):
    """FSAL methods evaluate s - 1 stages per attempt, plus f(t0) and the initial-step probe."""
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 5, 5, dtype=F64)
    stats = cnf.solve(_van_der_pol(2.0), y0, t, method=method, rtol=1e-6, atol=1e-6).stats
    assert stats.n_accepted > 5
    assert stats.nfe == evals_per_step * (stats.n_accepted + stats.n_rejected) + 2
    # A first step far too large is rejected (and counted); no initial-step probe is spent.
    stats = cnf.solve(
        _van_der_pol(2.0), y0, t, method=method, rtol=1e-6, atol=1e-6, options=dict(first_step=1.0)
    ).stats
    assert stats.n_rejected > 0
    assert stats.nfe == evals_per_step * (stats.n_accepted + stats.n_rejected) + 1


def test_first_step(call_log):
    f = call_log(_decay)
    cnf.solve(
        f,
        torch.ones(2, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        options=dict(first_step=1e-3),
    )
    assert f.times[0] == 0.0
    assert f.times[1] == pytest.approx(0.2 * 1e-3, rel=1e-12)  # c_1 h of dopri5
    assert f.dopri5_steps(1.0, n_setup=1)[0] == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.parametrize("first_step", [None, 0.5], ids=["auto", "first_step_above_max"])
def test_max_step_is_honoured(call_log, first_step):
    f = call_log(_decay)
    sol = cnf.solve(
        f,
        torch.ones(2, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        rtol=1e-3,
        atol=1e-3,
        options=dict(max_step=0.1, first_step=first_step),
    )
    steps = f.dopri5_steps(1.0, n_setup=2 if first_step is None else 1)
    assert len(steps) == sol.stats.n_accepted
    assert max(steps) <= 0.1 * (1 + 1e-12), steps
    assert sol.stats.n_accepted >= 10
    assert sol.stats.step_size <= 0.1


def test_max_step_is_honoured_backwards(call_log):
    f = call_log(_decay)
    sol = cnf.solve(
        f,
        torch.ones(2, dtype=F64),
        torch.tensor([1.0, 0.0], dtype=F64),
        rtol=1e-3,
        atol=1e-3,
        options=dict(max_step=0.1),
    )
    steps = f.dopri5_steps(0.0, n_setup=2)
    assert all(-0.1 * (1 + 1e-12) <= h < 0 for h in steps), steps
    assert sol.stats.n_accepted >= 10


def test_min_step_is_a_floor_for_all_steps_but_the_last(call_log):
    """With a tight tolerance the controller wants tiny steps; min_step overrides it."""
    f = call_log(_decay)
    sol = cnf.solve(
        f,
        torch.ones(2, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        rtol=1e-10,
        atol=1e-10,
        options=dict(min_step=0.05),
    )
    steps = f.dopri5_steps(1.0, n_setup=2)
    assert len(steps) == sol.stats.n_accepted <= 21
    # The last step only lands on t = 1 and may be shorter.
    assert min(steps[:-1]) >= 0.05 * (1 - 1e-12), steps


def test_min_step_too_large_for_the_tolerance_warns_and_accepts():
    """torchdiffeq's meaning: a step of min_step stands whatever its error (the option bounds
    the cost); cnf says so with a warning, once per solve."""

    def stiff(t, y):
        return -5.0 * (y - torch.cos(t))

    with pytest.warns(UserWarning, match="min_step=0.1 accepted above the tolerance"):
        sol = cnf.solve(
            stiff,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            options=dict(min_step=0.1),
        )
    assert sol.stats.n_accepted <= 10 and sol.stats.n_rejected == 0


def test_max_num_steps_adaptive():
    t = torch.tensor([0.0, 10.0], dtype=F64)
    sol = cnf.solve(_van_der_pol(1.0), torch.tensor([2.0, 0.0], dtype=F64), t)
    n = sol.stats.n_accepted
    # Exactly enough steps is fine; one fewer is an error that names the option.
    cnf.odeint(
        _van_der_pol(1.0), torch.tensor([2.0, 0.0], dtype=F64), t, options=dict(max_num_steps=n)
    )
    with pytest.raises(cnf.SolverError, match="max_num_steps") as info:
        cnf.odeint(
            _van_der_pol(1.0),
            torch.tensor([2.0, 0.0], dtype=F64),
            t,
            options=dict(max_num_steps=n - 1),
        )
    assert 0.0 < info.value.t < 10.0
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_max_num_steps_fixed_step(method):
    t = torch.tensor([0.0, 1.0], dtype=F64)
    cnf.odeint(
        _decay,
        torch.ones(1, dtype=F64),
        t,
        method=method,
        options=dict(step_size=0.01, max_num_steps=100),
    )
    with pytest.raises(cnf.SolverError, match="max_num_steps"):
        cnf.odeint(
            _decay,
            torch.ones(1, dtype=F64),
            t,
            method=method,
            options=dict(step_size=0.01, max_num_steps=99),
        )


def test_max_num_steps_on_the_grid_of_t():
    t = torch.linspace(0, 1, 21, dtype=F64)
    with pytest.raises(cnf.SolverError, match="max_num_steps"):
        cnf.odeint(
            _decay, torch.ones(1, dtype=F64), t, method="rk4", options=dict(max_num_steps=10)
        )


def _fast_and_slow(t, state):
    """x decays slowly; z = sin(20 t) oscillates fast and dominates the step size."""
    x, z = state
    return -x, 20.0 * torch.cos(20.0 * t).expand_as(z)


@pytest.mark.parametrize("which", ["rtol", "atol"])
def test_per_state_tolerances_loosen_only_that_state(which):
    state = (torch.ones(3, dtype=F64), torch.zeros(1, dtype=F64))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    tight = dict(rtol=1e-9, atol=1e-9)
    loose = dict(tight, **{which: (1e-9, 1e-3)})
    sol_tight = cnf.solve(_fast_and_slow, state, t, **tight)
    sol_loose = cnf.solve(_fast_and_slow, state, t, **loose)
    assert sol_loose.stats.n_accepted < 0.5 * sol_tight.stats.n_accepted
    # The tightly controlled state stays accurate; the loose one is only roughly right.
    assert rel_err(sol_loose.ys[0][-1], torch.full((3,), math.exp(-2.0))) < 1e-7
    z_err = rel_err(sol_loose.ys[1][-1], torch.tensor([math.sin(40.0)]))
    assert 1e-8 < z_err < 1e-2
    assert rel_err(sol_tight.ys[1][-1], torch.tensor([math.sin(40.0)])) < 1e-7


def test_scalar_tolerances_apply_to_every_state():
    state = (torch.ones(3, dtype=F64), torch.zeros(1, dtype=F64))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    a = cnf.solve(_fast_and_slow, state, t, rtol=1e-6, atol=1e-6)
    b = cnf.solve(_fast_and_slow, state, t, rtol=(1e-6, 1e-6), atol=[1e-6, 1e-6])
    assert a.stats.n_accepted == b.stats.n_accepted
    assert torch.equal(a.ys[1], b.ys[1])


def test_tighter_tolerance_takes_more_steps():
    t = torch.tensor([0.0, 5.0], dtype=F64)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    counts = [
        cnf.solve(_van_der_pol(1.0), y0, t, rtol=tol, atol=tol).stats.n_accepted
        for tol in (1e-3, 1e-6, 1e-9)
    ]
    assert counts[0] < counts[1] < counts[2]
    # Fifth order: 10^3 tighter costs about 10^(3/5) ~ 4x the steps.
    assert 2 < counts[2] / counts[1] < 8


def test_step_size_stat_is_the_next_step():
    sol = cnf.solve(_decay, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert 0 < sol.stats.step_size < 1.0
    # Resuming with the reported step as first_step: the solver's first step is accepted.
    sol2 = cnf.solve(
        _decay,
        sol.ys[-1],
        torch.tensor([1.0, 2.0], dtype=F64),
        options=dict(first_step=sol.stats.step_size),
    )
    assert sol2.stats.n_rejected == 0


# --- state layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_zero_dim_state(method):
    options = dict(step_size=0.01) if method == "rk4" else None
    ys = cnf.odeint(
        _decay,
        torch.tensor(2.0, dtype=F64),
        torch.linspace(0, 1, 4, dtype=F64),
        method=method,
        options=options,
    )
    assert ys.shape == (4,)
    exact = 2.0 * torch.exp(-torch.sin(torch.linspace(0, 1, 4, dtype=F64)))
    assert rel_err(ys, exact) < 1e-7


def test_non_contiguous_state_is_solved_like_a_contiguous_copy():
    y0 = torch.randn(4, 3, dtype=F64).T  # (3, 4), not contiguous
    assert not y0.is_contiguous()
    t = torch.linspace(0, 1, 3, dtype=F64)
    a = cnf.solve(_decay, y0, t)
    b = cnf.solve(_decay, y0.contiguous(), t)
    assert a.ys.shape == (3, 3, 4)
    assert a.stats.n_accepted == b.stats.n_accepted
    assert rel_err(a.ys, b.ys) < 1e-15


def test_solution_does_not_alias_the_initial_state():
    y0 = torch.ones(3, dtype=F64)
    ys = cnf.odeint(_decay, y0, torch.tensor([0.0, 1.0], dtype=F64))
    ys[0].zero_()
    assert torch.equal(y0, torch.ones(3, dtype=F64))
