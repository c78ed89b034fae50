"""Tests of cnf.transforms: logit and squeeze (invertibility, log-determinants against autograd,
bad input), uniform dequantization and bits/dim on hand-computed cases."""

import math

import pytest
import torch

from cnf.fields import ConcatSquashMLP
from cnf.flow import CNF, Flow, SequentialFlow
from cnf.settings import Call
from cnf.transforms import LogitTransform, Squeeze, bits_per_dim, dequantize

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _jacobian_logdets(fn, x):
    """log|det J| of ``fn`` per sample, from autograd's full Jacobian of the flattened map."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)
        sign, logabs = torch.linalg.slogdet(jac.reshape(xi.numel(), -1))
        assert sign != 0
        out.append(logabs)
    return torch.stack(out)


# --------------------------------------------------------------------------- logit


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_inverts(alpha):
    logit = LogitTransform((2, 3, 3), alpha).double()
    x = torch.rand(4, 2, 3, 3, dtype=F64, generator=_gen(1))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # the ends of [0, 1] are allowed
    z, _ = logit(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(logit.inverse(z), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_logdet_matches_autograd(alpha):
    logit = LogitTransform((1, 2, 3), alpha).double()
    x = torch.rand(3, 1, 2, 3, dtype=F64, generator=_gen(2))
    z, logdet = logit(x)
    expected = _jacobian_logdets(lambda v: logit(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10)

    # the inverse's logdet is log|det dx/dz|, minus the forward one at the matching point
    inv = logit.inverse_and_logdet(z, Call())
    torch.testing.assert_close(inv.z, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(inv.logdet, -logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        inv.logdet, _jacobian_logdets(logit.inverse, z), rtol=1e-10, atol=1e-10
    )
    assert inv.stats == [] and inv.kinetic is None


def test_logit_by_hand():
    # x = 0.5: y = 0.5, z = 0, log|dz/dx| = log(1 - 2 alpha) - 2 log(1/2) per entry
    logit = LogitTransform((3,), 0.05).double()
    z, logdet = logit(torch.full((1, 3), 0.5, dtype=F64))
    assert z.abs().max() == 0
    torch.testing.assert_close(logdet, torch.tensor([3 * math.log(0.9 * 4)], dtype=F64))


@pytest.mark.parametrize("bad", [-1e-3, 1.001, 2.0])
def test_logit_rejects_data_outside_unit_interval(bad):
    logit = LogitTransform((1, 2, 2), 0.05)
    x = torch.full((2, 1, 2, 2), 0.5)
    x[1, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Flow(logit).log_prob(x)


def test_logit_rejects_integer_data_and_bad_alpha():
    with pytest.raises(ValueError, match="dequantize"):
        LogitTransform((1, 2, 2), 0.05)(torch.ones(1, 1, 2, 2, dtype=torch.long))
    for alpha in (0, 0.5, -0.1, 1.0, "0.05", None):
        with pytest.raises(ValueError, match="alpha"):
            LogitTransform((1, 2, 2), alpha)


def test_logit_composes_with_cnf_blocks():
    torch.manual_seed(0)
    logit = LogitTransform((2,), 0.05)
    block = CNF(ConcatSquashMLP(2, hidden=(8,)), (2,), rtol=1e-9, atol=1e-9)
    flow = SequentialFlow([logit, block]).double()
    x = torch.rand(5, 2, dtype=F64, generator=_gen(3))
    y, ld_logit = logit(x)
    expected = block.log_prob(y) + ld_logit
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.inverse(flow.transform(x)[0]), x, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- squeeze


def test_squeeze_layout_by_hand():
    # one channel, one 2x2 patch: channels 4c + 2i + j hold pixel (i, j)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    z, logdet = Squeeze((1, 2, 2))(x)
    assert z.shape == (1, 4, 1, 1)
    assert z.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert logdet.tolist() == [0.0]


def test_squeeze_shapes_inverse_and_logdet():
    sq = Squeeze((3, 4, 6))
    assert sq.in_shape == (3, 4, 6) and sq.out_shape == (12, 2, 3)
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    z, logdet = sq(x)
    assert z.shape == (2, 12, 2, 3)
    assert torch.equal(sq.inverse(z), x)
    assert torch.equal(logdet, torch.zeros(2, dtype=F64))
    # a permutation: |det| = 1
    torch.testing.assert_close(
        _jacobian_logdets(lambda v: sq(v)[0], x[:1]), torch.zeros(1, dtype=F64)
    )


@pytest.mark.parametrize("shape", [(1, 3, 4), (1, 4, 5), (2, 1, 1)])
def test_squeeze_rejects_odd_sizes(shape):
    with pytest.raises(ValueError, match="even"):
        Squeeze(shape)


def test_squeeze_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C, H, W"):
        Squeeze((4, 4))
    sq = Squeeze((1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        sq(torch.zeros(1, 1, 4, 6))
    with pytest.raises(ValueError, match="shape"):
        sq(torch.zeros(1, 4, 4))  # no batch dimension
    with pytest.raises(ValueError, match="shape"):
        sq.inverse(torch.zeros(1, 1, 4, 4))


# --------------------------------------------------------------------------- dequantization


def test_dequantize_stays_in_its_cell():
    k = 17
    x = torch.randint(0, k, (500, 1, 8, 8), generator=_gen(4), dtype=torch.uint8)
    v = dequantize(x, k, _gen(5))
    assert v.dtype == torch.get_default_dtype() and v.shape == x.shape
    assert bool((v >= 0).all() and (v < 1).all())
    assert torch.equal(torch.floor(v * k).to(torch.uint8), x)
    # the noise is uniform on each cell: mean offset 1/2, reproducible with a generator
    assert abs((v * k - x).mean().item() - 0.5) < 0.01
    assert torch.equal(dequantize(x, k, _gen(5)), v)
    assert not torch.equal(dequantize(x, k, _gen(6)), v)


def test_dequantize_top_level_stays_below_one():
    # (k - 1 + u) / k rounds to 1.0 in float32 for u close to 1; the result must stay in [0, 1)
    v = dequantize(torch.full((10000,), 255.0), 256, _gen(7), dtype=torch.float32)
    assert bool((v < 1).all())


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="levels"):
        dequantize(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="levels"):
        dequantize(torch.zeros(3), 2.0)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        dequantize(torch.tensor([-1, 3]), 17)
    with pytest.raises(ValueError, match="integer"):
        dequantize(torch.tensor([0.5, 3.0]), 17)
    with pytest.raises(ValueError, match="floating"):
        dequantize(torch.tensor([1, 2]), 17, dtype=torch.long)


# --------------------------------------------------------------------------- bits per dimension


@pytest.mark.parametrize("k", [2, 17, 256])
def test_bits_per_dim_of_uniform_model_is_log2_levels(k):
    # log p = 0 on [0, 1)^D: every one of the k^D discrete points has probability k^-D
    bpd = bits_per_dim(torch.zeros(3, dtype=F64), (1, 8, 8), k)
    torch.testing.assert_close(bpd, torch.full((3,), math.log2(k), dtype=F64))


def test_bits_per_dim_of_a_histogram_is_its_discrete_nll():
    # A density constant on each dequantization cell, p(v) = k P(floor(k v)) for D = 1, gives
    # back the discrete model's -log2 P(x) exactly: the bound is tight for such models.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    k = len(probs)
    x = torch.tensor([0, 1, 2, 3, 3])
    v = dequantize(x, k, _gen(8), dtype=F64)
    log_p = torch.log(k * probs[torch.floor(k * v).long()])
    torch.testing.assert_close(bits_per_dim(log_p, (1,), k), -torch.log2(probs[x]))


def test_bits_per_dim_through_the_logit_transform_by_hand():
    # v = (0.25, 0.75), alpha = 0.05, base N(0, I), k = 4 levels:
    # y = 0.05 + 0.9 v = (0.275, 0.725), z = logit(y) = (-l, l) with l = log(0.725 / 0.275),
    # log p(v) = -l^2 - log(2 pi) + 2 [log 0.9 - log 0.275 - log 0.725],
    # bpd = log2(4) - log p(v) / (2 log 2).
    l_ = math.log(0.725 / 0.275)
    log_p = -(l_**2) - math.log(2 * math.pi) + 2 * (math.log(0.9 / 0.275) - math.log(0.725))
    by_hand = 2 - log_p / (2 * math.log(2))
    assert by_hand == pytest.approx(1.8291848545837, abs=1e-12)

    flow = Flow(LogitTransform((2,), 0.05)).double()
    model_log_p = flow.log_prob(torch.tensor([[0.25, 0.75]], dtype=F64))
    torch.testing.assert_close(model_log_p, torch.tensor([log_p], dtype=F64))
    torch.testing.assert_close(
        bits_per_dim(model_log_p, (2,), 4), torch.tensor([by_hand], dtype=F64)
    )


def test_bits_per_dim_rejects_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(torch.zeros(2), (1, 8, 8), 1)
    with pytest.raises(ValueError, match="event_shape"):
        bits_per_dim(torch.zeros(2), (), 17)
