r"""Tabular data sets that install with cnf: nothing is downloaded, ever.

=============  =========  =========================  ============================================
name           columns    rows (train/val/test)      source
=============  =========  =========================  ============================================
patches        63         40000 / 4000 / 10000       8x8 grey patches of scikit-learn's two sample
                                                     photographs, preprocessed like BSDS300
breast-cancer  30         455 / 57 / 57              scikit-learn's Wisconsin breast-cancer
                                                     features, a seeded 80/10/10 split
synthetic8     8          20000 / 2000 / 10000       a known density with a closed-form entropy
=============  =========  =========================  ============================================

The first two need the optional scikit-learn (``pip install scikit-learn``, or the ``images``
extra), whose sample photographs also need pillow (installed with matplotlib); the synthetic set
needs nothing. Every set is a :class:`~cnf.data.tables.TabularData` fixed by its ``seed``.

**patches** follows the BSDS300 set of the MAF paper (Papamakarios, Pavlakou & Murray, "Masked
Autoregressive Flow for Density Estimation", NeurIPS 2017, appendix on the data sets), which
made its patches the way RNADE did (Uria, Murray & Larochelle, NeurIPS 2013): monochrome 8x8
patches of natural photographs, dequantized by adding uniform noise in [0, 1) to the integer
grey levels, rescaled to [0, 1] (here by dividing by 256), the patch's mean subtracted, and the
bottom-right pixel discarded because the mean subtraction makes it minus the sum of the other 63
(the MAF code, ``datasets/bsds300.py`` of github.com/gpapamak/maf, rebuilds it exactly so). Two
things differ, because the photographs differ: BSDS300 had 200 training and 100 test images;
here there are two photographs (``china.jpg``, ``flower.jpg``, 427x640 RGB), so the split is by
*region*: each photograph is cut into vertical bands, the left 80 % of its width for training,
the next 10 % for validation and the right 10 % for testing, and a patch lies wholly inside one
band, so no test patch shares a pixel with a training or validation patch. The grey conversion
is ITU-R BT.601 luma, ``0.299 R + 0.587 G + 0.114 B``, rounded to integer levels (as PIL's
``convert("L")`` and MATLAB's ``rgb2gray`` do), so that there is something to dequantize.

**breast-cancer** is the data as scikit-learn ships it, untransformed: several columns are
strongly right-skewed (skewness above 3 for ``area error``, ``concavity error``, ``fractal
dimension error``, ``perimeter error``, ``radius error``), and the six concavity and
concave-points columns are exactly 0 in the same 13 rows, an atom of probability that a
flexible density can grow onto (NLL without a floor); the model's own standardization step
copes with the scales, and the NLL stays in the data's units.

**synthetic8**: see :func:`sample_synthetic`; its :attr:`~cnf.data.tables.TabularData.entropy`
is exact and :func:`synthetic_log_prob` is its exact log-density, so a model's test NLL has a
known floor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .optional import sklearn_datasets
from .tables import PARTS, TabularData, split_rows

__all__ = [
    "BUNDLED_NAMES",
    "load_breast_cancer",
    "load_bundled",
    "load_patches",
    "load_synthetic",
    "sample_synthetic",
    "synthetic_entropy",
    "synthetic_log_prob",
    "synthetic_scales",
]

BUNDLED_NAMES = ("patches", "breast-cancer", "synthetic8")
"""The names :func:`load_bundled` knows."""

PATCH = 8
LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B: the grey level of a colour pixel."""
BANDS = (0.8, 0.1, 0.1)
"""The shares of each photograph's width (left to right) given to train, val and test."""
PATCH_SIZES = (40_000, 4_000, 10_000)
SYNTHETIC_SIZES = (20_000, 2_000, 10_000)


def _check_sizes(n: Sequence[int], what: str) -> tuple[int, int, int]:
    sizes = tuple(int(k) for k in n)
    if len(sizes) != 3 or min(sizes) < 1 or sizes[0] < 2:
        raise ValueError(
            f"{what}: n must give the (train, val, test) rows, at least (2, 1, 1), got {n}"
        )
    return sizes


# ---------------------------------------------------------------------------------------------
# patches


