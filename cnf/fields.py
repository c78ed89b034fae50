r"""Vector fields ``f(t, z) -> dz/dt`` for continuous normalizing flows.

The layers are FFJORD's *ConcatSquash* layers (Grathwohl et al. 2019): a linear (or convolutional)
map of the state whose output is gated and shifted by functions of time,

.. math::

    \mathrm{out} = (W x + b) \odot \sigma(a\,t + c) + d\,t,

so time conditions every layer without being concatenated to the input. Every layer and every
activation owns its own parameters (no module instance is shared between layers).

Time is one scalar for the whole batch (what an ODE solver passes), or one time per sample, a
tensor of shape ``(batch,)`` (what flow matching passes: each point of the batch sits at its own
time on its path); then every sample gets its own gates and shifts,
:math:`\mathrm{out}_i = (W x_i + b) \odot \sigma(a\,t_i + c) + d\,t_i`. The networks say so
with the class attribute ``per_sample_time = True``, which flow matching
(:func:`cnf.training.flow_matching.field_velocity`) reads to call them once on the whole batch
(a field without it is evaluated point by point).

Built with ``context_features = C > 0``, :class:`ConcatSquashMLP` and
:class:`ConcatSquashConvNet` are conditional fields ``f(t, z, c)``: their hypernets read
:math:`h_i = [t_i, c_i]`, so gates and shifts differ per sample (per channel for the
convolutions: FiLM). The context is ``(batch, C)``, or ``(C,)`` for every sample.

:class:`ConcatSquashMLP` also computes its exact divergence analytically
(:meth:`ConcatSquashMLP.forward_with_divergence`), which :func:`cnf.trace.divergence_exact` uses
in place of automatic differentiation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "ConcatSquashConv2d",
    "ConcatSquashConvNet",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
]

ACTIVATIONS = ("tanh", "softplus", "swish", "elu")
"""Names accepted by the ``activation`` argument of the networks in this module."""

# F.softplus switches to the identity above this input; its derivative must switch with it so
# that the analytic divergence matches autograd's to rounding.
_SOFTPLUS_THRESHOLD = 20.0


def _time(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as a ``(1, 1)`` tensor with ``like``'s dtype and device (the input of the hypernets).

    The solver may hand over a float64 time with a float32 state; time is one scalar, so casting
    it costs nothing and spares every caller the bookkeeping.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.numel() != 1:
        raise ValueError(
            f"t must be a scalar time (a 0-dim tensor or a float), got shape {tuple(t.shape)}; "
            "one time per sample is accepted by forward only"
        )
    return t.reshape(1, 1)


def _times(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as a ``(1, 1)`` (one scalar time) or ``(batch, 1)`` column (a time per sample).

    A scalar is a float or a tensor of one element; a time per sample is a 1-D tensor with one
    entry per row of ``like`` (``like.shape[0]``). Cast to ``like``'s dtype and device.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(1, 1)
    if t.dim() != 1 or like.dim() < 2 or t.shape[0] != like.shape[0]:
        batch = like.shape[0] if like.dim() >= 2 else "batch"
        raise ValueError(
            "t must be a scalar time (a 0-dim tensor or a float) or one time per sample of "
            f"shape ({batch},), got shape {tuple(t.shape)} for a state of shape "
            f"{tuple(like.shape)}"
        )
    return t[:, None]


def _no_context(field: nn.Module, context: Tensor | None) -> None:
    """A field built without context features refuses a context: a mistake, not a no-op."""
    if context is not None:
        raise ValueError(
            f"{type(field).__name__} is an unconditional field and takes no context; call the "
            "flow without context=, or give it a field that uses one"
        )


def _check_context_features(size: object) -> None:
    """``context_features`` must be an int >= 0 (a bool or a float is a mistake, not a size)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"context_features must be an int >= 0, got {size!r}")
    if size < 0:
        raise ValueError(f"context_features must be an int >= 0, got {size}")


def _context_rows(field: nn.Module, context: Tensor | None, z: Tensor) -> Tensor | None:
    """The context of ``field`` (built with ``context_features = C``) as ``(batch, C)`` rows.

    ``context`` is ``(batch, C)``, or ``(C,)`` for one context broadcast to every sample, cast
    to ``z``'s dtype; ``batch = z.shape[0]``. None for an unconditional field (C = 0), which
    refuses a context. Shared by the conditional fields so they refuse the same mistakes with
    the same words.
    """
    size = field.context_features
    if size == 0:
        _no_context(field, context)
        return None
    if context is None:
        raise ValueError(
            f"{type(field).__name__} was built with context_features={size}: pass a context "
            f"of shape (batch, {size}) (or ({size},) for every sample)"
        )
    c = torch.as_tensor(context)
    c = c[None] if c.dim() == 1 else c
    if not c.is_floating_point():
        raise ValueError(f"the context must be real numbers (embed labels first): {c.dtype}")
    if c.dim() != 2 or c.shape[1] != size or c.shape[0] not in (1, z.shape[0]):
        raise ValueError(
            f"the context must have shape ({z.shape[0]}, {size}) or ({size},) for a state of "
            f"shape {tuple(z.shape)}, got {tuple(c.shape)}"
        )
    return c.to(dtype=z.dtype).expand(z.shape[0], size)


