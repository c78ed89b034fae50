r"""Flow matching: training a CNF by regressing its field on a known velocity, without a solve.

Conditional flow matching (Lipman et al. 2023) with the straight, "optimal transport"
conditional path, and optionally minibatch optimal-transport couplings (Tong et al. 2023).
The package's convention holds: the base lives at :math:`t = 0`, the data at :math:`t = 1`
(the CNF blocks' times must add up to exactly 1). For a base draw :math:`z` and a data point
:math:`x`, the path and its velocity are

.. math::

    x_t = (1 - (1 - \sigma_{min})\, t)\, z + t\, x, \qquad
    u = \frac{d x_t}{dt} = x - (1 - \sigma_{min})\, z,

and the loss of a batch of :math:`B` points, with :math:`t \sim p(t)` and the field
:math:`v` of the flow,

.. math::

    L = \frac1B \sum_b \| v(t_b, x_{t_b}) - u_b \|^2 ,

the squared norm summed over the event's entries (not averaged), so that :math:`L` is in the
same units for any event shape as the kinetic energy of the path. Its minimiser is the
marginal velocity :math:`v^*(t, y) = E[u \mid x_t = y]`, whose flow carries the base to the
data distribution; :math:`\log p` of the trained model is still the exact one of
:meth:`cnf.Flow.log_prob`.

A conditional flow learns the same way: each data point comes with its context :math:`c_b`, and
the field reads it, :math:`L = \frac1B \sum_b \| v(t_b, x_{t_b}, c_b) - u_b \|^2`. Its
minimiser is :math:`v^*(t, y, c) = E[u \mid x_t = y, c]`, whose flow carries the base to
:math:`p(x \mid c)` for every :math:`c`. (Minibatch OT couplings would pair points across
contexts and are refused with one.)

Example:
    >>> from cnf.training import FlowMatching, fit  # doctest: +SKIP
    >>> flow = CNF(ConcatSquashMLP(2), (2,), T=1.0, train_T=False)  # doctest: +SKIP
    >>> objective = FlowMatching(coupling="ot")
    >>> fit(flow, toy_sampler("8gaussians"), iters=1000, objective=objective)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from cnf.ode._problem import number

from ..continuous import CNFTransform
from ..flow import Flow, StandardNormal
from ..settings import Call, check_choice
from ..shards import draw_rows
from ..transforms.core import Compose, Reshape
from .objectives import Metric

__all__ = [
    "TIME_DISTRIBUTIONS",
    "FlowMatching",
    "block_space",
    "blockwise_velocity",
    "field_velocity",
    "ot_pairing",
    "split_flow",
]

TIME_DISTRIBUTIONS = ("uniform", "logit-normal")
"""How :class:`FlowMatching` draws :math:`t`: :math:`U(0, 1)`, or :math:`\\sigma(N(0, 1))`."""

_COUPLINGS = (None, "ot")


def ot_pairing(z: Tensor, x: Tensor, block: int = 256) -> Tensor:
    r"""Reorder base draws so that ``z[i]`` is the optimal-transport partner of ``x[i]``.

    Within consecutive blocks of ``block`` points (the ``j``-th block of ``z`` with the
    ``j``-th block of ``x``; the last one may be shorter), the exact assignment

    .. math::

        \pi^* = \arg\min_{\pi} \sum_i \| x_i - z_{\pi(i)} \|^2

    over permutations :math:`\pi` (``scipy.optimize.linear_sum_assignment``, entries
    flattened). Blocks keep the cost near :math:`O(B \cdot \text{block}^2)`.

    Args:
        z: base draws, ``(batch, *event_shape)``.
        x: data points, ``(batch, *event_shape)``.
        block: the most points per assignment problem, at least 1.

    Returns:
        ``z[perm]``, ``(batch, *event_shape)``: the same points as ``z`` in another order.

    Example:
        >>> z = torch.tensor([[1.0], [0.0]]); x = torch.tensor([[0.1], [0.9]])
        >>> ot_pairing(z, x)
        tensor([[0.],
                [1.]])
    """
    if z.shape != x.shape or z.dim() < 2:
        raise ValueError(f"z and x must share a shape (batch, ...), got {z.shape} and {x.shape}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    zf = z.detach().reshape(z.shape[0], -1).to("cpu", torch.float64)
    xf = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    perm = np.empty(z.shape[0], dtype=np.int64)
    for start in range(0, z.shape[0], block):
        stop = min(start + block, z.shape[0])
        cost = torch.cdist(xf[start:stop], zf[start:stop]).square().numpy()
        rows, cols = linear_sum_assignment(cost)  # rows: data points, cols: their base draws
        perm[start + rows] = start + cols
    return z[torch.from_numpy(perm).to(z.device)]


def _logit_normal(n: int, generator, like: Tensor) -> Tensor:
    normal = torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)
    return torch.sigmoid(normal)


def _uniform(n: int, generator, like: Tensor) -> Tensor:
    return torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)


_SAMPLERS = {"uniform": _uniform, "logit-normal": _logit_normal}


def _split(transform) -> tuple[list[nn.Module], list[CNFTransform]]:
    """The leading data-side steps and the CNF blocks of a flow's transform (data-to-base order)."""
    if isinstance(transform, CNFTransform):
        return [], [transform]
    steps = list(transform.steps) if isinstance(transform, Compose) else [transform]
    lead = 0
    while lead < len(steps) and not isinstance(steps[lead], CNFTransform):
        lead += 1
    end = len(steps)
    while end > lead and isinstance(steps[end - 1], Reshape):
        end -= 1  # reshapes on the base side: N(0, I) is the same in any shape
    prefix, blocks = steps[:lead], steps[lead:end]
    nested = any(isinstance(m, CNFTransform) for s in prefix for m in s.modules())
    if not blocks or nested or not all(isinstance(b, CNFTransform) for b in blocks):
        raise ValueError(
            "flow matching supports a CNF block, or CNF blocks after data-side steps without "
            f"a solve (e.g. LogitTransform, Reshape) and before reshapes; got "
            f"{type(transform).__name__} with steps {[type(s).__name__ for s in steps]}"
        )
    return prefix, blocks


