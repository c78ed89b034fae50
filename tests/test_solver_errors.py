"""Bad input is a ValueError that says what to do; a solve that cannot finish is a SolverError."""

from __future__ import annotations

import math

import pytest
import torch

import cnf

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)


def _decay(t, y):
    return -y


def _y0():
    return torch.ones(3, dtype=F64)


# --- times -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.zeros(2, 2, dtype=F64), "1-D"),
        (torch.tensor(1.0, dtype=F64), "1-D"),
        (torch.zeros(0, dtype=F64), "non-empty"),
        (torch.tensor([0.0, 1.0, 1.0], dtype=F64), "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, 1.0, 0.5], dtype=F64), "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, math.nan], dtype=F64), "NaN"),
        (torch.tensor([0.0, math.inf], dtype=F64), "NaN or Inf"),
        ("0 to 1", "1-D tensor"),
    ],
    ids=["2d", "0d", "empty", "repeated", "not-monotonic", "nan", "inf", "string"],
)
def test_bad_times(t, match):
    with pytest.raises(ValueError, match=match):
        cnf.odeint(_decay, _y0(), t)


def test_times_as_a_list_are_accepted():
    ys = cnf.odeint(_decay, _y0(), [0.0, 1.0])
    assert ys.shape == (2, 3)
    assert ys[-1, 0].item() == pytest.approx(math.exp(-1), rel=1e-6)


# --- method and options ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rk45", "Dopri5", ""])  # None: torchdiffeq's default, dopri5
def test_unknown_method_lists_the_valid_ones(method):
    with pytest.raises(ValueError, match="unknown method") as info:
        cnf.odeint(_decay, _y0(), T01, method=method)
    for name in ("bosh3", "dopri5", "euler", "midpoint", "rk4", "tsit5"):
        assert name in str(info.value)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_unknown_option_is_rejected_not_warned(method):
    # pyproject turns warnings into errors, so a warning would not pass this test either.
    with pytest.raises(ValueError, match="stepsize") as info:
        cnf.odeint(_decay, _y0(), T01, method=method, options=dict(stepsize=0.1))
    assert "valid options" in str(info.value)
    assert "step_size" in str(info.value)


@pytest.mark.parametrize("option", ["first_step", "max_step", "min_step", "safety", "ifactor"])
def test_adaptive_only_option_with_a_fixed_method(option):
    with pytest.raises(ValueError, match="only apply to adaptive methods"):
        cnf.odeint(_decay, _y0(), T01, method="rk4", options={option: 0.1})


@pytest.mark.parametrize(
    "options",
    [
        dict(step_size=0.0),
        dict(step_size=-0.1),
        dict(step_size=math.nan),
        dict(first_step=-1.0),
        dict(max_num_steps=0),
        dict(max_num_steps=10.5),
        dict(max_step=0.0),
        dict(min_step=-1.0),
        dict(min_step=0.5, max_step=0.1),
        dict(dfactor=1.5),
        dict(ifactor=0.5),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_bad_option_values(options):
    with pytest.raises(ValueError, match="options"):
        cnf.odeint(_decay, _y0(), T01, options=options)


def test_options_none_entries_mean_default():
    ys = cnf.odeint(_decay, _y0(), T01, options=dict(first_step=None, max_step=None))
    assert ys[-1, 0].item() == pytest.approx(math.exp(-1), rel=1e-6)


# --- tolerances --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-6, math.nan, math.inf, "tight"])
def test_bad_tolerance(name, value):
    with pytest.raises(ValueError, match=name):
        cnf.odeint(_decay, _y0(), T01, **{name: value})


def test_tuple_tolerance_with_wrong_length():
    state = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="2 tensors"):
        cnf.odeint(lambda t, s: s, state, T01, rtol=(1e-6, 1e-6, 1e-6))


def test_tuple_tolerance_for_a_tensor_state():
    with pytest.raises(ValueError, match="tuple state"):
        cnf.odeint(_decay, _y0(), T01, atol=(1e-6, 1e-6))


def test_bad_entry_of_a_tuple_tolerance():
    state = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match=r"atol\[1\]"):
        cnf.odeint(lambda t, s: s, state, T01, atol=(1e-6, -1.0))


