r"""Two-dimensional toy data sets for density estimation.

The eight data sets of FFJORD's ``lib/toy_data.py`` (Grathwohl et al., 2019), reimplemented in
numpy so that every one draws from the random generator it is given (FFJORD's ``2spirals`` and
``checkerboard`` use numpy's global state) and none needs scikit-learn. Scales and noise levels
are FFJORD's, including those it inherits from scikit-learn's ``make_moons``, ``make_circles``
and ``make_swiss_roll``; all points are i.i.d. draws (see "Differences from FFJORD" below).

=============  ===============================================================================
name           distribution of :math:`x \in \mathbb{R}^2`
=============  ===============================================================================
8gaussians     :math:`\frac18\sum_k \mathcal{N}(\mu_k, \sigma^2 I)`, :math:`\mu_k = \frac{4}{1.414}
               (\cos\frac{k\pi}{4}, \sin\frac{k\pi}{4})`, :math:`\sigma = \frac{0.5}{1.414}`
pinwheel       5 arms: :math:`r \sim \mathcal{N}(1, 0.3^2)`, :math:`s \sim \mathcal{N}(0, 0.1^2)`,
               :math:`x = 2 R(-\phi)(r, s)` with :math:`\phi = \frac{2\pi j}{5} + 0.25 e^r`
checkerboard   uniform on the 8 black squares of a 4x4 board on :math:`[-4, 4)^2`
2spirals       :math:`t = 3\pi\sqrt{u}`, :math:`x = \pm\frac13(-t\cos t + \frac{u_1}{2},
               t\sin t + \frac{u_2}{2}) + \mathcal{N}(0, 0.1^2 I)`
moons          two half circles of radius 2, :math:`\mathcal{N}(0, 0.2^2 I)` noise
circles        circles of radius 3 and 1.5, :math:`\mathcal{N}(0, 0.24^2 I)` noise
rings          circles of radius 3, 2.25, 1.5, 0.75, :math:`\mathcal{N}(0, 0.08^2 I)` noise
swissroll      :math:`t \sim U(1.5\pi, 4.5\pi)`, :math:`x = \frac{t}{5}(\cos t, \sin t) +
               \mathcal{N}(0, 0.2^2 I)`
=============  ===============================================================================

Here :math:`u, u_1, u_2 \sim U(0, 1)`, :math:`R(\phi)` is the rotation by :math:`\phi`, and each
mixture picks its component (arm, square, spiral, moon, circle, ring) uniformly at random.

For 8gaussians and checkerboard the density is known in closed form; :func:`density` returns it
as a :class:`ToyDensity` with ``log_density`` and ``entropy``, the lowest expected negative
log-likelihood any model can reach, so that results can be reported as the gap to that floor.

Differences from FFJORD, none of which changes the distribution sampled:

* Every generator draws from the given ``seed`` or :class:`numpy.random.Generator`.
* Mixture components are drawn at random for every point; FFJORD splits a batch into equal
  parts (dropping the remainder for pinwheel and 2spirals, so it can return fewer than ``n``
  points), and scikit-learn spaces the angles of moons, circles and rings evenly.
* Points are float64; FFJORD returns float32 for most data sets.

Example:
    >>> x = sample("pinwheel", 1000, seed=0)
    >>> x.shape
    (1000, 2)
    >>> d = density("checkerboard")
    >>> round(d.entropy, 4), float(d.log_density([[1.0, 1.0]])[0]) == -d.entropy
    (3.4657, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["DENSITY_NAMES", "NAMES", "ToyDensity", "density", "sample"]

# FFJORD divides the 8gaussians points by 1.414, not sqrt(2); keeping 1.414 keeps its entropy.
_EIGHT_GAUSSIANS_RADIUS = 4.0 / 1.414
_EIGHT_GAUSSIANS_STD = 0.5 / 1.414
_EIGHT_GAUSSIANS_CENTERS = _EIGHT_GAUSSIANS_RADIUS * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=1
)
# -E[log p] for the mixture above. Mixture entropies have no closed form. By the 8-fold
# symmetry the entropy is -E[log p(x)] under one component, computed by 80x80-node Gauss-Hermite
# quadrature; a midpoint rule on a 0.005 grid over [-6, 6]^2 agrees to 1e-12 (verified in
# tests/test_toy.py). It lies 0.0063 nats below log 8 + log(2 pi e sigma^2), the value for
# non-overlapping components.
_EIGHT_GAUSSIANS_ENTROPY = 2.831880406137

# The checkerboard covers 8 squares of side 2: uniform density 1/32.
_CHECKERBOARD_AREA = 32.0


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    component = rng.integers(8, size=n)
    return _EIGHT_GAUSSIANS_CENTERS[component] + _EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    arm = rng.integers(5, size=n)
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    # The twist grows exponentially along the arm; FFJORD applies the rotation to a row vector,
    # i.e. it rotates by -angle, so the arms curl clockwise.
    angle = 2 * np.pi * arm / 5 + 0.25 * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    x = radial * cos + tangential * sin
    y = -radial * sin + tangential * cos
    return 2.0 * np.stack([x, y], axis=1)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # Columns -2..1 and rows -2..1 index squares of side 2; a square is black when
    # column + row is even, so each column has two black rows of the column's parity.
    column = rng.integers(4, size=n) - 2
    row = 2 * rng.integers(2, size=n) - 2 + column % 2
    corner = np.stack([column, row], axis=1)
    return 2.0 * (corner + rng.random((n, 2)))


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # sqrt makes points roughly uniform along the spiral, whose length grows like t dt.
    t = 3 * np.pi * np.sqrt(rng.random(n))  # 540 degrees
    jitter = 0.5 * rng.random((n, 2))
    arm = np.stack([-t * np.cos(t), t * np.sin(t)], axis=1) + jitter
    sign = 2.0 * rng.integers(2, size=n) - 1.0
    return sign[:, None] * arm / 3 + 0.1 * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    theta = np.pi * rng.random(n)
    upper = rng.integers(2, size=n).astype(bool)
    x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    # scikit-learn's noise 0.1, then FFJORD's scale 2 and shift.
    points = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * points + np.array([-1.0, -0.2])


def _noisy_circles(n: int, rng: np.random.Generator, radii: np.ndarray, noise: float) -> np.ndarray:
    radius = radii[rng.integers(len(radii), size=n)]
    theta = 2 * np.pi * rng.random(n)
    circle = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return circle + noise * rng.standard_normal((n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    # scikit-learn's radii 1 and 0.5 with noise 0.08, all scaled by 3 in FFJORD.
    return _noisy_circles(n, rng, np.array([3.0, 1.5]), 0.24)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # FFJORD scales the radii by 3 before adding the noise, so the noise stays 0.08.
    return _noisy_circles(n, rng, np.array([3.0, 2.25, 1.5, 0.75]), 0.08)


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    roll = t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    # scikit-learn's unit noise, then FFJORD's division by 5.
    return (roll + rng.standard_normal((n, 2))) / 5.0


_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "circles": _circles,
    "rings": _rings,
    "swissroll": _swissroll,
}

NAMES: tuple[str, ...] = tuple(_GENERATORS)
"""Names of all toy data sets, in FFJORD's order of presentation."""


