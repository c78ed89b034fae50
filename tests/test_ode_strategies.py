"""Adjoint strategies: the objects, their conversion from torchdiffeq's keywords, the drop-in."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import pytest
import torch
from torch import nn

import cnf.ode as ode
from cnf.ode import Backsolve, Checkpoint, adjoint_strategy

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def _max_rel(grads_a, grads_b) -> float:
    return max(_rel(a, b) for a, b in zip(grads_a, grads_b))


def _gradients(solver, field, y0, t, **kwargs):
    """d/d(y0, t, params) of a weighted sum of the solution at every output time."""
    y0 = y0.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    ys = solver(field, y0, t, **kwargs)
    weights = torch.linspace(0.5, 1.5, ys.numel(), dtype=ys.dtype).view_as(ys)
    return torch.autograd.grad((ys * weights).sum(), (y0, t, *field.parameters()))


def _solve_ys(field, y0, t, **kwargs):
    return ode.solve(field, y0, t, **kwargs).ys


class _Counting(nn.Module):
    """Counts the evaluations of the wrapped field (forward and backward solves alike)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.field(t, y)


# --- the public surface ------------------------------------------------------------------------


def test_public_names():
    assert ode.__all__ == sorted(ode.__all__)
    assert set(ode.__all__) == {
        "Backsolve",
        "ButcherTableau",
        "Checkpoint",
        "METHODS",
        "Solution",
        "SolverError",
        "SolverStats",
        "TABLEAUS",
        "adjoint_strategy",
        "agreeing_norms",
        "odeint",
        "odeint_adjoint",
        "odeint_event",
        "solve",
    }
    assert ode.METHODS == (
        "adaptive_heun",
        "bosh3",
        "dopri5",
        "dopri8",
        "euler",
        "fehlberg2",
        "heun2",
        "heun3",
        "midpoint",
        "rk4",
        "tsit5",
    )
    assert isinstance(ode.TABLEAUS, MappingProxyType)


# --- torchdiffeq's call ------------------------------------------------------------------------


def test_torchdiffeq_seminorm_call_works_and_matches_backprop(time_mlp):
    """``odeint_adjoint(f, y0, t, adjoint_options=dict(norm="seminorm"))`` as written for
    torchdiffeq: a backsolve with the seminorm, accurate to the tolerance."""
    field = time_mlp(dim=2, width=16, scale=1.5)
    y0 = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    ref = _gradients(ode.odeint, field, y0, t, rtol=1e-12, atol=1e-12)

    ys = ode.odeint_adjoint(field, y0, t, adjoint_options=dict(norm="seminorm"))  # the exact call
    assert ys.shape == (3, 4, 2)
    got = _gradients(ode.odeint_adjoint, field, y0, t, adjoint_options=dict(norm="seminorm"))
    assert _max_rel(got, ref) < 1e-5  # default tolerances: rtol=1e-7, atol=1e-9

    tight = dict(rtol=1e-11, atol=1e-11)
    got = _gradients(
        ode.odeint_adjoint, field, y0, t, adjoint_options=dict(norm="seminorm"), **tight
    )
    assert _max_rel(got, ref) < 1e-8


def test_torchdiffeq_settings_without_a_mode_mean_backsolve(time_mlp):
    """Each backsolve setting alone gives exactly the gradients of the explicit Backsolve."""
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    cases = [
        (dict(adjoint_options=dict(norm="seminorm")), Backsolve(norm="seminorm")),
        (dict(adjoint_rtol=1e-5), Backsolve(rtol=1e-5)),
        (dict(adjoint_atol=1e-5), Backsolve(atol=1e-5)),
        (
            dict(adjoint_method="rk4", adjoint_options=dict(step_size=0.05)),
            Backsolve(method="rk4", options=dict(step_size=0.05)),
        ),
    ]
    for keywords, strategy in cases:
        got = _gradients(ode.odeint_adjoint, field, y0, t, rtol=1e-6, atol=1e-6, **keywords)
        want = _gradients(_solve_ys, field, y0, t, rtol=1e-6, atol=1e-6, adjoint=strategy)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), keywords


