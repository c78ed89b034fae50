r"""The transform protocol: invertible maps with exact log-determinants, and their composition.

A :class:`Transform` maps data-side points ``x`` of shape ``(batch, *in_shape)`` to base-side
points ``z`` of shape ``(batch, *out_shape)`` with the same number of entries, and knows

.. math::

    \log\left|\det \frac{\partial z}{\partial x}\right| \quad\text{(forward)}, \qquad
    \log\left|\det \frac{\partial x}{\partial z}\right| \quad\text{(inverse)}.

Implementations provide two unvalidated methods, ``forward_and_logdet(x, call)`` and
``inverse_and_logdet(z, call)``, each returning a :class:`FlowOutput`; ``call`` is the
:class:`cnf.settings.Call` of the public call (solver overrides, generator, context, flags) and
composite transforms pass it on to their steps unchanged. This class derives the validated
public API from them: ``transform(x, **settings) -> (z, logdet)`` (the module's ``__call__``)
and ``transform.inverse(z, **settings) -> x``.

A :class:`cnf.flow.Flow` is a transform plus a base distribution; the CNF block
(:class:`cnf.continuous.CNFTransform`), :class:`Compose`, :class:`Reshape`, the logit and
squeeze steps and the multiscale architecture are transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ode import SolverStats
from ..settings import Call

__all__ = [
    "Compose",
    "FlowOutput",
    "Reshape",
    "Transform",
    "check_event_shape",
    "check_points",
    "first_tensor",
]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else (a if b is None else a + b)


@dataclass
class FlowOutput:
    r"""Everything one pass of a transform or flow computed.

    Attributes:
        z: the image of the input, ``(batch, *shape)`` (base points for data-to-base passes,
            data points for base-to-data passes).
        logdet: log-determinant of the map that was applied, ``(batch,)``.
        log_prob: ``log p(x)`` of the data points, ``(batch,)``, filled in by a flow.
        kinetic: :math:`\int_0^T \|f\|^2 dt` summed over CNF blocks, ``(batch,)``, or None.
        jacobian: :math:`\int_0^T \|\partial f/\partial z\|_F^2 dt` (Hutchinson estimate),
            ``(batch,)``, or None.
        stats: solver statistics of every CNF block's solve, in order; the backward fields are
            filled in by ``loss.backward()`` when the solve used the adjoint.
    """

    z: Tensor
    logdet: Tensor
    log_prob: Tensor | None = None
    kinetic: Tensor | None = None
    jacobian: Tensor | None = None
    stats: list[SolverStats] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        """Forward function evaluations, summed over blocks."""
        return sum(s.nfe for s in self.stats)

    @property
    def nfe_backward(self) -> int:
        """Backward function evaluations, summed over blocks (after ``backward()``)."""
        return sum(s.nfe_backward for s in self.stats)

    def then(self, out: FlowOutput) -> FlowOutput:
        """This pass followed by ``out``: ``out``'s points, log-dets and regularizers added."""
        return FlowOutput(
            z=out.z,
            logdet=self.logdet + out.logdet,
            kinetic=_add(self.kinetic, out.kinetic),
            jacobian=_add(self.jacobian, out.jacobian),
            stats=self.stats + out.stats,
        )

    @classmethod
    def identity(cls, x: Tensor) -> FlowOutput:
        """The start of a composition: ``x`` itself with log-determinant 0."""
        return cls(z=x, logdet=x.new_zeros(x.shape[0]))


def check_event_shape(event_shape) -> torch.Size:
    """``event_shape`` as a ``torch.Size``; a ValueError unless it is non-empty and positive."""
    shape = torch.Size(event_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"event_shape must be non-empty and positive, got {tuple(shape)}")
    return shape


