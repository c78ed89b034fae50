"""Ready-made models, described by a plain dictionary (a *spec*) so checkpoints can rebuild them.

A spec holds only numbers, strings and lists, so it is stored inside a checkpoint and read back
with ``torch.load(..., weights_only=True)``; :func:`build` turns it into a model. Three kinds:
``"toy2d"`` (the 2-D model of the main job), ``"tabular"`` (the same ConcatSquash field on
``D`` columns, after a :class:`~cnf.transforms.Standardize` step fitted to the training rows by
:func:`fit_standardization`) and ``"image"`` (:mod:`cnf.dense`, :mod:`cnf.multiscale`).
"""

from __future__ import annotations

from copy import deepcopy
from types import MappingProxyType
from typing import Any

import torch

from .context import ContextEmbedding, conditional_field, context_spec
from .fields import ACTIVATIONS, ConcatSquashMLP
from .flow import CNF, Flow, SequentialFlow
from .transforms import Standardize

__all__ = [
    "ARCHITECTURES",
    "IMAGE_MODELS",
    "TABULAR_DEFAULTS",
    "TOY_DEFAULTS",
    "build",
    "exact_trace_affordable",
    "fit_standardization",
    "image_spec",
    "settings_of",
    "tabular_spec",
    "toy_spec",
    "trace_reason",
]

IMAGE_MODELS = ("digits", "mnist", "cifar10")
"""Image data sets with ready-made models (:mod:`cnf.dense`, :mod:`cnf.multiscale`)."""

ARCHITECTURES = ("dense", "multiscale")
"""Image model families: a dense MLP field on the flattened image (:class:`cnf.DenseImageCNF`)
or FFJORD's multiscale conv model (:class:`cnf.MultiscaleCNF`)."""

TOY_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "kind": "toy2d",
        "hidden": (64, 64, 64),
        "activation": "tanh",
        "blocks": 1,
        "T": 0.5,
        "train_T": True,
        "trace": "exact",
        "method": "dopri5",
        "rtol": 1e-4,
        "atol": 1e-4,
        "dtype": "float32",
        "context": None,
    }
)
"""The 2-D model of the main job: FFJORD's toy architecture (ConcatSquash 64-64-64, tanh).
``context`` makes it conditional: the keywords of :class:`cnf.context.ContextEmbedding`
(:func:`cnf.context.context_spec`), e.g. ``{"inputs": 1, "hidden": [32]}``."""


TABULAR_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        **TOY_DEFAULTS,
        "kind": "tabular",
        "dim": None,
        "hidden": (64, 64),
        "activation": "softplus",
        "T": 1.0,
        "trace": "auto",
        "rtol": 1e-5,
        "atol": 1e-5,
        "standardize": True,
    }
)
"""The model of tabular data (``dim`` columns): a Standardize step (``standardize``), then
``blocks`` CNF blocks of a ConcatSquash MLP. ``trace="auto"`` resolves to the exact trace where
:func:`exact_trace_affordable`, else Hutchinson's."""


def exact_trace_affordable(dim: int, hidden) -> bool:
    """Whether the exact divergence of a ConcatSquash MLP field costs about what Hutchinson's
    one-probe estimate does, so that the exact trace is the better default.

    The field's analytic trace (:meth:`cnf.fields.ConcatSquashMLP.forward_with_divergence`) of
    one or two hidden layers is a bilinear form in the activation slopes, no dearer than the
    vector-Jacobian product of Hutchinson's estimate: measured on one thread (batch 1000,
    forward and backward, widths 10 D), 0.75-0.93 of Hutchinson's time at D = 2 to 256. With
    three or more hidden layers it carries a D x D product per sample: 2.7x Hutchinson's at
    D = 8, 12x at D = 21, 37x at D = 63; it stays the default for 2-D data (the main job)
    and up to D = 4.
    """
    return len(tuple(hidden)) <= 2 or int(dim) <= 4


