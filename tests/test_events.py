"""Events: ``odeint(..., event_fn=...)`` and ``odeint_event`` against closed forms, finite
differences and torchdiffeq, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cnf

F64 = torch.float64
G = 9.81
TIGHT = dict(rtol=1e-10, atol=1e-12)


class Ball(nn.Module):
    """A ball in the air, ``y = (height, speed)``, ``y'' = -g``; ``g`` a parameter."""

    def __init__(self, g: float = G, dtype=F64) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g, dtype=dtype))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g * torch.ones_like(y[1])])


def height(t, y):
    return y[0]


def ball_state(h0, v0, dtype=F64):
    return torch.stack([torch.as_tensor(h0, dtype=dtype), torch.as_tensor(v0, dtype=dtype)])


def landing(h0: float, v0: float, g: float = G) -> float:
    """When a ball thrown up at ``v0`` from ``h0`` lands."""
    return (v0 + math.sqrt(v0**2 + 2 * g * h0)) / g


# --- event times against closed forms ------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize(
    "method, options", [("dopri5", None), ("tsit5", None), ("bosh3", None), ("rk4", 0.1)]
)
def test_a_ball_thrown_up_lands_at_2_v0_over_g(dtype, tol, method, options):
    options = None if options is None else {"step_size": options}
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    y0 = ball_state(0.0, 3.0, dtype)
    event_t, ys = cnf.odeint(
        Ball(dtype=dtype), y0, t, event_fn=height, method=method, options=options
    )
    assert event_t.shape == () and event_t.dtype == dtype
    assert ys.shape == (2, 2) and ys.dtype == dtype
    assert ys[0].tolist() == y0.tolist()
    # the solutions are quadratics, which every method and its dense output get exactly
    assert abs(event_t.item() - 2 * 3.0 / G) < tol
    assert abs(ys[1, 0].item()) < 10 * tol and abs(ys[1, 1].item() + 3.0) < 10 * tol


def decay(t, y):
    return -0.7 * y


def test_exponential_decay_reaches_a_threshold_at_log_y0_over_c_over_k():
    y0 = torch.tensor([2.0], dtype=F64)
    t = torch.tensor([0.5, 1.0], dtype=F64)
    event_t, ys = cnf.odeint(decay, y0, t, event_fn=lambda t, y: y - 0.3, **TIGHT)
    assert abs(event_t.item() - (0.5 + math.log(2.0 / 0.3) / 0.7)) < 1e-9
    assert abs(ys[1].item() - 0.3) < 1e-12  # on the dense output: c is zero to round-off


def test_reversed_time_runs_backwards_and_returns_the_real_event_time():
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, -1.0], dtype=F64)
    event_t, ys = cnf.odeint(decay, y0, t, event_fn=lambda t, y: y - 2.0, **TIGHT)
    assert abs(event_t.item() + math.log(2.0) / 0.7) < 1e-9
    assert abs(ys[1].item() - 2.0) < 1e-12
    # a ball seen backwards from the top of its flight, from 1 m up
    event_t, ys = cnf.odeint(
        Ball(), ball_state(1.0, 3.0), torch.tensor([0.0, -1.0], dtype=F64), event_fn=height
    )
    assert abs(event_t.item() + landing(1.0, -3.0)) < 1e-13


def test_a_tuple_state_gives_a_tuple_solution():
    def field(t, y):
        h, v = y
        return v, torch.full_like(v, -G)

    y0 = (torch.zeros(1, dtype=F64), torch.full((1,), 4.0, dtype=F64))
    event_t, (h, v) = cnf.odeint(
        field, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, y: y[0]
    )
    assert h.shape == v.shape == (2, 1)
    assert abs(event_t.item() - 8.0 / G) < 1e-13 and abs(v[1].item() + 4.0) < 1e-12


def test_with_several_entries_the_first_to_cross_wins_whatever_their_signs():
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def event_fn(t, y):  # positive, negative and time-dependent entries
        return torch.cat([y - 0.5, 0.9 - y, (3.0 - t).reshape(1)])

    event_t, _ = cnf.odeint(decay, y0, t, event_fn=event_fn, **TIGHT)
    assert abs(event_t.item() - math.log(1 / 0.9) / 0.7) < 1e-9
    event_t, _ = cnf.odeint(
        decay, y0, t, event_fn=lambda t, y: torch.cat([y - 0.5, (0.2 - t).reshape(1)]), **TIGHT
    )
    assert abs(event_t.item() - 0.2) < 1e-14


def test_odeint_and_odeint_adjoint_find_the_same_event():
    y0 = ball_state(0.5, 2.0).requires_grad_()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    a = cnf.odeint(Ball(), y0, t, event_fn=height)
    b = cnf.odeint_adjoint(Ball(), y0, t, event_fn=height)
    assert a[0].item() == b[0].item() and torch.equal(a[1], b[1])


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interface, kwargs",
    [
        (cnf.odeint, {}),
        (cnf.odeint_adjoint, {}),
        (cnf.odeint_adjoint, {"adjoint_options": {"norm": "seminorm"}, **TIGHT}),
    ],
    ids=["odeint", "adjoint-checkpoint", "adjoint-backsolve"],
)
def test_gradients_of_the_landing_time_and_speed_match_the_closed_form(interface, kwargs):
    h0, v0 = 1.0, 3.0
    y0 = ball_state(h0, v0).requires_grad_()
    t0 = torch.tensor(0.25, dtype=F64, requires_grad=True)
    ball = Ball()
    event_t, ys = cnf.odeint_event(
        ball, y0, t0, event_fn=height, odeint_interface=interface, **kwargs
    )
    root = math.sqrt(v0**2 + 2 * G * h0)
    assert abs(event_t.item() - 0.25 - landing(h0, v0)) < 1e-13
    dt = torch.autograd.grad(event_t, (y0, t0, ball.g), retain_graph=True)
    # t* = t0 + (v0 + root) / g
    expected = [1 / root, (1 + v0 / root) / G, 1.0, -(v0 + root) / G**2 + h0 / (G * root)]
    got = [*dt[0].tolist(), dt[1].item(), dt[2].item()]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-12, (got, expected)
    # the landing speed v* = -root
    dv = torch.autograd.grad(ys[1, 1], (y0, t0, ball.g))
    expected = [-G / root, -v0 / root, 0.0, -h0 / root]
    got = [*dv[0].tolist(), dv[1].item(), dv[2].item()]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-12, (got, expected)


def test_gradients_in_float32():
    y0 = ball_state(0.0, 3.0, torch.float32).requires_grad_()
    event_t, _ = cnf.odeint_event(Ball(dtype=torch.float32), y0, torch.tensor(0.0), event_fn=height)
    assert event_t.dtype == torch.float32
    (grad,) = torch.autograd.grad(event_t, y0)
    assert abs(grad[1].item() - 2 / G) < 1e-6 and abs(grad[0].item() - 1 / 3.0) < 1e-6


class Threshold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(0.3, dtype=F64))

    def forward(self, t, y):
        return y - self.level


def test_the_event_functions_own_parameters_get_gradients():
    event_fn = Threshold()
    event_t, _ = cnf.odeint_event(decay, torch.tensor([2.0], dtype=F64), 0.0, event_fn=event_fn)
    (grad,) = torch.autograd.grad(event_t, event_fn.level)
    assert abs(grad.item() + 1 / (0.7 * 0.3)) < 1e-7  # t* = log(y0 / c) / k


class Pendulum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.damping = nn.Parameter(torch.tensor(0.2, dtype=F64))

    def forward(self, t, y):
        return torch.stack([y[1], -self.a * torch.sin(y[0]) - self.damping * y[1] + 0.1 * t])


def _pendulum_event(y0, params, interface):
    field = Pendulum()
    with torch.no_grad():
        for p, v in zip(field.parameters(), params):
            p.copy_(v)
    event_t, ys = cnf.odeint_event(
        field,
        y0,
        torch.tensor(0.1, dtype=F64),
        event_fn=lambda t, y: y[0] - 0.2 * y[1],
        odeint_interface=interface,
        **TIGHT,
    )
    return event_t, ys[1], field


@pytest.mark.parametrize("interface", [cnf.odeint, cnf.odeint_adjoint])
def test_gradients_match_finite_differences_on_a_nonlinear_problem(interface):
    y0 = torch.tensor([1.0, 0.3], dtype=F64, requires_grad=True)
    params = [1.3, 0.2]
    event_t, y_end, field = _pendulum_event(y0, params, interface)
    loss = event_t + y_end[1] ** 2
    grads = torch.autograd.grad(loss, (y0, *field.parameters()))
    got = [*grads[0].tolist(), *(g.item() for g in grads[1:])]

    def value(y0_, params_):
        with torch.no_grad():
            t, y, _ = _pendulum_event(y0_, params_, cnf.odeint)
            return t.item() + y[1].item() ** 2

    eps, fd = 1e-6, []
    for i in range(2):
        e = torch.zeros(2, dtype=F64)
        e[i] = eps
        fd.append((value(y0.detach() + e, params) - value(y0.detach() - e, params)) / (2 * eps))
    for i in range(2):
        up, down = list(params), list(params)
        up[i] += eps
        down[i] -= eps
        fd.append((value(y0.detach(), up) - value(y0.detach(), down)) / (2 * eps))
    assert max(abs(a - b) for a, b in zip(got, fd)) < 1e-7, (got, fd)


def test_agreement_with_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    results = []
    for odeint_event in (cnf.odeint_event, torchdiffeq.odeint_event):
        ball = Ball()
        y0 = ball_state(1.0, 3.0).requires_grad_()
        event_t, ys = odeint_event(ball, y0, torch.tensor(0.0, dtype=F64), event_fn=height, **TIGHT)
        grads = torch.autograd.grad(event_t + ys[1, 1], (y0, ball.g))
        results.append([event_t.item(), *ys[1].tolist(), *grads[0].tolist(), grads[1].item()])
    ours, theirs = results
    assert abs(ours[0] - theirs[0]) < 1e-6
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5, (ours, theirs)


# --- errors --------------------------------------------------------------------------------------

T2 = torch.tensor([0.0, 1.0], dtype=F64)
Y0 = ball_state(0.0, 3.0)


@pytest.mark.deadline(10)
def test_t_must_have_two_entries():
    with pytest.raises(ValueError, match="exactly 2 entries"):
        cnf.odeint(Ball(), Y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), event_fn=height)


@pytest.mark.deadline(10)
def test_fixed_step_methods_need_a_step_size():
    with pytest.raises(ValueError, match="step_size"):
        cnf.odeint(Ball(), Y0, T2, event_fn=height, method="rk4")


@pytest.mark.deadline(10)
@pytest.mark.parametrize("method, options", [("dopri5", {}), ("euler", {"step_size": 0.01})])
def test_no_crossing_within_max_num_steps_is_a_solver_error(method, options):
    def oscillator(t, y):
        return torch.stack([y[1], -y[0]])

    with pytest.raises(cnf.SolverError, match="did not cross zero within max_num_steps=50"):
        cnf.odeint(
            oscillator,
            torch.tensor([1.0, 0.0], dtype=F64),
            T2,
            event_fn=lambda t, y: y[0] - 2.0,
            method=method,
            options={"max_num_steps": 50, **options},
        )


@pytest.mark.deadline(10)
@pytest.mark.parametrize(
    ("func", "options", "match"),
    [
        # a constant solution's steps grow tenfold each: the time overflows first
        (lambda t, y: torch.zeros_like(y), {}, "did not cross zero before the time overflowed"),
        (lambda t, y: torch.ones_like(y), {}, "overflows before the event"),
        (decay, {"max_num_steps": 200}, "did not cross zero within max_num_steps=200"),
    ],
    ids=["constant", "growing", "decaying"],
)
def test_an_event_that_never_comes_is_a_solver_error_not_a_hang(func, options, match):
    with pytest.raises(cnf.SolverError, match=match):
        y0 = torch.tensor([1.0], dtype=F64)
        cnf.odeint(func, y0, T2, event_fn=lambda t, y: y + 1.0, options=options)


@pytest.mark.deadline(10)
@pytest.mark.parametrize(
    "event_fn, match",
    [
        (lambda t, y: 1.0, "returned float"),
        (lambda t, y: y[0] > 0, "torch.bool"),
        (lambda t, y: y[:0], "at least one entry"),
        (lambda t, y: y[: 1 + int(t > 0.1)], "same shape at every call"),
        (lambda t, y: y[0] * 0.0, "does not move off zero"),
        ("height", "callable"),
    ],
)
def test_bad_event_functions_are_refused(event_fn, match):
    with pytest.raises(ValueError, match=match):
        cnf.odeint(Ball(), ball_state(1.0, 1.0), T2, event_fn=event_fn)
