"""ConcatSquash fields with a context: gates and shifts read ``[t, c]`` per sample, and the
analytic exact trace stays the same chain (issue 16's first piece)."""

from __future__ import annotations

import pytest
import torch

import cnf
from cnf.continuous import with_context
from cnf.fields import ConcatSquashMLP
from cnf.trace import divergence

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}

pytestmark = pytest.mark.deadline(60)


def _field(hidden, context=2, dim=3, activation="softplus"):
    torch.manual_seed(0)
    return ConcatSquashMLP(dim, hidden, activation, context_features=context).to(F64)


@pytest.mark.parametrize("hidden", [(8,), (8, 6), (8, 6, 5)])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "swish", "elu"])
def test_the_analytic_trace_with_a_context_equals_autograds(hidden, activation):
    field = _field(hidden, activation=activation)
    z, c = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    t = torch.tensor(0.37, dtype=F64)
    f, div = field.forward_with_divergence(t, z, c)
    generic = divergence(with_context(field, c), t, z, field_aware=False)
    torch.testing.assert_close(f, field(t, z, c), rtol=0, atol=1e-14)
    torch.testing.assert_close(div, generic.div, rtol=0, atol=1e-12)


def test_each_sample_sees_its_own_context_and_time():
    field = _field((8, 6))
    z, c = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    t = torch.rand(5, dtype=F64)
    batched = field(t, z, c)
    one_by_one = torch.cat([field(t[i], z[i : i + 1], c[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-14)
    shared = field(0.5, z, c[0])  # one context for every sample
    torch.testing.assert_close(shared, field(0.5, z, c[:1].expand(5, 2)), rtol=0, atol=0)
    assert not torch.allclose(field(0.5, z, c), field(0.5, z, c + 1.0))  # the context matters


def test_an_unconditional_field_keeps_its_parameters_and_values():
    torch.manual_seed(0)
    before = ConcatSquashMLP(3, (8, 6)).to(F64)
    torch.manual_seed(0)
    after = ConcatSquashMLP(3, (8, 6), context_features=0).to(F64)
    shapes = {k: v.shape for k, v in before.state_dict().items()}
    assert shapes == {k: v.shape for k, v in after.state_dict().items()}
    assert shapes["layers.0.hyper_gate.weight"] == (8, 1)
    conditional = _field((8, 6))
    assert conditional.layers[0].hyper_gate.weight.shape == (8, 3)  # [t, c] for hidden gates
    assert conditional.layers[-1].hyper_gate.weight.shape == (3, 1)  # the output's: t only
    assert conditional.layers[-1].hyper_bias.weight.shape == (3, 3)  # its shift reads c too


@pytest.mark.parametrize(
    "context, match",
    [
        (None, r"context_features=2: pass a context of shape \(batch, 2\)"),
        (torch.zeros(4, 3), r"shape \(4, 2\) or \(2,\)"),
        (torch.zeros(3, 2), r"shape \(4, 2\) or \(2,\)"),
        (torch.zeros(4, 2, dtype=torch.long), "embed labels first"),
    ],
)
def test_a_bad_context_is_refused(context, match):
    field = _field((8,))
    with pytest.raises(ValueError, match=match):
        field(0.0, torch.zeros(4, 3, dtype=F64), context)
    with pytest.raises(ValueError, match=r"context_features must be an int >= 0"):
        ConcatSquashMLP(3, (8,), context_features=-1)


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_a_conditional_cnf_gives_gradients_to_the_context(adjoint):
    flow = cnf.CNF(_field((8, 8)), (3,), T=0.5, adjoint=adjoint, **TIGHT).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 2, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(flow.log_prob(x, context=c).sum(), c)
    eps, k = 1e-6, (1, 0)
    up, down = c.detach().clone(), c.detach().clone()
    up[k] += eps
    down[k] -= eps
    with torch.no_grad():
        numeric = (flow.log_prob(x, context=up) - flow.log_prob(x, context=down)).sum() / (2 * eps)
    assert grad[k].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-7)


def test_each_conditional_density_integrates_to_one():
    """p(x | c) on a 2-D grid, for two contexts: each a density of its own."""
    torch.manual_seed(1)
    field = ConcatSquashMLP(2, (16, 16), "tanh", context_features=1).to(F64)
    flow = cnf.CNF(field, (2,), T=0.5, rtol=1e-8, atol=1e-8).to(F64)
    axis = torch.linspace(-7, 7, 161, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)
    cell = (axis[1] - axis[0]) ** 2
    masses = []
    for value in (-1.5, 2.0):
        with torch.no_grad():
            p = flow.log_prob(grid, context=torch.tensor([value], dtype=F64)).exp()
        masses.append((p.sum() * cell).item())
    assert masses == pytest.approx([1.0, 1.0], abs=2e-3)


def test_sampling_with_a_context_inverts_transform_with_the_same_context():
    flow = cnf.CNF(_field((8, 8)), (3,), T=0.5, **TIGHT).to(F64)
    c = torch.randn(5, 2, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    x, lp = flow.sample_with_log_prob(5, context=c, generator=gen, trace="exact")
    torch.testing.assert_close(flow.log_prob(x, context=c), lp, rtol=0, atol=1e-8)
    z, _ = flow.transform(x, context=c)
    torch.testing.assert_close(flow.inverse(z, context=c), x, rtol=0, atol=1e-8)
