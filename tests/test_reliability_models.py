"""Bad and unusual input to the models: the right answer or a clear error, never a traceback.

The kinds: empty batches (empty results, the same way for every model and method), points of
the wrong shape, dtype, device or values, broken weights, and per-call settings.
"""

from __future__ import annotations

import math

import pytest
import torch

import cnf.plot
from cnf import CNF, DenseImageCNF, MultiscaleCNF, SequentialFlow
from cnf.fields import ConcatSquashMLP
from cnf.ode import SolverError

pytestmark = pytest.mark.deadline(60)


def _toy(train_T=True):
    return CNF(ConcatSquashMLP(2, (8,)), (2,), T=0.5, train_T=train_T, rtol=1e-4, atol=1e-4)


def _sequential():
    return SequentialFlow([_toy().transform, _toy().transform])


def _dense():
    return DenseImageCNF((1, 4, 4), hidden=(8,), alpha=0.05, rtol=1e-3, atol=1e-3)


def _multiscale():
    return MultiscaleCNF(
        (1, 4, 4),
        scales=2,
        blocks_per_scale=1,
        hidden_channels=(4,),
        alpha=0.05,
        rtol=1e-3,
        atol=1e-3,
    )


MODELS = [_toy, _sequential, _dense, _multiscale]


# --- empty batches: empty results ----------------------------------------------------------------


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_an_empty_batch_gives_empty_results(make):
    flow = make()
    shape = tuple(flow.event_shape)
    x = torch.zeros(0, *shape)
    assert flow.log_prob(x).shape == (0,)
    out = flow.evaluate(x, regularizers=True)
    assert out.z.shape[0] == 0 and out.logdet.shape == (0,)
    assert out.kinetic.shape == (0,) and out.jacobian.shape == (0,)
    assert flow.sample(0).shape == (0, *shape)
    samples, log_prob = flow.sample_with_log_prob(0)
    assert samples.shape == (0, *shape) and log_prob.shape == (0,)
    assert flow.sample((2, 0)).shape == (2, 0, *shape)
    assert flow.inverse(flow.transform(x)[0]).shape == (0, *shape)


@pytest.mark.parametrize("make", [_toy, _sequential], ids=lambda f: f.__name__)
def test_an_empty_batch_trains_to_zero_gradients(make):
    flow = make()
    flow.log_prob(torch.zeros(0, 2)).sum().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


@pytest.mark.parametrize("make", [_toy, _sequential], ids=lambda f: f.__name__)
def test_an_empty_batch_has_an_empty_trajectory(make):
    flow = make()
    T = sum(float(b.T.detach()) for b in cnf.flow._cnf_blocks(flow.transform))
    ys = flow.trajectory(torch.zeros(0, 2), torch.linspace(0, T, 3))
    assert ys.shape == (3, 0, 2)


# --- points ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "error", "phrase"),
    [
        (torch.tensor([[math.nan, 0.0]]), ValueError, "x contains NaN or Inf"),
        (torch.tensor([[math.inf, 0.0]]), ValueError, "x contains NaN or Inf"),
        (torch.zeros(3), ValueError, r"shape \('batch', 2\)"),
        (torch.zeros(3, 3), ValueError, r"shape \('batch', 2\)"),
        (torch.zeros(3, 2, dtype=torch.float64), ValueError, r"x.to\(dtype=torch.float32"),
        (torch.zeros(3, 2, dtype=torch.float16), ValueError, "torch.float16 on cpu"),
        (torch.zeros(3, 2, dtype=torch.long), ValueError, "torch.int64"),
        (torch.zeros(3, 2, device="meta"), ValueError, "on meta"),
        ([[0.0, 0.0]], ValueError, "x must be a tensor"),
    ],
    ids=["nan", "inf", "1-d", "wrong-event", "f64", "f16", "int", "meta", "list"],
)
def test_bad_points(x, error, phrase):
    with pytest.raises(error, match=phrase):
        _toy().log_prob(x)


def test_far_points_have_a_tiny_density_not_an_error():
    """A point 1e4 away: the base's Gaussian tail, about -x^2, not NaN."""
    lp = _toy().log_prob(torch.full((2, 2), 1e4))
    assert torch.all(lp < -1e7) and not torch.isnan(lp).any()


def test_a_half_precision_model_is_refused_with_the_reason():
    flow = _toy().half()
    with pytest.raises(ValueError, match="float32 or float64"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="float32 or float64"):
        flow.sample(2)


