r"""Training objectives: what one batch costs and what it is worth reporting.

An objective is any callable ``objective(model, batch, generator) -> (loss, metrics)``
(:class:`Objective`); for conditional data the loop also passes the batch's contexts as
``context=`` (only then, so objectives for unconditional data need not take it). The loop
minimises ``loss`` and records every entry of ``metrics`` under its own name; nothing about
likelihoods or solvers is built into the loop. An objective calls
the model only as ``model(batch, ...)``, so a wrapper such as ``DistributedDataParallel`` can
stand in for the model.

A metric is a number, a scalar tensor or a zero-argument callable. Callables are resolved after
``loss.backward()``: that is how an objective reports what only the backward pass knows, such as
the function evaluations of an adjoint solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cnf.ode._problem import number

__all__ = ["RESERVED_METRICS", "MaximumLikelihood", "Metric", "Objective", "resolve_metrics"]

Metric = float | int | Tensor | Callable[[], float]
"""A reported value: a number, a one-element tensor, or a callable read after the backward."""

RESERVED_METRICS = ("iteration", "loss", "seconds")
"""Names the loop records itself; an objective may not report them."""


@runtime_checkable
class Objective(Protocol):
    """The loss of one batch, and named metrics to record with it.

    Implementations must be deterministic given ``(model, batch, generator)``: all of their
    randomness comes from ``generator``, which is what makes a resumed run exact.
    """

    def __call__(
        self, model: nn.Module, batch: Tensor, generator: torch.Generator | None, **context
    ) -> tuple[Tensor, dict[str, Metric]]:
        """Compute the loss of ``batch``.

        Args:
            model: the model being trained (possibly wrapped, e.g. for data parallelism); call
                it, don't reach into it.
            batch: training points, ``(batch, *event_shape)``.
            generator: the iteration's source of noise (e.g. Hutchinson probes), or None for
                the global RNG.
            context: ``context=`` the batch's contexts, given for conditional data only.

        Returns:
            A scalar loss to minimise and ``{name: metric}`` to record (names other than
            :data:`RESERVED_METRICS` and not starting with ``eval_``).
        """
        ...


def resolve_metrics(metrics: Mapping[str, Metric]) -> dict[str, float | int]:
    """Turn reported metrics into plain numbers (call this after ``loss.backward()``).

    Args:
        metrics: ``{name: metric}`` from an :class:`Objective`.

    Returns:
        ``{name: value}`` with ints kept as ints and everything else as floats.

    Raises:
        ValueError: a reserved or ``eval_`` name, or a tensor with more than one element.
    """
    values = {}
    for name, metric in metrics.items():
        if name in RESERVED_METRICS or name.startswith("eval_"):
            raise ValueError(
                f"the objective reported a metric named {name!r}; {RESERVED_METRICS} and "
                "'eval_*' are the loop's own names: rename it"
            )
        value = metric() if callable(metric) else metric
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} has shape {tuple(value.shape)}; report a scalar "
                    "(e.g. its mean)"
                )
            value = value.item()
        values[name] = value if isinstance(value, int) else float(value)
    return values


@dataclass
class MaximumLikelihood:
    r"""Maximum likelihood with the RNODE regularizers (Finlay et al. 2020).

    For a batch :math:`x_1, \dots, x_B` and the flow's field :math:`f`,

    .. math::

        L = -\frac1B \sum_b \log p(x_b)
            + \lambda_K \frac1B \sum_b \int_0^T \|f(z_b(t), t)\|^2 \, dt
            + \lambda_J \frac1B \sum_b \int_0^T \|\partial f / \partial z\|_F^2 \, dt.

    The model is called as ``model(batch, regularizers=..., generator=generator, **solver)``
    and must return a :class:`cnf.FlowOutput`.

    Metrics: ``"nll"`` (the first term, nats per sample), ``"nfe_forward"`` and
    ``"nfe_backward"`` (function evaluations of the solves, the backward ones read after
    ``loss.backward()``), and with regularizers ``"kinetic"`` and ``"jacobian"`` (the batch
    means of the two integrals, before weighting).

    Args:
        kinetic: :math:`\lambda_K \ge 0`.
        jacobian: :math:`\lambda_J \ge 0`.
        solver: per-call solver settings for training, e.g. ``{"trace": "hutchinson"}``.

    Example:
        >>> objective = MaximumLikelihood(kinetic=0.01, jacobian=0.01)  # doctest: +SKIP
        >>> loss, metrics = objective(flow, batch, torch.Generator())  # doctest: +SKIP
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    solver: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("kinetic", "jacobian"):
            value = getattr(self, name)
            if not (math.isfinite(number(name, value)) and value >= 0):
                raise ValueError(f"{name} must be a finite weight >= 0, got {value!r}")
        taken = {"regularizers", "generator", "context"} & set(self.solver)
        if taken:
            raise ValueError(
                f"solver may not set {sorted(taken)}: the objective passes them itself"
            )
        self.solver = dict(self.solver)

    @property
    def regularized(self) -> bool:
        """Whether the RNODE integrals enter the loss."""
        return self.kinetic > 0 or self.jacobian > 0

    def __call__(
        self,
        model: nn.Module,
        batch: Tensor,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Metric]]:
        r"""The loss :math:`L` of ``batch`` ``(batch, *event_shape)`` (given ``context``, for a
        conditional model: :math:`\log p(x_b \mid c_b)`) and its metrics."""
        given = {} if generator is None else {"generator": generator}
        if context is not None:
            given["context"] = context
        out = model(batch, regularizers=self.regularized, **given, **self.solver)
        nll = -out.log_prob.mean()
        metrics: dict[str, Metric] = {
            "nll": nll.detach(),
            "nfe_forward": out.nfe,
            "nfe_backward": lambda: out.nfe_backward,  # counted during loss.backward()
        }
        if not self.regularized:
            return nll, metrics
        kinetic, jacobian = out.kinetic.mean(), out.jacobian.mean()
        metrics.update(kinetic=kinetic.detach(), jacobian=jacobian.detach())
        return nll + self.kinetic * kinetic + self.jacobian * jacobian, metrics
