r"""Invertible steps for image flows, with exact log-determinants.

* :class:`LogitTransform`: FFJORD's squashing of ``[0, 1]`` data onto the real line.
* :class:`Squeeze`: space-to-depth, ``(C, H, W) -> (4C, H/2, W/2)`` (a permutation).

Both are :class:`~cnf.transforms.Transform` objects: they compose with CNF blocks in a
:class:`~cnf.transforms.Compose` (or :class:`~cnf.flow.SequentialFlow`), and
``Flow(LogitTransform(shape, alpha))`` is the logit-normal density. They ignore solver settings
and regularizers; their :class:`~cnf.transforms.FlowOutput` carries no solver statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ode._problem import number
from ..settings import Call
from .core import FlowOutput, Transform, check_event_shape

__all__ = ["LogitTransform", "Squeeze", "image_shape"]


def image_shape(event_shape: Sequence[int]) -> torch.Size:
    """``event_shape`` as a ``torch.Size``; a ValueError unless it is an image ``(C, H, W)``."""
    shape = torch.Size(event_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"event_shape must be an image shape (C, H, W) of positive ints, got {tuple(shape)}"
        )
    return shape


class LogitTransform(Transform):
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

    ``Flow(LogitTransform(shape, alpha))`` is the logit-normal density; in a composition put it
    first: ``SequentialFlow([LogitTransform(shape, 0.05), CNF(...), ...])``.

    Args:
        event_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        alpha: in ``(0, 0.5)``.

    Raises:
        ValueError: (when called) data outside ``[0, 1]`` or not floating point.

    Example:
        >>> logit = LogitTransform((1, 2, 2), alpha=0.05)
        >>> z, logdet = logit(torch.full((3, 1, 2, 2), 0.5))
        >>> z.abs().max().item(), logdet.shape
        (0.0, torch.Size([3]))
    """

    def __init__(self, event_shape: Sequence[int], alpha: float = 1e-6):
        super().__init__()
        self.in_shape = self.out_shape = check_event_shape(event_shape)
        if not 0 < number("alpha", alpha) < 0.5:
            raise ValueError(
                f"alpha must be a number in (0, 0.5), e.g. 1e-6 or 0.05; got {alpha!r}"
            )
        self.alpha = float(alpha)

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one point (the same on both sides)."""
        return self.in_shape

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, alpha={self.alpha:g}"

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
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

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        a = self.alpha
        x = (torch.sigmoid(z) - a) / (1 - 2 * a)
        if not call.with_logdet:
            return FlowOutput(z=x, logdet=z.new_zeros(z.shape[0]))
        # d sigmoid/dz = sigmoid(z) sigmoid(-z), in logs for large |z|
        logdet = (F.logsigmoid(z) + F.logsigmoid(-z) - math.log1p(-2 * a)).flatten(1).sum(1)
        return FlowOutput(z=x, logdet=logdet)


class Squeeze(Transform):
    r"""Space-to-depth by a factor 2: ``(C, H, W) -> (4C, H/2, W/2)``, a permutation (logdet 0).

    Each 2x2 patch of each channel becomes 4 channels (:func:`torch.nn.functional.pixel_unshuffle`,
    FFJORD's ``squeeze``): output channel ``4 c + 2 i + j`` at ``(h, w)`` holds input channel ``c``
    at ``(2 h + i, 2 w + j)``.

    Args:
        event_shape: input shape ``(C, H, W)``; ``H`` and ``W`` even.

    Example:
        >>> sq = Squeeze((1, 4, 4))
        >>> z, logdet = sq(torch.randn(2, 1, 4, 4))
        >>> tuple(z.shape), sq.out_shape
        ((2, 4, 2, 2), torch.Size([4, 2, 2]))
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        c, h, w = image_shape(event_shape)
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze needs an even height and width, got (C, H, W) = {(c, h, w)}; crop or "
                "pad the images, or use fewer scales"
            )
        self.in_shape = torch.Size((c, h, w))
        self.out_shape = torch.Size((4 * c, h // 2, w // 2))

    def extra_repr(self) -> str:
        return f"{tuple(self.in_shape)} -> {tuple(self.out_shape)}"

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        return FlowOutput.identity(_shuffled(F.pixel_unshuffle, x, self.out_shape))

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        return FlowOutput.identity(_shuffled(F.pixel_shuffle, z, self.in_shape))


def _shuffled(shuffle, x: Tensor, shape: torch.Size) -> Tensor:
    """``shuffle(x, 2)``, shaped ``(batch, *shape)`` for an empty batch too (torch 2.x returns an
    empty input unchanged, in the old shape)."""
    return shuffle(x, 2) if x.shape[0] else x.reshape(0, *shape)