@pytest.mark.parametrize("n", [-1, 1.5, True, "3", (2, -1), (), None])
def test_bad_sample_counts(n):
    with pytest.raises(ValueError, match="number of samples"):
        _toy().sample(n)


# --- broken weights ---------------------------------------------------------------------------


def test_nan_weights_are_named_by_the_solver():
    flow = _toy(train_T=False)
    with torch.no_grad():
        next(flow.field.parameters()).fill_(math.nan)
    with pytest.raises(SolverError, match="returned NaN.*NaN weights"):
        flow.log_prob(torch.zeros(3, 2))


def test_a_broken_learned_T_is_named():
    flow = _toy(train_T=True)
    with torch.no_grad():
        flow.T_scale.fill_(math.inf)
    with pytest.raises(ValueError, match="T_scale is not finite"):
        flow.log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="T_scale is not finite"):
        flow.sample(3)


# --- per-call settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "error", "phrase"),
    [
        ({"rtol": "1e-3"}, ValueError, "without quotes"),
        ({"atol": -1.0}, ValueError, "atol must be a positive"),
        ({"probes": 0}, ValueError, "probes must be a positive int"),
        ({"trace": "approx"}, ValueError, "unknown trace"),
        ({"method": "rk45"}, ValueError, "unknown method"),
        ({"noise": "uniform"}, ValueError, "unknown noise"),
        ({"options": {"max_num_steps": "5"}}, ValueError, "positive int"),
        ({"tol": 1e-3}, TypeError, "unknown keyword"),
        ({"generator": 0}, ValueError, "torch.Generator"),
        ({"context": [1.0]}, ValueError, "context must be a tensor"),
        ({"context": torch.zeros(3, 1)}, ValueError, "takes no context"),
    ],
)
def test_bad_per_call_settings(settings, error, phrase):
    with pytest.raises(error, match=phrase):
        _toy().log_prob(torch.zeros(3, 2), **settings)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"T": True}, "T must be a number"),
        ({"T": "1"}, "without quotes"),
        ({"T": 0.0}, "T must be a positive"),
        ({"T": math.nan}, "T must be a positive"),
        ({"event_shape": (0,)}, "event_shape must be non-empty and positive"),
        ({"event_shape": ()}, "event_shape must be non-empty and positive"),
    ],
)
def test_bad_model_settings(kwargs, phrase):
    kwargs = {"event_shape": (2,), **kwargs}
    with pytest.raises(ValueError, match=phrase):
        CNF(ConcatSquashMLP(2, (4,)), **kwargs)


# --- trajectories and pictures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "kwargs", "phrase"),
    [
        ([0.0, math.nan], {}, "times contain NaN or Inf"),
        ([0.0], {}, "at least two times"),
        ("0,0.5", {}, "1-D sequence of numbers, got str"),
        ([0.5, 0.0], {}, "needs strictly increasing times"),
        ([0.0, 0.5], {"direction": "normalizing"}, "needs strictly decreasing times"),
        ([0.0, 0.5], {"direction": "up"}, "unknown direction"),
        ([0.0, 2.0], {}, r"times must lie in \[0, T\]"),
    ],
)
@pytest.mark.parametrize("make", [_toy, _sequential], ids=lambda f: f.__name__)
def test_bad_trajectory_times(make, times, kwargs, phrase):
    if make is _sequential and "lie in" in phrase:
        phrase = "the sum of the blocks' T"
    with pytest.raises(ValueError, match=phrase):
        make().trajectory(torch.zeros(3, 2), times, **kwargs)


@pytest.mark.parametrize(
    ("draw", "phrase"),
    [
        (lambda m: cnf.plot.plot_density(m, lim="4"), "without quotes"),
        (lambda m: cnf.plot.plot_density(m, lim=-1), "lim must be a positive"),
        (lambda m: cnf.plot.plot_samples(torch.tensor([[math.nan, 0.0]])), "NaN or Inf"),
        (lambda m: cnf.plot.plot_samples(torch.zeros(0, 2)), "m >= 1"),
        (lambda m: cnf.plot.plot_trajectories(m, n=0), "n must be an int >= 1"),
        (lambda m: cnf.plot.animate_flow(m, "/nonexistent/dir/x.gif"), "does not exist"),
    ],
)
def test_bad_picture_arguments(draw, phrase):
    import matplotlib

    matplotlib.use("Agg")
    with pytest.raises(ValueError, match=phrase):
        draw(_toy())
