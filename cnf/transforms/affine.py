r"""Standardization as an invertible step of the model, so densities stay in the data's units.

Data whose columns differ in scale by orders of magnitude (a column in thousands next to one in
thousandths) are hard for a flow whose base is a unit Gaussian. Rescaling them outside the model
would leave ``log_prob`` in the rescaled units; :class:`Standardize` is the rescaling as the
first step of the flow instead,

.. math::

    z = (x - \mu) / \sigma, \qquad
    \log\left|\det \frac{\partial z}{\partial x}\right| = -\sum_i \log \sigma_i ,

with :math:`\mu, \sigma` fitted once on training data (:meth:`Standardize.fit`) and kept as
buffers: they travel in the model's ``state_dict`` (so in checkpoints) and are not trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..settings import Call
from .core import FlowOutput, Transform, check_event_shape

__all__ = ["Standardize"]


def _as_float(value) -> Tensor:
    """A tensor of ``value`` in its own floating dtype (numbers: the default dtype)."""
    value = torch.as_tensor(value)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


class Standardize(Transform):
    r"""The elementwise affine map :math:`z = (x - \mu) / \sigma` with its exact log-determinant.

    Args:
        event_shape: shape of one point, e.g. ``(D,)``.
        mean, scale: :math:`\mu` and :math:`\sigma`, broadcastable to ``event_shape``
            (default 0 and 1: the identity, to be set by :meth:`fit` or a ``state_dict``);
            ``scale`` must be positive and finite.

    Example:
        >>> x = torch.tensor([[1000.0, 0.001], [3000.0, 0.003]])
        >>> step = Standardize.fit(x)
        >>> step(x)[0]
        tensor([[-0.7071, -0.7071],
                [ 0.7071,  0.7071]])
    """

    def __init__(self, event_shape: Sequence[int], mean=0.0, scale=1.0):
        super().__init__()
        self.in_shape = self.out_shape = check_event_shape(event_shape)
        mean, scale = (_as_float(v).expand(self.in_shape) for v in (mean, scale))
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("mean must be finite")
        if not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise ValueError("scale must be positive and finite in every entry")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())

    @classmethod
    def fit(cls, x: Tensor, *, names: Sequence[str] | None = None) -> Standardize:
        """The step that standardizes ``x`` ``(n, *event_shape)``: its mean and standard deviation.

        Args:
            x: training data (at least 2 points, finite).
            names: column names for messages (``x`` of shape ``(n, D)``), e.g. a CSV header.

        Raises:
            ValueError: too few points, NaN or Inf, or a constant column (it has no scale to
                divide by: drop it, or give it noise of the size of its measurement error).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError("x must be a floating-point tensor of shape (n, *event_shape)")
        if x.shape[0] < 2:
            raise ValueError(f"standardizing needs at least 2 points, got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf; remove those rows before fitting")
        mean, std = x.mean(0), x.std(0)
        constant = (std <= torch.finfo(x.dtype).eps * mean.abs().clamp_min(1.0)).reshape(-1)
        if bool(constant.any()):
            which = constant.nonzero().reshape(-1).tolist()
            label = [names[i] for i in which] if names is not None else which
            raise ValueError(
                f"column(s) {label} are constant in the training data, so they cannot be "
                "standardized (and have no density): drop them, or add noise of the size of "
                "their measurement error"
            )
        return cls(x.shape[1:], mean, std).to(x.dtype)

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.in_shape)}"

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        z = (x - self.mean) / self.scale
        return FlowOutput(z=z, logdet=self._logdet(x))

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        x = z * self.scale + self.mean
        return FlowOutput(z=x, logdet=-self._logdet(z))

    def _logdet(self, like: Tensor) -> Tensor:
        """``-sum(log sigma)``, the same for every point: shape ``(batch,)``."""
        return (-self.scale.log().sum()).expand(like.shape[0]).to(like.dtype)
