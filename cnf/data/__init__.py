"""Data sets for density estimation: 2-D toy distributions (:mod:`cnf.data.toy`), 2-D
conditional distributions with a known density (:mod:`cnf.data.conditional`), images
(:mod:`cnf.data.images`: scikit-learn's 8x8 digits, MNIST and CIFAR-10 from local files) and
tables: a user's own files (:mod:`cnf.data.files`), the tabular benchmarks of MAF and FFJORD
(:mod:`cnf.data.benchmarks`, from MAF's local files) and tables that install with cnf
(:mod:`cnf.data.bundled`: image patches, breast-cancer features and a synthetic set with a
known density), all as :class:`TabularData` (:mod:`cnf.data.tables`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .benchmarks import (
    BENCHMARK_FILES,
    BENCHMARK_NAMES,
    PUBLISHED_SHAPES,
    load_benchmark,
    load_bsds300,
    load_gas,
    load_hepmass,
    load_miniboone,
    load_power,
)
from .bundled import (
    BUNDLED_NAMES,
    load_breast_cancer,
    load_bundled,
    load_patches,
    load_synthetic,
    sample_synthetic,
    synthetic_entropy,
    synthetic_log_prob,
    synthetic_scales,
)
from .conditional import (
    CONDITIONAL_NAMES,
    ConditionalDensity,
    conditional_density,
    conditional_sampler,
    sample_conditional,
)
from .files import FILE_SUFFIXES, Table, load_file, read_table
from .images import (
    IMAGE_NAMES,
    ImageData,
    load_cifar10,
    load_digits,
    load_images,
    load_mnist,
)
from .tables import PARTS, TabularData, split_rows
from .toy import DENSITY_NAMES, NAMES, ToyDensity, density, sample

__all__ = [
    "BENCHMARK_FILES",
    "BENCHMARK_NAMES",
    "PUBLISHED_SHAPES",
    "load_benchmark",
    "load_bsds300",
    "load_gas",
    "load_hepmass",
    "load_miniboone",
    "load_power",
    "BUNDLED_NAMES",
    "load_breast_cancer",
    "load_bundled",
    "load_patches",
    "load_synthetic",
    "sample_synthetic",
    "synthetic_entropy",
    "synthetic_log_prob",
    "synthetic_scales",
    "CONDITIONAL_NAMES",
    "ConditionalDensity",
    "conditional_density",
    "conditional_sampler",
    "sample_conditional",
    "IMAGE_NAMES",
    "ImageData",
    "load_cifar10",
    "load_digits",
    "load_images",
    "load_mnist",
    "FILE_SUFFIXES",
    "PARTS",
    "Table",
    "TabularData",
    "load_file",
    "read_table",
    "split_rows",
    "DENSITY_NAMES",
    "NAMES",
    "ToyDensity",
    "density",
    "sample",
    "sample_tensor",
    "toy_sampler",
]


def sample_tensor(
    name: str,
    n: int,
    seed: int | np.random.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` points of a toy data set as a tensor; :func:`sample` converted for torch.

    Args:
        name, n, seed: as for :func:`cnf.data.toy.sample`.
        dtype: the tensor's dtype; None means ``torch.get_default_dtype()``.
        device: where to put the tensor; None means the CPU.

    Returns:
        Points of shape ``(n, 2)``.
    """
    points = sample(name, n, seed)
    return torch.as_tensor(points, dtype=dtype or torch.get_default_dtype(), device=device)


def toy_sampler(name: str) -> Callable[[int, torch.Generator], torch.Tensor]:
    """A sampler of fresh batches for :func:`cnf.training.fit`: ``sampler(n, generator)``.

    Each call draws ``n`` new points of the toy data set ``name`` (float64 numpy draws seeded
    from ``generator``, returned as a float64 tensor; ``fit`` moves them to the model).
    """
    sample(name, 1, 0)  # validate the name now, not at the first batch

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return sample_tensor(name, n, seed, dtype=torch.float64)

    return sampler
