"""Tests for the 2-D toy data sets in :mod:`cnf.data.toy`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from cnf.data import DENSITY_NAMES, NAMES, density, sample, sample_tensor

N_MC = 100_000  # Monte Carlo sample size for distribution checks; a few ms per data set


def _midpoint_grid(low: float, high: float, h: float) -> tuple[np.ndarray, float]:
    """Cell midpoints of a square grid, shape (m, m, 2), and the cell area."""
    g = np.arange(low, high, h) + h / 2
    return np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1), h * h


# --- shapes, dtypes, seeds -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_shape_dtype_finite(name, n):
    # Odd n on purpose: FFJORD returned fewer points when n was not a multiple of 5 or 2.
    x = sample(name, n, seed=0)
    assert x.shape == (n, 2)
    assert x.dtype == np.float64
    assert np.all(np.isfinite(x))


def test_names():
    assert NAMES == (
        "8gaussians",
        "pinwheel",
        "checkerboard",
        "2spirals",
        "moons",
        "circles",
        "rings",
        "swissroll",
    )
    assert DENSITY_NAMES == ("8gaussians", "checkerboard")


@pytest.mark.parametrize("name", NAMES)
def test_seed_reproduces_and_different_seeds_differ(name):
    a, b, c = sample(name, 100, seed=3), sample(name, 100, seed=3), sample(name, 100, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.any(np.all(a == c, axis=1))
    # seed=None draws fresh entropy each call.
    assert not np.array_equal(sample(name, 100), sample(name, 100))


@pytest.mark.parametrize("name", NAMES)
def test_generator_is_used_and_advanced(name):
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    first = sample(name, 100, rng)
    assert rng.bit_generator.state != state
    second = sample(name, 100, rng)
    assert not np.array_equal(first, second)
    # The points come from the given generator alone, not from numpy's global state (FFJORD's
    # 2spirals and checkerboard drew from the global state).
    saved = np.random.get_state()  # noqa: NPY002
    try:
        np.random.seed(0)  # noqa: NPY002
        np.testing.assert_array_equal(first, sample(name, 100, np.random.default_rng(5)))
        np.random.seed(1)  # noqa: NPY002
        np.testing.assert_array_equal(first, sample(name, 100, 5))
    finally:
        np.random.set_state(saved)  # noqa: NPY002


# --- the distributions are FFJORD's -----------------------------------------------------------


def _spirals_second_moment() -> float:
    # t = 3 pi sqrt(u) has density 2t / (3 pi)^2 on [0, 3 pi]; the arm point is
    # (-t cos t + u1/2, t sin t + u2/2), divided by 3, plus N(0, 0.1^2) noise per coordinate.
    top = 3 * np.pi

    def mean(f):
        return integrate.quad(lambda t: f(t) * 2 * t / top**2, 0, top, limit=200)[0]

    arm = (
        mean(lambda t: t**2) - mean(lambda t: t * np.cos(t)) / 2 + mean(lambda t: t * np.sin(t)) / 2
    )
    return (arm + 2 / 12) / 9 + 2 * 0.1**2  # E[(u / 2)^2] = 1/12 per coordinate


def _second_moment(name: str) -> float:
    """E|x|^2 worked out from the definitions in FFJORD's lib/toy_data.py."""
    if name == "8gaussians":
        return (16 + 2 * 0.25) / 1.414**2
    if name == "pinwheel":
        return 4 * (1 + 0.3**2 + 0.1**2)
    if name == "checkerboard":
        return 2 * 16 / 3  # each coordinate is uniform on [-4, 4]
    if name == "2spirals":
        return _spirals_second_moment()
    if name == "moons":
        # outer: 2(cos, sin) + (-1, -0.2); inner: 2(1 - cos, 0.5 - sin) + (-1, -0.2).
        return (5.04 - 0.8 * 2 / np.pi + 5.64 - 3.2 * 2 / np.pi) / 2 + 2 * 0.2**2
    if name == "circles":
        return (3**2 + 1.5**2) / 2 + 2 * 0.24**2
    if name == "rings":
        return (3**2 + 2.25**2 + 1.5**2 + 0.75**2) / 4 + 2 * 0.08**2
    if name == "swissroll":
        a, b = 1.5 * np.pi, 4.5 * np.pi
        return (b**3 - a**3) / (3 * (b - a)) / 25 + 2 * 0.2**2
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_second_moment_matches_definition(name):
    r2 = np.sum(sample(name, N_MC, seed=11) ** 2, axis=1)
    stderr = r2.std() / math.sqrt(N_MC)
    assert abs(r2.mean() - _second_moment(name)) < 5 * stderr


