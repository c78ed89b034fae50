"""One contract over every model variant (zuko's ``test_flows`` idea), in float64 on small cases.

Variants: a CNF, a composition of CNF blocks, the dense image model, the multiscale model, a
logit step composed with CNF blocks, a squeeze composed with CNF blocks on each side, and a
standardization before a CNF block (data in thousands and thousandths). Each
must give the right shapes, a log-determinant equal to ``slogdet`` of the autograd Jacobian of
``transform``, an inverse of ``transform``, gradients that reach every parameter, and a save and
load round trip through the public :func:`cnf.training.load`.
"""

from __future__ import annotations

import pytest
import torch

import cnf
from cnf.fields import ConcatSquashConvNet, ConcatSquashMLP
from cnf.models import build, fit_standardization, image_spec, tabular_spec, toy_spec
from cnf.training import load, save_checkpoint

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}


def _seq_logit() -> cnf.Flow:
    shape = (1, 2, 2)
    blocks = [cnf.CNFTransform(ConcatSquashMLP(4, (8,)), (4,), T=0.5) for _ in range(2)]
    steps = [cnf.LogitTransform(shape, 0.05), cnf.Reshape(shape, (4,)), *blocks]
    return cnf.SequentialFlow([*steps, cnf.Reshape((4,), shape)])


def _seq_squeeze() -> cnf.Flow:
    shape = (1, 2, 2)
    before = cnf.CNFTransform(ConcatSquashConvNet(1, (4,)), shape, T=0.5)
    after = cnf.CNFTransform(ConcatSquashConvNet(4, (4,)), (4, 1, 1), T=0.5)
    # the base lives on the squeezed shape (4, 1, 1): a flow's two sides may differ in shape
    return cnf.SequentialFlow([before, cnf.Squeeze(shape), after])


def _seq_standardize() -> cnf.Flow:
    x = torch.tensor([[1000.0, 0.001], [3000.0, 0.004], [2000.0, 0.002]], dtype=F64)
    block = cnf.CNFTransform(ConcatSquashMLP(2, (8,)), (2,), T=0.5)
    return cnf.SequentialFlow([cnf.Standardize.fit(x), block])


def _tabular() -> cnf.Flow:
    """The model of ``cnf train --data FILE``: Standardize fitted to rows, then a block."""
    rows = torch.tensor([[10.0, 0.01, 5.0], [30.0, 0.04, 1.0], [20.0, 0.02, 3.0]])
    return fit_standardization(build(SPECS["tabular"]), rows.to(F64), names=["a", "b", "c"])


# name -> (make model, make data, spec for the public load or None)
VARIANTS = {
    "cnf": (lambda: build(SPECS["cnf"]), lambda n: torch.randn(n, 2, dtype=F64)),
    "blocks": (lambda: build(SPECS["blocks"]), lambda n: torch.randn(n, 2, dtype=F64)),
    "dense": (lambda: build(SPECS["dense"]), lambda n: torch.rand(n, 1, 8, 8, dtype=F64)),
    "multiscale": (
        lambda: build(SPECS["multiscale"]),
        lambda n: torch.rand(n, 1, 8, 8, dtype=F64),
    ),
    "logit": (_seq_logit, lambda n: torch.rand(n, 1, 2, 2, dtype=F64)),
    "squeeze": (_seq_squeeze, lambda n: torch.randn(n, 1, 2, 2, dtype=F64)),
    "tabular": (
        _tabular,
        lambda n: (
            torch.randn(n, 3, dtype=F64) * torch.tensor([10.0, 0.01, 2.0], dtype=F64)
            + torch.tensor([20.0, 0.02, 3.0], dtype=F64)
        ),
    ),
    "standardize": (
        _seq_standardize,
        lambda n: (
            torch.randn(n, 2, dtype=F64) * torch.tensor([1000.0, 0.001], dtype=F64)
            + torch.tensor([2000.0, 0.002], dtype=F64)
        ),
    ),
}
SPECS = {
    "cnf": toy_spec(hidden=[8, 8], dtype="float64"),
    "blocks": toy_spec(hidden=[8], blocks=2, dtype="float64"),
    "tabular": tabular_spec(3, hidden=[8, 8], dtype="float64"),
    "dense": image_spec("digits", "dense", hidden=[16], blocks=2, dtype="float64"),
    "multiscale": image_spec(
        "digits", "multiscale", hidden_channels=[4], blocks_per_scale=1, dtype="float64"
    ),
}


