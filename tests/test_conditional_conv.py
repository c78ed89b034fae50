"""Conv fields with a context (issue 16): FiLM gates and shifts that read ``[t, c]`` per sample.

Without a context the layers and the net compute what they did before; with one, each sample's
velocity depends on its own context only, the generic traces (exact and Hutchinson) see the
context through :func:`cnf.continuous.with_context`, and a conditional CNF on images is a
density of ``x`` given ``c`` that samples and inverts with the same context.
"""

from __future__ import annotations

import pytest
import torch

import cnf
from cnf.continuous import with_context
from cnf.fields import ConcatSquashConv2d, ConcatSquashConvNet
from cnf.trace import divergence, sample_noise
from cnf.training.flow_matching import field_velocity

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}

pytestmark = pytest.mark.deadline(60)


def _randomize(module, scale=0.5):
    """O(1) weights instead of the default init, so gates, shifts and Jacobians are far from
    trivial (and from saturated sigmoids) and every comparison below has something to see."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    return module


def _net(hidden=(4, 3), context=2, channels=2, activation="softplus", seed=0):
    torch.manual_seed(seed)
    field = ConcatSquashConvNet(channels, hidden, activation, context_features=context)
    return _randomize(field.to(F64))


def _film_by_hand(layer, h, x):
    """The layer's equation written out, conv(x) * sigmoid(A h + a0) + D h per sample, with the
    same modules and operations as before the context (so C = 0 can be compared bit for bit)."""
    gate = torch.sigmoid(layer.hyper_gate(h))
    return layer.conv(x) * gate[:, :, None, None] + layer.hyper_bias(h)[:, :, None, None]


def _jacobians(f, z):
    """Per-sample Jacobians of ``f`` (which maps one sample ``(1, *event)`` to its velocity)
    by brute force, ``(batch, D, D)``."""
    d = z[0].numel()
    jac = [torch.autograd.functional.jacobian(f(i), z[i]).reshape(d, d) for i in range(len(z))]
    return torch.stack(jac)


# ------------------------------------------------------------------ without a context


def test_an_unconditional_conv_net_computes_what_it_did_and_refuses_a_context():
    """C = 0: the same parameters from the same seed, the time-only equation bit for bit, and
    ``context=None`` the same call; a context is refused with the unconditional message."""
    torch.manual_seed(5)
    field = ConcatSquashConvNet(2, (4, 3), "swish").to(F64)
    torch.manual_seed(5)
    explicit = ConcatSquashConvNet(2, (4, 3), "swish", context_features=0).to(F64)
    assert all(torch.equal(a, b) for a, b in zip(field.parameters(), explicit.parameters()))
    assert field.layers[0].hyper_gate.weight.shape == (4, 1)  # the hypernets read t alone
    z, t = torch.randn(5, 2, 4, 3, dtype=F64), torch.rand(5, dtype=F64)
    for time in (torch.tensor(0.3, dtype=F64), t):
        h = time.reshape(-1, 1)
        x = z
        for layer, act in zip(field.layers, field.activations):
            x = act(_film_by_hand(layer, h, x))
        by_hand = _film_by_hand(field.layers[-1], h, x)
        assert torch.equal(field(time, z), by_hand)
        assert torch.equal(field(time, z, None), by_hand)
        assert torch.equal(field(time, z, context=None), explicit(time, z))
    with pytest.raises(ValueError, match="ConcatSquashConvNet is an unconditional field"):
        field(0.3, z, torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="unconditional"):
        cnf.CNF(field, (2, 4, 3)).log_prob(z, context=torch.zeros(5, 1, dtype=F64))


@pytest.mark.parametrize("transpose", [False, True])
def test_an_unconditional_layer_is_film_with_h_the_time(transpose):
    layer = _randomize(ConcatSquashConv2d(2, 3, 4, stride=2, transpose=transpose).to(F64))
    x, t = torch.randn(5, 2, 6, 6, dtype=F64), torch.rand(5, dtype=F64)
    assert torch.equal(layer.film(t[:, None], x), layer(t, x))
    assert torch.equal(layer.film(t[:1, None], x), layer(t[0], x))  # one row for the batch
    assert torch.equal(layer(t, x), _film_by_hand(layer, t[:, None], x))


# ------------------------------------------------------------------ the layer with a context


def test_a_conditional_layer_gates_and_shifts_every_channel_per_sample():
    torch.manual_seed(1)
    layer = _randomize(ConcatSquashConv2d(2, 3, context_features=2).to(F64))
    assert layer.hyper_gate.weight.shape == (3, 3) and layer.hyper_bias.weight.shape == (3, 3)
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    h = torch.cat([torch.rand(4, 1, dtype=F64), torch.randn(4, 2, dtype=F64)], dim=1)
    out = layer.film(h, x)
    a, a0, d = layer.hyper_gate.weight, layer.hyper_gate.bias, layer.hyper_bias.weight
    gate, shift = torch.sigmoid(h @ a.T + a0), h @ d.T  # (batch, out): one per sample, channel
    expected = layer.conv(x) * gate[:, :, None, None] + shift[:, :, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    rows = torch.cat([layer.film(h[i : i + 1], x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(out, rows, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.film(h[:1], x), layer.film(h[:1].expand(4, 3), x))
    with pytest.raises(ValueError, match=r"context_features=2: apply it with film\(h, x\)"):
        layer(0.5, x)
    for bad in (h[:, :2], h[:3], h[0]):
        with pytest.raises(ValueError, match=r"h must have shape \(4, 3\) or \(1, 3\)"):
            layer.film(bad, x)


# ------------------------------------------------------------------ the net with a context


def test_each_sample_sees_its_own_context_and_time():
    field = _net()
    z, c = torch.randn(5, 2, 4, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    t = torch.rand(5, dtype=F64)
    batched = field(t, z, c)
    assert batched.shape == z.shape
    one_by_one = torch.cat([field(t[i], z[i : i + 1], c[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-13)
    # a context of shape (C,) is that row for every sample; a scalar time, that time for all
    shared = field(0.4, z, c[0])
    torch.testing.assert_close(shared, field(0.4, z, c[:1].expand(5, 2)), rtol=0, atol=0)
    torch.testing.assert_close(shared, field(torch.full((5,), 0.4, dtype=F64), z, c[0]))
    # changing sample 0's context, or its time, moves sample 0's velocity and no other
    moved_c, moved_t = c.clone(), t.clone()
    moved_c[0] += 1.0
    moved_t[0] += 0.5
    for changed in (field(t, z, moved_c), field(moved_t, z, c)):
        assert (changed[0] - batched[0]).abs().max() > 1e-3
        torch.testing.assert_close(changed[1:], batched[1:], rtol=0, atol=0)


def test_every_layer_reads_the_context_and_zero_init_last_starts_at_zero():
    field = _net(hidden=(4,))
    for layer in field.layers:  # the output layer too: no analytic trace to keep cheap
        assert layer.hyper_gate.weight.shape[1] == 3 and layer.hyper_bias.weight.shape[1] == 3
    # with the hidden layer blind to the context, the output layer alone still reads it, in
    # its gate and in its shift
    with torch.no_grad():
        for p in (field.layers[0].hyper_gate.weight, field.layers[0].hyper_bias.weight):
            p[:, 1:] = 0
    z, c = torch.randn(2, 2, 3, 3, dtype=F64), torch.randn(2, 2, dtype=F64)
    t = torch.rand(2, dtype=F64)
    last = field.layers[-1]
    for p in (last.hyper_gate.weight, last.hyper_bias.weight):
        (grad,) = torch.autograd.grad(field(t, z, c).sum(), p)
        assert grad[:, 1:].abs().min() > 0
    assert (field(t, z, c) - field(t, z, c + 1.0)).abs().max() > 1e-3
    torch.manual_seed(0)
    zero = ConcatSquashConvNet(1, (4,), context_features=3, zero_init_last=True).to(F64)
    c = torch.randn(3, 3)  # float32, cast to the state's dtype
    f = zero(torch.rand(3, dtype=F64), torch.randn(3, 1, 4, 4, dtype=F64), c)
    assert torch.equal(f, torch.zeros_like(f))


def test_gradients_reach_the_state_and_the_context():
    field = _net(hidden=(2,), context=2, channels=1, activation="tanh")
    z = torch.randn(2, 1, 3, 3, dtype=F64, requires_grad=True)
    c = torch.randn(2, 2, dtype=F64, requires_grad=True)
    t = torch.rand(2, dtype=F64)
    assert torch.autograd.gradcheck(lambda z, c: field(t, z, c), (z, c))
    (grad,) = torch.autograd.grad(field(t, z, c).square().sum(), c)
    assert grad.abs().min() > 0  # every context entry of every sample matters


# ------------------------------------------------------------------ traces through with_context


@pytest.mark.parametrize("activation", ["softplus", "swish"])
def test_the_exact_trace_with_a_context_equals_the_jacobians(activation):
    field = _net(activation=activation)
    z, c = torch.randn(3, 2, 3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    d = divergence(with_context(field, c), t, z)
    torch.testing.assert_close(d.f, field(t, z, c), rtol=0, atol=0)
    jac = _jacobians(lambda i: lambda x: field(t, x[None], c[i : i + 1])[0], z)
    expected = torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(d.div, expected, rtol=0, atol=1e-10)
    chunked = divergence(with_context(field, c), t, z, chunk_size=5)
    torch.testing.assert_close(chunked.div, d.div, rtol=0, atol=1e-12)


def test_hutchinson_with_a_context_is_unbiased():
    field = _net(hidden=(4,))
    z, c = torch.randn(3, 2, 2, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    t = torch.tensor(0.7, dtype=F64)
    exact = divergence(with_context(field, c), t, z).div
    probes = 2000
    noise = sample_noise(
        z.shape, "rademacher", probes=probes, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    # one probe per row: the batch (and its contexts) repeated, every estimate kept apart
    rows = (1, -1, *z.shape[1:])
    with torch.no_grad():
        d = divergence(
            with_context(field, c.repeat(probes, 1)), t, z.repeat(probes, 1, 1, 1),
            estimator="hutchinson", noise=noise.reshape(rows),
        )  # fmt: skip
    est = d.div.reshape(probes, 3)
    std = est.std(0)
    assert (std > 1e-3 * exact.abs()).all()  # an estimator, not the exact value
    assert ((est.mean(0) - exact).abs() < 5 * std / probes**0.5).all()
    with torch.no_grad():
        mean_k = divergence(with_context(field, c), t, z, estimator="hutchinson", noise=noise)
    torch.testing.assert_close(mean_k.div, est.mean(0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ a conditional CNF on images


def test_a_conditional_conv_cnf_samples_scores_and_inverts_with_its_context():
    torch.manual_seed(2)
    field = _randomize(ConcatSquashConvNet(1, (4, 4), context_features=3).to(F64), 0.3)
    flow = cnf.CNF(field, (1, 6, 6), T=0.5, **TIGHT).to(F64)
    c = torch.randn(3, 3, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x, lp = flow.sample_with_log_prob(3, context=c, generator=gen, trace="exact")
        torch.testing.assert_close(flow.log_prob(x, context=c), lp, rtol=0, atol=1e-6)
        z, _ = flow.transform(x, context=c)
        torch.testing.assert_close(flow.inverse(z, context=c), x, rtol=0, atol=1e-6)
        other = flow.log_prob(x, context=c + 1.0)
    assert (other - lp).abs().max() > 1e-3  # a density given c, not one density for all c


def test_flow_matchings_velocity_passes_the_context_and_needs_one():
    """``field_velocity(field, t, x, c)`` evaluates the conditional field at per-sample times
    and contexts; without a context it fails loudly rather than run without one."""
    field = _net()
    t, x = torch.rand(4, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    c = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(field_velocity(field, t, x, c), field(t, x, c), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"context_features=2: pass a context"):
        field_velocity(field, t, x)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "context, match",
    [
        (None, r"ConcatSquashConvNet was built with context_features=2: pass a context"),
        (torch.zeros(4, 3, dtype=F64), r"shape \(4, 2\) or \(2,\)"),
        (torch.zeros(3, 2, dtype=F64), r"shape \(4, 2\) or \(2,\)"),
        (torch.zeros(4, 2, 1, dtype=F64), r"shape \(4, 2\) or \(2,\)"),
        (torch.zeros(4, 2, dtype=torch.long), "embed labels first"),
        (torch.zeros(2, dtype=torch.long), "embed labels first"),
    ],
)
def test_a_bad_context_is_refused(context, match):
    with pytest.raises(ValueError, match=match):
        _net()(0.0, torch.zeros(4, 2, 3, 3, dtype=F64), context)


def test_bad_sizes_and_states_are_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"context_features must be an int >= 0"):
            ConcatSquashConvNet(1, (4,), context_features=bad)
        with pytest.raises(ValueError, match=r"context_features must be an int >= 0"):
            ConcatSquashConv2d(1, 4, context_features=bad)
    c = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 2, H, W\)"):
        _net()(0.0, torch.zeros(4, 3, 3, 3, dtype=F64), c)
    with pytest.raises(ValueError, match=r"one time per sample of shape \(4,\)"):
        _net()(torch.zeros(3, dtype=F64), torch.zeros(4, 2, 3, 3, dtype=F64), c)