@pytest.mark.parametrize(
    ("name", "phase", "expected"),
    [
        # arm j: angle -(2 pi j / 5 + 0.25 e^r), radius 2r
        ("pinwheel", lambda phi, rho: 5 * (phi + 0.25 * np.exp(rho / 2)), 0.848),
        # arms +-(-t cos t, t sin t) / 3: angle pi - t (or -t), radius t / 3
        ("2spirals", lambda phi, rho: 2 * (phi + 3 * rho), 0.687),
        # (t cos t, t sin t) / 5: angle t, radius t / 5
        ("swissroll", lambda phi, rho: phi - 5 * rho, 0.605),
    ],
)
def test_spirals_turn_the_right_way(name, phase, expected):
    # The phase is constant along the curve, up to noise, so its mean resultant length is large;
    # a mirror image spreads it around the circle (< 0.2). The expected lengths were measured on
    # 400,000 points from a literal transcription of FFJORD's code; sampling error is ~0.002.
    for mirror in (1.0, -1.0):
        x = sample(name, N_MC, seed=12) * np.array([1.0, mirror])
        angle, radius = np.arctan2(x[:, 1], x[:, 0]), np.hypot(x[:, 0], x[:, 1])
        resultant = abs(np.mean(np.exp(1j * phase(angle, radius))))
        if mirror == 1.0:
            assert abs(resultant - expected) < 0.01
        else:
            assert resultant < 0.2


@pytest.mark.parametrize(
    ("name", "radii", "width"),
    [("circles", [1.5, 3.0], 0.7), ("rings", [0.75, 1.5, 2.25, 3.0], 0.3)],
)
def test_rings_have_equal_weights(name, radii, width):
    rho = np.hypot(*sample(name, N_MC, seed=13).T)
    for r in radii:
        assert abs(np.mean(np.abs(rho - r) < width) - 1 / len(radii)) < 0.01


def test_moons_orientation():
    x = sample("moons", N_MC, seed=14)
    # Upper moon on the left, lower moon on the right: E[x1] = 0, E[x2] = 0.3,
    # E[x1 x2] = 1/2 - 4/pi (the mirror image would give the opposite sign).
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.3], atol=0.02)
    assert abs(np.mean(x[:, 0] * x[:, 1]) - (0.5 - 4 / np.pi)) < 0.02


# --- closed-form densities --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high", "h"), [("8gaussians", -6, 6, 0.02), ("checkerboard", -5, 5, 0.05)]
)
def test_density_integrates_to_one(name, low, high, h):
    # The checkerboard grid's cell edges fall on the square edges, so the midpoint rule is exact.
    x, area = _midpoint_grid(low, high, h)
    mass = np.sum(np.exp(density(name).log_density(x))) * area
    assert abs(mass - 1) < 1e-3


def test_eight_gaussians_log_density_matches_scipy():
    centers = 4 / 1.414 * np.array([[np.cos(a), np.sin(a)] for a in np.arange(8) * np.pi / 4])
    x = np.random.default_rng(15).uniform(-5, 5, size=(500, 2))
    expected = np.log(
        sum(stats.multivariate_normal(c, (0.5 / 1.414) ** 2).pdf(x) for c in centers) / 8
    )
    np.testing.assert_allclose(density("8gaussians").log_density(x), expected, rtol=1e-10)
    # Far from every center the density underflows, yet the log-density stays finite.
    assert np.isfinite(density("8gaussians").log_density([[100.0, -100.0]])).all()