def _check_times(blocks: list[CNFTransform]) -> None:
    """The blocks' ``T`` must be fixed and add up to 1."""
    if any(b.T_scale is not None for b in blocks):
        raise ValueError(
            "flow matching needs a fixed integration time: build the model with train_T=False"
        )
    spans = [b.T0 for b in reversed(blocks)]
    if not math.isclose(sum(spans), 1.0, rel_tol=0.0, abs_tol=1e-12):
        raise ValueError(
            f"flow matching puts the data at t = 1, but the blocks' T add up to {sum(spans):g} "
            f"(T = {spans}); build the model with T=1.0 (or T = 1/n for each of n blocks), "
            "train_T=False"
        )


def split_flow(model: nn.Module) -> tuple[list[nn.Module], list[CNFTransform]]:
    """The data-side steps and the CNF blocks of a flow that flow matching can train.

    Checks that ``model`` (or the ``module`` a data-parallel wrapper keeps) is a
    :class:`cnf.Flow` with a standard normal base whose transform is CNF blocks with fixed
    ``T`` adding up to 1, after data-side steps without a solve and before reshapes.

    Returns:
        The data-side steps and the blocks, each in the data-to-base order.
    """
    flow = getattr(model, "module", model)  # DistributedDataParallel keeps it there
    if not isinstance(flow, Flow):
        raise ValueError(f"flow matching trains a cnf.Flow, got {type(flow).__name__}")
    if not isinstance(flow.base, StandardNormal):
        raise ValueError("flow matching draws base points from N(0, I): use the default base")
    prefix, blocks = _split(flow.transform)
    _check_times(blocks)
    return prefix, blocks


def block_space(model: nn.Module, batch: Tensor) -> tuple[list[CNFTransform], Tensor]:
    """The CNF blocks of a flow (:func:`split_flow`), and ``batch`` in their space.

    Args:
        model: the flow.
        batch: data points, ``(batch, *event_shape)``.

    Returns:
        The blocks in the data-to-base order, and the points where they start,
        ``(batch, *block_shape)``: ``batch`` through the data-side steps, without gradients.
    """
    prefix, blocks = split_flow(model)
    x = batch
    if prefix:
        call = Call.make({})
        with torch.no_grad():
            for step in prefix:  # data-side steps: fixed maps to the CNF space
                x = step.forward_and_logdet(x, call).z
    return blocks, x


