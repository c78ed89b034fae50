r"""Flows: a transform plus a base distribution, and the ready-made CNF flows.

A :class:`Flow` is the density

.. math::

    \log p(x) = \log p_{base}(z) + \log\left|\det \frac{\partial z}{\partial x}\right|,
    \qquad (z, \log|\det \partial z/\partial x|) = \text{transform}(x),

for any :class:`~cnf.transforms.Transform` (a CNF block, a composition of logit, reshape,
squeeze and CNF blocks, the multiscale architecture). :meth:`Flow.transform` is that
transform, so ``flow.transform(x)`` returns ``(z, logdet)`` and
``flow.log_prob(x) == flow.base.log_prob(z) + logdet``.

:class:`CNF` (one block) and :class:`SequentialFlow` (blocks in sequence) are the flows built
from CNF blocks; :mod:`cnf.dense` and :mod:`cnf.multiscale` build the image models. The
convention of the blocks (base at ``t = 0``, data at ``t = T``) is in :mod:`cnf.continuous`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .continuous import CNFTransform, trajectory_times
from .settings import Call, SolverSettings, check_choice
from .transforms.core import Compose, FlowOutput, Transform, check_points, first_tensor

__all__ = ["CNF", "Flow", "FlowOutput", "SequentialFlow", "StandardNormal"]


class StandardNormal(nn.Module):
    """The standard normal over ``event_shape``; follows the model's device and dtype.

    Same interface as a ``torch.distributions.Distribution`` for what flows use:
    ``log_prob(z) -> (batch,)`` and ``sample(shape, generator=None)``.
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = torch.Size(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """:math:`-\\frac12 \\|z\\|^2 - \\frac D2 \\log 2\\pi` per sample."""
        d = self.event_shape.numel()
        dims = tuple(range(-len(self.event_shape), 0))
        return -0.5 * z.square().sum(dims) - 0.5 * d * math.log(2 * math.pi)

    def sample(
        self,
        sample_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Standard normal draws of shape ``(*sample_shape, *event_shape)``.

        ``dtype``/``device`` default to the module's (it follows ``.to()``).
        """
        a = self._anchor
        shape = (*sample_shape, *self.event_shape)
        return torch.randn(
            shape, generator=generator, dtype=dtype or a.dtype, device=device or a.device
        )


def _is_int(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


def _sample_shape(n) -> tuple[int, ...]:
    if _is_int(n):
        shape = (n,)
    elif isinstance(n, (tuple, list, torch.Size)):
        shape = tuple(n)
    else:
        shape = None
    if not shape or not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"the number of samples must be an int >= 0 or a shape of them, got {n!r}")
    return shape


def _check_base(base, shape: torch.Size):
    if base is None:
        return StandardNormal(shape)
    if torch.Size(getattr(base, "event_shape", ())) != shape:
        raise ValueError(
            f"base has event_shape {tuple(getattr(base, 'event_shape', ()))}, but the transform "
            f"maps to {tuple(shape)}; use e.g. torch.distributions.Independent(..., "
            f"{len(shape)}) to make them match"
        )
    return base


class Flow(nn.Module):
    """A density :math:`p(x) = p_{base}(z) |\\det \\partial z / \\partial x|`, ``z = transform(x)``.

    Every public method takes the per-call keywords of :data:`cnf.settings.CALL_KEYS`: solver
    settings for that call only (``trace``, ``rtol``, ``method``, ``adjoint``, ...), a random
    ``generator`` for the Hutchinson probes and a ``context`` for conditional fields. E.g. train
    with ``trace="hutchinson"`` and evaluate with ``log_prob(x, trace="exact", rtol=1e-7,
    atol=1e-7)``; nothing switches silently.

    Args:
        transform: a :class:`~cnf.transforms.Transform` from data to base.
        base: base distribution over the transform's ``out_shape``; default
            :class:`StandardNormal`.

    Attributes:
        transform: the transform; ``flow.transform(x, **settings) -> (z, logdet)``.
        base: the base distribution.
        event_shape: shape of one data point (the transform's ``in_shape``).
    """

    def __init__(self, transform: Transform, base=None):
        super().__init__()
        if not isinstance(transform, Transform):
            raise ValueError(
                f"transform must be a cnf.transforms.Transform, got {type(transform).__name__}"
            )
        self.transform = transform
        self.event_shape = transform.in_shape
        self.base = _check_base(base, transform.out_shape)

    def forward(self, x: Tensor, *, regularizers: bool = False, **settings) -> FlowOutput:
        """One pass from data to base with everything an objective needs.

        This is what ``model(x)`` runs, so a ``DistributedDataParallel`` wrapper sees it.

        Args:
            x: data, shape ``(batch, *event_shape)``.
            regularizers: also integrate the RNODE regularizers (kinetic energy and Jacobian
                Frobenius norm) as extra channels of the same solves.
            **settings: per-call settings (see the class docstring).

        Returns:
            :class:`~cnf.transforms.FlowOutput` with ``z``, ``logdet``, ``log_prob`` and, with
            ``regularizers=True``, ``kinetic`` and ``jacobian``; ``stats`` per CNF block.
        """
        x = check_points(x, self.event_shape, "x", self.reference())
        call = Call.make(settings, regularizers=regularizers)
        out = self.transform.forward_and_logdet(x, call)
        out.log_prob = self.base.log_prob(out.z) + out.logdet
        return out

    def evaluate(self, x: Tensor, *, regularizers: bool = False, **settings) -> FlowOutput:
        """The same as calling the flow: :meth:`forward`."""
        return self(x, regularizers=regularizers, **settings)

    def log_prob(self, x: Tensor, **settings) -> Tensor:
        """Exact log-density ``log p(x)`` of data ``(batch, *event_shape)``: shape ``(batch,)``."""
        return self(x, **settings).log_prob

    def inverse(self, z: Tensor, **settings) -> Tensor:
        """Map base points to data: ``x`` of shape ``(batch, *event_shape)``."""
        return self.transform.inverse(z, **settings)

    def sample(self, n: int | Sequence[int], **settings) -> Tensor:
        """Draw samples: ``n`` (or ``sample_shape``) base points carried to the data side.

        For a conditional flow, ``context=`` is one context per sample (``prod(sample_shape)``
        rows, in order) or one context for all of them (e.g. ``torch.tensor(3)``, a label, or
        ``(C,)``, a vector), as its field's embedding takes it.

        Returns:
            samples of shape ``(*sample_shape, *event_shape)``.
        """
        return self._sample(n, Call.make(settings, with_logdet=False))[0]

    def sample_with_log_prob(self, n: int | Sequence[int], **settings) -> tuple[Tensor, Tensor]:
        """Draw samples and their log-density from one solve.

        Returns:
            ``(x, log_prob)`` of shapes ``(*sample_shape, *event_shape)`` and ``sample_shape``.
        """
        return self._sample(n, Call.make(settings, with_logdet=True))

    def trajectory(
        self,
        x: Tensor,
        times: Tensor | Sequence[float],
        *,
        direction: str = "generative",
        **settings,
    ) -> Tensor:
        """States along the flow at the requested times, for plots.

        For a CNF block, or CNF blocks in sequence on one time axis: block ``k`` of the
        generative order (the last step acts on base points first) occupies
        ``[o_k, o_k + T_k]``, ``o_k`` the sum of the earlier blocks' ``T``.

        Args:
            x: the state at ``times[0]``: base points (``direction="generative"``, times
                increasing) or data points (``"normalizing"``, times decreasing), shape
                ``(batch, *event_shape)``.
            times: 1-D times in ``[0, total T]``, e.g. ``torch.linspace(0, flow.T, 50)``.
            direction: ``"generative"`` (base to data) or ``"normalizing"`` (data to base).

        Returns:
            states of shape ``(len(times), batch, *event_shape)``.
        """
        blocks = _cnf_blocks(self.transform)
        call = Call.make(settings, with_logdet=False)
        if len(blocks) == 1:
            return blocks[0].trajectory(x, times, direction, call)
        check_choice("direction", direction, ("generative", "normalizing"))
        x = check_points(x, self.event_shape, "x", self.reference())
        return _trajectory_through(blocks, x, times, direction, call)

    def reference(self) -> Tensor | None:
        """A parameter or buffer (its dtype and device are the flow's), or None."""
        return first_tensor(self)

    def _sample(self, n, call: Call) -> tuple[Tensor, Tensor | None]:
        shape = _sample_shape(n)
        z = self._draw_base(math.prod(shape), call.generator)
        out = self.transform.inverse_and_logdet(z, call)
        x = out.z.reshape(*shape, *self.event_shape)
        if not call.with_logdet:
            return x, None
        # log p(x) = log p_base(z) - log|det dx/dz|
        return x, (self.base.log_prob(z) - out.logdet).reshape(shape)

    def _draw_base(self, n: int, generator: torch.Generator | None) -> Tensor:
        ref = self.reference()
        if isinstance(self.base, StandardNormal):
            return self.base.sample(
                (n,),
                generator=generator,
                dtype=None if ref is None else ref.dtype,
                device=None if ref is None else ref.device,
            )
        if generator is not None:
            raise ValueError(
                "this flow's base is a torch.distributions object, which takes no generator; "
                "seed with torch.manual_seed instead, or use the default StandardNormal base"
            )
        z = self.base.sample((n,))
        return z if ref is None else z.to(dtype=ref.dtype, device=ref.device)


def _cnf_blocks(transform: Transform) -> list[CNFTransform]:
    if isinstance(transform, CNFTransform):
        return [transform]
    if isinstance(transform, Compose) and all(isinstance(s, CNFTransform) for s in transform.steps):
        return list(transform.steps)
    raise ValueError("trajectory needs a CNF block or CNF blocks in sequence")


def _trajectory_through(blocks, x: Tensor, times, direction: str, call: Call) -> Tensor:
    """:meth:`Flow.trajectory` through several blocks: one local solve per block crossed."""
    taus = trajectory_times(times, x, direction).detach().tolist()
    forward = direction == "generative"
    segments, start = [], 0.0
    for block in reversed(blocks):
        span = float(block.span(x).detach())
        segments.append((block, start, start + span))
        start += span
    if not forward:
        segments.reverse()
    states, state, now, rest = [x], x, taus[0], taus[1:]
    for block, a, b in segments:
        end = b if forward else a
        if (end <= now) if forward else (end >= now):
            continue  # this block lies behind the starting time
        inside = [tau for tau in rest if (tau <= end if forward else tau >= end)]
        rest = rest[len(inside) :]
        local = [now - a] + [tau - a for tau in inside]
        if rest and local[-1] != end - a:
            local.append(end - a)  # carry the state to the block's far end
        if len(local) > 1:
            ys = block.trajectory(state, local, direction, call)
            states.extend(ys[1 : 1 + len(inside)])
            state, now = ys[-1], end
        if not rest:
            break
    if rest:
        raise ValueError(f"times must lie in [0, {start:g}] (the sum of the blocks' T)")
    return torch.stack(states)


class CNF(Flow):
    r"""A continuous normalizing flow: the density carried by :math:`dz/dt = f(t, z)`, t in [0, T].

    ``Flow(CNFTransform(field, event_shape, ...), base)`` with the block's attributes at hand.

    Args:
        field: ``field(t, z) -> dz/dt`` for ``z`` of shape ``(batch, *event_shape)``, an
            ``nn.Module`` (e.g. :class:`cnf.fields.ConcatSquashMLP`).
        event_shape: shape of one data point, e.g. ``(2,)`` or ``(1, 28, 28)``.
        base: base distribution with ``event_shape``; default :class:`StandardNormal`.
        **block: the block's ``T`` (integration time, default 1), ``train_T`` (learn it as
            ``T = T0 s^2``, positive) and its solver settings, given as ``settings=`` (a
            :class:`~cnf.settings.SolverSettings`) or as its fields (``trace``, ``noise``,
            ``probes``, ``method``, ``rtol``, ``atol``, ``logp_rtol``, ``logp_atol``,
            ``adjoint``, ``adjoint_options``, ``options``); see :class:`CNFTransform`.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> flow = CNF(ConcatSquashMLP(2, hidden=(32, 32)), event_shape=(2,))
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, field: nn.Module, event_shape: Sequence[int], *, base=None, **block):
        super().__init__(CNFTransform(field, event_shape, **block), base)

    @property
    def field(self) -> nn.Module:
        """The vector field."""
        return self.transform.field

    @property
    def settings(self) -> SolverSettings:
        """The block's default solver settings."""
        return self.transform.settings

    @property
    def T(self) -> Tensor:
        """The integration time (a 0-dim tensor; differentiable when ``train_T``)."""
        return self.transform.T

    @property
    def T_scale(self) -> nn.Parameter | None:
        """The learned scale ``s`` of ``T = T0 s^2``, or None."""
        return self.transform.T_scale


class SequentialFlow(Flow):
    """Flows or transforms applied in sequence; their log-determinants add up.

    ``steps[0]`` is applied first on the way from data to base (``transform``, ``log_prob``)
    and last on the way back (``inverse``, ``sample``). A :class:`Flow` step contributes its
    transform; its base is not used (the sequence has its own ``base``).

    Args:
        steps: :class:`Flow` or :class:`~cnf.transforms.Transform` objects (e.g. several
            :class:`CNF` blocks), each mapping to the next one's input shape.
        base: base distribution; default :class:`StandardNormal`.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> flow = SequentialFlow([CNF(ConcatSquashMLP(2, (16,)), (2,)) for _ in range(2)])
        >>> flow.log_prob(torch.randn(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, steps: Sequence[Flow | Transform], base=None):
        steps = list(steps)
        if not steps or not all(isinstance(s, (Flow, Transform)) for s in steps):
            raise ValueError("steps must be a non-empty sequence of Flow or Transform objects")
        super().__init__(Compose([s.transform if isinstance(s, Flow) else s for s in steps]), base)

    @property
    def steps(self) -> nn.ModuleList:
        """The transforms, in the data-to-base order."""
        return self.transform.steps
