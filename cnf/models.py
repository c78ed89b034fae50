"""Ready-made models, described by a plain dictionary (a *spec*) so checkpoints can rebuild them.

A spec holds only numbers, strings and lists, so it is stored inside a checkpoint and read back
with ``torch.load(..., weights_only=True)``; :func:`build` turns it into a model.
"""

from __future__ import annotations

from typing import Any

import torch

from .fields import ACTIVATIONS, ConcatSquashMLP
from .flow import CNF, Flow, SequentialFlow

__all__ = ["IMAGE_MODELS", "TOY_DEFAULTS", "build", "image_spec", "toy_spec"]

IMAGE_MODELS = ("digits", "mnist", "cifar10")
"""Image data sets with a ready-made multiscale model (:mod:`cnf.multiscale`)."""

TOY_DEFAULTS: dict[str, Any] = {
    "kind": "toy2d",
    "hidden": [64, 64, 64],
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


def image_spec(data: str, **options: Any) -> dict[str, Any]:
    """The multiscale model for an image data set, with :class:`cnf.MultiscaleCNF` overrides.

    ``options`` may set any argument of :class:`cnf.multiscale.MultiscaleCNF` (lists for
    sequences) plus ``dtype``; they are checked by building the model once.
    """
    if data not in IMAGE_MODELS:
        raise ValueError(f"unknown image data {data!r}; choose one of {IMAGE_MODELS}")
    spec = {"kind": "image", "data": data, "options": dict(options)}
    build(spec)  # validate now, not when a checkpoint is read back
    return spec


def _build_image(spec: dict[str, Any]) -> Flow:
    from . import multiscale

    options = dict(spec.get("options", {}))
    dtype = options.pop("dtype", "float32")
    if "hidden_channels" in options:
        options["hidden_channels"] = tuple(int(c) for c in options["hidden_channels"])
    make = {
        "digits": multiscale.digits_model,
        "mnist": multiscale.mnist_model,
        "cifar10": multiscale.cifar10_model,
    }[spec["data"]]
    return make(**options).to(getattr(torch, dtype))


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
