"""Pictures of conditional flows: densities at several contexts (beside the true ones), and rows of
samples per class label; density_grid's context."""

# ruff: noqa: E402  (the backend is chosen before pyplot is imported)
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; must come before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import cnf
from cnf import plot
from cnf.context import Conditioned, ContextEmbedding
from cnf.dense import DenseImageCNF
from cnf.fields import ConcatSquashMLP

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}

pytestmark = pytest.mark.deadline(60)


def _flow(embedding: ContextEmbedding) -> cnf.CNF:
    """A tiny 2-D conditional CNF, weights scaled up so that the context visibly matters."""
    torch.manual_seed(0)
    field = Conditioned(ConcatSquashMLP(2, (8,), context_features=embedding.features), embedding)
    flow = cnf.CNF(field, (2,), T=0.5, **TIGHT).to(F64)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(2.0)
    return flow


@pytest.fixture
def labelled() -> cnf.CNF:
    return _flow(ContextEmbedding(classes=3, features=4))


@pytest.fixture
def vector() -> cnf.CNF:
    return _flow(ContextEmbedding(inputs=1))


def _images(classes=3, alpha=None, shape=(1, 3, 3)) -> DenseImageCNF:
    """A tiny class-conditional image flow; without the logit its samples leave [0, 1]."""
    torch.manual_seed(0)
    context = {"classes": classes, "features": 4}
    return DenseImageCNF(shape, hidden=(8,), alpha=alpha, context=context, **TIGHT).to(F64)


def _rendered(fig, panels: int, tmp_path) -> None:
    """A Figure with ``panels`` axes that saves to a PNG and is not held by pyplot."""
    assert isinstance(fig, Figure)
    assert len(fig.axes) == panels
    path = tmp_path / "figure.png"
    fig.savefig(path, dpi=20)
    assert path.stat().st_size > 0
    assert plt.get_fignums() == []


def _direct_log_prob(model, lim: float, n: int, context: torch.Tensor) -> np.ndarray:
    axis = torch.linspace(-lim, lim, n, dtype=F64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = model.log_prob(points, context=context, trace="exact", **TIGHT)
    return logp.reshape(n, n).numpy()


# ---------------------------------------------------------------------------- density_grid


@pytest.mark.parametrize(
    ("which", "one", "other"),
    [("labelled", torch.tensor(1), torch.tensor(2)), ("vector", torch.tensor([0.5]), None)],
)
def test_density_grid_at_a_context_is_log_prob_at_it_and_contexts_differ(
    which, one, other, request
):
    model = request.getfixturevalue(which)
    other = torch.tensor([-1.0]) if other is None else other
    _, _, logp = plot.density_grid(model, lim=2.0, n=5, batch=7, context=one, **TIGHT)
    np.testing.assert_allclose(logp, _direct_log_prob(model, 2.0, 5, one), rtol=0, atol=1e-8)
    _, _, elsewhere = plot.density_grid(model, lim=2.0, n=5, context=other, **TIGHT)
    assert np.abs(logp - elsewhere).max() > 1e-3


def test_density_grid_casts_a_vector_context_to_the_model_dtype(vector):
    _, _, f32 = plot.density_grid(vector, n=4, context=torch.tensor([0.5], dtype=torch.float32))
    _, _, f64 = plot.density_grid(vector, n=4, context=torch.tensor([0.5], dtype=F64))
    np.testing.assert_array_equal(f32, f64)
    with pytest.raises(ValueError, match="context must be a tensor"):
        plot.density_grid(vector, n=4, context=0.5)