# --- initial state -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_y0(bad):
    y0 = _y0()
    y0[1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        cnf.odeint(_decay, y0, T01)


def test_non_finite_y0_in_a_tuple_state():
    state = (torch.ones(2, dtype=F64), torch.tensor([math.nan], dtype=F64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        cnf.odeint(lambda t, s: s, state, T01)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_y0(dtype):
    with pytest.raises(ValueError, match="floating point"):
        cnf.odeint(_decay, torch.ones(3, dtype=dtype), T01)


@pytest.mark.parametrize(
    "y0", [[1.0, 2.0], 1.0, (), None], ids=["floats", "scalar", "empty", "none"]
)
def test_y0_not_a_tensor(y0):
    with pytest.raises(ValueError, match="y0"):
        cnf.odeint(_decay, y0, T01)


def test_tuple_state_with_mixed_dtypes():
    state = (torch.ones(2, dtype=F64), torch.ones(1, dtype=torch.float32))
    with pytest.raises(ValueError, match="share dtype"):
        cnf.odeint(lambda t, s: s, state, T01)


def test_func_not_callable():
    with pytest.raises(ValueError, match="callable"):
        cnf.odeint("f", _y0(), T01)


# --- what func returns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "func, match",
    [
        (lambda t, y: y[:2], r"shape \(2,\)"),
        (lambda t, y: y[None], r"shape \(1, 3\)"),
        (lambda t, y: y.float(), "torch.float32"),
        (lambda t, y: y.tolist(), r"\(float; float; float\)"),
        (lambda t, y: None, "NoneType"),
    ],
    ids=["short", "extra-axis", "float32", "list", "none"],
)
def test_func_returning_the_wrong_thing(func, match):
    with pytest.raises(ValueError, match="func") as info:
        cnf.odeint(func, _y0(), T01)
    assert "shape (3,)" in str(info.value)  # says what was expected ...
    assert info.match(match)  # ... and what came back


def test_func_returning_the_wrong_structure_for_a_tuple_state():
    state = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="func"):
        cnf.odeint(lambda t, s: s[0], state, T01)
    with pytest.raises(ValueError, match="func"):
        cnf.odeint(lambda t, s: (s[0], s[1], s[1]), state, T01)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        cnf.odeint(lambda t, s: (s[0][:1], s[1]), state, T01)


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_wrong_shape_is_caught_by_fixed_methods(method):
    with pytest.raises(ValueError, match="func"):
        cnf.odeint(lambda t, y: y[:2], _y0(), T01, method=method, options=dict(step_size=0.1))


# --- adjoint options ---------------------------------------------------------------------------


class _Decay(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, t, y):
        return -self.k * y


# The three marked True are torchdiffeq's backsolve settings: odeint_adjoint takes them.
@pytest.mark.parametrize(
    "kwargs, match, drop_in_accepts",
    [
        (dict(adjoint_options=dict(mode="reverse")), "unknown adjoint mode", False),
        (dict(adjoint_options=dict(mode="backsolve", norm="max")), "unknown adjoint norm", False),
        (dict(adjoint_options=dict(norm="seminorm")), "mode='backsolve'", True),
        (dict(adjoint_options=dict(mode="checkpoint", norm="seminorm")), "norm", False),
        (dict(adjoint_options=dict(mode="checkpoint", step_size=0.1)), "step_size", False),
        (dict(adjoint_rtol=1e-4), "mode='backsolve'", True),
        (dict(adjoint_method="rk4"), "mode='backsolve'", True),
        (dict(adjoint_options=dict(mode="backsolve", stepsize=0.1)), "stepsize", False),
        (
            dict(adjoint_method="rk45", adjoint_options=dict(mode="backsolve")),
            "unknown method",
            False,
        ),
        (dict(adjoint_rtol=-1.0, adjoint_options=dict(mode="backsolve")), "adjoint_rtol", False),
        (dict(adjoint_params=[1.0]), "adjoint_params", False),
    ],
    ids=[
        "mode",
        "norm",
        "norm-default-mode",
        "norm-checkpoint",
        "option-checkpoint",
        "rtol-checkpoint",
        "method-checkpoint",
        "option-backsolve",
        "method-backsolve",
        "rtol-backsolve",
        "params-not-tensors",
    ],
)
def test_bad_adjoint_arguments(kwargs, match, drop_in_accepts):
    """``solve`` is strict: backsolve settings need ``mode="backsolve"``; ``odeint_adjoint``
    reads them as torchdiffeq does (a backsolve) and rejects everything else too."""
    y0 = _y0().requires_grad_(True)
    with pytest.raises(ValueError, match=match):
        cnf.solve(_Decay(), y0, T01, adjoint=True, **kwargs)
    if drop_in_accepts:
        cnf.odeint_adjoint(_Decay(), y0, T01, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            cnf.odeint_adjoint(_Decay(), y0, T01, **kwargs)


def test_bad_adjoint_arguments_are_caught_without_gradients():
    with torch.no_grad(), pytest.raises(ValueError, match="unknown adjoint mode"):
        cnf.odeint_adjoint(_Decay(), _y0(), T01, adjoint_options=dict(mode="reverse"))


# --- solves that cannot finish -----------------------------------------------------------------


def test_finite_time_blow_up_raises_step_size_underflow():
    """y' = y^2, y(0) = 1 blows up at t = 1: the step size shrinks to the precision of t there.

    Even with a practically unlimited step budget the solver stops by itself, at the pole,
    after a modest number of steps (the step size falls geometrically towards the pole).
    """
    n_evals = 0

    def f(t, y):
        nonlocal n_evals
        n_evals += 1
        return y**2

    with pytest.raises(cnf.SolverError, match="underflow") as info:
        cnf.odeint(
            f,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            options=dict(max_num_steps=10**7),
        )
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.t == pytest.approx(1.0, abs=1e-6)
    assert 0 < abs(err.step_size) < 1e-12
    assert n_evals < 20_000
    assert f"t={err.t:.17g}" in str(err)  # where it stopped ...
    assert "rtol" in str(err)  # ... and what to try


def test_finite_time_blow_up_backwards():
    """y' = -y^2, y(0) = 1 in reverse time blows up at t = -1."""
    with pytest.raises(cnf.SolverError, match="underflow") as info:
        cnf.odeint(
            lambda t, y: -(y**2),
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, -2.0], dtype=F64),
            options=dict(max_num_steps=10**7),
        )
    assert info.value.t == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_nan_derivative_rejects_and_shrinks_then_raises(method):
    """A field that turns NaN for t > 0.5: steps across are rejected (not accepted as NaN) and
    shrink until the step size underflows at t = 0.5; the error names the NaN and the time of
    the evaluation that returned it, not a blow-up."""

    def f(t, y):
        return y * math.nan if t > 0.5 else -y

    with pytest.raises(cnf.SolverError, match="returned NaN in 2 of 2 entries") as info:
        cnf.odeint(f, torch.ones(2, dtype=F64), T01, method=method)
    assert info.value.t == pytest.approx(0.5, abs=1e-9)
    assert info.value.t > 0.5  # where f returned NaN
    assert "blow up" not in str(info.value)


