"""The context slot: a field called as ``field(t, z, context)``, with exact densities and gradients.

A linear conditional field ``f(t, z, c) = -c z`` (one rate ``c`` per sample) has the closed form
``z(t) = z(0) exp(-c t)``: data ``x`` at ``T`` comes from ``z(0) = x exp(c T)`` and
``log p(x | c) = log N(x exp(c T)) + D c T``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cnf
from cnf.fields import ConcatSquashMLP

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


class Decay(nn.Module):
    """``f(t, z, c) = -s c z`` with a learnable scale ``s``; ``c`` of shape ``(batch, 1)``."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, t, z, context):
        return -self.scale * context * z


def _closed_form(x, c, T):
    z0 = x * torch.exp(c * T)
    d = x.shape[1]
    return -0.5 * z0.square().sum(1) - 0.5 * d * math.log(2 * math.pi) + d * c[:, 0] * T


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_conditional_log_prob_and_gradients_match_the_closed_form(adjoint):
    flow = cnf.CNF(Decay(), (3,), T=0.7, adjoint=adjoint, **TIGHT)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.tensor([[0.5], [-0.3], [1.2], [0.0]], dtype=F64, requires_grad=True)
    lp = flow.log_prob(x, context=c)
    expected = _closed_form(x, c, 0.7)
    torch.testing.assert_close(lp, expected.detach(), rtol=0, atol=1e-8)
    (grad,) = torch.autograd.grad(lp.sum(), c)
    (want,) = torch.autograd.grad(expected.sum(), c)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)  # gradients reach the context


def test_sampling_with_a_context_inverts_transform_with_the_same_context():
    flow = cnf.CNF(Decay(), (2,), T=0.5, **TIGHT)
    c = torch.tensor([[0.2], [0.9]], dtype=F64)
    x, lp = flow.sample_with_log_prob(2, context=c, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(x, context=c), lp, rtol=0, atol=1e-8)
    z, _ = flow.transform(x, context=c)
    torch.testing.assert_close(flow.inverse(z, context=c), x, rtol=0, atol=1e-8)


def test_unconditional_fields_reject_a_context_instead_of_ignoring_it():
    flow = cnf.CNF(ConcatSquashMLP(2, (8,)), (2,))
    with pytest.raises(ValueError, match="unconditional"):
        flow.log_prob(torch.randn(3, 2), context=torch.randn(3, 1))
    with pytest.raises(ValueError, match="context must be a tensor"):
        flow.log_prob(torch.randn(3, 2), context=[1.0])
