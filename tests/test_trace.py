"""Tests of cnf.trace: exact and Hutchinson divergences, the Frobenius estimate, the noise."""

import pytest
import torch
from jacobians import jacobians, randomize
from torch import nn

from cnf.fields import ConcatSquashConvNet, ConcatSquashMLP
from cnf.trace import (
    ESTIMATORS,
    NOISE_KINDS,
    Divergence,
    divergence,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
)

F64 = torch.float64


def _mlp(dim=3, hidden=(6, 5, 4), activation="tanh", seed=0):
    torch.manual_seed(seed)
    return randomize(ConcatSquashMLP(dim, hidden=hidden, activation=activation).to(F64))


class _Linear(nn.Module):
    """f(t, z) = A z on events of any shape, as a plain module without a field-aware trace."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, z):
        flat = z.reshape(z.shape[0], -1)
        return (flat @ self.a.T).reshape(z.shape)


T = torch.tensor(0.3, dtype=F64)


# --------------------------------------------------------------------------- exact


@pytest.mark.parametrize("activation", ["tanh", "softplus", "swish", "elu"])
def test_generic_exact_trace_equals_autograd_jacobian_mlp(activation):
    field = _mlp(activation=activation)
    z = torch.randn(5, 3, dtype=F64)
    f, div = divergence_exact(field, T, z, field_aware=False)
    torch.testing.assert_close(f, field(T, z), rtol=0, atol=1e-14)
    expected = torch.diagonal(jacobians(field, T, z), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-10)
    assert expected.abs().max() > 1e-2


def test_generic_exact_trace_equals_autograd_jacobian_conv():
    torch.manual_seed(1)
    field = randomize(ConcatSquashConvNet(2, hidden_channels=(4, 3)).to(F64), 0.5)
    z = torch.randn(3, 2, 3, 4, dtype=F64)
    f, div = divergence_exact(field, T, z)
    assert f.shape == z.shape and div.shape == (3,)
    expected = torch.diagonal(jacobians(field, T, z), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-10)
    _, chunked = divergence_exact(field, T, z, chunk_size=5)
    torch.testing.assert_close(chunked, div, rtol=0, atol=1e-12)


def test_exact_trace_of_a_linear_field_and_of_any_callable():
    torch.manual_seed(2)
    a = torch.randn(4, 4, dtype=F64)
    z = torch.randn(6, 2, 2, dtype=F64)
    _, div = divergence_exact(_Linear(a), T, z)
    torch.testing.assert_close(div, torch.full((6,), a.trace().item(), dtype=F64))
    # a plain function with a scalar event: d/dz sin(t z) = t cos(t z)
    z1 = torch.randn(7, dtype=F64)
    f, div = divergence_exact(lambda t, z: torch.sin(t * z), T, z1)
    torch.testing.assert_close(div, T * torch.cos(T * z1), rtol=0, atol=1e-14)
    assert f.shape == (7,)


def test_exact_dispatches_to_forward_with_divergence():
    class Marked(_Linear):
        def forward_with_divergence(self, t, z):
            return self(t, z), torch.full(z.shape[:1], 123.0, dtype=z.dtype)

    field = Marked(torch.eye(2, dtype=F64))
    z = torch.randn(3, 2, dtype=F64)
    assert divergence_exact(field, T, z)[1].tolist() == [123.0] * 3
    assert divergence_exact(field, T, z, field_aware=False)[1].tolist() == [2.0] * 3
    assert divergence(field, T, z).div.tolist() == [123.0] * 3


def test_exact_gradients_generic_and_field_aware_agree():
    field = _mlp(dim=3, hidden=(5, 4, 6), activation="softplus")
    params = list(field.parameters())
    z0 = torch.randn(4, 3, dtype=F64)

    def grads(field_aware):
        z = z0.clone().requires_grad_(True)
        f, div = divergence_exact(field, T, z, field_aware=field_aware)
        loss = (f.square().sum() + div.sum()) ** 2
        return torch.autograd.grad(loss, [z, *params])

    for g_fa, g_gen in zip(grads(True), grads(False)):
        torch.testing.assert_close(g_fa, g_gen, rtol=1e-10, atol=1e-12)


def test_exact_gradcheck_generic_conv_on_z():
    torch.manual_seed(3)
    field = randomize(ConcatSquashConvNet(1, hidden_channels=(2,), activation="tanh").to(F64))
    z = torch.randn(2, 1, 2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: divergence_exact(field, T, z)[1], (z,))


# ---------------------------------------------------------------------- hutchinson


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_hutchinson_is_unbiased_with_nonzero_variance(kind):
    field = _mlp(dim=3, hidden=(8, 8), activation="swish")
    z = torch.randn(4, 3, dtype=F64)
    jac = jacobians(field, T, z)
    exact = torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)
    frob = jac.square().sum((-2, -1))
    probes = 4000
    gen = torch.Generator().manual_seed(0)
    noise = sample_noise(z.shape, kind, probes=probes, generator=gen, dtype=F64)
    # one probe per row: repeat the batch so every probe's estimate comes back separately
    z_rep = z.repeat(probes, 1)
    with torch.no_grad():
        f, est, frob_est = divergence(
            field, T, z_rep, estimator="hutchinson", noise=noise.reshape(1, -1, 3), frobenius=True
        )
    torch.testing.assert_close(f, field(T, z).repeat(probes, 1))
    est, frob_est = est.reshape(probes, 4), frob_est.reshape(probes, 4)
    for values, target in ((est, exact), (frob_est, frob)):
        std = values.std(0)
        assert (std > 1e-3 * target.abs()).all()  # a real estimator, not the exact value
        err = (values.mean(0) - target).abs()
        assert (err < 5 * std / probes**0.5).all(), (err, std)
    # K probes in one call average the single-probe estimates
    with torch.no_grad():
        _, mean_k, frob_k = divergence(
            field, T, z, estimator="hutchinson", noise=noise, frobenius=True
        )
    torch.testing.assert_close(mean_k, est.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frob_k, frob_est.mean(0), rtol=1e-12, atol=1e-12)
    _, mean_fn = divergence_hutchinson(field, T, z, noise)
    torch.testing.assert_close(mean_fn, mean_k, rtol=1e-12, atol=1e-12)


def test_hutchinson_single_probe_value_and_shapes():
    torch.manual_seed(4)
    a = torch.randn(12, 12, dtype=F64)
    field = _Linear(a)
    z = torch.randn(5, 3, 2, 2, dtype=F64)
    e = sample_noise(z.shape, "gaussian", dtype=F64)
    assert e.shape == (1, *z.shape)
    f, div = divergence_hutchinson(field, T, z, e[0])  # (batch, *event) means one probe
    flat = e[0].reshape(5, 12)
    torch.testing.assert_close(div, ((flat @ a) * flat).sum(-1))
    assert f.shape == z.shape and div.shape == (5,)
    _, div2 = divergence_hutchinson(field, T, z, e)
    torch.testing.assert_close(div2, div, rtol=0, atol=0)


def test_hutchinson_conv_net_shapes_and_gradients():
    field = ConcatSquashConvNet(2, hidden_channels=(4, 4))
    z = torch.randn(3, 2, 4, 4)
    noise = sample_noise(z.shape, probes=2)
    f, div, frob = divergence(field, 0.1, z, estimator="hutchinson", noise=noise, frobenius=True)
    assert f.shape == z.shape and div.shape == (3,) and frob.shape == (3,)
    (f.sum() + div.sum() + frob.sum()).backward()
    assert all(p.grad is not None for p in field.parameters())


# ----------------------------------------------------------------------- frobenius


@pytest.mark.parametrize("hidden", [(5, 4, 6), (5, 4)])
def test_frobenius_uses_the_probes_on_every_path(hidden):
    field = _mlp(dim=3, hidden=hidden)
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    noise = sample_noise(z.shape, "gaussian", probes=3, dtype=F64)
    jac = jacobians(field, T, z.detach())
    expected = torch.einsum("kbi,bij->kbj", noise, jac).square().sum(-1).mean(0)
    results = [
        divergence(field, T, z, noise=noise, frobenius=True),
        divergence(field, T, z, noise=noise, frobenius=True, field_aware=False),
        divergence(field, T, z, estimator="hutchinson", noise=noise, frobenius=True),
    ]
    for res in results:
        assert isinstance(res, Divergence)
        torch.testing.assert_close(res.frobenius, expected, rtol=1e-10, atol=1e-12)
    exact = torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(results[0].div, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(results[1].div, exact, rtol=0, atol=1e-10)
    # the gradients of the regularized objective agree between the two exact paths
    params = list(field.parameters())
    grads = [
        torch.autograd.grad(r.f.sum() + r.div.sum() + r.frobenius.sum(), [z, *params])
        for r in results[:2]
    ]
    for g_fa, g_gen in zip(*grads):
        torch.testing.assert_close(g_fa, g_gen, rtol=1e-10, atol=1e-12)
    assert divergence(field, T, z, noise=noise).frobenius is None


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_probe_by_autograd_equals_the_vectorised_probes(estimator):
    # while training, one probe's product is plain autograd (so the checkpoint adjoint can
    # measure the graph); two copies of that probe go through torch.func's vmap: the same
    # values and gradients, w.r.t. z and the parameters
    field = _mlp(dim=3, hidden=(6, 5))
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    one = sample_noise(z.shape, "gaussian", probes=1, dtype=F64)
    results = [
        divergence(field, T, z, estimator=estimator, noise=e, frobenius=True)
        for e in (one, one.expand(2, -1, -1))
    ]
    params = [z, *field.parameters()]
    grads = [torch.autograd.grad(r.div.sum() + r.frobenius.sum(), params) for r in results]
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dim", [3, 8])
def test_the_training_loop_trace_equals_the_vectorised_one(dim):
    # D <= LOOP_DIMS under autograd: one plain product per basis vector; chunk_size forces the
    # vectorised product: the same trace and gradients, w.r.t. z and the parameters
    field = _mlp(dim=dim, hidden=(6, 5))
    z = torch.randn(4, dim, dtype=F64, requires_grad=True)
    params = [z, *field.parameters()]
    outs = [
        divergence_exact(field, T, z, field_aware=False, chunk_size=chunk) for chunk in (None, 2)
    ]
    grads = [torch.autograd.grad(f.square().sum() + d.sum(), params) for f, d in outs]
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-13)
    exact = torch.diagonal(jacobians(field, T, z.detach()), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(outs[0][1], exact, rtol=1e-12, atol=1e-13)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_one_probe_of_a_field_that_ignores_z():
    # a constant field: a zero divergence and Frobenius norm, not an autograd error
    bias = nn.Parameter(torch.ones(2, dtype=F64))
    for field in (lambda t, z: bias.expand(z.shape[0], 2), lambda t, z: torch.ones_like(z)):
        z = torch.randn(3, 2, dtype=F64)
        noise = sample_noise(z.shape, dtype=F64)
        res = divergence(field, T, z, estimator="hutchinson", noise=noise, frobenius=True)
        assert res.div.abs().max() == 0 and res.frobenius.abs().max() == 0


# ----------------------------------------------------------------- graph semantics


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("field_aware", [True, False])
def test_only_the_graph_the_caller_needs(estimator, field_aware):
    field = ConcatSquashMLP(2, hidden=(4, 4, 4))
    z = torch.randn(3, 2)
    noise = sample_noise(z.shape)
    kw = dict(estimator=estimator, noise=noise, frobenius=True, field_aware=field_aware)
    with torch.no_grad():
        res = divergence(field, 0.5, z, **kw)
    assert all(x.grad_fn is None and not x.requires_grad for x in res)
    # training: differentiable w.r.t. the parameters although z needs no gradient
    res = divergence(field, 0.5, z, **kw)
    assert all(x.requires_grad for x in res)
    assert not z.requires_grad and z.grad is None
    (res.div.sum() + res.frobenius.sum()).backward()
    assert field.layers[0].linear.weight.grad.abs().sum() > 0
    # and w.r.t. z when it requires one (the adjoint differentiates the dynamics w.r.t. z)
    zg = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(divergence(field, 0.5, zg, **kw).div.sum(), zg)
    assert gz.abs().sum() > 0


# --------------------------------------------------------------------------- noise


def test_sample_noise_kinds_shapes_and_reproducibility():
    e = sample_noise((64, 3), "rademacher", probes=5, generator=torch.Generator().manual_seed(1))
    assert e.shape == (5, 64, 3) and e.dtype == torch.get_default_dtype()
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    g = sample_noise((2000, 5), "gaussian", dtype=F64, generator=torch.Generator().manual_seed(1))
    assert g.dtype == F64 and abs(g.mean()) < 0.05 and abs(g.var() - 1) < 0.05
    for kind in NOISE_KINDS:
        a = sample_noise((8, 2), kind, probes=2, generator=torch.Generator().manual_seed(7))
        b = sample_noise((8, 2), kind, probes=2, generator=torch.Generator().manual_seed(7))
        c = sample_noise((8, 2), kind, probes=2, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_names_and_arguments_raise_value_error():
    field = ConcatSquashMLP(2, hidden=(4,))
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="valid kinds.*rademacher.*gaussian"):
        sample_noise(z.shape, "uniform")
    with pytest.raises(ValueError, match="probes"):
        sample_noise(z.shape, probes=0)
    with pytest.raises(ValueError, match="valid estimators.*exact.*hutchinson"):
        divergence(field, 0.0, z, estimator="skilling")
    with pytest.raises(ValueError, match="needs probe noise"):
        divergence(field, 0.0, z, estimator="hutchinson")
    with pytest.raises(ValueError, match="needs probe noise"):
        divergence(field, 0.0, z, frobenius=True)
    with pytest.raises(ValueError, match=r"\(probes, 3, 2\)"):
        divergence_hutchinson(field, 0.0, z, torch.randn(3, 3))
    with pytest.raises(ValueError, match="dtype"):
        divergence_hutchinson(field, 0.0, z, torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"dz/dt of z's shape \(3, 2\)"):
        divergence_exact(lambda t, z: z.sum(-1), 0.0, z)
    with pytest.raises(ValueError, match="floating-point"):
        divergence_exact(field, 0.0, torch.ones(3, 2, dtype=torch.long))


def test_float32_matches_float64():
    field = _mlp(dim=4, hidden=(16, 16, 16))
    z = torch.randn(8, 4, dtype=F64)
    _, ref = divergence_exact(field, T, z)
    field32 = field.float()
    for field_aware in (True, False):
        _, div = divergence_exact(field32, T.float(), z.float(), field_aware=field_aware)
        assert div.dtype == torch.float32
        torch.testing.assert_close(div.double(), ref, rtol=1e-4, atol=1e-4)