def test_eight_gaussians_entropy_constant():
    d = density("8gaussians")
    assert round(d.entropy, 2) == 2.83  # the value quoted in issue 4
    # By symmetry H = -E[log p(x)] under one component; Gauss-Hermite quadrature in 2-D.
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / math.sqrt(2 * math.pi)
    center = np.array([4 / 1.414, 0.0])
    x = center + 0.5 / 1.414 * np.stack(np.meshgrid(z, z, indexing="ij"), axis=-1)
    quadrature = -np.sum(np.outer(w, w) * d.log_density(x))
    assert abs(quadrature - d.entropy) < 1e-9
    # An independent check: the midpoint rule for -integral p log p.
    x, area = _midpoint_grid(-6, 6, 0.02)
    log_p = d.log_density(x)
    assert abs(-np.sum(np.exp(log_p) * log_p) * area - d.entropy) < 1e-9


def test_checkerboard_entropy_constant():
    d = density("checkerboard")
    assert d.entropy == math.log(32)
    assert round(d.entropy, 2) == 3.47  # the value quoted in issue 4


@pytest.mark.parametrize("name", DENSITY_NAMES)
def test_samples_match_density(name):
    d = density(name)
    x = d.sample(N_MC, seed=16)
    # Mean negative log-density of samples estimates the entropy.
    nll = -d.log_density(x)
    assert np.all(np.isfinite(nll))
    assert abs(nll.mean() - d.entropy) <= 5 * nll.std() / math.sqrt(N_MC) + 1e-12
    # Histogram against bin probabilities (10x10 midpoint rule per 0.5-wide bin): the total
    # variation from sampling noise alone is about 0.01 here.
    edges = np.linspace(-5, 5, 21)
    counts = np.histogram2d(x[:, 0], x[:, 1], bins=[edges, edges])[0]
    fine, area = _midpoint_grid(-5, 5, 0.05)
    prob = np.exp(d.log_density(fine)).reshape(20, 10, 20, 10).sum(axis=(1, 3)) * area
    assert 0.5 * np.abs(counts / N_MC - prob).sum() < 0.025


def test_checkerboard_samples_on_black_squares_only():
    x = sample("checkerboard", N_MC, seed=17)
    assert np.all((x >= -4) & (x < 4))
    column, row = np.floor(x / 2).astype(int).T
    assert np.all((column + row) % 2 == 0)
    # All 8 black squares are used, each about equally often.
    squares, counts = np.unique(np.stack([column, row], axis=1), axis=0, return_counts=True)
    assert len(squares) == 8
    np.testing.assert_allclose(counts / N_MC, 1 / 8, atol=0.005)
    # White squares and points off the board have zero density.
    log_p = density("checkerboard").log_density([[1.0, 1.0], [1.0, 3.0], [-3.0, -1.0], [5.0, 1.0]])
    np.testing.assert_array_equal(log_p, [-math.log(32), -np.inf, -np.inf, -np.inf])


@pytest.mark.parametrize("name", DENSITY_NAMES)
def test_log_density_shapes_and_bad_input(name):
    d = density(name)
    assert d.log_density(np.zeros((4, 3, 2))).shape == (4, 3)
    assert d.log_density([0.5, 0.5]).shape == ()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        d.log_density(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="finite"):
        d.log_density([[np.nan, 0.0]])


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="8gaussians, pinwheel, .*swissroll"):
        sample("9gaussians", 10)
    with pytest.raises(ValueError, match="choose one of"):
        density("nope")
    with pytest.raises(ValueError, match="densities are known for: 8gaussians, checkerboard"):
        density("pinwheel")


@pytest.mark.parametrize("n", [-3, 2.5, 10.0, True, "10", None])
def test_bad_n(n):
    with pytest.raises(ValueError, match="an int >= 0"):
        sample("moons", n)


@pytest.mark.parametrize("name", NAMES)
def test_zero_points_are_an_empty_array(name):
    """As a model's sample(0): empty results, not an error."""
    assert sample(name, 0).shape == (0, 2)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, np.random.RandomState(0)])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        sample("moons", 10, seed)


def test_numpy_integers_accepted():
    np.testing.assert_array_equal(
        sample("rings", np.int64(5), np.int32(2)), sample("rings", 5, seed=2)
    )


def test_sample_tensor():
    t = sample_tensor("pinwheel", 6, seed=1)
    assert t.shape == (6, 2) and t.dtype == torch.get_default_dtype() and t.device.type == "cpu"
    t64 = sample_tensor("pinwheel", 6, seed=1, dtype=torch.float64)
    np.testing.assert_array_equal(t64.numpy(), sample("pinwheel", 6, seed=1))