def test_odeint_adjoint_without_settings_is_the_checkpoint_adjoint(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    kwargs = dict(rtol=1e-6, atol=1e-6)
    got = _gradients(ode.odeint_adjoint, field, y0, t, **kwargs)
    want = _gradients(_solve_ys, field, y0, t, adjoint=Checkpoint(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # The checkpoint adjoint differentiates the very steps taken: backprop to rounding.
    assert _max_rel(got, _gradients(ode.odeint, field, y0, t, **kwargs)) < 1e-12


def test_explicit_mode_still_decides_in_odeint_adjoint(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    got = _gradients(ode.odeint_adjoint, field, y0, t, adjoint_options=dict(mode="checkpoint"))
    want = _gradients(_solve_ys, field, y0, t, adjoint=Checkpoint())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="mode='backsolve'"):
        ode.odeint_adjoint(field, y0, t, adjoint_options=dict(mode="checkpoint", norm="seminorm"))


@pytest.mark.parametrize("drop_in", [False, True], ids=["solve", "odeint_adjoint"])
def test_seminorm_takes_no_more_backward_evaluations_than_rms(time_mlp, drop_in):
    """The parameters' gradient channels do not feed back into the dynamics: leaving them out
    of the error norm can only save backward steps (Kidger, Chen & Lyons 2021)."""
    field = _Counting(time_mlp(dim=2, width=32, depth=2))
    y0 = torch.randn(8, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    assert sum(p.numel() for p in field.parameters()) > 10 * y0.numel()

    def backward_calls(norm: str) -> int:
        if drop_in:
            ys = ode.odeint_adjoint(
                field, y0, t, rtol=1e-7, atol=1e-7, adjoint_options=dict(norm=norm)
            )
        else:
            ys = _solve_ys(field, y0, t, rtol=1e-7, atol=1e-7, adjoint=Backsolve(norm=norm))
        before = field.calls
        ys[-1].sum().backward()
        return field.calls - before

    rms, semi = backward_calls("rms"), backward_calls("seminorm")
    assert 0 < semi <= rms
    assert semi < rms  # on this problem the saving is real, not just allowed


# --- the strategy objects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="max"), "unknown adjoint norm"),
        (dict(norm=None), "unknown adjoint norm"),
        (dict(rtol=0.0), "adjoint_rtol"),
        (dict(rtol=-1e-6), "adjoint_rtol"),
        (dict(atol=math.nan), "adjoint_atol"),
        (dict(atol=math.inf), "adjoint_atol"),
        (dict(rtol="tight"), "adjoint_rtol"),
        (dict(atol=(1e-6, -1.0)), r"adjoint_atol\[1\]"),
        (dict(method="rk45"), "unknown method"),
        (dict(method="Dopri5"), "unknown method"),
        (dict(options=dict(stepsize=0.1)), "stepsize"),
        (dict(options=dict(max_num_steps=0)), "max_num_steps"),
        (dict(options=dict(step_size=-0.1)), "step_size"),
        (dict(method="rk4", options=dict(first_step=0.1)), "only apply to adaptive methods"),
        (dict(options=[("step_size", 0.1)]), "dict"),
    ],
)
def test_backsolve_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Backsolve(**kwargs)


def test_backsolve_normalises_and_is_frozen():
    strategy = Backsolve(rtol=1, atol=[1e-6, 1e-7], options=dict(max_step=0.5, first_step=None))
    assert strategy.rtol == 1.0 and isinstance(strategy.rtol, float)
    assert strategy.atol == (1e-6, 1e-7)
    assert dict(strategy.options) == dict(max_step=0.5)  # None means the default
    with pytest.raises(TypeError):
        strategy.options["max_step"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.norm = "seminorm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Checkpoint().mode = "backsolve"
    assert Backsolve(options={}) == Backsolve()
    assert Backsolve(options=dict(max_step=0.5)) == Backsolve(options=dict(max_step=0.5))
    assert hash(Backsolve(options=dict(max_step=0.5))) == hash(Backsolve())
    assert Checkpoint() == Checkpoint() and Checkpoint() != Backsolve()


def test_backsolve_tolerances_per_state_tensor():
    """``rtol``/``atol`` of a Backsolve may be one per tensor of a tuple state, as forward."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    state = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def field(t, s):
        return -k * s[0], -k * s[1]

    adjoint = Backsolve(rtol=(1e-9, 1e-8), atol=(1e-9, 1e-8))
    ys = ode.solve(field, state, t, adjoint=adjoint, adjoint_params=(k,)).ys
    (g,) = torch.autograd.grad(ys[0][-1].sum() + ys[1][-1].sum(), k)
    assert g.item() == pytest.approx(-3 * math.exp(-0.7), rel=1e-7)
    with pytest.raises(ValueError, match="2 tensors"):
        ode.solve(field, state, t, adjoint=Backsolve(rtol=(1e-6,) * 3), adjoint_params=(k,))


# --- conversion --------------------------------------------------------------------------------


def test_adjoint_strategy_converts():
    assert adjoint_strategy(True) == Checkpoint()
    assert adjoint_strategy(True, {}) == Checkpoint()
    assert adjoint_strategy(True, dict(mode="checkpoint")) == Checkpoint()
    assert adjoint_strategy(True, dict(mode="checkpoint", norm="rms")) == Checkpoint()
    assert adjoint_strategy(False) is None
    assert adjoint_strategy(None) is None
    assert adjoint_strategy(False, {}) is None
    strategy = Backsolve(norm="seminorm")
    assert adjoint_strategy(strategy) is strategy
    assert adjoint_strategy(adjoint_strategy(True)) == Checkpoint()  # idempotent
    assert adjoint_strategy(
        True, dict(mode="backsolve", norm="seminorm", step_size=0.1, max_num_steps=50)
    ) == Backsolve(norm="seminorm", options=dict(step_size=0.1, max_num_steps=50))


@pytest.mark.parametrize(
    "adjoint, options, match",
    [
        (True, dict(norm="seminorm"), "mode='backsolve'"),  # strict: no implied backsolve
        (True, dict(mode="checkpoint", step_size=0.1), "step_size"),
        (True, dict(mode="reverse"), "unknown adjoint mode"),
        (True, dict(mode="backsolve", norm="max"), "unknown adjoint norm"),
        (True, dict(mode="backsolve", stepsize=0.1), "stepsize"),
        (True, [("mode", "backsolve")], "adjoint_options must be a dict"),
        (Checkpoint(), dict(mode="backsolve"), "put the settings in the strategy"),
        (Backsolve(), dict(norm="seminorm"), "put the settings in the strategy"),
        (False, dict(mode="backsolve"), "adjoint=True"),
        ("checkpoint", None, "Checkpoint()"),
        (1, None, "Checkpoint()"),
        (dict(mode="backsolve"), None, "Checkpoint()"),
    ],
)
def test_adjoint_strategy_rejects(adjoint, options, match):
    with pytest.raises(ValueError, match=match):
        adjoint_strategy(adjoint, options)


def test_solve_takes_strategies_like_keywords(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    pairs = [
        (dict(adjoint=True), dict(adjoint=Checkpoint())),
        (
            dict(adjoint=True, adjoint_rtol=1e-5, adjoint_options=dict(mode="backsolve")),
            dict(adjoint=Backsolve(rtol=1e-5)),
        ),
    ]
    for keywords, strategy in pairs:
        got = _gradients(_solve_ys, field, y0, t, **keywords)
        want = _gradients(_solve_ys, field, y0, t, **strategy)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_settings_that_do_not_apply_are_errors(time_mlp):
    field = time_mlp(dim=2, width=8)
    y0 = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="put the settings in the strategy"):
        ode.solve(field, y0, t, adjoint=Backsolve(), adjoint_rtol=1e-5)
    with pytest.raises(ValueError, match="adjoint=True"):
        ode.solve(field, y0, t, adjoint_options=dict(mode="backsolve"))
    with pytest.raises(ValueError, match="adjoint_params"):
        ode.solve(field, y0, t, adjoint_params=tuple(field.parameters()))
    with pytest.raises(TypeError):
        ode.odeint(field, y0, t, adjoint=True)  # odeint never takes the adjoint
    with pytest.raises(TypeError):
        ode.odeint_adjoint(field, y0, t, adjoint=Backsolve())  # the keywords choose it there
