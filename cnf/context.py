r"""Contexts for conditional flows: labels or measurements made into the vector a field reads.

A conditional field reads a real vector of ``C`` features per sample, e.g.
:class:`cnf.fields.ConcatSquashMLP` built with ``context_features=C``. What users condition on
is often something else: a class label, or raw measurements in their own units.
:class:`ContextEmbedding` turns either into that vector,

.. math::

    e(y) = E_{y,:} \ (\text{a label } y < K), \qquad
    e(c) = \mathrm{MLP}\big((c - \mu) / \sigma\big) \ (\text{a vector } c \in \mathbb{R}^{C}),

with :math:`\mu, \sigma` fitted once to the training contexts (:meth:`ContextEmbedding.fit`,
buffers like :class:`~cnf.transforms.Standardize`'s) and an MLP that may be empty (then
:math:`e(c)` is the standardized vector). :class:`Conditioned` is a field that embeds first,

.. math::

    g(t, z, y) = f(t, z, e(y)),

and a CNF block calls its embedding once per solve, not at every evaluation of the field
(:func:`with_context`): the embedded context is a tensor of the solve like the state, and the
adjoint carries its gradient back to the embedding's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .fields import solve_context

__all__ = [
    "Conditioned",
    "ContextEmbedding",
    "conditional_field",
    "context_spec",
    "with_context",
]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def context_spec(
    *,
    classes: int | None = None,
    inputs: int | None = None,
    features: int | None = None,
    hidden: Sequence[int] = (),
) -> dict:
    """The checked, complete settings of a :class:`ContextEmbedding` as plain data (for specs).

    Exactly one of ``classes`` (labels ``0..K-1``) and ``inputs`` (vectors of ``C`` numbers).
    ``features`` defaults to ``min(K, 32)`` for labels, to ``hidden[-1]`` after an MLP and to
    ``C`` for a bare standardized vector (which must then keep its width).
    """
    if (classes is None) == (inputs is None):
        raise ValueError(
            "a context is either labels (classes=K) or vectors (inputs=C): give exactly one"
        )
    hidden = [_positive_int("hidden sizes", h) for h in hidden]
    if classes is not None:
        classes = _positive_int("classes", classes)
        if hidden:
            raise ValueError("a label's embedding is a learned table: hidden applies to vectors")
        features = min(classes, 32) if features is None else features
    else:
        inputs = _positive_int("inputs", inputs)
        default = hidden[-1] if hidden else inputs
        features = default if features is None else features
        if not hidden and features != inputs:
            raise ValueError(
                f"features={features} differs from inputs={inputs}: without hidden layers the "
                "embedding is the standardized vector itself; add hidden=(...) to map it"
            )
    features = _positive_int("features", features)
    return {"classes": classes, "inputs": inputs, "features": features, "hidden": hidden}


class ContextEmbedding(nn.Module):
    """Labels or vectors to the ``(batch, features)`` context a conditional field reads.

    Args:
        classes: ``K``: the context is integer labels ``(batch,)`` (or one label, 0-dim, for
            every sample), embedded by a learned ``(K, features)`` table.
        inputs: ``C``: the context is real vectors ``(batch, C)`` (or ``(C,)`` for every
            sample), standardized with the fitted buffers ``mean`` and ``scale`` (0 and 1 until
            :meth:`fit`) and then passed through an MLP of ``hidden`` sizes (tanh) to
            ``features``; without ``hidden`` the standardized vector is the embedding.
        features: size of the embedding (see :func:`context_spec` for the defaults).
        hidden: hidden sizes of the vector MLP.

    Example:
        >>> labels = ContextEmbedding(classes=10, features=8)
        >>> labels(torch.tensor([3, 1])).shape
        torch.Size([2, 8])
        >>> ContextEmbedding(inputs=1, features=16, hidden=(32,))(torch.rand(5, 1)).shape
        torch.Size([5, 16])
    """

    def __init__(self, *, classes=None, inputs=None, features=None, hidden=()):
        super().__init__()
        spec = context_spec(classes=classes, inputs=inputs, features=features, hidden=hidden)
        self.classes, self.inputs = spec["classes"], spec["inputs"]
        self.features = spec["features"]
        if self.classes is not None:
            self.table = nn.Embedding(self.classes, self.features)
            return
        self.register_buffer("mean", torch.zeros(self.inputs))
        self.register_buffer("scale", torch.ones(self.inputs))
        layers, width = [], self.inputs
        for h in spec["hidden"]:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        if spec["hidden"]:
            layers.append(nn.Linear(width, self.features))
        self.net = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        source = f"classes={self.classes}" if self.classes is not None else f"inputs={self.inputs}"
        return f"{source}, features={self.features}"

    def forward(self, context: Tensor) -> Tensor:
        """The embedding: ``(batch, features)``, or ``(features,)`` for one broadcast context."""
        if not isinstance(context, Tensor):
            raise ValueError(f"context must be a tensor, got {type(context).__name__}")
        if self.classes is not None:
            return self.table(self._labels(context))
        return self.net((self._vectors(context) - self.mean) / self.scale)

    def _labels(self, y: Tensor) -> Tensor:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"this context is class labels: give integers in [0, {self.classes}), got dtype "
                f"{y.dtype} (e.g. labels.long())"
            )
        if y.dim() > 1:
            raise ValueError(f"labels must have shape (batch,) or (), got {tuple(y.shape)}")
        if y.numel() and not bool(((y >= 0) & (y < self.classes)).all()):
            bad = y[(y < 0) | (y >= self.classes)][0].item()
            raise ValueError(f"label {bad} is outside [0, {self.classes}) for this model")
        return y.to(self.table.weight.device)

    def _vectors(self, c: Tensor) -> Tensor:
        if not c.is_floating_point():
            raise ValueError(
                f"this context is vectors of {self.inputs} real numbers, got dtype {c.dtype} "
                "(for class labels build the embedding with classes=K)"
            )
        if c.dim() not in (1, 2) or c.shape[-1] != self.inputs:
            raise ValueError(
                f"the context must have shape (batch, {self.inputs}) or ({self.inputs},), got "
                f"{tuple(c.shape)}"
            )
        if not bool(torch.isfinite(c).all()):
            raise ValueError("the context has NaN or Inf values")
        return c.to(self.mean.dtype)

    @torch.no_grad()
    def fit(self, contexts: Tensor) -> ContextEmbedding:
        """Set ``mean`` and ``scale`` to the training contexts' ``(n, C)``; labels: a no-op.

        A constant column keeps scale 1 (it carries no information, and dividing by 0 would).
        """
        if self.classes is not None:
            return self
        c = self._vectors(torch.as_tensor(contexts)).reshape(-1, self.inputs).double()
        if c.shape[0] < 2:
            raise ValueError("fitting the context's standardization needs at least 2 rows")
        scale = c.std(0)
        self.mean.copy_(c.mean(0))
        self.scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
        return self


class Conditioned(nn.Module):
    """A conditional field behind a :class:`ContextEmbedding`: ``f(t, z, embedding(context))``.

    Args:
        field: ``field(t, z, c)`` reading ``c`` of shape ``(batch, embedding.features)``, e.g.
            ``ConcatSquashMLP(D, hidden, context_features=embedding.features)``.
        embedding: the :class:`ContextEmbedding` (or any module mapping a context to ``c``).

    The field's analytic trace (``forward_with_divergence``) and its ``per_sample_time`` carry
    over. Inside a CNF block the embedding runs once per solve (:func:`with_context`).
    """

    def __init__(self, field: nn.Module, embedding: nn.Module):
        super().__init__()
        self.field, self.embedding = field, embedding
        self.per_sample_time = getattr(field, "per_sample_time", False)
        if callable(getattr(field, "forward_with_divergence", None)):
            self.forward_with_divergence = self._with_divergence

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``dz/dt`` of shape ``z.shape``; ``context`` as the embedding takes it."""
        return self.field(t, z, self._embed(context))

    def _with_divergence(self, t, z, context=None) -> tuple[Tensor, Tensor]:
        return self.field.forward_with_divergence(t, z, self._embed(context))

    def solving(self):
        """The field's per-solve context (:func:`cnf.fields.solve_context`)."""
        return solve_context(self.field)

    def _embed(self, context: Tensor | None) -> Tensor:
        if context is None:
            raise ValueError(
                "this is a conditional model: pass context= (labels or vectors, as it was "
                "trained with)"
            )
        return self.embedding(context)