def trace_reason(dim: int, hidden) -> str:
    """Why ``trace="auto"`` chose what it chose for a field of ``hidden`` layers on ``dim``
    columns (:func:`exact_trace_affordable`), in a few words for messages."""
    layers = len(tuple(hidden))
    if exact_trace_affordable(dim, hidden):
        return f"the analytic trace of {layers} layers costs no more than Hutchinson's"
    return f"an exact trace of {layers} layers costs a D x D product per row at D = {dim}"


def toy_spec(**changes: Any) -> dict[str, Any]:
    """:data:`TOY_DEFAULTS` with ``changes``; unknown keys are a ``ValueError``."""
    return _vector_spec(TOY_DEFAULTS, changes)


def tabular_spec(
    dim: int,
    *,
    hidden_factor: int | None = None,
    layers: int = 2,
    width_range: tuple[int, int] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """:data:`TABULAR_DEFAULTS` for ``dim`` columns with ``changes``.

    Args:
        dim: the number of columns ``D``.
        hidden_factor: ``layers`` hidden layers of ``hidden_factor * D`` units each (FFJORD's
            ``hdim_factor`` and ``nhidden``), unless ``hidden`` is given.
        layers: hidden layers of the ``hidden_factor`` rule.
        width_range: ``(least, most)`` units per layer of that rule (None: no bounds).
        changes: other settings of :data:`TABULAR_DEFAULTS` (None keeps the default);
            ``trace="auto"`` resolves to ``"exact"`` or ``"hutchinson"``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1 (the data's columns), got {dim!r}")
    changes = {k: v for k, v in changes.items() if v is not None}
    if hidden_factor is not None and "hidden" not in changes:
        width = int(hidden_factor) * dim
        if width_range is not None:
            width = min(max(width, int(width_range[0])), int(width_range[1]))
        changes["hidden"] = [width] * int(layers)
    spec = _vector_spec(TABULAR_DEFAULTS, {**changes, "dim": dim})
    if spec["trace"] == "auto":
        spec["trace"] = "exact" if exact_trace_affordable(dim, spec["hidden"]) else "hutchinson"
    spec["standardize"] = bool(spec["standardize"])
    return spec


def settings_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The model settings of a spec: the spec itself for vector data, its options for images."""
    return spec.get("options", {}) if spec.get("kind") == "image" else spec


def _vector_spec(defaults, changes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changes) - set(defaults)
    if unknown:
        raise ValueError(f"unknown model setting(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    spec = {**defaults, **changes}
    spec["hidden"] = [int(h) for h in spec["hidden"]]
    if spec["activation"] not in ACTIVATIONS:
        raise ValueError(f"unknown activation {spec['activation']!r}; choose one of {ACTIVATIONS}")
    if spec["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {spec['dtype']!r}")
    if spec["context"] is not None:
        spec["context"] = context_spec(**spec["context"])
    return spec


def image_spec(data: str, architecture: str | None = None, **options: Any) -> dict[str, Any]:
    """The ready-made model for an image data set, with overrides.

    Args:
        data: one of :data:`IMAGE_MODELS`.
        architecture: ``"dense"`` or ``"multiscale"``; None: the default of the data set's
            recipe (:func:`cnf.recipes.get`): dense for the digits, multiscale for MNIST and
            CIFAR-10.
        options: any argument of :class:`cnf.DenseImageCNF` or :class:`cnf.MultiscaleCNF`
            (lists for sequences) plus ``dtype``; they are checked by building the model once.
    """
    if data not in IMAGE_MODELS:
        raise ValueError(f"unknown image data {data!r}; choose one of {IMAGE_MODELS}")
    if architecture is None:
        from .recipes import get

        architecture = get(data).architecture
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if data == "digits" and architecture == "dense":
        from .dense import DIGITS_DENSE

        # resolved, not only the overrides: a checkpoint must rebuild after a default changes
        options = {**DIGITS_DENSE, **options}
    # a copy: the spec must not share lists with the module's defaults or the caller
    options = deepcopy(options)
    if options.get("context") is not None:  # resolved, like the rest
        options["context"] = context_spec(**options["context"])
    spec = {"kind": "image", "data": data, "architecture": architecture, "options": options}
    build(spec)  # validate now, not when a checkpoint is read back
    return spec


def _build_image(spec: dict[str, Any]) -> Flow:
    from . import dense, multiscale

    options = dict(spec.get("options", {}))
    dtype = options.pop("dtype", "float32")
    for key in ("hidden_channels", "hidden"):
        if key in options:
            options[key] = tuple(int(c) for c in options[key])
    # specs written before dense models existed have no architecture: they are multiscale
    architecture = spec.get("architecture", "multiscale")
    if architecture == "dense":
        from .recipes import get

        if spec["data"] == "digits":
            model = dense.digits_dense_model(**options)
        else:
            model = dense.DenseImageCNF(get(spec["data"], "dense").event_shape, **options)
    else:
        make = {
            "digits": multiscale.digits_model,
            "mnist": multiscale.mnist_model,
            "cifar10": multiscale.cifar10_model,
        }[spec["data"]]
        model = make(**options)
    return model.to(getattr(torch, dtype))


def build(spec: dict[str, Any]) -> Flow:
    """Build the (untrained) model a spec describes; a tabular model's Standardize step is the
    identity until :func:`fit_standardization` (or a checkpoint's weights) sets it.

    The model keeps a copy of the spec as ``model.spec``; :func:`cnf.training.fit` stores it in
    its checkpoints, so that :func:`cnf.training.load` rebuilds the model from the file alone.
    """
    model = _build(spec)
    model.spec = deepcopy(dict(spec))
    return model


def _build(spec: dict[str, Any]) -> Flow:
    kind = spec.get("kind")
    if kind == "image":
        return _build_image(spec)
    if kind == "tabular":
        spec = tabular_spec(**{k: v for k, v in spec.items() if k != "kind"})
    elif kind == "toy2d":
        spec = toy_spec(**{k: v for k, v in spec.items() if k != "kind"})
    else:
        raise ValueError(
            f"unknown model kind {kind!r}; this version builds 'toy2d', 'tabular' and 'image'"
        )
    dim = spec.get("dim", 2)

    def make(c: int) -> ConcatSquashMLP:
        return ConcatSquashMLP(dim, spec["hidden"], spec["activation"], context_features=c)

    blocks = [
        CNF(
            conditional_field(make, spec["context"]),
            (dim,),
            T=spec["T"],
            train_T=spec["train_T"],
            trace=spec["trace"],
            method=spec["method"],
            rtol=spec["rtol"],
            atol=spec["atol"],
        )
        for _ in range(int(spec["blocks"]))
    ]
    if spec.get("standardize"):
        model = SequentialFlow([Standardize((dim,)), *blocks])
    else:
        model = blocks[0] if len(blocks) == 1 else SequentialFlow(blocks)
    return model.to(getattr(torch, spec["dtype"]))


def fit_standardization(model: Flow, x, names=None, context=None) -> Flow:
    """Set the :class:`~cnf.transforms.Standardize` steps of ``model`` to standardize ``x``
    ``(n, *event_shape)`` (the training part: its mean and standard deviation, see
    :meth:`~cnf.transforms.Standardize.fit`), and the context embeddings' standardization to
    the training ``context`` ``(n, C)`` when given (:meth:`cnf.context.ContextEmbedding.fit`);
    a model without either is returned unchanged. ``names`` name the columns in the errors
    (a constant column)."""
    for step in model.modules():
        if isinstance(step, Standardize):
            fitted = Standardize.fit(torch.as_tensor(x, dtype=torch.float64), names=names)
            step.mean.copy_(fitted.mean)
            step.scale.copy_(fitted.scale)
        elif isinstance(step, ContextEmbedding) and context is not None:
            step.fit(torch.as_tensor(context))
    return model
