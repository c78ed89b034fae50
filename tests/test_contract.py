"""One contract over every model variant (zuko's ``test_flows`` idea), in float64 on small cases.

Variants: a CNF, a composition of CNF blocks, the dense image model, the multiscale model, a
logit step composed with CNF blocks, a squeeze composed with CNF blocks on each side, and a
standardization before a CNF block (data in thousands and thousandths). Each runs as it is
and conditional (issue 16): with raw context vectors, labels through an embedding, or a
context column standardized by its embedding. Each must give the right shapes, a
log-determinant equal to ``slogdet`` of the autograd Jacobian of ``transform`` (at a fixed
context), an inverse of ``transform`` (with the same context), samples whose log-density is
``log_prob``'s, gradients that reach every parameter (the embeddings' too), and a save and load
round trip through the public :func:`cnf.training.load`.
"""

from __future__ import annotations

import pytest
import torch

import cnf
from cnf.context import Conditioned, ContextEmbedding
from cnf.fields import ConcatSquashConvNet, ConcatSquashMLP
from cnf.models import build, fit_standardization, image_spec, tabular_spec, toy_spec
from cnf.training import load, save_checkpoint

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}


def _mlp(dim, hidden, context):
    """A ConcatSquash MLP field: unconditional, reading raw vectors of 2 features
    (``context="vectors"``), or behind a label embedding (``context="labels"``)."""
    if context == "labels":
        return Conditioned(
            ConcatSquashMLP(dim, hidden, context_features=3),
            ContextEmbedding(classes=4, features=3),
        )
    return ConcatSquashMLP(dim, hidden, context_features=2 if context else 0)


def _seq_logit(context=None) -> cnf.Flow:
    shape = (1, 2, 2)
    blocks = [cnf.CNFTransform(_mlp(4, (8,), context), (4,), T=0.5) for _ in range(2)]
    steps = [cnf.LogitTransform(shape, 0.05), cnf.Reshape(shape, (4,)), *blocks]
    return cnf.SequentialFlow([*steps, cnf.Reshape((4,), shape)])


def _seq_squeeze(context=None) -> cnf.Flow:
    shape, c = (1, 2, 2), 2 if context else 0
    before = cnf.CNFTransform(ConcatSquashConvNet(1, (4,), context_features=c), shape, T=0.5)
    after = cnf.CNFTransform(ConcatSquashConvNet(4, (4,), context_features=c), (4, 1, 1), T=0.5)
    # the base lives on the squeezed shape (4, 1, 1): a flow's two sides may differ in shape
    return cnf.SequentialFlow([before, cnf.Squeeze(shape), after])


def _seq_standardize(context=None) -> cnf.Flow:
    x = torch.tensor([[1000.0, 0.001], [3000.0, 0.004], [2000.0, 0.002]], dtype=F64)
    block = cnf.CNFTransform(_mlp(2, (8,), context and "labels"), (2,), T=0.5)
    return cnf.SequentialFlow([cnf.Standardize.fit(x), block])


def _tabular(context=None) -> cnf.Flow:
    """The model of ``cnf train --data FILE``: Standardize fitted to rows, then a block (with a
    context column, standardized by the embedding)."""
    rows = torch.tensor([[10.0, 0.01, 5.0], [30.0, 0.04, 1.0], [20.0, 0.02, 3.0]], dtype=F64)
    c = torch.tensor([[100.0], [300.0], [250.0]], dtype=F64) if context else None
    model = build(SPECS["tabular", bool(context)])
    return fit_standardization(model, rows, names=["a", "b", "c"], context=c)


def _spec(name):
    return lambda context=None: build(SPECS[name, bool(context)])


def _table_rows(n):
    scale, shift = torch.tensor([10.0, 0.01, 2.0], dtype=F64), torch.tensor([20.0, 0.02, 3.0])
    return torch.randn(n, 3, dtype=F64) * scale + shift.to(F64)


def _big_small(n, big, small):
    return torch.randn(n, 2, dtype=F64) * torch.tensor(big, dtype=F64) + torch.tensor(
        small, dtype=F64
    )