def field_velocity(field: nn.Module, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
    """``field(t_b, x_b)`` (``field(t_b, x_b, c_b)`` with a context) for every point, each at
    its own time.

    A field whose class sets ``per_sample_time = True`` (the package's
    :class:`~cnf.fields.ConcatSquashMLP` and :class:`~cnf.fields.ConcatSquashConvNet`) takes the
    times ``(batch,)`` directly and is called once on the whole batch. Any other field is taken
    to accept one scalar time only: ``torch.func.vmap`` over ``(t_b, x_b[, c_b])`` calls it on
    batches of one point, which works for fields built from batched torch operations but costs
    a weight-sized computation per point. A user field that evaluates ``t`` of shape
    ``(batch,)`` row by row can set the attribute too.

    Args:
        field: ``field(t, z[, context])`` with ``z`` of shape ``(n, *event_shape)`` and ``t`` a
            0-dim tensor, or of shape ``(n,)`` if the field has ``per_sample_time = True``.
        t: times, ``(batch,)``.
        x: points, ``(batch, *event_shape)``.
        context: one context per point, ``(batch, ...)``; None for an unconditional field.

    Returns:
        velocities, ``(batch, *event_shape)``.
    """
    given = () if context is None else (context,)
    if getattr(field, "per_sample_time", False) is True:
        return field(t, x, *given)

    def one(t_b: Tensor, x_b: Tensor, *c_b: Tensor) -> Tensor:
        return field(t_b, x_b.unsqueeze(0), *(c.unsqueeze(0) for c in c_b)).squeeze(0)

    return torch.func.vmap(one)(t, x, *given)


def blockwise_velocity(
    blocks: list[CNFTransform], t: Tensor, x: Tensor, context: Tensor | None = None
) -> Tensor:
    r"""The velocity of CNF blocks sharing one time axis, at global times ``t`` in [0, 1].

    Block ``k`` of the generative order (``reversed(blocks)``: the last step of the
    data-to-base order acts first on base points) occupies :math:`[o_k, o_k + T_k]`,
    :math:`o_k = \sum_{j<k} T_j`; a point at time :math:`t` gets that block's field at the local
    time :math:`t - o_k` (as in :meth:`cnf.Flow.trajectory`). Each block's field is evaluated
    once, on the group of points in its span (:func:`field_velocity`).

    Args:
        blocks: CNF blocks in the data-to-base order, with fixed ``T``.
        t: global times, ``(batch,)``.
        x: points in the blocks' space, ``(batch, *event_shape)``.
        context: one context per point, ``(batch, ...)``, or None.

    Returns:
        velocities, ``(batch, *event_shape)``.
    """
    generative = list(reversed(blocks))
    if len(generative) == 1:
        return field_velocity(generative[0].field, t, x, context)
    spans = [b.T0 for b in generative]
    offsets = [sum(spans[:k]) for k in range(len(spans))]
    inner = torch.tensor(offsets[1:], dtype=t.dtype, device=t.device)
    which = torch.bucketize(t, inner, right=True)  # index k with o_k <= t < o_{k+1}
    v = torch.zeros_like(x)
    for k, block in enumerate(generative):
        mask = which == k
        # a field of per-sample times runs on an empty group too (no host sync): its weights
        # then get a gradient, zero, every step, as DistributedDataParallel needs of them all
        if getattr(block.field, "per_sample_time", False) is True or bool(mask.any()):
            c = None if context is None else context[mask]
            u = field_velocity(block.field, t[mask] - offsets[k], x[mask], c)
            v = v.index_put((mask,), u)
    return v


@dataclass(frozen=True)
class FlowMatching:
    r"""The conditional flow-matching objective (see the module docstring for the equations).

    An :class:`~cnf.training.Objective` for :func:`cnf.training.fit`: no ODE solve, one field
    evaluation per point. The model must be a :class:`cnf.Flow` with a standard normal base
    whose transform is one CNF block, or CNF blocks after data-side steps without a solve
    (e.g. ``LogitTransform``, ``Reshape``; the batch goes through those first, without
    gradients); the blocks' ``T`` must be fixed and add up to 1. The field is called directly
    (``block.field``), not through ``model(batch)``: a data-parallel wrapper's ``module`` is
    unwrapped, so gradients must be synchronised by other means.

    Every random choice (times, base draws, coupling) comes from the generator, so a resumed
    run is exact. Metrics: ``"fm_loss"`` (the loss :math:`L`).

    Args:
        sigma_min: :math:`\sigma_{min} \in [0, 1)`, the width of the path's end at the data.
        time: how :math:`t` is drawn, one of :data:`TIME_DISTRIBUTIONS`.
        coupling: None (independent base draws) or ``"ot"`` (minibatch optimal transport,
            :func:`ot_pairing`).
        ot_block: the most points per assignment problem of the ``"ot"`` coupling.

    Example:
        >>> objective = FlowMatching(coupling="ot")
        >>> objective.time
        'uniform'
    """

    sigma_min: float = 0.0
    time: str = "uniform"
    coupling: str | None = None
    ot_block: int = 256

    def __post_init__(self):
        s = self.sigma_min
        if not 0.0 <= number("sigma_min", s) < 1.0:
            raise ValueError(f"sigma_min must be a number in [0, 1), got {s!r}")
        check_choice("time distribution", self.time, TIME_DISTRIBUTIONS)
        check_choice("coupling", self.coupling, _COUPLINGS)
        b = self.ot_block
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"ot_block must be a positive int, got {b!r}")

    def __call__(
        self,
        model: nn.Module,
        batch: Tensor,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Metric]]:
        r"""The loss :math:`L` of ``batch`` ``(batch, *event_shape)`` and ``{"fm_loss": L}``;
        with ``context`` (one per point) the field regresses :math:`v(t, x_t, c)` on the same
        targets, which trains :math:`p(x \mid c)`."""
        blocks, x = block_space(model, batch)
        t, z = self.draw(x, generator)
        if self.coupling == "ot":
            if context is not None:
                raise ValueError(
                    "the 'ot' coupling pairs base and data points ignoring their contexts, "
                    "which trains a wrong conditional flow; use coupling=None with contexts"
                )
            z = ot_pairing(z, x, self.ot_block)
        loss = self.loss(blocks, t, z, x, context)
        return loss, {"fm_loss": loss.detach()}

    def draw(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Times ``(batch,)`` from :attr:`time` and standard normal base draws like ``x``."""
        n, rest = x.shape[0], x.shape[1:]
        # a data-parallel process draws the whole batch's times and keeps its rows (cnf.shards)
        t = draw_rows(lambda m: _SAMPLERS[self.time](m, generator, x), n)
        z = draw_rows(
            lambda m: torch.randn((m, *rest), generator=generator, dtype=x.dtype, device=x.device),
            n,
        )
        return t, z

    def loss(
        self,
        blocks: list[CNFTransform],
        t: Tensor,
        z: Tensor,
        x: Tensor,
        context: Tensor | None = None,
    ) -> Tensor:
        r""":math:`L = \frac1B \sum_b \|v(t_b, x_{t_b}) - u_b\|^2` for given ``t``, ``z``, ``x``.

        Args:
            blocks: CNF blocks in the data-to-base order (fixed ``T`` adding up to 1).
            t: times, ``(batch,)``.
            z: base points paired with ``x``, ``(batch, *event_shape)``.
            x: data points in the blocks' space, ``(batch, *event_shape)``.
            context: the points' contexts, ``(batch, ...)``, or None.

        Returns:
            the scalar loss.
        """
        shrink = 1.0 - self.sigma_min
        tt = t.reshape(-1, *([1] * (x.dim() - 1)))
        xt = (1.0 - shrink * tt) * z + tt * x
        target = x - shrink * z
        v = blockwise_velocity(blocks, t, xt, context)
        return (v - target).square().reshape(x.shape[0], -1).sum(1).mean()
