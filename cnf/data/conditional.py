r"""Two-dimensional conditional data sets :math:`p(x \mid c)` with a closed-form density.

A model of a conditional density is scored by its test negative log-likelihood; here the lowest
reachable value, the conditional entropy, is known, so results can be reported as the gap to it.

=========  ===================================================================================
name       distribution of the context :math:`c` and of :math:`x \in \mathbb{R}^2` given c
=========  ===================================================================================
rotating   :math:`c \sim U[-1, 1]`, :math:`x = s(c) R(\pi c) y` with :math:`s(c) = e^{c/2}` and
           :math:`y \sim \sum_k w_k \mathcal{N}(\mu_k, \sigma^2 I)`, :math:`w = (0.5, 0.3, 0.2)`,
           :math:`\mu_k = 2 (\cos\frac{2\pi k}{3}, \sin\frac{2\pi k}{3})`, :math:`\sigma = 0.4`
=========  ===================================================================================

:math:`R(\phi)` is the rotation by :math:`\phi`, so the context turns the three blobs by up to
half a turn either way and scales them by :math:`e^{\pm 1/2}`. The unequal weights make every
angle distinguishable: no rotation by a multiple of :math:`2\pi/3` maps the law onto itself.
The components' centers lie :math:`2\sqrt3 / 0.4 \approx 8.7` standard deviations apart.

By the change of variables :math:`y = R(-\pi c)\, x / s(c)`, with Jacobian :math:`s(c)^{-2}`:

.. math::

    \log p(x \mid c) = \log p_y\big(R(-\pi c)\, x / s(c)\big) - 2 \log s(c)
                     = \log p_y\big(R(-\pi c)\, x\, e^{-c/2}\big) - c,

    H(x \mid c) = H(y) + 2 \log s(c) = H(y) + c,
    \qquad \mathbb{E}_{c \sim U[-1, 1]}\, H(x \mid c) = H(y).

A Gaussian mixture's entropy :math:`H(y)` has no closed form; it is stored as a constant,
computed by quadrature (see ``_ROTATING_ENTROPY``) and recomputed in the tests.

Example:
    >>> x, c = sample_conditional("rotating", 1000, seed=0)
    >>> x.shape, c.shape
    ((1000, 2), (1000, 1))
    >>> d = conditional_density("rotating")
    >>> round(d.entropy, 4), float(d.entropy_given(0.5)) == d.entropy + 0.5
    (2.0349, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

from .toy import as_generator, check_count

__all__ = [
    "CONDITIONAL_NAMES",
    "ConditionalDensity",
    "conditional_density",
    "conditional_sampler",
    "sample_conditional",
]

_CONTEXT_RANGE = (-1.0, 1.0)

_ROTATING_WEIGHTS = np.array([0.5, 0.3, 0.2])
_ROTATING_ANGLES = 2 * np.pi * np.arange(3) / 3
_ROTATING_MEANS = 2.0 * np.stack([np.cos(_ROTATING_ANGLES), np.sin(_ROTATING_ANGLES)], axis=1)
_ROTATING_STD = 0.4
# H(y) = -integral p_y log p_y in nats. The midpoint rule on [-6, 6]^2 (every center is at least
# 10 std from the edge, so the mass outside is below 1e-20) gives the same 16 digits with cells
# of 0.02, 0.01 and 0.005; scipy's dblquad in polar coordinates agrees to 1e-13. (Gauss-Hermite
# per component converges slowly here: log p_y bends sharply between components.) The value is
# 4.2e-5 nats below H(w) + log(2 pi e sigma^2), the entropy of non-overlapping components.
_ROTATING_ENTROPY = 2.034906800301484


def _check_name(name: str) -> None:
    if name not in CONDITIONAL_NAMES:
        raise ValueError(
            f"unknown conditional data set {name!r}; choose one of: {', '.join(CONDITIONAL_NAMES)}"
        )


def _check_context_values(c: np.ndarray) -> None:
    low, high = _CONTEXT_RANGE
    if not np.all(np.isfinite(c)):
        raise ValueError("the context contains NaN or infinite values; pass finite numbers")
    if np.any((c < low) | (c > high)):
        bad = float(c[(c < low) | (c > high)].flat[0])
        raise ValueError(
            f"the context must lie in [{low}, {high}], the range it is drawn from, got {bad!r}; "
            "rescale it or clip it to that range"
        )


def _as_context(context: ArrayLike, n: int) -> np.ndarray:
    """A float or an array of shape (n,) or (n, 1) as a checked float64 array of shape (n,)."""
    c = np.asarray(context, dtype=np.float64)
    if c.ndim == 0:
        c = np.full(n, float(c))
    elif c.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"the context must be a float or have shape ({n},) or ({n}, 1), one value per "
            f"point, got shape {c.shape}"
        )
    c = c.reshape(n)
    _check_context_values(c)
    return c


def _rotating_log_p_y(y: np.ndarray) -> np.ndarray:
    """log p_y of the base mixture at points of shape (n, 2); shape (n,)."""
    var = _ROTATING_STD**2
    sq_dist = np.sum((y[:, None, :] - _ROTATING_MEANS) ** 2, axis=-1)
    # log-sum-exp: far from all centers every exp(-d^2 / 2 var) underflows to zero.
    exponent = np.log(_ROTATING_WEIGHTS) - sq_dist / (2 * var)
    top = np.max(exponent, axis=-1)
    log_sum = top + np.log(np.sum(np.exp(exponent - top[:, None]), axis=-1))
    return log_sum - math.log(2 * math.pi * var)


def _rotating_y(u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Base draws y, shape (n, 2), from uniforms u (n,) picking the component and normals z."""
    cumulative = np.cumsum(_ROTATING_WEIGHTS)
    # min: the last cumulative weight may round below 1, and u < 1 must still pick component 2.
    component = np.minimum(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1)
    return _ROTATING_MEANS[component] + _ROTATING_STD * z


