r"""Vector fields ``f(t, z) -> dz/dt`` for continuous normalizing flows.

The layers are FFJORD's *ConcatSquash* layers (Grathwohl et al. 2019): a linear (or convolutional)
map of the state whose output is gated and shifted by functions of time,

.. math::

    \mathrm{out} = (W x + b) \odot \sigma(a\,t + c) + d\,t,

so time conditions every layer without being concatenated to the input. Every layer and every
activation owns its own parameters (no module instance is shared between layers).

:class:`ConcatSquashMLP` also computes its exact divergence analytically
(:meth:`ConcatSquashMLP.forward_with_divergence`), which :func:`cnf.trace.divergence_exact` uses
in place of automatic differentiation.
"""

from __future__ import annotations

from collections.abc import Sequence

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
            f"t must be a scalar time (a 0-dim tensor or a float), got shape {tuple(t.shape)}"
        )
    return t.reshape(1, 1)


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
        return y, 1 - y * y


class _Softplus(_Activation):
    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)
        dy = torch.where(x > _SOFTPLUS_THRESHOLD, torch.ones_like(x), torch.sigmoid(x))
        return y, dy


class _ELU(_Activation):
    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.elu(x)
        # for x <= 0, elu(x) = exp(x) - 1, so its derivative exp(x) is y + 1
        return y, torch.where(x > 0, torch.ones_like(x), y + 1)


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
        return x * s, s * (1 + bx * (1 - s))


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
    ``hyper_bias`` holds ``d``.

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.

    Example:
        >>> layer = ConcatSquashLinear(2, 8)
        >>> layer(torch.tensor(0.5), torch.randn(16, 2)).shape
        torch.Size([16, 8])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.hyper_gate = nn.Linear(1, out_features)
        self.hyper_bias = nn.Linear(1, out_features, bias=False)

    def gate(self, t: Tensor) -> Tensor:
        r"""The gate :math:`\sigma(a\,t + c)`, shape ``(1, out_features)`` for t of shape (1, 1)."""
        return torch.sigmoid(self.hyper_gate(t))

    def shift(self, t: Tensor) -> Tensor:
        r"""The time bias :math:`d\,t`, shape ``(1, out_features)``, for ``t`` of shape (1, 1)."""
        return self.hyper_bias(t)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: scalar time (0-dim tensor or float; cast to ``x``'s dtype).
            x: input of shape ``(..., in_features)``.

        Returns:
            shape ``(..., out_features)``.
        """
        t = _time(t, x)
        return self.linear(x) * self.gate(t) + self.shift(t)


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
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        *,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        (dim,) = _check_sizes("dim", (dim,))
        hidden = _check_sizes("hidden", hidden)
        sizes = (dim, *hidden, dim)
        self.dim = dim
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activations = nn.ModuleList(_make_activation(activation) for _ in hidden)
        if zero_init_last:
            last = self.layers[-1]
            for p in (last.linear.weight, last.linear.bias, last.hyper_bias.weight):
                nn.init.zeros_(p)

    def _check(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (batch, {self.dim}), got {tuple(z.shape)}")

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        """Evaluate ``dz/dt = f(t, z)``.

        Args:
            t: scalar time (0-dim tensor or float).
            z: state of shape ``(batch, dim)``.

        Returns:
            ``dz/dt`` of shape ``(batch, dim)``.
        """
        self._check(z)
        t = _time(t, z)
        x = z
        for layer, act in zip(self.layers, self.activations):
            x = act(layer.linear(x) * layer.gate(t) + layer.shift(t))
        last = self.layers[-1]
        return last.linear(x) * last.gate(t) + last.shift(t)

    def forward_with_divergence(self, t: Tensor | float, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Evaluate ``f(t, z)`` and its exact divergence, with the Jacobian taken analytically.

        The Jacobian of the network is a product of per-sample matrices,

        .. math::

            \frac{\partial f}{\partial z} = G\,W_{n+1}\,S_n W_n \cdots S_1 W_1, \qquad
            S_k = \mathrm{diag}(s'(u_k) \odot g_k), \quad G = \mathrm{diag}(g_{n+1}),

        with :math:`u_k` the pre-activations and :math:`g_k` the layers' time gates, and its
        trace is a multilinear form in the per-sample slopes :math:`s_k = s'(u_k) \odot g_k`
        whose coefficients depend on the weights only. It is evaluated with batched matrix
        products, no autograd, folding the weights into shared tensors where possible:

        * one hidden layer: :math:`s_1 \cdot \operatorname{diag}(W_1 G W_2)`;
        * two: the bilinear form :math:`s_1^\top (A \odot W_2^\top) s_2`,
          :math:`A = W_1 G W_3`;
        * three or more: whichever is cheaper of carrying the ``(batch, D, h_k)`` Jacobian
          forward (cost :math:`\propto D`) or going round
          :math:`\operatorname{tr}(S_1 A S_n W_n \cdots S_2 W_2)` from :math:`S_1` (cost
          :math:`\propto h_1 h_2 h_n`, independent of :math:`D`).

        The result is differentiable with respect to ``z`` and the parameters (the CNF
        backpropagates through the trace when training) and equals the autograd trace to
        rounding.

        :func:`cnf.trace.divergence_exact` calls this method for fields that have it.

        Args:
            t: scalar time (0-dim tensor or float).
            z: state of shape ``(batch, dim)``.

        Returns:
            ``(f, div)``: ``f = dz/dt`` of shape ``(batch, dim)`` and
            :math:`\operatorname{tr}(\partial f / \partial z)` of shape ``(batch,)``.
        """
        self._check(z)
        t = _time(t, z)
        x = z
        slopes = []  # s'(u_k) * g_k, shape (batch, h_k): the diagonals of S_k
        for layer, act in zip(self.layers, self.activations):
            gate = layer.gate(t)
            x, ds = act.value_and_derivative(layer.linear(x) * gate + layer.shift(t))
            slopes.append(ds * gate)
        last = self.layers[-1]
        last_gate = last.gate(t)
        f = last.linear(x) * last_gate + last.shift(t)
        weights = [layer.linear.weight for layer in self.layers]
        return f, _trace_of_chain(weights, slopes, last_gate[0])


def _trace_of_chain(
    weights: Sequence[Tensor], slopes: Sequence[Tensor], gate: Tensor, strategy: str | None = None
) -> Tensor:
    r"""Trace of :math:`J = G W_{n+1} S_n W_n \cdots S_1 W_1` for every sample.

    Args:
        weights: :math:`W_1, \dots, W_{n+1}`, shapes ``(h_1, D), (h_2, h_1), ..., (D, h_n)``.
        slopes: diagonals of :math:`S_1, \dots, S_n`, shapes ``(batch, h_k)``.
        gate: diagonal of :math:`G`, shape ``(D,)`` (shared by the batch).
        strategy: for three or more hidden layers, ``"forward"``, ``"cycle"`` or None for the
            cheaper one (a test hook; both give the same value).

    Returns:
        shape ``(batch,)``.
    """
    w, s, n = weights, slopes, len(slopes)
    last = gate[:, None] * w[-1]  # G W_{n+1}, shape (D, h_n)
    if n == 1:  # tr(S_1 W_1 G W_2) = s_1 . diag(W_1 G W_2)
        return s[0] @ (w[0] * last.T).sum(1)
    if n == 2:  # tr(S_1 A S_2 W_2) = s_1^T (A * W_2^T) s_2 with A = W_1 G W_3: a bilinear form
        return ((s[0] @ ((w[0] @ last) * w[1].T)) * s[1]).sum(-1)

    batch, dim = s[0].shape[0], w[0].shape[1]
    h = [x.shape[0] for x in w[:-1]]  # h_1 .. h_n
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
        t2 = w[0][:, :, None] * w[1].T[:, None, :]  # (h_1, D, h_2)
        x = (s[0] @ t2.reshape(h[0], -1)).reshape(batch, dim, h[1])
        for k in range(2, n):
            x = F.linear(x * s[k - 1][:, None, :], w[k])
        # tr(G W_{n+1} S_n J_n) as a matrix-vector product: no (batch, D, h_n) temporary
        return (x * s[-1][:, None, :]).reshape(batch, -1) @ last.reshape(-1)
    if strategy != "cycle":
        raise ValueError(f"unknown strategy {strategy!r}; valid: 'forward', 'cycle', None")
    # tr(J) = tr(S_1 A S_n W_n ... S_3 W_3 S_2 W_2): start the cycle with R = W_2 S_1 A, one
    # matrix product with the shared tensor T[i, k, j] = W_2[k, i] A[i, j] (D drops out)
    a = w[0] @ last  # A = W_1 G W_{n+1}, shape (h_1, h_n)
    t = w[1].T[:, :, None] * a[:, None, :]  # (h_1, h_2, h_n)
    if n == 3:
        t = t * w[2].T  # fold W_3 in too: R[k, j] then carries W_3[j, k]
    r = (s[0] @ t.reshape(h[0], -1)).reshape(batch, h[1], h[-1])
    if n > 3:
        for k in range(n - 1, 2, -1):  # R <- R S_{k+1} W_{k+1} for k + 1 = n, ..., 4
            r = (r * s[k][:, None, :]) @ w[k]
        r = r * w[2].T
    # sum_{k, j} s_2[k] R[k, j] s_3[j] as a batched vector-matrix product: no temporary of R's size
    return (torch.bmm(s[1][:, None, :], r)[:, 0] * s[2]).sum(-1)


class ConcatSquashConv2d(nn.Module):
    r"""ConcatSquash convolution for images: a convolution gated and shifted per channel by time.

    .. math::

        \mathrm{out}(t, x) = (K * x + b) \odot \sigma(a\,t + c) + d\,t,

    with :math:`a, c, d` of shape ``(out_channels,)`` broadcast over the spatial dimensions.

    Args:
        in_channels, out_channels: channels of the input and output.
        kernel_size, stride, padding: as for :class:`torch.nn.Conv2d`.
        transpose: use :class:`torch.nn.ConvTranspose2d` (for upsampling).

    Example:
        >>> layer = ConcatSquashConv2d(3, 16)
        >>> layer(torch.tensor(0.0), torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.hyper_gate = nn.Linear(1, out_channels)
        self.hyper_bias = nn.Linear(1, out_channels, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: scalar time (0-dim tensor or float; cast to ``x``'s dtype).
            x: input of shape ``(batch, in_channels, H, W)``.

        Returns:
            shape ``(batch, out_channels, H', W')``.
        """
        t = _time(t, x)
        gate = torch.sigmoid(self.hyper_gate(t)).reshape(1, -1, 1, 1)
        return self.conv(x) * gate + self.hyper_bias(t).reshape(1, -1, 1, 1)


class ConcatSquashConvNet(nn.Module):
    r"""A vector field on images: stride-1 ConcatSquash 3x3 convolutions with activations.

    ``in_channels -> hidden_channels[0] -> ... -> hidden_channels[-1] -> in_channels``, with an
    activation after every layer but the last (FFJORD's ODEnet with ``concatsquash`` layers,
    without its down/up-sampling). Every layer keeps the spatial size, so ``f(t, z)`` has ``z``'s
    shape. The divergence comes from :func:`cnf.trace.divergence_exact` (generic, costly for
    large images) or :func:`cnf.trace.divergence_hutchinson`, FFJORD's choice for images.

    Args:
        in_channels: channels :math:`C` of the state.
        hidden_channels: channels of the hidden layers, at least one.
        activation: one of :data:`ACTIVATIONS`; softplus is FFJORD's choice for images.
        zero_init_last: start with the zero field, see :class:`ConcatSquashMLP`.

    Example:
        >>> field = ConcatSquashConvNet(1, hidden_channels=(8, 8))
        >>> field(torch.tensor(0.0), torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 1, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        *,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        (in_channels,) = _check_sizes("in_channels", (in_channels,))
        hidden_channels = _check_sizes("hidden_channels", hidden_channels)
        sizes = (in_channels, *hidden_channels, in_channels)
        self.in_channels = in_channels
        self.layers = nn.ModuleList(
            ConcatSquashConv2d(a, b, kernel_size=3, stride=1, padding=1)
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.activations = nn.ModuleList(_make_activation(activation) for _ in hidden_channels)
        if zero_init_last:
            last = self.layers[-1]
            for p in (last.conv.weight, last.conv.bias, last.hyper_bias.weight):
                nn.init.zeros_(p)

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        """Evaluate ``dz/dt = f(t, z)``.

        Args:
            t: scalar time (0-dim tensor or float).
            z: state of shape ``(batch, in_channels, H, W)``.

        Returns:
            ``dz/dt`` of shape ``(batch, in_channels, H, W)``.
        """
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(
                f"z must have shape (batch, {self.in_channels}, H, W), got {tuple(z.shape)}"
            )
        x = z
        for layer, act in zip(self.layers, self.activations):
            x = act(layer(t, x))
        return self.layers[-1](t, x)