def _model(name: str, make=None) -> cnf.Flow:
    torch.manual_seed(0)
    model = (make or VARIANTS[name][0])().to(F64)
    with torch.no_grad():  # move every field away from its initialisation: a generic case
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_inverse_and_sampling(name):
    model, x = _model(name), VARIANTS[name][1](5)
    shape = tuple(model.event_shape)
    z, logdet = model.transform(x, trace="exact", **TIGHT)
    assert z.shape == (5, *model.transform.out_shape) and z.numel() == x.numel()
    assert logdet.shape == (5,) and z.dtype == F64
    out = model(x, trace="exact", **TIGHT)
    assert isinstance(out, cnf.FlowOutput) and out.log_prob.shape == (5,)
    torch.testing.assert_close(out.log_prob, model.base.log_prob(z) + logdet)
    torch.testing.assert_close(model.inverse(z, **TIGHT), x, rtol=0, atol=1e-7)
    xs, lps = model.sample_with_log_prob((4, 5), trace="exact", **TIGHT)
    assert xs.shape == (4, 5, *shape) and lps.shape == (4, 5)
    xs, lps = xs.reshape(20, *shape), lps.reshape(20)
    if any(isinstance(m, cnf.LogitTransform) for m in model.modules()):
        # the logit's inverse reaches slightly past [0, 1], where the density is not defined
        inside = ((xs >= 0) & (xs <= 1)).flatten(1).all(1)
        assert inside.sum() >= 3
        xs, lps = xs[inside], lps[inside]
    torch.testing.assert_close(model.log_prob(xs, trace="exact", **TIGHT), lps, rtol=0, atol=1e-6)


# the image models at the smallest sizes their structure allows: D autograd passes each
SMALL = {
    "dense": (
        lambda: cnf.DenseImageCNF((1, 2, 2), hidden=(8,), blocks=2, alpha=0.05),
        lambda n: torch.rand(n, 1, 2, 2, dtype=F64),
    ),
    "multiscale": (
        lambda: cnf.MultiscaleCNF(
            (1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=(4,), alpha=0.05
        ),
        lambda n: torch.rand(n, 1, 4, 4, dtype=F64),
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logdet_equals_slogdet_of_the_autograd_jacobian(name):
    make, data = SMALL.get(name, VARIANTS[name][:2])
    model, x = _model(name, make), data(2)
    _, logdet = model.transform(x, trace="exact", **TIGHT)
    for i in range(len(x)):

        def flat(v, i=i):
            return model.transform(v.reshape(1, *x.shape[1:]), **TIGHT)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, x[i].reshape(-1))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model, x = _model(name), VARIANTS[name][1](4)
    (-model.log_prob(x, generator=torch.Generator().manual_seed(0)).mean()).backward()
    params = dict(model.named_parameters())
    assert params, "every variant has parameters"
    for pname, p in params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), pname
        assert p.grad.abs().max() > 0, pname


@pytest.mark.parametrize("name", list(VARIANTS))
def test_save_and_load_round_trip(name, tmp_path):
    model, x = _model(name), VARIANTS[name][1](3)
    expected = model.log_prob(x, trace="exact", **TIGHT).detach()
    path = tmp_path / "model.pt"
    if name in SPECS:
        save_checkpoint(path, {"model": model.state_dict(), "iteration": 1, "spec": SPECS[name]})
        loaded = load(path)
    else:  # a composition built in Python: load the weights into a freshly built one
        save_checkpoint(path, {"model": model.state_dict(), "iteration": 1})
        loaded = load(path, model=VARIANTS[name][0]().to(F64))
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, trace="exact", **TIGHT), expected)