# name -> (make model (context: None or the kind), make data, make contexts)
VARIANTS = {
    "cnf": (_spec("cnf"), lambda n: torch.randn(n, 2, dtype=F64), "vectors"),
    "blocks": (_spec("blocks"), lambda n: torch.randn(n, 2, dtype=F64), "labels"),
    "dense": (_spec("dense"), lambda n: torch.rand(n, 1, 8, 8, dtype=F64), "labels"),
    "multiscale": (_spec("multiscale"), lambda n: torch.rand(n, 1, 8, 8, dtype=F64), "labels"),
    "logit": (_seq_logit, lambda n: torch.rand(n, 1, 2, 2, dtype=F64), "vectors"),
    "squeeze": (_seq_squeeze, lambda n: torch.randn(n, 1, 2, 2, dtype=F64), "vectors"),
    "tabular": (_tabular, _table_rows, "column"),
    "standardize": (
        _seq_standardize,
        lambda n: _big_small(n, [1000.0, 0.001], [2000.0, 0.002]),
        "labels",
    ),
}
CONTEXTS = {
    "vectors": lambda n: torch.randn(n, 2, dtype=F64),
    "labels": lambda n: torch.arange(n) % 3,
    "column": lambda n: 200 + 100 * torch.randn(n, 1, dtype=F64),
}
_VECTORS, _LABELS = {"inputs": 2}, {"classes": 10, "features": 3}
SPECS = {
    ("cnf", False): toy_spec(hidden=[8, 8], dtype="float64"),
    ("cnf", True): toy_spec(hidden=[8, 8], dtype="float64", context={**_VECTORS, "hidden": [8]}),
    ("blocks", False): toy_spec(hidden=[8], blocks=2, dtype="float64"),
    ("blocks", True): toy_spec(hidden=[8], blocks=2, dtype="float64", context=_LABELS),
    ("tabular", False): tabular_spec(3, hidden=[8, 8], dtype="float64"),
    ("tabular", True): tabular_spec(3, hidden=[8, 8], dtype="float64", context={"inputs": 1}),
    **{
        ("dense", bool(c)): image_spec(
            "digits", "dense", hidden=[16], blocks=2, dtype="float64", context=c
        )
        for c in (None, _LABELS)
    },
    **{
        ("multiscale", bool(c)): image_spec(
            "digits",
            "multiscale",
            hidden_channels=[4],
            blocks_per_scale=1,
            dtype="float64",
            context=c,
        )
        for c in (None, _LABELS)
    },
}
CASES = [(name, conditional) for name in VARIANTS for conditional in (False, True)]
IDS = [f"{name}-{'context' if c else 'plain'}" for name, c in CASES]


def _model(name: str, conditional: bool, make=None) -> cnf.Flow:
    torch.manual_seed(0)
    kind = VARIANTS[name][2] if conditional else None
    model = (make or VARIANTS[name][0])(kind).to(F64)
    with torch.no_grad():  # move every field away from its initialisation: a generic case
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _context(name: str, conditional: bool, n: int) -> dict:
    """``{"context": ...}`` with one context per point for a conditional case, else ``{}``."""
    return {"context": CONTEXTS[VARIANTS[name][2]](n)} if conditional else {}


