"""Tests of cnf.multiscale: FFJORD's multiscale CNF on tiny images.

Shapes, packing, invertibility, the log-determinant of the whole model against autograd's
``slogdet`` (exact trace, float64), gradients, regularizers summed over blocks, per-call
settings reaching every block, save/load and bad input.
"""

import io

import pytest
import torch

from cnf.continuous import CNFTransform
from cnf.flow import FlowOutput
from cnf.multiscale import MultiscaleCNF, cifar10_model, digits_model, max_scales, mnist_model
from cnf.settings import Call

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _model(shape=(1, 4, 4), *, seed=0, scales=2, hidden=(4,), alpha=0.05, trace="exact", **kw):
    torch.manual_seed(seed)
    kw = {"blocks_per_scale": 1, "hidden_channels": hidden, "trace": trace, **kw}
    return MultiscaleCNF(shape, scales=scales, alpha=alpha, **kw).to(F64)


def _data(shape=(1, 4, 4), n=3, seed=1):
    return torch.rand(n, *shape, dtype=F64, generator=_gen(seed))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    "shape, n", [((1, 8, 8), 2), ((1, 28, 28), 3), ((3, 32, 32), 4), ((1, 4, 4), 1), ((1, 9, 9), 1)]
)
def test_max_scales(shape, n):
    assert max_scales(shape) == n


def test_architecture_follows_ffjord():
    model = _model((1, 8, 8), scales=3, blocks_per_scale=2)
    # two blocks before and after each squeeze, two on the last scale
    shapes = [tuple(b.event_shape) for b in model.blocks]
    assert (
        shapes
        == [(1, 8, 8)] * 2 + [(4, 4, 4)] * 2 + [(2, 4, 4)] * 2 + [(8, 2, 2)] * 2 + [(4, 2, 2)] * 2
    )
    assert model.logit is not None and model.logit.alpha == 0.05
    assert all(isinstance(b, CNFTransform) and b.T_scale is not None for b in model.blocks)
    assert all(b.settings.trace == "exact" for b in model.blocks)

    single = _model((1, 8, 8), scales=None, single_scale=True)
    assert single.scales == 1 and [tuple(b.event_shape) for b in single.blocks] == [(1, 8, 8)]
    assert _model((1, 8, 8), scales=None, alpha=None).scales == 2
    assert _model((1, 8, 8), scales=None, alpha=None).logit is None


def test_paper_configurations():
    digits, mnist, cifar = digits_model(), mnist_model(), cifar10_model()
    assert digits.event_shape == (1, 8, 8) and digits.logit.alpha == 0.05
    assert len(digits.blocks) == 3
    assert mnist.event_shape == (1, 28, 28) and mnist.scales == 3 and mnist.logit.alpha == 1e-6
    assert len(mnist.blocks) == 10
    assert cifar.event_shape == (3, 32, 32) and cifar.scales == 4 and cifar.logit.alpha == 0.05
    assert len(cifar.blocks) == 14
    for model in (mnist, cifar):
        field = model.blocks[0].field
        assert [layer.conv.out_channels for layer in field.layers[:-1]] == [64, 64, 64]
        assert type(field.activations[0]).__name__ == "_Softplus"
        assert model.blocks[0].settings.trace == "hutchinson"
        assert model.blocks[0].settings.noise == "rademacher"
    assert digits_model(hidden_channels=(8,), scales=1).scales == 1


# --------------------------------------------------------------------------- the maps


@pytest.mark.parametrize("scales, shape", [(1, (1, 4, 4)), (2, (1, 4, 4)), (3, (2, 8, 4))])
def test_shapes(scales, shape):
    model = _model(shape, scales=scales)
    x = _data(shape)
    z, logdet = model.transform(x)
    assert z.shape == x.shape and logdet.shape == (3,)
    assert model.inverse(z).shape == x.shape
    assert model.log_prob(x).shape == (3,)
    assert model.sample(2).shape == (2, *shape)
    assert model.sample((2, 3)).shape == (2, 3, *shape)
    xs, lp = model.sample_with_log_prob(4)
    assert xs.shape == (4, *shape) and lp.shape == (4,)


def test_packing_puts_latents_where_their_pixels_were():
    # With zero fields and no logit every block is the identity: the packed latent is the data
    model = _model((2, 8, 8), scales=3, alpha=None, zero_init_last=True)
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    z, logdet = model.transform(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2, dtype=F64))
    assert torch.equal(model.inverse(x), x)


def test_transform_then_inverse_returns_data():
    model = _model((1, 8, 8), scales=2, hidden=(4, 4))
    x = _data((1, 8, 8))
    z, _ = model.transform(x, **TIGHT)
    torch.testing.assert_close(model.inverse(z, **TIGHT), x, rtol=0, atol=1e-6)


def test_log_prob_is_base_plus_logdet_and_matches_sampling():
    model = _model(alpha=None)
    x = _data()
    z, logdet = model.transform(x, **TIGHT)
    out = model.evaluate(x, **TIGHT)
    torch.testing.assert_close(out.log_prob, model.base.log_prob(z) + logdet)
    torch.testing.assert_close(out.z, z)
    # the inverse pass's log-density (base minus log|det dx/dz|) agrees with the forward one
    xs, lp = model.sample_with_log_prob(3, generator=_gen(2), **TIGHT)
    torch.testing.assert_close(model.log_prob(xs, **TIGHT), lp, rtol=1e-7, atol=1e-7)


