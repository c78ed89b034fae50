"""Tests of cnf.dense: CNF blocks with MLP fields on flattened images.

Shapes, invertibility, the whole model's log-determinant against autograd's ``slogdet``
(float64), the analytic exact trace against Hutchinson's mean, gradients, specs and the CLI's
architecture switch, and bad settings.
"""

import pytest
import torch

from cnf import dense
from cnf.dense import DenseImageCNF, digits_dense_model
from cnf.models import build, image_spec
from cnf.multiscale import MultiscaleCNF

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _model(shape=(1, 4, 4), *, seed=0, hidden=(8, 8), alpha=0.05, **kw):
    torch.manual_seed(seed)
    return DenseImageCNF(shape, hidden=hidden, alpha=alpha, **{"trace": "exact", **kw}).to(F64)


def _data(shape=(1, 4, 4), n=3, seed=1):
    return torch.rand(n, *shape, dtype=F64, generator=_gen(seed))


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 2, 2), (2, 3, 5)])
@pytest.mark.parametrize("blocks", [1, 2])
def test_shapes_and_invertibility(shape, blocks):
    model = _model(shape, blocks=blocks)
    x = _data(shape)
    z, logdet = model.transform(x, **TIGHT)
    assert z.shape == x.shape and logdet.shape == (3,)
    torch.testing.assert_close(model.inverse(z, **TIGHT), x, rtol=0, atol=1e-7)
    assert model.sample(5, generator=_gen(2)).shape == (5, *shape)
    assert len(model.blocks) == blocks


def test_logdet_matches_autograd_slogdet():
    """log|det dz/dx| of logit + flatten + two CNF blocks, against the full Jacobian."""
    model = _model((1, 3, 3), blocks=2, adjoint=False, T=2.0)
    x = _data((1, 3, 3), n=2)
    tol = dict(rtol=1e-9, atol=1e-9)
    _, logdet = model.transform(x, **tol)

    def z_of(v):
        return model.transform(v[None], trace="hutchinson", **tol)[0][0]

    expected = torch.stack(
        [
            torch.linalg.slogdet(torch.autograd.functional.jacobian(z_of, xi).reshape(9, 9))[1]
            for xi in x
        ]
    )
    torch.testing.assert_close(logdet.detach(), expected, rtol=0, atol=1e-6)
    # the CNF blocks contribute well above the tolerance, not only the logit transform
    assert ((logdet - model.logit(x)[1]).abs() > 1e-2).all()


def test_log_prob_agrees_between_directions_and_without_logit():
    model = _model(alpha=None)
    x = _data()
    z, logdet = model.transform(x, **TIGHT)
    torch.testing.assert_close(model.log_prob(x, **TIGHT), model.base.log_prob(z) + logdet)
    xs, lp = model.sample_with_log_prob(4, generator=_gen(3), **TIGHT)
    torch.testing.assert_close(model.log_prob(xs, **TIGHT), lp, rtol=1e-7, atol=1e-7)


def test_hutchinson_is_unbiased_for_the_exact_trace():
    model = _model(hidden=(16,))
    x = _data(n=2)
    exact = model.log_prob(x, **TIGHT)
    g = _gen(4)
    draws = torch.stack([model.log_prob(x, trace="hutchinson", generator=g) for _ in range(400)])
    err = (draws.mean(0) - exact).abs()
    assert (err < 4 * draws.std(0) / 20 + 1e-6).all(), (err, draws.std(0))


def test_gradients_reach_every_parameter():
    model = _model(trace="hutchinson")
    model.log_prob(_data(), generator=_gen(5)).mean().neg().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), name


def test_digits_default_and_spec_round_trip():
    model = digits_dense_model()
    assert model.event_shape == (1, 8, 8) and model.dim == 64
    assert len(model.blocks) == 2 and model.alpha == 0.01
    for block in model.blocks:
        assert [layer.linear.out_features for layer in block.field.layers] == [256, 256, 64]
        assert block.T0 == 0.5
    spec = image_spec("digits")
    assert spec["architecture"] == "dense" and isinstance(build(spec), DenseImageCNF)
    small = image_spec("digits", hidden=[8], activation="tanh", dtype="float64")
    m = build(small)
    assert m.blocks[0].field.layers[0].linear.out_features == 8
    assert next(m.parameters()).dtype == F64
    assert isinstance(build(image_spec("digits", "multiscale")), MultiscaleCNF)
    assert image_spec("mnist")["architecture"] == "multiscale"
    # specs saved before dense models existed carry no architecture: they are multiscale
    old = {"kind": "image", "data": "digits", "options": {"hidden_channels": [4]}}
    assert isinstance(build(old), MultiscaleCNF)


def test_digits_spec_survives_a_change_of_defaults(monkeypatch):
    """A digits spec stores the model's settings resolved, so the checkpoint it describes still
    rebuilds after the package's defaults move on."""
    spec = image_spec("digits", activation="tanh")
    assert spec["options"] == {**dense.DIGITS_DENSE, "activation": "tanh"}
    monkeypatch.setitem(dense.DIGITS_DENSE, "hidden", [16])
    monkeypatch.setitem(dense.DIGITS_DENSE, "blocks", 1)
    model = build(spec)
    assert len(model.blocks) == 2
    assert [layer.linear.out_features for layer in model.blocks[0].field.layers] == [256, 256, 64]
    assert len(build(image_spec("digits")).blocks) == 1  # new specs take the new defaults


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"blocks": 0}, "blocks"),
        ({"blocks": True}, "blocks"),
        ({"hidden": ()}, "hidden"),
        ({"activation": "relu"}, "activation"),
        ({"alpha": 0.7}, "alpha"),
        ({"event_shape": (4, 4)}, "shape"),
    ],
)
def test_rejects_bad_settings(kw, match):
    kw = {"event_shape": (1, 4, 4), **kw}
    with pytest.raises(ValueError, match=match):
        DenseImageCNF(**kw)


def test_rejects_bad_architecture_and_wrong_input_shape():
    with pytest.raises(ValueError, match="architecture"):
        image_spec("digits", "conv")
    with pytest.raises(ValueError, match="shape"):
        _model().log_prob(torch.rand(2, 1, 4, 5, dtype=F64))