def conditional_field(make: Callable[[int], nn.Module], context: dict | None) -> nn.Module:
    """The field a model's spec asks for: ``make(0)`` without a context; with ``context`` (the
    keywords of :class:`ContextEmbedding`, e.g. from :func:`context_spec`) the field
    ``make(C)`` reading ``C = features`` context features, behind its own embedding.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> make = lambda c: ConcatSquashMLP(2, (16,), context_features=c)
        >>> type(conditional_field(make, {"classes": 3})).__name__
        'Conditioned'
    """
    if context is None:
        return make(0)
    embedding = ContextEmbedding(**context)
    return Conditioned(make(embedding.features), embedding)


def with_context(field: nn.Module, context: Tensor | None) -> nn.Module:
    """``field`` itself without a context; else a module ``(t, z) -> field(t, z, context)``.

    A :class:`Conditioned` field is embedded here, once: the bound module calls the inner field
    with the embedded context. The bound module's ``parameters()`` are the inner field's, and its
    ``context`` attribute is the tensor the field reads, which the adjoint must differentiate
    when it requires a gradient. The field's analytic trace carries over.
    """
    if context is None:
        return field
    if isinstance(field, Conditioned):
        return _Bound(field.field, field.embedding(context))
    return _Bound(field, context)


class _Bound(nn.Module):
    """A field with its context filled in, for solvers and trace estimators that know ``(t, z)``."""

    def __init__(self, field: nn.Module, context: Tensor):
        super().__init__()
        self.field, self.context = field, context
        if callable(getattr(field, "forward_with_divergence", None)):
            self.forward_with_divergence = self._with_divergence

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.field(t, z, self.context)

    def _with_divergence(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.field.forward_with_divergence(t, z, self.context)