def test_logdet_matches_autograd_slogdet():
    """The key correctness test: log|det dz/dx| of logit + CNF blocks + squeeze + split."""
    model = _model((1, 4, 4), scales=2, hidden=(6,), adjoint=False, T=2.0)
    x = _data((1, 4, 4), n=2)
    tol = dict(rtol=1e-8, atol=1e-8)
    _, logdet = model.transform(x, **tol)  # exact trace

    def z_of(v):  # the map alone; Hutchinson makes its backward passes cheaper
        return model.transform(v[None], trace="hutchinson", **tol)[0][0]

    expected = torch.stack(
        [
            torch.linalg.slogdet(torch.autograd.functional.jacobian(z_of, xi).reshape(16, 16))[1]
            for xi in x
        ]
    )
    torch.testing.assert_close(logdet.detach(), expected, rtol=0, atol=1e-6)
    # the CNF blocks contribute well above the tolerance, not only the logit transform
    assert ((logdet - model.logit(x)[1]).abs() > 1e-2).all()


def test_gradients_reach_every_parameter():
    model = _model(trace="hutchinson", hidden=(4, 4))  # adjoint gradients, the default
    loss = -model.log_prob(_data(), generator=_gen(3)).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any(), name


def test_regularizers_are_summed_over_blocks():
    model = _model((1, 4, 4), scales=2, blocks_per_scale=2)
    x = _data()
    out = model.evaluate(x, regularizers=True, generator=_gen(4))
    assert len(out.stats) == len(model.blocks) == 6
    assert out.kinetic.shape == out.jacobian.shape == (3,)

    # the same chain by hand: each block draws its probes from the generator in turn
    gen, kinetic, jacobian = _gen(4), 0, 0
    h = model.logit(x)[0]

    def run(block, h):
        nonlocal kinetic, jacobian
        o = block.forward_and_logdet(h, Call.make({"generator": gen}, regularizers=True))
        kinetic, jacobian = kinetic + o.kinetic, jacobian + o.jacobian
        return o.z

    for block in model.pre[0]:
        h = run(block, h)
    h = model.squeezes[0](h)[0]
    for block in model.post[0]:
        h = run(block, h)
    h = h[:, :2]
    for block in model.pre[1]:
        h = run(block, h)
    torch.testing.assert_close(out.kinetic, kinetic)
    torch.testing.assert_close(out.jacobian, jacobian)
    assert (out.kinetic > 0).all() and (out.jacobian > 0).all()
    assert model.evaluate(x).kinetic is None


def test_per_call_settings_reach_every_block():
    model = _model(trace="hutchinson")
    x = _data()
    a, b = model.log_prob(x), model.log_prob(x)
    assert not torch.allclose(a, b)  # Hutchinson: a fresh estimate each call
    exact = model.log_prob(x, trace="exact")
    torch.testing.assert_close(model.log_prob(x, trace="exact"), exact, rtol=0, atol=0)
    torch.testing.assert_close(
        model.log_prob(x, generator=_gen(5)), model.log_prob(x, generator=_gen(5))
    )
    fixed = model.evaluate(x, trace="exact", method="rk4", options={"step_size": 0.25})
    assert fixed.nfe == 4 * 4 * len(model.blocks)
    with pytest.raises(TypeError, match="unknown keyword"):
        model.log_prob(x, tol=1e-3)


def test_state_dict_round_trip():
    model, other = _model(seed=0), _model(seed=1)
    x = _data()
    assert not torch.allclose(model.log_prob(x), other.log_prob(x))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(other.log_prob(x), model.log_prob(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input


def test_rejects_bad_input():
    model = _model()
    for bad in (torch.rand(2, 1, 4, 5, dtype=F64), torch.rand(1, 4, 4, dtype=F64)):
        with pytest.raises(ValueError, match="shape"):
            model.log_prob(bad)
    with pytest.raises(ValueError, match="shape"):
        model.inverse(torch.randn(2, 4, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(_data() + 1)
    with pytest.raises(ValueError, match="float32"):
        model.log_prob(_data().float())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(event_shape=(8, 8)), "C, H, W"),
        (dict(event_shape=(1, 6, 6), scales=3), "odd"),
        (dict(event_shape=(1, 5, 4), scales=2), "odd"),
        (dict(scales=0), "scales"),
        (dict(scales=2.0), "scales"),
        (dict(blocks_per_scale=0), "blocks_per_scale"),
        (dict(single_scale=True, scales=2), "single_scale"),
        (dict(alpha=0.5), "alpha"),
        (dict(activation="relu"), "activation"),
        (dict(trace="stochastic"), "trace"),
    ],
)
def test_rejects_bad_settings(kw, match):
    kw = {"event_shape": (1, 4, 4), "hidden_channels": (4,), **kw}
    with pytest.raises(ValueError, match=match):
        MultiscaleCNF(**kw)


def test_flow_output_is_complete():
    out = _model().evaluate(_data())
    assert isinstance(out, FlowOutput) and out.log_prob.shape == (3,)
    assert out.nfe > 0 and len(out.stats) == 3  # pre-squeeze, post-squeeze, last scale
