"""Tests of the generic exact trace of cnf.trace: chunked vector-Jacobian products over the basis.

A generic field is a black box ``field(t, z)``; its exact divergence must equal the trace of the
Jacobian computed per sample, and its gradients those of FFJORD's loop of ``autograd.grad``
calls, whatever the chunking of the basis vectors.
"""

import pytest
import torch
from jacobians import jacobians, randomize
from torch import nn

import cnf.trace
from cnf.fields import ConcatSquashConvNet, ConcatSquashMLP
from cnf.trace import divergence, divergence_exact, sample_noise

F64 = torch.float64
T = torch.tensor(0.7, dtype=F64)


def _loop_trace(field, t, z):
    """FFJORD's exact trace: one ``autograd.grad`` per entry of the flattened event."""
    f = field(t, z)
    flat_f, d = f.reshape(len(z), -1), z[0].numel()
    div = torch.zeros(len(z), dtype=z.dtype)
    for i in range(d):
        (g,) = torch.autograd.grad(flat_f[:, i].sum(), z, create_graph=True)
        div = div + g.reshape(len(z), -1)[:, i]
    return f, div


class _TimeField(nn.Module):
    """``f(t, z) = tanh(t A z + b) * (1 + t^2)`` on events of any shape: depends on t."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(d, d)), nn.Parameter(torch.randn(d))

    def forward(self, t, z):
        flat = z.reshape(z.shape[0], -1)
        return (torch.tanh(t * flat @ self.a.T + self.b) * (1 + t**2)).reshape(z.shape)


def _mlp(dim, seed=0):
    torch.manual_seed(seed)
    return randomize(ConcatSquashMLP(dim, hidden=(7, 6), activation="softplus").to(F64), scale=0.6)


def _conv(seed=0):
    torch.manual_seed(seed)
    return randomize(
        ConcatSquashConvNet(2, hidden_channels=(3, 4), activation="tanh").to(F64), scale=0.6
    )


def _trace(field, t, z):
    return torch.diagonal(jacobians(field, t, z), dim1=-2, dim2=-1).sum(-1)


@pytest.mark.parametrize("dim", [3, 17])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5, 100])
def test_generic_trace_equals_the_jacobians_trace_mlp(dim, chunk_size):
    field = _mlp(dim)
    z = torch.randn(6, dim, dtype=F64)
    f, div = divergence_exact(field, T, z, field_aware=False, chunk_size=chunk_size)
    torch.testing.assert_close(f, field(T, z), rtol=0, atol=1e-14)
    torch.testing.assert_close(div, _trace(field, T, z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_generic_trace_of_a_conv_field_with_event_shape_2_3_3(chunk_size):
    field = _conv()
    z = torch.randn(4, 2, 3, 3, dtype=F64)
    f, div = divergence_exact(field, T, z, chunk_size=chunk_size)  # no analytic trace: generic
    assert f.shape == z.shape and div.shape == (4,)
    expected = _trace(field, T, z)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-10)
    assert expected.abs().min() > 1e-3


def test_default_chunks_follow_chunk_rows(monkeypatch):
    field = _mlp(17)
    z = torch.randn(5, 17, dtype=F64)
    _, whole = divergence_exact(field, T, z, field_aware=False)
    monkeypatch.setattr(cnf.trace, "CHUNK_ROWS", 3 * 5)  # chunks of 3 basis vectors
    _, chunked = divergence_exact(field, T, z, field_aware=False)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    monkeypatch.setattr(cnf.trace, "CHUNK_ROWS", 1)  # below one vector: one at a time
    _, single = divergence_exact(field, T, z, field_aware=False)
    torch.testing.assert_close(single, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make, shape",
    [(lambda: _mlp(5), (4, 5)), (_conv, (3, 2, 3, 3)), (lambda: _TimeField(6), (4, 6))],
)
def test_gradients_equal_those_of_the_loop(make, shape):
    field = make().to(F64)
    params = list(field.parameters())
    z0 = torch.randn(shape, dtype=F64)

    def grads(method):
        z = z0.clone().requires_grad_(True)
        f, div = method(z)
        return torch.autograd.grad(f.square().sum() + div.sum(), [z, *params])

    loop = grads(lambda z: _loop_trace(field, T, z))
    for chunk_size in (None, 2):
        ours = grads(
            lambda z, c=chunk_size: divergence_exact(field, T, z, field_aware=False, chunk_size=c)
        )
        for a, b in zip(ours, loop):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_field_that_depends_on_time():
    torch.manual_seed(4)
    field = _TimeField(5).to(F64)
    z = torch.randn(3, 5, dtype=F64)
    for t in (0.0, 0.4, -1.3):
        t = torch.tensor(t, dtype=F64)
        _, div = divergence_exact(field, t, z, chunk_size=2)
        torch.testing.assert_close(div, _trace(field, t, z), rtol=0, atol=1e-10)
    assert divergence_exact(field, torch.tensor(0.0, dtype=F64), z)[1].abs().max() < 1e-14


@pytest.mark.parametrize("make, shape", [(lambda: _mlp(4), (5, 4)), (_conv, (3, 2, 3, 3))])
def test_frobenius_estimate_with_the_generic_trace(make, shape):
    field = make()
    z = torch.randn(shape, dtype=F64)
    noise = sample_noise(z.shape, "gaussian", probes=3, dtype=F64)
    res = divergence(field, T, z, noise=noise, frobenius=True, field_aware=False, chunk_size=3)
    jac = jacobians(field, T, z)
    rows = torch.einsum("kbi,bij->kbj", noise.reshape(3, len(z), -1), jac)
    torch.testing.assert_close(res.frobenius, rows.square().sum(-1).mean(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(res.div, _trace(field, T, z), rtol=0, atol=1e-10)


def test_batch_of_one_and_empty_batch():
    field = _mlp(3)
    z = torch.randn(1, 3, dtype=F64, requires_grad=True)
    f, div = divergence_exact(field, T, z, field_aware=False)
    assert f.shape == (1, 3) and div.shape == (1,)
    torch.testing.assert_close(div, _trace(field, T, z.detach()), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(div.sum(), z)
    assert g.shape == (1, 3)
    empty = torch.zeros(0, 3, dtype=F64)
    noise = torch.zeros(2, 0, 3, dtype=F64)
    for field_aware in (True, False):
        res = divergence(field, T, empty, noise=noise, frobenius=True, field_aware=field_aware)
        assert [tuple(x.shape) for x in res] == [(0, 3), (0,), (0,)]


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True])
def test_bad_chunk_size_raises_value_error(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        divergence_exact(_mlp(3), T, torch.randn(2, 3, dtype=F64), chunk_size=chunk_size)