def _rotate_and_scale(y: np.ndarray, c: np.ndarray, sign: float) -> np.ndarray:
    """s(c) R(pi c) y for sign = 1, and its inverse R(-pi c) y / s(c) for sign = -1."""
    angle, scale = sign * np.pi * c, np.exp(sign * c / 2)
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = np.stack([cos * y[:, 0] - sin * y[:, 1], sin * y[:, 0] + cos * y[:, 1]], axis=1)
    return scale[:, None] * rotated


def _rotating_x(u: np.ndarray, z: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The shared law of both samplers: x (n, 2) from u (n,), z (n, 2) and contexts c (n,)."""
    return _rotate_and_scale(_rotating_y(u, z), c, 1.0)


def _rotating_log_density(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """log p(x | c) for checked x (n, 2) and c (n,); shape (n,)."""
    return _rotating_log_p_y(_rotate_and_scale(x, c, -1.0)) - c


# Per data set: x from (u, z, c) as above, log p(x | c), and E_c H(x | c).
_DRAWS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "rotating": _rotating_x
}
_LOG_DENSITIES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "rotating": _rotating_log_density
}
_ENTROPIES: dict[str, float] = {"rotating": _ROTATING_ENTROPY}

CONDITIONAL_NAMES: tuple[str, ...] = tuple(_DRAWS)
"""Names of the conditional data sets: ``("rotating",)``."""


def sample_conditional(
    name: str,
    n: int,
    seed: int | np.random.Generator | None = None,
    context: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Draw ``n`` i.i.d. pairs :math:`(x, c)` of the conditional data set ``name``.

    The base draws come first and the contexts last, so with the same ``seed``, passing the
    returned contexts back as ``context`` reproduces ``x`` exactly.

    Args:
        name: one of :data:`CONDITIONAL_NAMES`.
        n: number of points, an int >= 0.
        seed: an int for a reproducible draw, a :class:`numpy.random.Generator` to draw from
            (it is advanced), or None for fresh entropy.
        context: None to draw :math:`c \sim U[-1, 1]`; otherwise the contexts to draw
            :math:`x \mid c` at: a float for all points, or an array of shape ``(n,)`` or
            ``(n, 1)``, with values in ``[-1, 1]``.

    Returns:
        ``(x, c)``: points of shape ``(n, 2)`` and their contexts of shape ``(n, 1)``, float64.

    Raises:
        ValueError: for an unknown ``name``, a bad ``n`` or ``seed``, or a ``context`` of the
            wrong shape, not finite, or outside ``[-1, 1]``.
    """
    _check_name(name)
    check_count(n)
    n = int(n)
    c = None if context is None else _as_context(context, n)
    rng = as_generator(seed)
    u, z = rng.random(n), rng.standard_normal((n, 2))
    if c is None:
        c = rng.uniform(*_CONTEXT_RANGE, size=n)
    return _DRAWS[name](u, z, c), c[:, None].copy()


def conditional_sampler(
    name: str,
) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A sampler of fresh batches for training loops: ``sampler(n, generator) -> (x, c)``.

    Each call draws ``n`` new pairs of the data set ``name`` with all randomness from the
    :class:`torch.Generator` given (uniforms and normals drawn in float64 on the generator's
    device), so a run is reproducible from the generator's state and resumes where it stopped.
    The law is that of :func:`sample_conditional`; the draws themselves differ.

    Returns:
        A function returning ``x`` of shape ``(n, 2)`` and ``c`` of shape ``(n, 1)``, float64
        tensors on the CPU.

    Raises:
        ValueError: for an unknown ``name`` (now, not at the first batch); the sampler raises
            it for a bad ``n``.
    """
    _check_name(name)

    def sampler(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_count(n)
        like = {"generator": generator, "dtype": torch.float64, "device": generator.device}
        u = torch.rand(int(n), **like).cpu().numpy()
        z = torch.randn(int(n), 2, **like).cpu().numpy()
        low, high = _CONTEXT_RANGE
        c = low + (high - low) * torch.rand(int(n), **like).cpu().numpy()
        x = _DRAWS[name](u, z, c)
        return torch.from_numpy(x), torch.from_numpy(c[:, None].copy())

    return sampler


def _check_points(x: ArrayLike) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2), one 2-D point per row, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values; pass finite points")
    return x


@dataclass(frozen=True)
class ConditionalDensity:
    r"""A conditional data set whose density :math:`p(x \mid c)` is known in closed form.

    Get one with :func:`conditional_density`; do not construct it directly.

    Attributes:
        name: the data set, one of :data:`CONDITIONAL_NAMES`.
        entropy: the expected conditional entropy :math:`\mathbb{E}_c H(x \mid c)` in nats,
            the lowest expected negative log-likelihood a model of :math:`p(x \mid c)` can
            reach on data drawn with random contexts.
        context_range: the interval ``(low, high)`` the context is drawn uniformly from.
    """

    name: str
    entropy: float
    context_range: tuple[float, float] = _CONTEXT_RANGE

    def log_density(self, x: ArrayLike, c: ArrayLike) -> np.ndarray:
        r""":math:`\log p(x \mid c) = \log p_y(R(-\pi c)\, x\, e^{-c/2}) - c` in nats.

        Args:
            x: points of shape ``(n, 2)``; finite. Numpy arrays, lists and CPU tensors work.
            c: their contexts: a float for all points, or shape ``(n,)`` or ``(n, 1)``, in
                ``[-1, 1]``.

        Returns:
            The log-densities, shape ``(n,)``, float64.

        Raises:
            ValueError: for ``x`` not of shape ``(n, 2)`` or not finite, or a bad ``c``.
        """
        x = _check_points(x)
        c = _as_context(c, len(x))
        return _LOG_DENSITIES[self.name](x, c)

    def entropy_given(self, c: ArrayLike) -> np.ndarray:
        r"""The conditional entropy :math:`H(x \mid c) = H(y) + c` in nats.

        Args:
            c: contexts of any shape, in ``[-1, 1]``.

        Returns:
            An array of the shape of ``c``, float64.
        """
        c = np.asarray(c, dtype=np.float64)
        _check_context_values(c)
        return self.entropy + c

    def sample(
        self,
        n: int,
        seed: int | np.random.Generator | None = None,
        context: ArrayLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` pairs ``(x, c)``, shapes ``(n, 2)`` and ``(n, 1)``; see
        :func:`sample_conditional`."""
        return sample_conditional(self.name, n, seed, context)


def conditional_density(name: str) -> ConditionalDensity:
    """The closed-form conditional density and entropy of the data set ``name``.

    Args:
        name: one of :data:`CONDITIONAL_NAMES`.

    Returns:
        A :class:`ConditionalDensity` with ``log_density(x, c)``, ``entropy``,
        ``entropy_given(c)``, ``context_range`` and ``sample``.

    Raises:
        ValueError: for an unknown name.
    """
    _check_name(name)
    return ConditionalDensity(name=name, entropy=_ENTROPIES[name])
