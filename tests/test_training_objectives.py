"""Objectives of cnf.training: named metrics, read after the backward; the model is only called."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnf.fields import ConcatSquashMLP
from cnf.flow import CNF
from cnf.ode import Checkpoint
from cnf.training import MaximumLikelihood, Objective, fit


def _cnf(seed: int = 0) -> CNF:
    torch.manual_seed(seed)
    return CNF(ConcatSquashMLP(2, (8,)), (2,), T=0.5, rtol=1e-3, atol=1e-3)


DATA = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the flow is reachable only through forward."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.module, self.calls = flow, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


class SquaredNorm:
    """A non-likelihood objective (no ODE solve) with metrics of every kind."""

    def __call__(self, model, batch, generator):
        backward = {"done": 0.0}
        loss = sum(p.square().sum() for p in model.parameters()) * batch.abs().mean()
        loss.register_hook(lambda grad: backward.update(done=1.0))
        metrics = {
            "fm_loss": 2 * loss.detach(),  # a tensor
            "calls": 3,  # an int
            "after_backward": lambda: backward["done"],  # read once backward ran
        }
        return loss, metrics


def test_every_named_metric_is_recorded_under_its_name():
    assert isinstance(SquaredNorm(), Objective)  # structurally, by the protocol's one method
    history = fit(_cnf(), DATA, iters=3, batch_size=16, objective=SquaredNorm(), progress=False)
    assert history.fm_loss == pytest.approx([2 * v for v in history.loss])
    assert history.calls == [3, 3, 3] and all(isinstance(c, int) for c in history.calls)
    assert history.after_backward == [1.0, 1.0, 1.0]
    assert set(history.to_dict()) == {
        *("iteration", "loss", "seconds", "fm_loss", "calls", "after_backward"),
        *("eval_iteration", "eval_nll"),
    }
    with pytest.raises(AttributeError, match="no metric 'nll'"):
        history.nll  # noqa: B018 - nothing about likelihoods is built into the loop


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"loss": 1.0}, "loop's own names"),
        ({"eval_nll": 1.0}, "loop's own names"),
        ({"per_sample": torch.zeros(4)}, "report a scalar"),
    ],
)
def test_bad_metrics_are_value_errors(metrics, match):
    def objective(model, batch, generator):
        return sum(p.sum() for p in model.parameters()) * 0.0, metrics

    with pytest.raises(ValueError, match=match):
        fit(_cnf(), DATA, iters=1, batch_size=16, objective=objective, progress=False)


@pytest.mark.parametrize("regularized", [False, True])
def test_maximum_likelihood_calls_the_model_and_names_its_metrics(regularized):
    weight = 0.5 if regularized else 0.0
    # the checkpoint adjoint replaying its steps (it would keep this small graph by default)
    solver = {"trace": "hutchinson", "adjoint": Checkpoint(graph_memory=0)}
    objective = MaximumLikelihood(kinetic=weight, jacobian=weight, solver=solver)
    wrapped = Wrapper(_cnf())
    loss, metrics = objective(wrapped, DATA[:16], torch.Generator().manual_seed(0))
    assert wrapped.calls == 1
    names = {"nll", "nfe_forward", "nfe_backward"} | (
        {"kinetic", "jacobian"} if regularized else set()
    )
    assert set(metrics) == names
    assert metrics["nfe_forward"] > 0 and metrics["nfe_backward"]() == 0
    loss.backward()
    assert metrics["nfe_backward"]() > 0  # the adjoint solve ran in backward
    expected = metrics["nll"]
    if regularized:
        expected = expected + weight * (metrics["kinetic"] + metrics["jacobian"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fit_trains_a_wrapped_model_through_its_forward():
    wrapped = Wrapper(_cnf())
    history = fit(wrapped, DATA, iters=2, batch_size=16, kinetic=0.1, progress=False)
    assert wrapped.calls == 2
    assert len(history.kinetic) == len(history.jacobian) == 2
    assert all(loss > nll for loss, nll in zip(history.loss, history.nll))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kinetic=-1.0), "kinetic must be a finite weight"),
        (dict(jacobian=float("nan")), "jacobian must be a finite weight"),
        (dict(solver={"generator": None}), "may not set"),
        (dict(solver={"regularizers": True}), "may not set"),
    ],
)
def test_maximum_likelihood_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaximumLikelihood(**kwargs)
