r"""Invertible steps with exact log-determinants for image flows, and the data-side bookkeeping.

* :class:`LogitTransform`: FFJORD's squashing of ``[0, 1]`` data onto the real line; a
  :class:`~cnf.flow.Flow`, so it composes with CNF blocks in a :class:`~cnf.flow.SequentialFlow`.
* :class:`Squeeze`: space-to-depth, ``(C, H, W) -> (4C, H/2, W/2)``. Its output shape differs
  from its input's, so it is not a :class:`~cnf.flow.Flow` (whose ``event_shape`` is one shape
  for data and base); it has the same private ``_forward``/``_inverse`` protocol, validated
  public ``transform``/``inverse`` and ``in_shape``/``out_shape``, and
  :class:`cnf.multiscale.MultiscaleCNF` composes it internally.
* :func:`dequantize` and :func:`bits_per_dim`: uniform dequantization of ``k``-level data and
  the bits/dim of the discrete data it bounds.

Both transforms ignore solver settings and regularizers; their :class:`~cnf.flow.FlowOutput`
carries no solver statistics.

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
import torch.nn.functional as F
from torch import Tensor, nn

from .flow import Flow, FlowOutput

__all__ = ["LogitTransform", "Squeeze", "bits_per_dim", "dequantize"]


def _image_shape(event_shape: Sequence[int]) -> torch.Size:
    shape = torch.Size(event_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"event_shape must be an image shape (C, H, W) of positive ints, got {tuple(shape)}"
        )
    return shape


class LogitTransform(Flow):
    r"""FFJORD's logit transform of data in ``[0, 1]``, elementwise, with its exact log-determinant.

    .. math::

        y = \alpha + (1 - 2\alpha)\, x, \qquad z = \operatorname{logit}(y) = \log y - \log(1 - y),

        \log\left|\frac{dz}{dx}\right| = \sum_i \log(1 - 2\alpha) - \log y_i - \log(1 - y_i),

    and back, :math:`x = (\sigma(z) - \alpha) / (1 - 2\alpha)` with
    :math:`\log|dx/dz| = \sum_i \log\sigma(z_i) + \log\sigma(-z_i) - \log(1 - 2\alpha)`.
    ``alpha`` keeps the ends of ``[0, 1]`` away from :math:`\pm\infty`; FFJORD uses ``1e-6`` for
    MNIST and ``0.05`` for CIFAR-10. The inverse maps the whole real line onto
    ``(-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha))``, slightly wider than ``[0, 1]``:
    clamp samples for display.

    As a :class:`~cnf.flow.Flow` on its own (with the standard normal base) it is the
    logit-normal density; in a :class:`~cnf.flow.SequentialFlow` put it first:
    ``SequentialFlow([LogitTransform(shape, 0.05), CNF(...), ...])``.

    Args:
        event_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        alpha: in ``(0, 0.5)``.

    Raises:
        ValueError: (when called) data outside ``[0, 1]`` or not floating point.

    Example:
        >>> logit = LogitTransform((1, 2, 2), alpha=0.05)
        >>> z, logdet = logit.transform(torch.full((3, 1, 2, 2), 0.5))
        >>> z.abs().max().item(), logdet.shape
        (0.0, torch.Size([3]))
    """

    def __init__(self, event_shape: Sequence[int], alpha: float = 1e-6):
        super().__init__(event_shape)
        if not (isinstance(alpha, (int, float)) and 0 < alpha < 0.5):
            raise ValueError(
                f"alpha must be a number in (0, 0.5), e.g. 1e-6 or 0.05; got {alpha!r}"
            )
        self.alpha = float(alpha)

    @property
    def in_shape(self) -> torch.Size:
        """Shape of one input (data) point: ``event_shape``."""
        return self.event_shape

    @property
    def out_shape(self) -> torch.Size:
        """Shape of one output point: ``event_shape``."""
        return self.event_shape

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, alpha={self.alpha:g}"

    def _forward(self, x: Tensor, regularizers: bool, opts: dict) -> FlowOutput:
        if not x.is_floating_point():
            raise ValueError(
                f"the logit transform needs floating-point data in [0, 1], got {x.dtype}; "
                "dequantize integer levels first (cnf.transforms.dequantize)"
            )
        if bool(((x < 0) | (x > 1)).any()):
            raise ValueError(
                f"the logit transform needs data in [0, 1], got values in "
                f"[{x.min().item():g}, {x.max().item():g}]; rescale the data (e.g. "
                "cnf.transforms.dequantize(levels, k) puts k-level data in [0, 1))"
            )
        a = self.alpha
        y = a + (1 - 2 * a) * x
        log_y, log_1my = torch.log(y), torch.log1p(-y)
        z = log_y - log_1my
        logdet = (math.log1p(-2 * a) - log_y - log_1my).flatten(1).sum(1)
        return FlowOutput(z=z, logdet=logdet)

    def _inverse(self, z: Tensor, opts: dict, with_logdet: bool) -> FlowOutput:
        a = self.alpha
        x = (torch.sigmoid(z) - a) / (1 - 2 * a)
        if not with_logdet:
            return FlowOutput(z=x, logdet=z.new_zeros(z.shape[0]))
        # d sigmoid/dz = sigmoid(z) sigmoid(-z), in logs for large |z|
        logdet = (F.logsigmoid(z) + F.logsigmoid(-z) - math.log1p(-2 * a)).flatten(1).sum(1)
        return FlowOutput(z=x, logdet=logdet)


class Squeeze(nn.Module):
    r"""Space-to-depth by a factor 2: ``(C, H, W) -> (4C, H/2, W/2)``, a permutation (logdet 0).

    Each 2x2 patch of each channel becomes 4 channels (:func:`torch.nn.functional.pixel_unshuffle`,
    FFJORD's ``squeeze``): output channel ``4 c + 2 i + j`` at ``(h, w)`` holds input channel ``c``
    at ``(2 h + i, 2 w + j)``.

    Not a :class:`~cnf.flow.Flow` (its output shape differs from its input's), but it follows
    the flows' protocol: validated :meth:`transform` and :meth:`inverse`, and private
    ``_forward(x, regularizers, opts)`` / ``_inverse(z, opts, with_logdet)`` returning a
    :class:`~cnf.flow.FlowOutput`, as used by :class:`cnf.multiscale.MultiscaleCNF`.

    Args:
        event_shape: input shape ``(C, H, W)``; ``H`` and ``W`` even.

    Example:
        >>> sq = Squeeze((1, 4, 4))
        >>> z, logdet = sq.transform(torch.randn(2, 1, 4, 4))
        >>> tuple(z.shape), sq.out_shape
        ((2, 4, 2, 2), torch.Size([4, 2, 2]))
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        c, h, w = _image_shape(event_shape)
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze needs an even height and width, got (C, H, W) = {(c, h, w)}; crop or "
                "pad the images, or use fewer scales"
            )
        self.event_shape = torch.Size((c, h, w))
        self.out_shape = torch.Size((4 * c, h // 2, w // 2))

    @property
    def in_shape(self) -> torch.Size:
        """Shape of one input point ``(C, H, W)`` (same as ``event_shape``)."""
        return self.event_shape

    def extra_repr(self) -> str:
        return f"{tuple(self.in_shape)} -> {tuple(self.out_shape)}"

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Squeeze ``x`` of shape ``(batch, *in_shape)``: ``(z, logdet)``, ``z`` of shape
        ``(batch, *out_shape)``, ``logdet`` zeros of shape ``(batch,)``."""
        out = self._forward(_check(x, self.in_shape, "x"), False, {})
        return out.z, out.logdet

    def inverse(self, z: Tensor) -> Tensor:
        """Unsqueeze ``z`` of shape ``(batch, *out_shape)`` to ``(batch, *in_shape)``."""
        return self._inverse(_check(z, self.out_shape, "z"), {}, False).z

    def _forward(self, x: Tensor, regularizers: bool, opts: dict) -> FlowOutput:
        return FlowOutput(z=F.pixel_unshuffle(x, 2), logdet=x.new_zeros(x.shape[0]))

    def _inverse(self, z: Tensor, opts: dict, with_logdet: bool) -> FlowOutput:
        return FlowOutput(z=F.pixel_shuffle(z, 2), logdet=z.new_zeros(z.shape[0]))


def _check(x: Tensor, shape: torch.Size, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or x.shape[1:] != shape:
        raise ValueError(
            f"{name} must have shape {('batch', *shape)} (batch first), got {tuple(x.shape)}"
        )
    return x


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
    shape = torch.Size(event_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"event_shape must be non-empty and positive, got {tuple(shape)}")
    d = shape.numel()
    log_prob = torch.as_tensor(log_prob)
    if not log_prob.is_floating_point():
        log_prob = log_prob.to(torch.get_default_dtype())
    return -(log_prob - d * math.log(k)) / (d * math.log(2))