def _check_name(name: str) -> None:
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of: {', '.join(NAMES)}")


def check_count(n: int) -> None:
    """The number of points to draw: an int >= 0 (a ValueError otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n is the number of points to draw and must be an int >= 0, got {n!r}")


def as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    """``seed`` (an int >= 0, a generator or None) as a numpy generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(
            f"seed must be a non-negative int, a numpy.random.Generator or None, got {seed!r}"
        )
    return np.random.default_rng(seed)


def sample(name: str, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Draw ``n`` i.i.d. points from the toy data set ``name``.

    Args:
        name: one of :data:`NAMES`.
        n: number of points, a positive int.
        seed: an int for a reproducible draw, a :class:`numpy.random.Generator` to draw from
            (it is advanced, so successive calls give fresh points), or None for fresh entropy.

    Returns:
        Points of shape ``(n, 2)``, float64.

    Raises:
        ValueError: for an unknown ``name``, an ``n`` that is not a positive int, or a ``seed``
            of another kind.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a, b = sample("moons", 5, rng), sample("moons", 5, rng)
        >>> bool(np.array_equal(a, b))
        False
    """
    _check_name(name)
    check_count(n)
    rng = as_generator(seed)
    return _GENERATORS[name](int(n), rng)


class ToyDensity:
    r"""A toy data set whose density is known in closed form.

    Get one with :func:`density`; do not construct it directly.

    Attributes:
        name: the data set, one of :data:`DENSITY_NAMES`.
        entropy: the differential entropy :math:`H = -\int p \log p \, dx` in nats, the
            lowest expected negative log-likelihood any model of the data can reach.
    """

    name: str
    entropy: float

    def log_density(self, x: ArrayLike) -> np.ndarray:
        r"""The log-density :math:`\log p(x)` in nats.

        Args:
            x: points of shape ``(..., 2)``; finite.

        Returns:
            :math:`\log p(x)` of shape ``(...)``, float64; ``-inf`` where the density is zero.

        Raises:
            ValueError: if ``x`` does not have a last axis of size 2 or is not finite.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 1 or x.shape[-1] != 2:
            raise ValueError(
                f"x must have shape (..., 2), one 2-D point per row, got shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or infinite values; pass finite points")
        return self._log_density(x)

    def sample(self, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
        """Draw ``n`` points, shape ``(n, 2)``; see :func:`sample`."""
        return sample(self.name, n, seed)

    def _log_density(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"ToyDensity(name={self.name!r}, entropy={self.entropy:.6f})"


class _EightGaussians(ToyDensity):
    r""":math:`p(x) = \frac18 \sum_k \mathcal{N}(x; \mu_k, \sigma^2 I)`."""

    name = "8gaussians"
    entropy = _EIGHT_GAUSSIANS_ENTROPY

    def _log_density(self, x: np.ndarray) -> np.ndarray:
        var = _EIGHT_GAUSSIANS_STD**2
        sq_dist = np.sum((x[..., None, :] - _EIGHT_GAUSSIANS_CENTERS) ** 2, axis=-1)
        # log-sum-exp: far from all centers every exp(-d^2 / 2 var) underflows to zero.
        exponent = -sq_dist / (2 * var)
        top = np.max(exponent, axis=-1)
        log_sum = top + np.log(np.sum(np.exp(exponent - top[..., None]), axis=-1))
        return log_sum - math.log(8) - math.log(2 * math.pi * var)


class _Checkerboard(ToyDensity):
    r""":math:`p(x) = \frac{1}{32}` on the black squares, where
    :math:`\lfloor x_1/2 \rfloor + \lfloor x_2/2 \rfloor` is even and :math:`x \in [-4, 4)^2`;
    zero elsewhere."""

    name = "checkerboard"
    entropy = math.log(_CHECKERBOARD_AREA)

    def _log_density(self, x: np.ndarray) -> np.ndarray:
        cell = np.floor(x / 2.0)
        on_board = np.all((x >= -4.0) & (x < 4.0), axis=-1)
        black = np.sum(cell, axis=-1) % 2 == 0
        return np.where(on_board & black, -self.entropy, -np.inf)


_DENSITIES: dict[str, ToyDensity] = {d.name: d for d in (_EightGaussians(), _Checkerboard())}

DENSITY_NAMES: tuple[str, ...] = tuple(_DENSITIES)
"""Names of the data sets whose density :func:`density` knows."""


def density(name: str) -> ToyDensity:
    """The closed-form density and entropy of the toy data set ``name``.

    Args:
        name: one of :data:`DENSITY_NAMES` (8gaussians, checkerboard).

    Returns:
        A :class:`ToyDensity` with ``log_density``, ``entropy`` and ``sample``.

    Raises:
        ValueError: for an unknown name or a data set without a closed-form density.

    Example:
        >>> d = density("8gaussians")
        >>> round(d.entropy, 2)
        2.83
    """
    _check_name(name)
    if name not in _DENSITIES:
        raise ValueError(
            f"toy data set {name!r} has no closed-form density; densities are known for: "
            f"{', '.join(DENSITY_NAMES)}"
        )
    return _DENSITIES[name]