@functools.lru_cache(maxsize=1)
def _grey_photographs() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photographs as integer grey levels, each ``(427, 640)`` uint8.

    In scikit-learn's order (``china.jpg``, ``flower.jpg``); read-only, because they are cached
    (reading the JPEGs is the slow part of :func:`load_patches`).
    """
    datasets = sklearn_datasets("patches")
    try:
        photographs = datasets.load_sample_images().images
    except ImportError as err:  # scikit-learn reads the JPEGs with pillow
        raise ImportError(
            f"scikit-learn's sample photographs need pillow: pip install pillow ({err})"
        ) from err
    grey = []
    for rgb in photographs:
        levels = np.rint(np.asarray(rgb, dtype=np.float64) @ np.asarray(LUMA))
        image = np.clip(levels, 0, 255).astype(np.uint8)
        image.setflags(write=False)
        grey.append(image)
    return tuple(grey)


def _band_columns(width: int) -> dict[str, tuple[int, int]]:
    """The columns ``[lo, hi)`` of each part's vertical band of an image ``width`` wide."""
    cuts = np.rint(np.cumsum((0.0, *BANDS)) * width).astype(int)
    return {part: (int(cuts[i]), int(cuts[i + 1])) for i, part in enumerate(PARTS)}


def _patch_origins(
    shapes: Sequence[tuple[int, int]], n: Sequence[int], seed: int
) -> dict[str, np.ndarray]:
    """Where the patches of each part start: ``{part: (m, 3) int64}`` rows of (image, row, col).

    A part's ``m`` patches are shared out over the images as evenly as possible (the first
    images take the remainder). Within an image, the origins are drawn without replacement from
    every position whose 8x8 patch lies wholly inside the part's band (:data:`BANDS`), so
    patches of one part may overlap one another but never those of another part. Each part has
    its own random stream, ``default_rng([seed, part])``, so the test patches do not change
    when more training patches are asked for.

    Raises:
        ValueError: a part asks for more patches than its bands have positions.
    """
    origins = {}
    for index, (part, count) in enumerate(zip(PARTS, n)):
        rng = np.random.default_rng([seed, index])
        per_image = np.full(len(shapes), count // len(shapes))
        per_image[: count % len(shapes)] += 1
        rows = []
        for image, ((height, width), m) in enumerate(zip(shapes, per_image)):
            lo, hi = _band_columns(width)[part]
            n_rows, n_cols = height - PATCH + 1, hi - lo - PATCH + 1
            if m > n_rows * n_cols:
                raise ValueError(
                    f"patches: the {part} band of image {image} has {n_rows * n_cols} patch "
                    f"positions; {m} were asked for"
                )
            flat = rng.choice(n_rows * n_cols, size=m, replace=False)
            rows.append(np.stack([np.full(m, image), flat // n_cols, lo + flat % n_cols], 1))
        origins[part] = np.concatenate(rows).astype(np.int64)
    return origins


def _cut_patches(
    grey: Sequence[np.ndarray], origins: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The preprocessed patches at ``origins`` ``(m, 3)``: ``(m, 63)`` float64.

    Each patch's 64 integer levels ``v`` become ``(v + u) / 256`` with fresh ``u ~ U[0, 1)``
    per pixel and patch (so overlapping patches do not share noise), minus the patch's mean;
    the last pixel (bottom right, row-major order) is dropped.
    """
    offsets = np.arange(PATCH)
    stack = np.stack(grey)  # the photographs share one shape, so one fancy index cuts them all
    rows = origins[:, 1, None, None] + offsets[None, :, None]
    cols = origins[:, 2, None, None] + offsets[None, None, :]
    levels = stack[origins[:, 0, None, None], rows, cols].reshape(len(origins), PATCH * PATCH)
    values = (levels + rng.random(levels.shape)) / 256.0
    values -= values.mean(axis=1, keepdims=True)
    return values[:, :-1]


def _patch_parts(
    seed: int, n: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The parts of :func:`load_patches` and their origins (as :func:`_patch_origins`)."""
    grey = _grey_photographs()
    origins = _patch_origins([image.shape for image in grey], n, seed)
    # the noise streams are apart from the position streams: [seed, part, 1] vs [seed, part]
    parts = {
        part: _cut_patches(grey, origins[part], np.random.default_rng([seed, index, 1]))
        for index, part in enumerate(PARTS)
    }
    return parts, origins


def load_patches(seed: int = 0, n: Sequence[int] = PATCH_SIZES) -> TabularData:
    """Natural-image patches made like BSDS300's (see the module's notes), ``(m, 63)``.

    Each row is an 8x8 grey patch of ``china.jpg`` or ``flower.jpg``, dequantized, rescaled to
    [0, 1], with its mean subtracted and its bottom-right pixel dropped (that pixel is minus the
    sum of the 63 kept); values lie in about (-1, 1). Columns ``r0c0 ... r7c6`` name each pixel
    by row and column. Training patches come from the left 80 % of each photograph, validation
    from the next 10 %, test from the right 10 %; no two parts share a pixel.

    The default sizes: 40,000 training patches (about a tenth of the 424,200 positions in the
    training bands, enough to fit a 63-D flow without running out of data, small enough that an
    epoch is affordable on a CPU; more would mostly resample the same two photographs),
    4,000 for validation (early stopping) and 10,000 for testing, drawn from the 47,880
    positions of the test bands, so test patches overlap one another: the standard error of a
    test NLL computed as if they were independent is too small.

    Args:
        seed: the patch positions and the dequantization noise; the same seed gives the same
            arrays, bit for bit.
        n: the (train, val, test) numbers of patches.

    Returns:
        A :class:`~cnf.data.tables.TabularData` named ``"patches"`` with ``entropy`` None.

    Raises:
        ImportError: scikit-learn (or pillow) is not installed.
        ValueError: a part asks for more patches than its bands have positions.
    """
    sizes = _check_sizes(n, "patches")
    parts, _ = _patch_parts(int(seed), sizes)
    columns = [f"r{k // PATCH}c{k % PATCH}" for k in range(PATCH * PATCH - 1)]
    return TabularData(
        "patches",
        parts,
        columns=columns,
        source="8x8 grey patches of scikit-learn's china.jpg and flower.jpg, BSDS300-style",
    )


# ---------------------------------------------------------------------------------------------
# breast cancer


def load_breast_cancer(seed: int = 0) -> TabularData:
    """scikit-learn's Wisconsin diagnostic breast-cancer features: 569 rows of 30 columns.

    The rows, untransformed (the module's notes say which columns are skewed and which hold
    exact zeros), split 80/10/10 by :func:`~cnf.data.tables.split_rows` with ``seed``: 455
    training, 57 validation and 57 test rows. The columns are scikit-learn's feature names
    (``mean radius``, ..., ``worst fractal dimension``); the diagnosis is not a column.

    Returns:
        A :class:`~cnf.data.tables.TabularData` named ``"breast-cancer"``.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    bunch = sklearn_datasets("breast-cancer").load_breast_cancer()
    rows = np.asarray(bunch.data, dtype=np.float64)
    index = split_rows(len(rows), int(seed))
    return TabularData(
        "breast-cancer",
        {part: rows[index[part]] for part in PARTS},
        columns=[str(name) for name in bunch.feature_names],
        source="scikit-learn's Wisconsin diagnostic breast-cancer features",
    )


# ---------------------------------------------------------------------------------------------
# synthetic


def synthetic_scales(dim: int = 8) -> np.ndarray:
    """The standard deviations of the latent Gaussian: ``dim`` values from 1 down to 0.25,
    spaced geometrically, ``(dim,)``."""
    if dim < 2:
        raise ValueError(f"the synthetic set needs dim >= 2, got {dim}")
    return np.geomspace(1.0, 0.25, dim)


def synthetic_entropy(dim: int = 8) -> float:
    r"""The exact differential entropy of the synthetic set in nats: the latent Gaussian's,
    :math:`\sum_k \tfrac12 \log(2\pi e\,\sigma_k^2)`, since the map keeps volume."""
    scales = synthetic_scales(dim)
    return float(np.sum(0.5 * np.log(2 * math.pi * math.e * scales**2)))


def _synthetic_shift(x: Tensor) -> Tensor:
    """The shift ``m(x)`` of the map ``x = z + m(x)``, ``(n, D)``: column ``k`` depends on
    columns before ``k`` only, so the map is triangular with a unit diagonal (log-det 0)."""
    first = torch.zeros_like(x[:, :1])
    # a smoothed step in x_0 moves x_1 by about +-2: two modes, where z_1 has sigma 0.82
    step = 2.0 * torch.tanh(4.0 * x[:, :1])
    # each later coordinate bends along a sine of the one before: curved, narrow ridges
    bend = torch.sin(2.0 * x[:, 1:-1])
    return torch.cat([first, step, bend], dim=1)


def sample_synthetic(
    n: int, seed: int | Sequence[int] | np.random.Generator = 0, dim: int = 8
) -> np.ndarray:
    r"""Draws of the synthetic density, ``(n, dim)`` float64.

    With :math:`z_k \sim N(0, \sigma_k^2)` independent (:func:`synthetic_scales`),

    .. math::
        x_0 = z_0, \quad x_1 = z_1 + 2 \tanh(4 x_0), \quad
        x_k = z_k + \sin(2 x_{k-1}) \ (k \ge 2).

    Each :math:`x_k` is :math:`z_k` plus a function of earlier coordinates, so the Jacobian
    :math:`\partial x / \partial z` is lower triangular with ones on its diagonal: the density
    is :math:`p(x) = \prod_k N(z_k(x); 0, \sigma_k^2)` and the entropy the Gaussian's, while
    :math:`x_1` is bimodal and the later pairs are curved.

    Args:
        n: rows.
        seed: anything ``numpy.random.default_rng`` takes.
        dim: columns, at least 2.
    """
    scales = synthetic_scales(dim)
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, dim)) * scales)
    x = z
    # the shift of column k needs columns < k only, so after k passes columns 0..k are final
    for _ in range(dim - 1):
        x = z + _synthetic_shift(x)
    return x.numpy()


def synthetic_log_prob(x: Tensor | np.ndarray) -> Tensor:
    """The exact log-density of the synthetic set at ``x`` ``(n, D)``: a float64 ``(n,)``.

    ``z = x - m(x)`` inverts the map in one step, ``m`` reading ``x``, which is given; the
    log-det is 0. Works for any ``D >= 2`` (the set's ``dim``) and is differentiable in ``x``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"x must be (n, D) with D >= 2, got shape {tuple(x.shape)}")
    scales = torch.as_tensor(synthetic_scales(x.shape[1]), dtype=torch.float64)
    z = (x - _synthetic_shift(x)) / scales
    return (-0.5 * z**2 - torch.log(scales) - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def load_synthetic(seed: int = 0, n: Sequence[int] = SYNTHETIC_SIZES, dim: int = 8) -> TabularData:
    """The synthetic set of :func:`sample_synthetic`, fresh draws per part, named ``synthetic8``
    (``synthetic{dim}``).

    The default sizes: 20,000 training rows (plenty for an 8-D flow, and an epoch that takes
    seconds on a CPU), 2,000 validation rows (for early stopping) and 10,000 test rows, so that
    the standard error of a test NLL is about 0.02 nats (the log-density's standard deviation is
    about 2 nats in 8 dimensions): small next to the gaps to the entropy worth reporting.

    Args:
        seed: part ``i`` (train, val, test) is drawn with ``default_rng([seed, i])``.
        n: the (train, val, test) rows.
        dim: the columns ``x0 ... x{dim-1}``, at least 2.

    Returns:
        A :class:`~cnf.data.tables.TabularData` whose ``entropy`` is :func:`synthetic_entropy`.
    """
    sizes = _check_sizes(n, "synthetic")
    parts = {
        part: sample_synthetic(count, [int(seed), index], dim)
        for index, (part, count) in enumerate(zip(PARTS, sizes))
    }
    return TabularData(
        f"synthetic{dim}",
        parts,
        entropy=synthetic_entropy(dim),
        source="a Gaussian through a volume-preserving triangular map (exact density)",
    )


def load_bundled(name: str, seed: int = 0) -> TabularData:
    """One of :data:`BUNDLED_NAMES` with its default sizes, split by ``seed``.

    Raises:
        ValueError: an unknown name.
        ImportError: ``patches`` or ``breast-cancer`` without scikit-learn.
    """
    loaders = {
        "patches": load_patches,
        "breast-cancer": load_breast_cancer,
        "synthetic8": load_synthetic,
    }
    if name not in loaders:
        raise ValueError(f"unknown bundled data set {name!r}; choose one of {list(BUNDLED_NAMES)}")
    return loaders[name](seed=seed)