@pytest.mark.parametrize(("name", "conditional"), CASES, ids=IDS)
def test_shapes_inverse_and_sampling(name, conditional):
    model, x = _model(name, conditional), VARIANTS[name][1](5)
    given = _context(name, conditional, 5)
    shape = tuple(model.event_shape)
    z, logdet = model.transform(x, trace="exact", **given, **TIGHT)
    assert z.shape == (5, *model.transform.out_shape) and z.numel() == x.numel()
    assert logdet.shape == (5,) and z.dtype == F64
    out = model(x, trace="exact", **given, **TIGHT)
    assert isinstance(out, cnf.FlowOutput) and out.log_prob.shape == (5,)
    torch.testing.assert_close(out.log_prob, model.base.log_prob(z) + logdet)
    torch.testing.assert_close(model.inverse(z, **given, **TIGHT), x, rtol=0, atol=1e-7)
    one = {k: v[0] for k, v in _context(name, conditional, 20).items()}  # broadcast to all
    xs, lps = model.sample_with_log_prob((4, 5), trace="exact", **one, **TIGHT)
    assert xs.shape == (4, 5, *shape) and lps.shape == (4, 5)
    given = _context(name, conditional, 20)  # and one per sample
    xs, lps = model.sample_with_log_prob(20, trace="exact", **given, **TIGHT)
    keep = torch.ones(20, dtype=torch.bool)
    if any(isinstance(m, cnf.LogitTransform) for m in model.modules()):
        # the logit's inverse reaches slightly past [0, 1], where the density is not defined
        keep = ((xs >= 0) & (xs <= 1)).flatten(1).all(1)
        assert keep.sum() >= 3
    given = {k: v[keep] for k, v in given.items()}
    lp = model.log_prob(xs[keep], trace="exact", **given, **TIGHT)
    torch.testing.assert_close(lp, lps[keep], rtol=0, atol=1e-6)


# the image models at the smallest sizes their structure allows: D autograd passes each
SMALL = {
    "dense": (
        lambda context=None: cnf.DenseImageCNF(
            (1, 2, 2), hidden=(8,), blocks=2, alpha=0.05, context=context and _LABELS
        ),
        lambda n: torch.rand(n, 1, 2, 2, dtype=F64),
    ),
    "multiscale": (
        lambda context=None: cnf.MultiscaleCNF(
            (1, 4, 4),
            scales=2,
            blocks_per_scale=1,
            hidden_channels=(4,),
            alpha=0.05,
            context=context and _LABELS,
        ),
        lambda n: torch.rand(n, 1, 4, 4, dtype=F64),
    ),
}


@pytest.mark.parametrize(("name", "conditional"), CASES, ids=IDS)
def test_logdet_equals_slogdet_of_the_autograd_jacobian(name, conditional):
    make, data = SMALL.get(name, VARIANTS[name][:2])
    model, x = _model(name, conditional, make), data(2)
    given = _context(name, conditional, 2)
    _, logdet = model.transform(x, trace="exact", **given, **TIGHT)
    for i in range(len(x)):
        one = {k: v[i : i + 1] for k, v in given.items()}

        def flat(v, one=one):
            return model.transform(v.reshape(1, *x.shape[1:]), **one, **TIGHT)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, x[i].reshape(-1))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0
        # both sides carry the solver's error at 1e-9, relative to a log-det of up to ~8 here
        torch.testing.assert_close(logdet[i], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "conditional"), CASES, ids=IDS)
def test_gradients_reach_every_parameter(name, conditional):
    model, x = _model(name, conditional), VARIANTS[name][1](4)
    given = _context(name, conditional, 4)
    out = model.log_prob(x, generator=torch.Generator().manual_seed(0), **given)
    (-out.mean()).backward()
    params = dict(model.named_parameters())
    assert params, "every variant has parameters"
    for pname, p in params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), pname
        assert p.grad.abs().max() > 0, pname
        if pname.endswith("table.weight"):  # a label embedding: every label used gets one
            assert bool((p.grad[given["context"]].abs().sum(1) > 0).all()), pname


@pytest.mark.parametrize(("name", "conditional"), CASES, ids=IDS)
def test_save_and_load_round_trip(name, conditional, tmp_path):
    model, x = _model(name, conditional), VARIANTS[name][1](3)
    given = _context(name, conditional, 3)
    expected = model.log_prob(x, trace="exact", **given, **TIGHT).detach()
    path = tmp_path / "model.pt"
    spec = SPECS.get((name, conditional))
    if spec is not None:
        save_checkpoint(path, {"model": model.state_dict(), "iteration": 1, "spec": spec})
        loaded = load(path)
    else:  # a composition built in Python: load the weights into a freshly built one
        save_checkpoint(path, {"model": model.state_dict(), "iteration": 1})
        kind = VARIANTS[name][2] if conditional else None
        loaded = load(path, model=VARIANTS[name][0](kind).to(F64))
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x, trace="exact", **given, **TIGHT), expected)
