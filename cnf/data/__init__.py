"""Data sets for density estimation: 2-D toy distributions (:mod:`cnf.data.toy`)."""

from __future__ import annotations

import numpy as np
import torch

from .toy import DENSITY_NAMES, NAMES, ToyDensity, density, sample

__all__ = ["DENSITY_NAMES", "NAMES", "ToyDensity", "density", "sample", "sample_tensor"]


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
