"""Bad and unusual input to the solver core: each case ends in the right answer or a clear error.

Every case names the exception type and a phrase of its message (or checks the result), and
runs under a deadline, so that a regression into a hang fails instead of stalling the suite.
The kinds: empty states, non-finite derivatives (at the start, mid-solve, overflow), devices
and dtypes the error control cannot work in, tolerances and options (one rule for numbers
across the package), times, and what ``func`` returns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cnf
from cnf.ode import SolverError, odeint, odeint_adjoint, solve
from cnf.settings import SolverSettings

pytestmark = pytest.mark.deadline(30)


@pytest.mark.deadline(0.5)
def test_the_deadline_ends_a_hang():
    """The suite's guard: a test that loops forever fails with a TimeoutError."""
    with pytest.raises(TimeoutError, match="deadline"):
        while True:
            pass


T01 = torch.tensor([0.0, 1.0])
F64 = torch.float64


def decay(t, y):
    return -y


class Decay(torch.nn.Module):
    """``dy/dt = -w y`` with a learnable rate, for adjoint solves."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, t, y):
        return -self.w * y


# --- empty states: the solution of nothing is nothing -------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 2), (3, 0)])
@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler"])
def test_empty_state_solves_to_itself(shape, method):
    sol = solve(decay, torch.ones(shape), torch.linspace(0, 1, 4), method=method)
    assert sol.ys.shape == (4, *shape)
    assert sol.stats.nfe == 0


def test_empty_tuple_state_and_gradients():
    y0 = (torch.ones(0, 2, requires_grad=True), torch.ones(0, requires_grad=True))
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    ys = odeint(lambda t, y: (-y[0], -y[1]), y0, t)
    assert [y.shape for y in ys] == [(2, 0, 2), (2, 0)]
    (ys[0].sum() + ys[1].sum()).backward()
    assert y0[0].grad.shape == (0, 2) and t.grad.tolist() == [0.0, 0.0]


def test_empty_state_adjoint():
    y0 = torch.ones(0, 3, requires_grad=True)
    odeint_adjoint(Decay(), y0, T01).sum().backward()
    assert y0.grad.shape == (0, 3)


def test_tuple_state_with_one_empty_tensor_is_solved():
    ys = odeint(
        lambda t, y: (-y[0], -y[1]), (torch.ones(2, dtype=F64), torch.ones(0, dtype=F64)), T01
    )
    assert ys[0][-1].tolist() == pytest.approx([math.exp(-1)] * 2, rel=1e-6)


# --- non-finite derivatives ----------------------------------------------------------------------


def _inf_at_start(t, y):
    return torch.full_like(y, math.inf)


def _nan_for_late_times(t, y):
    return y * math.nan if t > 0.5 else -y


def _nan_below_half(t, y):
    # NaN once the state itself decays below 0.5 (at t = ln 2): a state-dependent failure
    return torch.where(y < 0.5, torch.full_like(y, math.nan), -y)


@pytest.mark.parametrize(
    ("func", "y0", "phrase", "at"),
    [
        (
            _inf_at_start,
            torch.ones(2),
            "returned Inf in 2 of 2 entries.*at t=0 .at the initial",
            0.0,
        ),
        (_nan_for_late_times, torch.ones(2, dtype=F64), "returned NaN in 2 of 2 entries", 0.5),
        (_nan_below_half, torch.ones(3, dtype=F64), "returned NaN in 3 of 3", math.log(2)),
        (lambda t, y: 1e30 * y, torch.ones(2), "overflows", None),  # float32: exp(1e30 t)
        (lambda t, y: y * y, torch.ones(2, dtype=F64), "blow up", 1.0),  # y = 1 / (1 - t)
    ],
    ids=["inf-at-start", "nan-after-t", "nan-in-state", "overflow-float32", "finite-time-blowup"],
)
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_non_finite_derivatives_are_named(func, y0, phrase, at, method):
    with pytest.raises(SolverError, match=phrase) as info:
        odeint(func, y0, torch.tensor([0.0, 2.0], dtype=y0.dtype), method=method)
    if at is not None:
        assert info.value.t == pytest.approx(at, abs=1e-6)


def test_nan_is_located_in_a_tuple_state():
    def f(t, y):
        b = -y[1]
        b = torch.where(torch.arange(4) == 2, b * math.nan, b) if t > 0.25 else b
        return -y[0], b

    with pytest.raises(SolverError, match=r"NaN in 1 of 10 entries, the first at tensor 1 of "
                       r"the state, index \(2,\)"):  # fmt: skip
        odeint(f, (torch.ones(2, 3, dtype=F64), torch.ones(4, dtype=F64)), T01)


def test_nan_in_a_batch_names_the_sample():
    def f(t, y):
        return torch.where(torch.arange(5)[:, None] == 3, y * math.nan, -y)

    with pytest.raises(SolverError, match=r"NaN in 2 of 10 entries, the first at index \(3, 0\)"):
        odeint(f, torch.ones(5, 2), T01)


def test_fixed_step_nan_names_the_first_output_time():
    with pytest.raises(SolverError, match=r"not finite at t=0.75 \(NaN in 2 of 2"):
        odeint(_nan_for_late_times, torch.ones(2), torch.linspace(0, 1, 5), method="rk4",
               options={"step_size": 0.1})  # fmt: skip


def test_nan_before_the_last_output_time_keeps_earlier_outputs():
    ys = odeint(_nan_for_late_times, torch.ones(2, dtype=F64), torch.tensor([0.0, 0.25, 0.5]))
    assert torch.isfinite(ys).all()


def test_nan_derivative_with_min_step_names_the_nan():
    with pytest.raises(SolverError, match="NaN.*min_step"):
        odeint(_nan_for_late_times, torch.ones(2, dtype=F64), T01, options={"min_step": 1e-3})


def test_stiff_problem_hits_max_num_steps():
    with pytest.raises(SolverError, match="max_num_steps=50"):
        odeint(lambda t, y: -1e6 * y, torch.ones(2), T01, options={"max_num_steps": 50})


def test_nan_weights_in_an_adjoint_solve():
    field = Decay()
    with torch.no_grad():
        field.w.fill_(math.nan)
    with pytest.raises(SolverError, match="returned NaN.*initial state.*NaN weights"):
        odeint_adjoint(field, torch.ones(3, requires_grad=True), T01)


# --- devices and dtypes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y0", "t", "phrase"),
    [
        (torch.ones(2, device="meta"), T01, "y0 is a meta tensor"),
        (torch.ones(2), torch.tensor([0.0, 1.0], device="meta"), "t is a meta tensor"),
        (torch.ones(2, dtype=torch.float16), T01, "y0 is torch.float16.*float32 or float64"),
        (torch.ones(2, dtype=torch.bfloat16), T01, "y0 is torch.bfloat16"),
        (torch.ones(2), T01.half(), r"t is torch.float16.*t.float\(\)"),
        (torch.ones(2), T01.bfloat16(), "t is torch.bfloat16"),
        (torch.ones(2, dtype=torch.complex64), T01, "floating point"),
        (torch.ones(2, dtype=torch.int64), T01, "floating point"),
        (torch.ones(2), T01.to(torch.complex64), "real times"),
        ((torch.ones(2), torch.ones(2, dtype=F64)), T01, "share dtype"),
    ],
    ids=[
        "meta-y0",
        "meta-t",
        "f16",
        "bf16",
        "f16-t",
        "bf16-t",
        "complex",
        "int",
        "complex-t",
        "mixed",
    ],
)
def test_unsupported_dtypes_and_devices(y0, t, phrase):
    with pytest.raises(ValueError, match=phrase):
        solve(lambda t, y: y, y0, t)


def test_integer_times_are_fine():
    ys = odeint(decay, torch.ones(2, dtype=F64), torch.tensor([0, 1]))
    assert ys[-1].tolist() == pytest.approx([math.exp(-1)] * 2, rel=1e-6)


# --- tolerances and options: one rule for numbers -------------------------------------------------

BAD_TOLERANCES = ["1e-3", True, math.nan, math.inf, -1e-3, 0.0, [1e-3], torch.ones(3)]
GOOD_TOLERANCES = [1e-3, 1, np.float32(1e-3), np.float64(1e-3), torch.tensor(1e-3)]


def _solve_with(key, value):
    return solve(decay, torch.ones(2), T01, **{key: value})


def _adjoint_with(key, value):
    kw = {"adjoint_" + key: value}
    return odeint_adjoint(Decay(), torch.ones(2, requires_grad=True), T01, **kw)


def _settings_with(key, value):
    return SolverSettings(**{key: value})


def _cnf_with(key, value):
    return cnf.CNF(cnf.fields.ConcatSquashMLP(2, (4,)), (2,), **{key: value})


def _call_with(key, value):
    flow = cnf.CNF(cnf.fields.ConcatSquashMLP(2, (4,)), (2,))
    return flow.log_prob(torch.zeros(2, 2), **{key: value})


PLACES = [_solve_with, _adjoint_with, _settings_with, _cnf_with, _call_with]


@pytest.mark.parametrize("place", PLACES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("key", ["rtol", "atol"])
@pytest.mark.parametrize("value", BAD_TOLERANCES, ids=repr)
def test_bad_tolerances_are_refused_everywhere(place, key, value):
    with pytest.raises(ValueError, match=key):
        place(key, value)


def test_a_missing_tolerance_is_refused_by_the_solver():
    """None means 'the default' for settings and per-call overrides; the solver has no
    default to fall back to in its place."""
    with pytest.raises(ValueError, match="rtol must be a number, got None"):
        _solve_with("rtol", None)


@pytest.mark.parametrize("place", PLACES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", GOOD_TOLERANCES, ids=repr)
def test_numbers_of_every_kind_are_tolerances(place, value):
    place("rtol", value)


def test_a_string_tolerance_says_to_drop_the_quotes():
    with pytest.raises(ValueError, match="without quotes"):
        _solve_with("rtol", "1e-3")


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"max_num_steps": "10"}, "positive int"),
        ({"max_num_steps": 0}, "positive int"),
        ({"max_num_steps": 2.5}, "positive int"),
        ({"first_step": "0.1"}, "must be a number"),
        ({"first_step": -0.1}, "positive"),
        ({"safety": True}, "must be a number"),
        ({"min_step": -1.0}, ">= 0"),
        ({"max_step": 0.0}, "> 0"),
        ({"min_step": 0.5, "max_step": 0.1}, "must not exceed"),
        ({"dfactor": 2.0}, "dfactor < 1 < ifactor"),
        ({"stepsize": 0.1}, "unknown option"),
        ("fast", "dict of solver options"),
    ],
)
def test_bad_options(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        solve(decay, torch.ones(2), T01, options=options)


def test_bad_step_size_for_fixed_methods():
    with pytest.raises(ValueError, match="step_size"):
        solve(decay, torch.ones(2), T01, method="rk4", options={"step_size": "0.1"})
    with pytest.raises(SolverError, match="max_num_steps"):
        solve(decay, torch.ones(2), T01, method="rk4", options={"step_size": 1e-9})


@pytest.mark.parametrize("method", [None, "RK45", 5])  # solve takes names only (odeint: None)
def test_unknown_methods(method):
    with pytest.raises(ValueError, match="unknown method"):
        solve(decay, torch.ones(2), T01, method=method)


# --- times and what func returns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "phrase"),
    [
        (torch.tensor([0.0, 1.0, 0.5]), "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, 0.0, 1.0]), "no repeated times"),
        (torch.tensor([0.0, math.nan]), "NaN or Inf"),
        (torch.tensor([0.0, math.inf]), "NaN or Inf"),
        (torch.zeros(2, 2), "1-D"),
        (torch.zeros(0), "non-empty"),
        ("0 to 1", "1-D tensor of times"),
    ],
)
def test_bad_times(t, phrase):
    with pytest.raises(ValueError, match=phrase):
        solve(decay, torch.ones(2), t)


def test_a_single_time_returns_the_initial_state():
    ys = odeint(decay, torch.ones(2), torch.tensor([0.3]))
    assert ys.shape == (1, 2) and ys[0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("func", "phrase"),
    [
        (lambda t, y: None, "returned NoneType"),
        (lambda t, y: -y[:1], r"returned shape \(1,\)"),
        (lambda t, y: (-y).double(), "dtype torch.float32"),
        (lambda t, y: (-y).long(), "dtype torch.float32"),
        (lambda t, y: (-y, -y), "state's structure"),
    ],
)
def test_func_returning_the_wrong_thing(func, phrase):
    with pytest.raises(ValueError, match=phrase):
        solve(func, torch.ones(2), T01)


@pytest.mark.parametrize(
    ("y0", "phrase"),
    [
        (torch.tensor([1.0, math.nan]), "y0 contains NaN or Inf"),
        ([1.0, 2.0], "tensor or a non-empty tuple"),
        ((), "tensor or a non-empty tuple"),
    ],
)
def test_bad_initial_states(y0, phrase):
    with pytest.raises(ValueError, match=phrase):
        solve(decay, y0, T01)


def test_func_that_is_not_callable():
    with pytest.raises(ValueError, match="callable"):
        solve("decay", torch.ones(2), T01)