def check_points(x, shape: torch.Size, name: str, like: Tensor | None = None) -> Tensor:
    """``x`` if it is a finite ``(batch, *shape)`` tensor matching ``like``'s dtype and device.

    Raises:
        ValueError: saying what to change.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or x.shape[1:] != shape:
        raise ValueError(
            f"{name} must have shape {('batch', *shape)} (batch first), got {tuple(x.shape)}"
        )
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(
            f"{name} is {x.dtype} on {x.device} but the model is {like.dtype} on {like.device}; "
            f"convert it: {name}.to(dtype={like.dtype}, device='{like.device}')"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def first_tensor(module: nn.Module) -> Tensor | None:
    """The first parameter, else the first buffer, of ``module``: its dtype and device."""
    tensor = next(module.parameters(), None)
    return tensor if tensor is not None else next(module.buffers(), None)


class Transform(nn.Module):
    """An invertible map from ``(batch, *in_shape)`` to ``(batch, *out_shape)`` (see the module).

    Subclasses set ``in_shape`` and ``out_shape`` (``torch.Size``) and implement
    ``forward_and_logdet(x, call)`` and ``inverse_and_logdet(z, call)``.
    """

    in_shape: torch.Size
    out_shape: torch.Size

    def forward(self, x: Tensor, **settings) -> tuple[Tensor, Tensor]:
        """Map data to the base side: ``(z, logdet)`` with ``logdet = log|det dz/dx|``.

        Args:
            x: ``(batch, *in_shape)``.
            **settings: per-call settings (:data:`cnf.settings.CALL_KEYS`).

        Returns:
            ``z`` of shape ``(batch, *out_shape)`` and ``logdet`` of shape ``(batch,)``.
        """
        x = check_points(x, self.in_shape, "x", self.reference())
        out = self.forward_and_logdet(x, Call.make(settings))
        return out.z, out.logdet

    def inverse(self, z: Tensor, **settings) -> Tensor:
        """Map base-side points ``(batch, *out_shape)`` back to ``(batch, *in_shape)``."""
        z = check_points(z, self.out_shape, "z", self.reference())
        return self.inverse_and_logdet(z, Call.make(settings, with_logdet=False)).z

    def reference(self) -> Tensor | None:
        """A parameter or buffer (its dtype and device are the transform's), or None."""
        return first_tensor(self)

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        raise NotImplementedError

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        raise NotImplementedError


class Compose(Transform):
    """Transforms applied in sequence; their log-determinants add up.

    ``steps[0]`` is applied first on the way from data to base and last on the way back; each
    step's ``out_shape`` must be the next one's ``in_shape``.

    Example:
        >>> t = Compose([Reshape((1, 2, 2), (4,)), Reshape((4,), (2, 2))])
        >>> t(torch.zeros(3, 1, 2, 2))[0].shape
        torch.Size([3, 2, 2])
    """

    def __init__(self, steps: Sequence[Transform]):
        super().__init__()
        steps = list(steps)
        if not steps or not all(isinstance(s, Transform) for s in steps):
            raise ValueError("steps must be a non-empty sequence of Transform objects")
        for i, (a, b) in enumerate(zip(steps[:-1], steps[1:])):
            if a.out_shape != b.in_shape:
                raise ValueError(
                    f"step {i} maps to event_shape {tuple(a.out_shape)} but step {i + 1} takes "
                    f"event_shape {tuple(b.in_shape)}; insert a Reshape between them"
                )
        self.steps = nn.ModuleList(steps)
        self.in_shape, self.out_shape = steps[0].in_shape, steps[-1].out_shape

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        total = FlowOutput.identity(x)
        for step in self.steps:
            total = total.then(step.forward_and_logdet(total.z, call))
        return total

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        total = FlowOutput.identity(z)
        for step in reversed(self.steps):
            total = total.then(step.inverse_and_logdet(total.z, call))
        return total


class Reshape(Transform):
    """A reshape of every point from ``in_shape`` to ``out_shape`` (log-determinant 0).

    Example:
        >>> Reshape((1, 8, 8), (64,))(torch.zeros(2, 1, 8, 8))[0].shape
        torch.Size([2, 64])
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.in_shape, self.out_shape = torch.Size(in_shape), torch.Size(out_shape)
        if self.in_shape.numel() != self.out_shape.numel():
            raise ValueError(
                f"cannot reshape {tuple(self.in_shape)} to {tuple(self.out_shape)}: "
                "they hold different numbers of entries"
            )

    def extra_repr(self) -> str:
        return f"{tuple(self.in_shape)} -> {tuple(self.out_shape)}"

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        return FlowOutput.identity(x.reshape(x.shape[0], *self.out_shape))

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        return FlowOutput.identity(z.reshape(z.shape[0], *self.in_shape))