def solve_context(field: nn.Module):
    """``field.solving()``, the context a field may offer for one solve (see
    :meth:`ConcatSquashMLP.solving`), or a context that does nothing."""
    context = getattr(field, "solving", None)
    return context() if callable(context) else nullcontext()


def _zero_last(layer: nn.Module) -> None:
    """Zero a ConcatSquash layer's map and time bias: the field starts at exactly 0."""
    inner = layer.linear if hasattr(layer, "linear") else layer.conv
    for p in (inner.weight, inner.bias, layer.hyper_bias.weight):
        nn.init.zeros_(p)


class _Activation(nn.Module):
    """An elementwise activation that also returns its derivative (for the analytic trace)."""

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(s(x), s'(x))``, both of ``x``'s shape and differentiable."""
        raise NotImplementedError


class _Tanh(_Activation):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.tanh(x)
        return y, torch.addcmul(y.new_ones(()), y, y, value=-1)  # 1 - y^2 in one op


class _Softplus(_Activation):
    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)
        return y, torch.sigmoid(x).masked_fill(x > _SOFTPLUS_THRESHOLD, 1.0)


class _ELU(_Activation):
    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.elu(x)
        # for x <= 0, elu(x) = exp(x) - 1, so its derivative exp(x) is y + 1; for x > 0, y > 0
        return y, y.clamp(max=0) + 1


class _Swish(_Activation):
    r"""``x * sigmoid(beta * x)`` with a learnable ``beta`` (initially 1), as in FFJORD."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bx = self.beta * x
        s = torch.sigmoid(bx)
        # s' = s (1 + bx (1 - s)) = s + bx (s - s^2), as two fused multiply-adds
        return x * s, torch.addcmul(s, bx, torch.addcmul(s, s, s, value=-1))


_ACTIVATION_CLASSES = {"tanh": _Tanh, "softplus": _Softplus, "swish": _Swish, "elu": _ELU}


def _make_activation(name: str) -> _Activation:
    """A new activation module (never a shared instance: swish carries a parameter)."""
    if name not in _ACTIVATION_CLASSES:
        raise ValueError(f"unknown activation {name!r}; valid activations: {list(ACTIVATIONS)}")
    return _ACTIVATION_CLASSES[name]()


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not sizes or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {sizes!r}")
    return sizes


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's ConcatSquash linear layer: a linear map gated and shifted by time.

    .. math::

        \mathrm{out}(t, x) = (W x + b) \odot \sigma(a\,t + c) + d\,t

    with :math:`W` of shape ``(out_features, in_features)`` and :math:`b, a, c, d` of shape
    ``(out_features,)``: ``linear`` holds ``W, b``, ``hyper_gate`` holds ``a, c`` and
    ``hyper_bias`` holds ``d``. With ``context_features = C > 0`` the hypernets read the time
    and a context vector together, :math:`h = [t, c]` (``a`` and ``d`` of shape
    ``(out_features, 1 + C)``): :math:`\sigma(A h + c_0)` and :math:`D h` differ per sample.
    This layer's :meth:`forward` is time-only; :class:`ConcatSquashMLP` applies the context.

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.
        context_features: size ``C`` of the context (0: an unconditional layer).
        gate_context: whether the gate reads the context too (else only the shift does).

    Example:
        >>> layer = ConcatSquashLinear(2, 8)
        >>> layer(torch.tensor(0.5), torch.randn(16, 2)).shape
        torch.Size([16, 8])
        >>> layer(torch.rand(16), torch.randn(16, 2)).shape  # a time per sample
        torch.Size([16, 8])
    """

    per_sample_time = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        context_features: int = 0,
        *,
        gate_context: bool = True,
    ) -> None:
        super().__init__()
        hyper = 1 + int(context_features)  # the hypernets read [t, c]
        self.context_features = int(context_features)
        self.linear = nn.Linear(in_features, out_features)
        self.hyper_gate = nn.Linear(hyper if gate_context else 1, out_features)
        self.hyper_bias = nn.Linear(hyper, out_features, bias=False)

    def gate(self, t: Tensor) -> Tensor:
        r"""The gate :math:`\sigma(a\,t + c)`: shape ``(n, out_features)`` for t of shape (n, 1)."""
        return torch.sigmoid(self.hyper_gate(t))

    def shift(self, t: Tensor) -> Tensor:
        r"""The time bias :math:`d\,t`: shape ``(n, out_features)`` for ``t`` of shape (n, 1)."""
        return self.hyper_bias(t)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: scalar time (0-dim tensor, float or one element), or one time per sample of
                shape ``(batch,)``, sample ``i`` being ``x[i]``; cast to ``x``'s dtype.
            x: input of shape ``(..., in_features)``; ``(batch, ..., in_features)`` for a time
                per sample.

        Returns:
            shape ``(..., out_features)``.
        """
        t = _times(t, x)
        if t.shape[0] > 1 and x.dim() > 2:  # per-sample gates broadcast over the middle dims
            t = t.reshape(-1, *([1] * (x.dim() - 1)))
        return self.linear(x) * self.gate(t) + self.shift(t)

    def _terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(W, b, a, c, d)`` of the equation above, with ``a`` and ``d`` of shape ``(out, 1)``.

        Each attribute is looked up once: a module attribute costs about as much as a small
        tensor operation, and :class:`ConcatSquashMLP` gathers these on every evaluation.
        """
        linear, gate = self.linear, self.hyper_gate
        return linear.weight, linear.bias, gate.weight, gate.bias, self.hyper_bias.weight


class ConcatSquashMLP(nn.Module):
    r"""A vector field ``f(t, z)`` on :math:`\mathbb{R}^D`: ConcatSquash linear layers, activations.

    For hidden sizes :math:`(h_1, \dots, h_n)` the network is
    :math:`D \to h_1 \to \dots \to h_n \to D`,

    .. math::

        x_0 = z, \quad x_k = s(L_k(t, x_{k-1})) \ (k = 1..n), \quad f(t, z) = L_{n+1}(t, x_n),

    with :class:`ConcatSquashLinear` layers :math:`L_k` and no activation after the last one.

    Activations (each layer gets its own module):

    * ``"tanh"``, ``"softplus"``, ``"elu"``: the usual ones.
    * ``"swish"``: :math:`x\,\sigma(\beta x)` with a learnable :math:`\beta` initialised to 1
      (FFJORD's choice), one per layer (FFJORD's registry shares one instance, hence one
      :math:`\beta`, between all layers).

    All activations are smooth enough for the trace to be differentiable (ELU's second derivative
    jumps at 0, which gradient descent does not mind).

    Initialisation: PyTorch's default for every layer. ``zero_init_last=True`` zeroes the last
    layer's weight, bias and time bias, so the field is exactly 0 and the flow starts as the
    identity (a common choice for flows: the initial model is the base distribution and the
    first solves take few steps); the first gradient step then reaches only the last layer
    (every other gradient is multiplied by its zero weight), after which all layers train.

    Args:
        dim: dimension :math:`D` of the state.
        hidden: hidden sizes :math:`(h_1, \dots, h_n)`, at least one.
        activation: one of :data:`ACTIVATIONS`.
        zero_init_last: start with the zero field (see above).

    Example:
        >>> field = ConcatSquashMLP(2, hidden=(64, 64, 64), activation="tanh")
        >>> field(torch.tensor(0.0), torch.randn(128, 2)).shape
        torch.Size([128, 2])
        >>> field(torch.rand(128), torch.randn(128, 2)).shape  # a time per sample
        torch.Size([128, 2])
    """

    per_sample_time = True
    """:meth:`forward` takes one time per sample, ``t`` of shape ``(batch,)``."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        *,
        context_features: int = 0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        (dim,) = _check_sizes("dim", (dim,))
        hidden = _check_sizes("hidden", hidden)
        _check_context_features(context_features)
        sizes = (dim, *hidden, dim)
        self.dim, self.context_features = dim, context_features
        self._out_sizes = sizes[1:]  # of the layers, for splitting their concatenated gates
        # the output layer's gate reads the time only: one gate for the whole batch folds into
        # its weight, which keeps the analytic trace as cheap as without a context
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b, context_features, gate_context=k < len(hidden))
            for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        self.activations = nn.ModuleList(_make_activation(activation) for _ in hidden)
        if zero_init_last:
            _zero_last(self.layers[-1])

    def _check(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (batch, {self.dim}), got {tuple(z.shape)}")

    def _per_sample_terms(self, start: int, stop: int | None, h_gate: Tensor, h_bias: Tensor):
        r"""The per-sample gates :math:`g_{k,i} = \sigma(a_k h^{gate}_i + c_k)` and biases
        :math:`b'_{k,i} = g_{k,i} \odot b_k + d_k h^{bias}_i` of ``layers``, computed together
        (a few larger operations make a smaller autograd graph than many small ones) and split
        per layer, each ``(batch, out_k)``, for ``layers[start:stop]``; the hypernet inputs are
        ``(batch, 1)`` times, or ``(batch, 1 + C)`` times and contexts."""
        _, b, a, c, d = self._hypernets(start, stop)
        gate = torch.sigmoid(torch.addmm(c, h_gate, a.T))  # (batch, H)
        bias = torch.addcmul(h_bias @ d.T, gate, b)
        sizes = self._out_sizes[start:stop]
        return gate.split_with_sizes(sizes, dim=1), bias.split_with_sizes(sizes, dim=1)

    def _per_sample_chain(self, z: Tensor, gates, biases, slopes: list | None = None) -> Tensor:
        r"""The network with per-sample gates and biases, :math:`L_k(x_i) = (x_i W_k^\top)
        \odot g_{k,i} + b'_{k,i}`; with ``slopes`` a list, the gated activation slopes
        :math:`s'(u_k) \odot g_k` of the hidden layers (the per-sample diagonals of the
        Jacobian's chain) are appended to it."""
        x = z
        for layer, g, bk, act in zip(self.layers, gates, biases, self.activations):
            u = torch.addcmul(bk, x @ layer.linear.weight.T, g)
            if slopes is None:
                x = act(u)
            else:
                x, ds = act.value_and_derivative(u)
                slopes.append(ds * g)
        return torch.addcmul(biases[-1], x @ self.layers[-1].linear.weight.T, gates[-1])

    def _conditional_terms(self, t: Tensor, c: Tensor):
        r"""Per-sample gates and biases of every layer from :math:`h = [t, c]`: the hidden
        layers' gates and every layer's bias read ``h``; the output gate reads ``t`` only."""
        h = torch.cat([t.expand(c.shape[0], 1), c], dim=1)  # (batch, 1 + C)
        last = len(self.layers) - 1
        gates, biases = self._per_sample_terms(0, last, h, h)
        gate_out, bias_out = self._per_sample_terms(last, None, h[:, :1], h)
        return (*gates, *gate_out), (*biases, *bias_out)

    def forward(self, t: Tensor | float, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate ``dz/dt = f(t, z)``.

        Args:
            t: scalar time (0-dim tensor, float or one element), or one time per sample of
                shape ``(batch,)`` (``z[i]`` at time ``t[i]``).
            z: state of shape ``(batch, dim)``.
            context: ``(batch, C)`` (or ``(C,)``, the same for every sample) for a field built
                with ``context_features = C``; None otherwise.

        Returns:
            ``dz/dt`` of shape ``(batch, dim)``.
        """
        self._check(z)
        c = _context_rows(self, context, z)
        t = _times(t, z)
        if c is not None:
            return self._per_sample_chain(z, *self._conditional_terms(t, c))
        if t.shape[0] != 1:
            return self._forward_per_sample(t, z)
        weights, biases = self._affine_maps(t.reshape(1))
        x = z
        for v, b, act in zip(weights, biases, self.activations):
            x = act(torch.addmm(b, x, v))
        return torch.addmm(biases[-1], x, weights[-1])

    def _forward_per_sample(self, t: Tensor, z: Tensor) -> Tensor:
        r"""``f(t_i, z_i)`` for every sample, with ``t`` of shape ``(batch, 1)``.

        The gates now differ between samples and cannot fold into the weights; each layer is
        :math:`L_k(t_i, x_i) = (x_i W_k^\top) \odot g_{k,i} + b'_{k,i}`, with the gates
        :math:`g_{k,i} = \sigma(a_k t_i + c_k)` and biases :math:`b'_{k,i} = g_{k,i} \odot b_k
        + d_k t_i` of all layers computed together, shape ``(batch, H)``.
        """
        return self._per_sample_chain(z, *self._per_sample_terms(0, None, t, t))

    def _affine_maps(self, t: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        r"""Every layer at time ``t`` as a plain affine map: :math:`L_k(t, x) = x V_k + b'_k`.

        ``t`` is one scalar for the whole batch, so each layer's gate and shift fold into its
        weights,

        .. math::

            V_k = (\operatorname{diag}(g_k) W_k)^\top, \quad b'_k = g_k \odot b_k + d_k t,
            \qquad g_k = \sigma(a_k t + c_k),

        which costs weight-sized operations in place of batch-sized ones. The gates and biases
        of all layers are computed together, from the layers' concatenated hypernet
        parameters: a few larger operations make a smaller autograd graph than many small ones.

        Args:
            t: time of shape ``(1,)``, with the parameters' dtype and device.

        Returns:
            ``([V_1, ..., V_{n+1}], [b'_1, ..., b'_{n+1}])``, shapes ``(in_k, out_k)`` (the
            transposes, which :func:`torch.addmm` takes as they are) and ``(out_k,)``.
        """
        w, b, a, c, d = self._hypernets()
        gate = torch.sigmoid(torch.addmv(c, a, t))  # (H,), H = sum out_k
        bias = torch.addcmul(torch.mv(d, t), gate, b)
        gates = gate.split_with_sizes(self._out_sizes)
        return [wk.t() * g for wk, g in zip(w, gates)], bias.split_with_sizes(self._out_sizes)

    def _hypernets(self, start: int = 0, stop: int | None = None):
        """The weights of ``layers[start:stop]`` and their ``b, a, c, d`` concatenated over
        those layers; computed once per grad mode inside :meth:`solving`, at every call
        outside it."""
        cache = self.__dict__.get("_hypernet_cache")
        key = (torch.is_grad_enabled(), start, stop)
        if cache is not None and key in cache:
            return cache[key]
        w, b, a, c, d = zip(*(layer._terms() for layer in self.layers[start:stop]))
        terms = (w, torch.cat(b), torch.cat(a), torch.cat(c), torch.cat(d))
        if cache is not None:
            cache[key] = terms
        return terms

    @contextmanager
    def solving(self):
        """A context for one solve, during which the parameters do not change: the layers'
        concatenated hypernet parameters are computed once (per grad mode, with their graph
        while one is recorded) instead of at every evaluation.

        :class:`cnf.CNFTransform` enters it around its forward solve. Changing a parameter
        inside it (in place or by assignment) is not seen until it exits.
        """
        if "_hypernet_cache" in self.__dict__:  # nested: the outer context owns the cache
            yield
            return
        self.__dict__["_hypernet_cache"] = {}
        try:
            yield
        finally:
            del self.__dict__["_hypernet_cache"]

    def forward_with_divergence(
        self, t: Tensor | float, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Evaluate ``f(t, z)`` and its exact divergence, with the Jacobian taken analytically.

        With the time gates folded into the weights, :math:`W'_k = \operatorname{diag}(g_k) W_k`,
        the Jacobian of the network is a product of per-sample matrices,

        .. math::

            \frac{\partial f}{\partial z} = W'_{n+1} S_n W'_n \cdots S_1 W'_1, \qquad
            S_k = \operatorname{diag}(s'(u_k)),

        with :math:`u_k` the pre-activations, and its trace is a multilinear form in the
        per-sample slopes :math:`s'(u_k)` whose coefficients depend on the weights only. It is
        evaluated with batched matrix products, no autograd, folding the weights into shared
        tensors where possible:

        * one hidden layer: :math:`s'(u_1) \cdot \operatorname{diag}(W'_1 W'_2)`;
        * two: the bilinear form :math:`s'(u_1)^\top (A \odot W_2'^\top)\, s'(u_2)`,
          :math:`A = W'_1 W'_3`;
        * three or more: whichever is cheaper of carrying the ``(batch, D, h_k)`` Jacobian
          forward (cost :math:`\propto D`) or going round
          :math:`\operatorname{tr}(S_1 A S_n W'_n \cdots S_2 W'_2)` from :math:`S_1` (cost
          :math:`\propto h_1 h_2 h_n`, independent of :math:`D`).

        The result is differentiable with respect to ``z`` and the parameters (the CNF
        backpropagates through the trace when training) and equals the autograd trace to
        rounding.

        :func:`cnf.trace.divergence_exact` calls this method for fields that have it.

        Args:
            t: scalar time (0-dim tensor or float); unlike :meth:`forward`, not one per sample
                (a ``ValueError``).
            z: state of shape ``(batch, dim)``.
            context: as for :meth:`forward`.

        Returns:
            ``(f, div)``: ``f = dz/dt`` of shape ``(batch, dim)`` and
            :math:`\operatorname{tr}(\partial f / \partial z)` of shape ``(batch,)``.
        """
        self._check(z)
        c = _context_rows(self, context, z)
        if c is not None:
            return self._conditional_with_divergence(_time(t, z), z, c)
        weights, biases = self._affine_maps(_time(t, z).reshape(1))
        x, slopes = z, []  # slopes: s'(u_k), shape (batch, h_k), the diagonals of S_k
        for v, b, act in zip(weights, biases, self.activations):
            x, ds = act.value_and_derivative(torch.addmm(b, x, v))
            slopes.append(ds)
        return torch.addmm(biases[-1], x, weights[-1]), _trace_of_chain(weights, slopes)

    def _conditional_with_divergence(self, t: Tensor, z: Tensor, c: Tensor):
        r"""``(f, div)`` with a context: the hidden layers' per-sample gates join the slopes,
        :math:`S_k G_k`, and the output gate, one for the batch (it reads the time only),
        folds into the last weight, so the trace is the same chain as without a context."""
        gates, biases = self._conditional_terms(t, c)
        slopes: list[Tensor] = []
        f = self._per_sample_chain(z, gates, biases, slopes)
        weights = [layer.linear.weight.T for layer in self.layers[:-1]]
        weights.append(self.layers[-1].linear.weight.T * gates[-1][0])  # the time is one scalar
        return f, _trace_of_chain(weights, slopes)


def _trace_of_chain(
    weights: Sequence[Tensor], slopes: Sequence[Tensor], strategy: str | None = None
) -> Tensor:
    r"""Trace of :math:`J = W_{n+1} S_n W_n \cdots S_1 W_1` for every sample.

    Args:
        weights: the transposes :math:`V_k = W_k^\top`, shapes
            ``(D, h_1), (h_1, h_2), ..., (h_n, D)`` (for a :class:`ConcatSquashMLP`, of the
            weights with the gates folded in).
        slopes: diagonals of :math:`S_1, \dots, S_n`, shapes ``(batch, h_k)``.
        strategy: for three or more hidden layers, ``"forward"``, ``"cycle"`` or None for the
            cheaper one (a test hook; both give the same value).

    Returns:
        shape ``(batch,)``.
    """
    v, s, n = weights, slopes, len(slopes)
    if n == 1:  # tr(S_1 W_1 W_2) = s_1 . diag(W_1 W_2)
        return s[0] @ (v[0] * v[1].T).sum(0)
    if n == 2:  # tr(S_1 A S_2 W_2) = s_1^T (A * W_2^T) s_2 with A = W_1 W_3: a bilinear form
        return ((s[0] @ ((v[2] @ v[0]).T * v[1])) * s[1]).sum(-1)

    batch, dim = s[0].shape[0], v[0].shape[0]
    h = [x.shape[1] for x in v[:-1]]  # h_1 .. h_n
    if strategy is None:
        # multiply-adds per sample of each way round; an elementwise product on a (batch, ., .)
        # tensor counts 4 per entry (memory-bound, and its backward costs two more)
        forward = h[0] * dim * h[1] + sum(dim * h[k - 1] * h[k] for k in range(2, n))
        forward += 4 * sum(dim * h[k] for k in range(1, n))
        cycle = h[0] * h[1] * h[-1] + sum(h[1] * h[k] * h[k - 1] for k in range(3, n))
        cycle += 4 * h[1] * (h[2] + sum(h[k] for k in range(3, n)) + (h[2] if n > 3 else 0))
        strategy = "forward" if forward < cycle else "cycle"

    if strategy == "forward":
        # x holds J_k^T = (W_k S_{k-1} ... S_1 W_1)^T, shape (batch, D, h_k), starting at k = 2
        # with one matrix product: x[b, d, k] = sum_i s_1[b, i] (W_1[i, d] W_2[k, i])
        t2 = v[0].T[:, :, None] * v[1][:, None, :]  # (h_1, D, h_2)
        x = (s[0] @ t2.reshape(h[0], -1)).reshape(batch, dim, h[1])
        for k in range(2, n):
            x = (x * s[k - 1][:, None, :]) @ v[k]
        # tr(W_{n+1} S_n J_n): sum over D first, then the dot product with s_n
        return ((x * v[-1].T).sum(1) * s[-1]).sum(-1)
    if strategy != "cycle":
        raise ValueError(f"unknown strategy {strategy!r}; valid: 'forward', 'cycle', None")
    # tr(J) = tr(S_1 A S_n W_n ... S_3 W_3 S_2 W_2): start the cycle with R = W_2 S_1 A, one
    # matrix product with the shared tensor T[i, k, j] = W_2[k, i] A[i, j] (D drops out)
    a = v[0].T @ v[-1].T  # A = W_1 W_{n+1}, shape (h_1, h_n)
    # (h_1, h_2, h_n), from contiguous factors so that the reshape below is a view, not a copy
    t = v[1].contiguous()[:, :, None] * a[:, None, :]
    if n == 3:
        t = t * v[2]  # fold W_3 in too: R[k, j] then carries W_3[j, k]
    r = (s[0] @ t.reshape(h[0], -1)).reshape(batch, h[1], h[-1])
    if n > 3:
        for k in range(n - 1, 2, -1):  # R <- R S_{k+1} W_{k+1} for k + 1 = n, ..., 4
            r = (r * s[k][:, None, :]) @ v[k].T
        r = r * v[2]
    # sum_{k, j} s_2[k] R[k, j] s_3[j] as a batched vector-matrix product: no temporary of R's size
    return (torch.bmm(s[1][:, None, :], r)[:, 0] * s[2]).sum(-1)


class ConcatSquashConv2d(nn.Module):
    r"""ConcatSquash convolution for images: a convolution gated and shifted per channel by time.

    .. math::

        \mathrm{out}(t, x) = (K * x + b) \odot \sigma(a\,t + c) + d\,t,

    with :math:`a, c, d` of shape ``(out_channels,)`` broadcast over the spatial dimensions.

    With ``context_features = C > 0`` the hypernets read the time and a context vector together,
    :math:`h = [t, c]` of size ``1 + C``, so every sample gets its own per-channel scale and
    shift (FiLM, Perez et al. 2018), broadcast over its pixels:

    .. math::

        \mathrm{out}_i = (K * x_i + b) \odot \sigma(A\,h_i + a_0) + D\,h_i,

    with :math:`A, D` of shape ``(out_channels, 1 + C)`` (``hyper_gate.weight`` and
    ``hyper_bias.weight``) and :math:`a_0` of shape ``(out_channels,)``. :meth:`film` applies
    the layer to a given ``h``; :meth:`forward` is the time-only call of a layer with C = 0.

    Args:
        in_channels, out_channels: channels of the input and output.
        kernel_size, stride, padding: as for :class:`torch.nn.Conv2d`.
        transpose: use :class:`torch.nn.ConvTranspose2d` (for upsampling).
        context_features: size ``C`` of the context (0: an unconditional layer).

    Example:
        >>> layer = ConcatSquashConv2d(3, 16)
        >>> layer(torch.tensor(0.0), torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
        >>> layer(torch.rand(4), torch.randn(4, 3, 8, 8)).shape  # a time per sample
        torch.Size([4, 16, 8, 8])
        >>> conditional = ConcatSquashConv2d(3, 16, context_features=2)
        >>> h = torch.cat([torch.rand(4, 1), torch.randn(4, 2)], dim=1)  # rows [t_i, c_i]
        >>> conditional.film(h, torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    per_sample_time = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        transpose: bool = False,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        _check_context_features(context_features)
        self.context_features = context_features
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        # created in this order whatever C is: a seed gives an unconditional layer its old values
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.hyper_gate = nn.Linear(1 + context_features, out_channels)
        self.hyper_bias = nn.Linear(1 + context_features, out_channels, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Apply the layer (C = 0; a layer with a context is applied with :meth:`film`).

        Args:
            t: scalar time (0-dim tensor, float or one element), or one time per sample of
                shape ``(batch,)``, whose gates broadcast over the pixels of ``x[i]``; cast to
                ``x``'s dtype.
            x: input of shape ``(batch, in_channels, H, W)``.

        Returns:
            shape ``(batch, out_channels, H', W')``.
        """
        if self.context_features:
            raise ValueError(
                f"this layer was built with context_features={self.context_features}: apply it "
                "with film(h, x), h = [t, c] of shape (batch, 1 + C)"
            )
        return self._modulate(_times(t, x), x)

    def film(self, h: Tensor, x: Tensor) -> Tensor:
        r"""Apply the layer with the hypernets' input given: :math:`h_i = [t_i, c_i]`.

        Args:
            h: shape ``(n, 1 + C)``, one row for the whole batch (n = 1) or one per sample
                (n = batch); cast to ``x``'s dtype. With C = 0 it is the time column, and
                ``film(t[:, None], x)`` equals ``forward(t, x)``.
            x: input of shape ``(batch, in_channels, H, W)``.

        Returns:
            shape ``(batch, out_channels, H', W')``.
        """
        width = 1 + self.context_features
        if h.dim() != 2 or h.shape[1] != width or h.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"h must have shape ({x.shape[0]}, {width}) or (1, {width}) (rows [t, c]) for an "
                f"input of shape {tuple(x.shape)}, got {tuple(h.shape)}"
            )
        return self._modulate(h.to(dtype=x.dtype), x)

    def _modulate(self, h: Tensor, x: Tensor) -> Tensor:
        """The equation above, for ``h`` of shape ``(n, 1 + C)`` already checked."""
        n = h.shape[0]  # 1, or batch for per-sample gates
        gate = torch.sigmoid(self.hyper_gate(h)).reshape(n, -1, 1, 1)
        return self.conv(x) * gate + self.hyper_bias(h).reshape(n, -1, 1, 1)


class ConcatSquashConvNet(nn.Module):
    r"""A vector field on images: stride-1 ConcatSquash 3x3 convolutions with activations.

    ``in_channels -> hidden_channels[0] -> ... -> hidden_channels[-1] -> in_channels``, with an
    activation after every layer but the last (FFJORD's ODEnet with ``concatsquash`` layers,
    without its down/up-sampling). Every layer keeps the spatial size, so ``f(t, z)`` has ``z``'s
    shape. The divergence comes from :func:`cnf.trace.divergence_exact` (generic, costly for
    large images) or :func:`cnf.trace.divergence_hutchinson`, FFJORD's choice for images.

    With ``context_features = C > 0`` the field is conditional, ``f(t, z, c)``: every layer,
    the last included, is a FiLM layer whose per-sample, per-channel gate and shift read
    :math:`h_i = [t_i, c_i]` (see :class:`ConcatSquashConv2d`),

    .. math::

        x_k = s\bigl((K_k * x_{k-1} + b_k) \odot \sigma(A_k h + a_k) + D_k h\bigr), \quad
        f(t, z, c) = (K_{n+1} * x_n + b_{n+1}) \odot \sigma(A_{n+1} h + a_{n+1}) + D_{n+1} h.

    :class:`ConcatSquashMLP` keeps its output gate time-only so that it folds into the last
    weight of its analytic trace; a convolution has no analytic trace here (the divergence is
    autograd's or Hutchinson's whatever the gates), so nothing is saved by that restriction and
    the output gate reads the context too.

    Args:
        in_channels: channels of the state.
        hidden_channels: channels of the hidden layers, at least one.
        activation: one of :data:`ACTIVATIONS`; softplus is FFJORD's choice for images.
        context_features: size ``C`` of the context (0: an unconditional field, which refuses
            a context).
        zero_init_last: start with the zero field (whatever the context), see
            :class:`ConcatSquashMLP`.

    Example:
        >>> field = ConcatSquashConvNet(1, hidden_channels=(8, 8))
        >>> field(torch.tensor(0.0), torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 1, 6, 6])
        >>> conditional = ConcatSquashConvNet(1, (8, 8), context_features=3)
        >>> conditional(torch.rand(2), torch.randn(2, 1, 6, 6), torch.randn(2, 3)).shape
        torch.Size([2, 1, 6, 6])
    """

    per_sample_time = True
    """:meth:`forward` takes one time per sample, ``t`` of shape ``(batch,)``."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        *,
        context_features: int = 0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        (in_channels,) = _check_sizes("in_channels", (in_channels,))
        hidden_channels = _check_sizes("hidden_channels", hidden_channels)
        _check_context_features(context_features)
        sizes = (in_channels, *hidden_channels, in_channels)
        self.in_channels, self.context_features = in_channels, context_features
        self.layers = nn.ModuleList(
            ConcatSquashConv2d(a, b, 3, stride=1, padding=1, context_features=context_features)
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.activations = nn.ModuleList(_make_activation(activation) for _ in hidden_channels)
        if zero_init_last:
            _zero_last(self.layers[-1])

    def forward(self, t: Tensor | float, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate ``dz/dt = f(t, z)`` (or ``f(t, z, c)`` for a conditional field).

        Args:
            t: scalar time (0-dim tensor, float or one element), or one time per sample of
                shape ``(batch,)`` (``z[i]`` at time ``t[i]``).
            z: state of shape ``(batch, in_channels, H, W)``.
            context: ``(batch, C)`` float (or ``(C,)``, the same for every sample) for a field
                built with ``context_features = C``; None otherwise.

        Returns:
            ``dz/dt`` of shape ``(batch, in_channels, H, W)``.
        """
        if not self.context_features:
            _no_context(self, context)  # before the shape check, as for every unconditional call
            self._check(z)
            t = _times(t, z).reshape(-1)  # checked once: (1,) or (batch,)
            x = z
            for layer, act in zip(self.layers, self.activations):
                x = act(layer(t, x))
            return self.layers[-1](t, x)
        self._check(z)  # first: the context's check reads the batch size
        c = _context_rows(self, context, z)
        h = torch.cat([_times(t, z).expand(z.shape[0], 1), c], dim=1)  # (batch, 1 + C)
        x = z
        for layer, act in zip(self.layers, self.activations):
            x = act(layer.film(h, x))
        return self.layers[-1].film(h, x)

    def _check(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(
                f"z must have shape (batch, {self.in_channels}, H, W), got {tuple(z.shape)}"
            )
