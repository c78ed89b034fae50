"""Conditional flows p(x | c): context embeddings, the embedding inside solves, and training on
``(points, contexts)`` pairs with either objective."""

from __future__ import annotations

import math

import pytest
import torch

import cnf
from cnf.context import Conditioned, ContextEmbedding, context_spec, with_context
from cnf.fields import ConcatSquashMLP
from cnf.models import build, fit_standardization, tabular_spec, toy_spec
from cnf.training import FlowMatching, evaluate_nll, fit
from cnf.training.sampling import Batches

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}

pytestmark = pytest.mark.deadline(60)


def _labelled_flow(adjoint=True, classes=3) -> cnf.CNF:
    torch.manual_seed(0)
    embedding = ContextEmbedding(classes=classes, features=4)
    field = Conditioned(ConcatSquashMLP(2, (8, 8), context_features=4), embedding)
    return cnf.CNF(field, (2,), T=0.5, adjoint=adjoint, **TIGHT).to(F64)


def test_label_and_vector_embeddings_have_the_documented_shapes_and_standardization():
    labels = ContextEmbedding(classes=10, features=8)
    assert labels(torch.tensor([3, 1])).shape == (2, 8)
    torch.testing.assert_close(labels(torch.tensor(3)), labels.table.weight[3])
    bare = ContextEmbedding(inputs=2).double()
    c = torch.randn(50, 2, dtype=F64) * torch.tensor([1000.0, 0.01], dtype=F64) + 7.0
    bare.fit(c)
    e = bare(c)
    torch.testing.assert_close(e.mean(0), torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(e.std(0), torch.ones(2, dtype=F64), rtol=0, atol=1e-12)
    assert ContextEmbedding(inputs=1, hidden=(16,), features=5)(torch.rand(7, 1)).shape == (7, 5)
    assert context_spec(classes=50) == {"classes": 50, "inputs": None, "features": 32, "hidden": []}


@pytest.mark.parametrize(
    ("context", "match"),
    [
        (torch.tensor([0.5, 1.0]), "class labels: give integers"),
        (torch.tensor([0, 3]), "label 3 is outside"),
        (torch.tensor([[0, 1]]), "labels must have shape"),
        ([0, 1], "context must be a tensor"),
    ],
)
def test_bad_labels_are_refused_with_what_to_give(context, match):
    with pytest.raises(ValueError, match=match):
        ContextEmbedding(classes=3)(context)


def test_bad_vectors_and_specs_are_refused():
    vectors = ContextEmbedding(inputs=2)
    for bad, match in [
        (torch.tensor([[1, 2]]), "real numbers"),
        (torch.randn(3, 3), r"shape \(batch, 2\)"),
        (torch.tensor([[float("nan"), 0.0]]), "NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            vectors(bad)
    with pytest.raises(ValueError, match="exactly one"):
        context_spec(classes=3, inputs=2)
    with pytest.raises(ValueError, match="add hidden"):
        context_spec(inputs=2, features=4)
    with pytest.raises(ValueError, match="pass context="):
        _labelled_flow().log_prob(torch.randn(2, 2, dtype=F64))


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_gradients_reach_the_embedding_and_match_finite_differences(adjoint):
    flow = _labelled_flow(adjoint)
    x, y = torch.randn(6, 2, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    flow.log_prob(x, context=y).sum().backward()
    table = flow.field.embedding.table.weight
    grad = table.grad.clone()
    assert grad.abs().min() > 0  # every label's row is used, so every entry has a gradient
    for row, col in [(0, 0), (2, 3)]:
        with torch.no_grad():
            table[row, col] += 1e-5
            up = flow.log_prob(x, context=y).sum()
            table[row, col] -= 2e-5
            down = flow.log_prob(x, context=y).sum()
            table[row, col] += 1e-5
        fd = (up - down) / 2e-5
        torch.testing.assert_close(grad[row, col], fd, rtol=1e-5, atol=1e-7)


def test_the_embedding_runs_once_per_solve_not_per_evaluation():
    flow = _labelled_flow()
    calls = []
    flow.field.embedding.register_forward_hook(lambda *a: calls.append(1))
    out = flow(torch.randn(4, 2, dtype=F64), context=torch.tensor([0, 1, 2, 1]))
    assert out.nfe > 10 and len(calls) == 1


def test_each_sample_gets_its_own_context_and_one_context_broadcasts():
    flow = _labelled_flow()
    x, y = torch.randn(5, 2, dtype=F64), torch.tensor([2, 0, 1, 1, 2])
    together = flow.log_prob(x, context=y)
    alone = torch.stack([flow.log_prob(x[i : i + 1], context=y[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-8)
    one = flow.log_prob(x, context=torch.tensor(1))
    torch.testing.assert_close(one, flow.log_prob(x, context=torch.ones(5, dtype=torch.long)))
    assert not torch.allclose(flow.log_prob(x, context=torch.tensor(0)), one)


def test_sampling_given_a_label_inverts_transform_and_integrates_to_one():
    flow = _labelled_flow()
    g = torch.Generator().manual_seed(1)
    x, lp = flow.sample_with_log_prob(6, context=torch.tensor(2), generator=g)
    z, _ = flow.transform(x, context=torch.tensor(2))
    torch.testing.assert_close(flow.inverse(z, context=torch.tensor(2)), x, rtol=0, atol=1e-8)
    torch.testing.assert_close(flow.log_prob(x, context=torch.tensor(2)), lp, rtol=0, atol=1e-8)
    # p(. | y) integrates to one on a grid wide enough for a near-standard-normal flow
    grid = torch.linspace(-7, 7, 141, dtype=F64)
    pts = torch.cartesian_prod(grid, grid)
    for label in range(3):
        with torch.no_grad():
            p = flow.log_prob(pts, context=torch.tensor(label), rtol=1e-6, atol=1e-6).exp()
        assert abs(float(p.sum()) * float(grid[1] - grid[0]) ** 2 - 1.0) < 2e-3


def test_trajectory_follows_the_context():
    flow = _labelled_flow()
    z = torch.randn(3, 2, dtype=F64)
    ys = flow.trajectory(z, torch.linspace(0, 0.5, 4), context=torch.tensor(1))
    torch.testing.assert_close(ys[-1], flow.inverse(z, context=torch.tensor(1)), atol=1e-8, rtol=0)


def test_with_context_embeds_and_keeps_the_analytic_trace():
    flow = _labelled_flow()
    y = torch.tensor([0, 2])
    bound = with_context(flow.field, y)
    torch.testing.assert_close(bound.context, flow.field.embedding(y))
    assert callable(getattr(bound, "forward_with_divergence", None))
    assert {id(p) for p in bound.parameters()} == {id(p) for p in flow.field.field.parameters()}


def _pairs(n, seed=0):
    """x | c ~ N(2c, 0.5^2 I) in 2-D with c ~ U[-1, 1]: true conditional entropy known."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 1, generator=g, dtype=F64) * 2 - 1
    return 2 * c + 0.5 * torch.randn(n, 2, generator=g, dtype=F64), c


def _gaussian_entropy():
    return 2 * (0.5 * math.log(2 * math.pi * math.e) + math.log(0.5))


@pytest.mark.parametrize("objective", ["likelihood", "flow-matching"])
def test_fit_on_pairs_learns_the_conditional_density(objective):
    spec = toy_spec(hidden=[32, 32], T=1.0, train_T=False, dtype="float64", rtol=1e-5, atol=1e-5)
    spec["context"] = {"inputs": 1, "hidden": [16]}
    torch.manual_seed(0)
    model = build(spec)
    data, held_out = _pairs(2000), _pairs(1000, seed=1)
    fit_standardization(model, data[0], context=data[1])
    extra = {"objective": FlowMatching()} if objective == "flow-matching" else {}
    iters = 600 if objective == "flow-matching" else 250
    fit(model, data, iters=iters, batch_size=200, lr=1e-2, progress=False, **extra)
    nll = evaluate_nll(model, held_out[0], context=held_out[1])
    unconditional = evaluate_nll(model, held_out[0], context=torch.zeros_like(held_out[1]))
    # the conditional entropy is 0.70 nats; ignoring c costs about 1.3 nats more
    assert nll < _gaussian_entropy() + 0.25 < unconditional


def test_fit_evaluates_pairs_and_samplers_may_return_pairs():
    model = build({**toy_spec(hidden=[8], dtype="float64"), "context": {"classes": 2}})
    x = torch.randn(64, 2, dtype=F64)
    y = (x[:, 0] > 0).long()

    def sampler(n, generator):
        rows = torch.randint(64, (n,), generator=generator)
        return x[rows], y[rows]

    history = fit(model, sampler, iters=2, batch_size=16, eval_data=(x, y), progress=False)
    assert history.eval_nll[-1] == pytest.approx(evaluate_nll(model, x, context=y), abs=1e-9)
    batch = Batches((x, y), 16, seed=0)(0)
    assert isinstance(batch, tuple) and torch.equal(batch[1], (batch[0][:, 0] > 0).long())
    with pytest.raises(ValueError, match="one row per point"):
        fit(model, (x, y[:10]), iters=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        fit(model, (x, torch.full((64, 1), float("nan"))), iters=1, progress=False)


def test_ot_coupling_is_refused_with_contexts():
    model = build({**toy_spec(hidden=[8], T=1.0, train_T=False), "context": {"classes": 2}})
    with pytest.raises(ValueError, match="coupling=None"):
        FlowMatching(coupling="ot")(model, torch.randn(4, 2), None, torch.tensor([0, 1, 0, 1]))


def test_tabular_specs_with_a_context_build_and_standardize_it():
    spec = tabular_spec(3, hidden=[8], context={"inputs": 2}, dtype="float64")
    model = build(spec)
    c = torch.randn(100, 2, dtype=F64) * 50 + 10
    fit_standardization(model, torch.randn(100, 3, dtype=F64), context=c)
    (embedding,) = [m for m in model.modules() if isinstance(m, ContextEmbedding)]
    torch.testing.assert_close(embedding.mean, c.mean(0))
    assert model.log_prob(torch.randn(4, 3, dtype=F64), context=c[:4]).shape == (4,)


def test_a_fit_of_the_rotating_family_uses_its_context_and_each_density_integrates_to_one():
    """The conditional 2-D family with an exact density (cnf.data.conditional): a short fit of
    the recipe's model (smaller) learns (its held-out NLL given c falls by half a nat),
    reads the context (shuffled contexts score worse), and each p(. | c) integrates to one.
    How close the recipe's defaults come to the true conditional NLL is a slow test."""
    from cnf.data import conditional_density
    from cnf.recipes import get

    recipe = get("rotating")
    data = recipe.load()
    torch.manual_seed(0)
    model = recipe.new_model(data, hidden=[32, 32])
    x, c = data.part("test", seed=3, n=2000)
    before = recipe.score(model, (x, c), tol=1e-5)
    fit(model, data.sampler(), **recipe.fit_options(iters=200, batch_size=256, progress=False))
    truth = float(-torch.as_tensor(conditional_density("rotating").log_density(x, c)).mean())
    nll = recipe.score(model, (x, c), tol=1e-5)
    shuffled = recipe.score(model, (x, c[torch.randperm(len(c))]), tol=1e-5)
    assert before - nll > 0.5 and truth < nll < shuffled - 0.15, (before, nll, truth, shuffled)
    grid = torch.linspace(-9, 9, 121)
    points = torch.cartesian_prod(grid, grid)
    for value in (-1.0, 0.0, 1.0):
        with torch.no_grad():
            lp = model.log_prob(points, context=torch.tensor([value]), rtol=1e-5, atol=1e-5)
        mass = float(lp.exp().sum()) * float(grid[1] - grid[0]) ** 2
        assert abs(mass - 1.0) < 0.02, (value, mass)
