"""Ready-made models, described by a plain dictionary (a *spec*) so checkpoints can rebuild them.

A spec holds only numbers, strings and lists, so it is stored inside a checkpoint and read back
with ``torch.load(..., weights_only=True)``; :func:`build` turns it into a model.
"""

from __future__ import annotations

from copy import deepcopy
from types import MappingProxyType
from typing import Any

import torch

from .fields import ACTIVATIONS, ConcatSquashMLP
from .flow import CNF, Flow, SequentialFlow

__all__ = [
    "ARCHITECTURES",
    "IMAGE_MODELS",
    "TOY_DEFAULTS",
    "build",
    "image_spec",
    "toy_spec",
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
    }
)
"""The 2-D model of the main job: FFJORD's toy architecture (ConcatSquash 64-64-64, tanh)."""


def toy_spec(**changes: Any) -> dict[str, Any]:
    """:data:`TOY_DEFAULTS` with ``changes``; unknown keys are a ``ValueError``."""
    unknown = set(changes) - set(TOY_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown model setting(s) {sorted(unknown)}; valid: {sorted(TOY_DEFAULTS)}"
        )
    spec = {**TOY_DEFAULTS, **changes}
    spec["hidden"] = [int(h) for h in spec["hidden"]]
    if spec["activation"] not in ACTIVATIONS:
        raise ValueError(f"unknown activation {spec['activation']!r}; choose one of {ACTIVATIONS}")
    if spec["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {spec['dtype']!r}")
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
    """Build the (untrained) model a spec describes."""
    kind = spec.get("kind")
    if kind == "image":
        return _build_image(spec)
    if kind != "toy2d":
        raise ValueError(f"unknown model kind {kind!r}; this version builds 'toy2d' and 'image'")
    spec = toy_spec(**{k: v for k, v in spec.items() if k != "kind"})
    blocks = [
        CNF(
            ConcatSquashMLP(2, hidden=spec["hidden"], activation=spec["activation"]),
            (2,),
            T=spec["T"],
            train_T=spec["train_T"],
            trace=spec["trace"],
            method=spec["method"],
            rtol=spec["rtol"],
            atol=spec["atol"],
        )
        for _ in range(int(spec["blocks"]))
    ]
    model = blocks[0] if len(blocks) == 1 else SequentialFlow(blocks)
    return model.to(getattr(torch, spec["dtype"]))
