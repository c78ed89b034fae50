r"""Dequantization of integer data and bits per dimension.

Bits per dimension (FFJORD's ``compute_bits_per_dim``, Theis et al. 2016). Integer data
:math:`x \in \{0, \dots, k-1\}^D` are dequantized to :math:`v = (x + u) / k \in [0, 1)^D`,
:math:`u \sim U[0, 1)^D`, and a continuous model :math:`p` is fit to :math:`v`. On the integer
scale, :math:`y = x + u = k v` has the density :math:`p(y / k)\, k^{-D}`, and since every cell
:math:`x + [0, 1)^D` has volume 1, Jensen's inequality gives

.. math::

    \log P(x) = \log \int_{[0,1)^D} p\!\left(\tfrac{x + u}{k}\right) k^{-D} du
    \ \ge\ E_u\!\left[\log p(v)\right] - D \log k ,

so the bits/dim reported,

.. math::

    \mathrm{bpd} = -\frac{\log p(v) - D \log k}{D \log 2}
    = \log_2 k - \frac{\log p(v)}{D \log 2},

averaged over data and dequantization draws, is an upper bound on the discrete data's negative
log-likelihood in bits per dimension. Here :math:`\log p(v)` is the log-density of the model on
the ``[0, 1)`` scale, every transform's log-determinant (logit, squeeze, CNF blocks) included:
exactly what :meth:`cnf.flow.Flow.log_prob` returns for the dequantized data. A model uniform on
``[0, 1)^D`` (:math:`\log p = 0`) scores :math:`\log_2 k`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .core import check_event_shape

__all__ = ["bits_per_dim", "dequantize"]


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2 (e.g. 256 for 8-bit images), got {levels!r}")
    return levels


def dequantize(
    x: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Uniform dequantization of integer levels into ``[0, 1)``: :math:`v = (x + u) / k`.

    With :math:`u \sim U[0, 1)` per entry; this is the data-side noise of the variational bound
    in :func:`bits_per_dim`, not a bijection (draw it afresh every epoch, and average the
    bits/dim over several draws when evaluating).

    Args:
        x: integer levels in ``{0, ..., levels - 1}``, any shape, integer or floating dtype
            (e.g. ``uint8`` images).
        levels: the number :math:`k` of levels (17 for the 8x8 digits, 256 for 8-bit images).
        generator: random generator (on ``x``'s device) for reproducible draws.
        dtype: floating dtype of the result (default: ``x``'s if floating, else PyTorch's
            default dtype).

    Returns:
        ``v`` of ``x``'s shape with values in ``[0, 1)`` (clamped below 1 against rounding).

    Raises:
        ValueError: ``levels`` not an int >= 2; ``x`` not integer-valued in ``[0, levels)``.

    Example:
        >>> v = dequantize(torch.tensor([0, 16]), 17, torch.Generator().manual_seed(0))
        >>> bool((v >= 0).all() and (v < 1).all()), bool(v[1] >= 16 / 17)
        (True, True)
    """
    k = _check_levels(levels)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor of integer levels, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x must hold integer levels, got dtype {x.dtype}")
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if x.numel():
        if x.is_floating_point() and not bool((x == x.round()).all()):
            raise ValueError("x must hold integer levels; got non-integer values")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > k - 1:
            raise ValueError(
                f"x must hold levels in [0, {k - 1}] for levels={k}, got values in [{lo}, {hi}]"
            )
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    v = (x.to(dtype) + u) / k
    # (k - 1 + u) / k can round up to 1 for u just below 1
    return v.clamp(max=1 - torch.finfo(dtype).eps / 2)


def bits_per_dim(log_prob: Tensor, event_shape: Sequence[int], levels: int) -> Tensor:
    r"""Bits per dimension of ``k``-level data from the log-density of its dequantized version.

    .. math::

        \mathrm{bpd} = -\frac{\log p(v) - D \log k}{D \log 2}
        = \log_2 k - \frac{\log p(v)}{D \log 2}

    with :math:`D` the number of entries of one data point and :math:`\log p(v)` the model's
    log-density of the dequantized data :math:`v = (x + u)/k \in [0, 1)^D`
    (:meth:`cnf.flow.Flow.log_prob`, all log-determinants included). It bounds the discrete
    data's negative log-likelihood from above; see the module docstring for the derivation
    (FFJORD's ``compute_bits_per_dim`` with :math:`k = 256`).

    Args:
        log_prob: ``log p(v)`` per data point, any shape (e.g. ``(batch,)``).
        event_shape: shape of one data point, e.g. ``(1, 8, 8)`` (:math:`D = 64`).
        levels: the number :math:`k` of levels the data were dequantized from.

    Returns:
        bits/dim per data point, ``log_prob``'s shape; take ``.mean()`` for a data set's.

    Example:
        >>> bits_per_dim(torch.zeros(2), (1, 8, 8), 17)  # uniform on [0, 1)^64: log2(17)
        tensor([4.0875, 4.0875])
    """
    k = _check_levels(levels)
    d = check_event_shape(event_shape).numel()
    log_prob = torch.as_tensor(log_prob)
    if not log_prob.is_floating_point():
        log_prob = log_prob.to(torch.get_default_dtype())
    return -(log_prob - d * math.log(k)) / (d * math.log(2))