def test_nan_derivative_up_to_an_output_time_is_fine():
    """Outputs before the NaN region come back finite if the solve stops there."""

    def f(t, y):
        return y * math.nan if t > 0.5 else -y

    ys = cnf.odeint(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 0.25, 0.5], dtype=F64))
    assert torch.isfinite(ys).all()
    assert ys[-1, 0].item() == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_inf_derivative_is_rejected_like_nan():
    def f(t, y):
        return y * math.inf if t > 0.5 else -y

    with pytest.raises(cnf.SolverError) as info:
        cnf.odeint(f, torch.ones(2, dtype=F64), T01)
    assert info.value.t == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_overflow_raises(method):
    """Explicit methods are unstable for h * lambda = -10: the iterates overflow to inf/NaN."""
    with pytest.raises(cnf.SolverError, match="not finite") as info:
        cnf.odeint(
            lambda t, y: -100.0 * y,
            torch.ones(2, dtype=F64),
            torch.tensor([0.0, 100.0], dtype=F64),
            method=method,
            options=dict(step_size=0.1),
        )
    assert "step" in str(info.value)


def test_fixed_step_overflow_on_the_grid_of_t():
    with pytest.raises(cnf.SolverError):
        cnf.odeint(
            lambda t, y: y**2,
            torch.ones(1, dtype=F64),
            torch.linspace(0, 2, 201, dtype=F64),
            method="rk4",
        )


def test_float32_overflow_of_an_adaptive_solve_raises():
    with pytest.raises(cnf.SolverError):
        cnf.odeint(lambda t, y: y**2, torch.ones(1), torch.tensor([0.0, 2.0]))
