"""Transforms: invertible maps with exact log-determinants, and the data-side bookkeeping.

* :mod:`cnf.transforms.core`: the :class:`Transform` protocol, :class:`Compose`,
  :class:`Reshape` and :class:`FlowOutput`;
* :mod:`cnf.transforms.image`: :class:`LogitTransform` and :class:`Squeeze`;
* :mod:`cnf.transforms.affine`: :class:`Standardize` (data in its own units);
* :mod:`cnf.transforms.quantize`: :func:`dequantize` and :func:`bits_per_dim`.

The CNF block (:class:`cnf.continuous.CNFTransform`) and the multiscale architecture
(:class:`cnf.multiscale.MultiscaleTransform`) are transforms too.
"""

from .affine import Standardize
from .core import Compose, FlowOutput, Reshape, Transform, check_points
from .image import LogitTransform, Squeeze, image_shape
from .quantize import bits_per_dim, dequantize

__all__ = [
    "Compose",
    "FlowOutput",
    "LogitTransform",
    "Reshape",
    "Squeeze",
    "Standardize",
    "Transform",
    "bits_per_dim",
    "check_points",
    "dequantize",
    "image_shape",
]
