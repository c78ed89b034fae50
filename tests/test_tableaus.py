"""Butcher tableaus: consistency, order conditions (all rooted trees), embedded and dense orders."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from cnf.ode import METHODS, TABLEAUS, ButcherTableau

ALL = sorted(TABLEAUS)
ADAPTIVE = ["adaptive_heun", "bosh3", "dopri5", "dopri8", "fehlberg2", "tsit5"]
FIXED = ["euler", "heun2", "heun3", "midpoint", "rk4"]
FSAL = ["bosh3", "dopri5", "dopri8", "tsit5"]
EXPECTED_ORDER = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "adaptive_heun": 2,
    "fehlberg2": 2,
    "bosh3": 3,
    "dopri5": 5,
    "tsit5": 5,
    "dopri8": 8,
}
# Order of the continuous extension as a Runge-Kutta method in its own right (Hairer, Norsett &
# Wanner, Solving ODEs I, II.6): Shampine's and Tsitouras' interpolants are of order 4, the
# cubic Hermite interpolant over an order-3 step is of order 3 (over an order-2 step: 2), and
# dopri8's sixth-degree continuous extension is of order 5.
DENSE_ORDER = {
    "adaptive_heun": 2,
    "fehlberg2": 2,
    "bosh3": 3,
    "dopri5": 4,
    "tsit5": 4,
    "dopri8": 5,
}
# Tsitouras' coefficients are published to ~30 digits but some dense-output constants to ~16.
TOL = 1e-12


Tree = tuple  # a rooted tree: the sorted tuple of its subtrees; () is the single node


def _graft(tree: Tree) -> set[Tree]:
    """Every tree obtained by adding one leaf to ``tree``."""
    out = {tuple(sorted((*tree, ())))}
    for i, child in enumerate(tree):
        for grown in _graft(child):
            out.add(tuple(sorted((*tree[:i], grown, *tree[i + 1 :]))))
    return out


@functools.cache
def trees(order: int) -> tuple[Tree, ...]:
    """All rooted trees with ``order`` nodes."""
    if order == 1:
        return ((),)
    return tuple(sorted(set().union(*(_graft(t) for t in trees(order - 1)))))


def _size(tree: Tree) -> int:
    return 1 + sum(_size(c) for c in tree)


def _gamma(tree: Tree) -> int:
    """The density gamma(t) = |t| prod gamma(children)."""
    return _size(tree) * int(np.prod([_gamma(c) for c in tree]))


def _matrix(tab: ButcherTableau) -> np.ndarray:
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, : len(row)] = row
    return A


def _phi(tree: Tree, A: np.ndarray) -> np.ndarray:
    """Internal stage weights: Phi_i(t) = prod over children u of (A Phi(u))_i."""
    out = np.ones(A.shape[0])
    for child in tree:
        out = out * (A @ _phi(child, A))
    return out


def _order_residuals(tab: ButcherTableau, weights, order: int, theta: float = 1.0) -> np.ndarray:
    """``weights . Phi(t) - theta^|t| / gamma(t)`` for every tree with exactly ``order`` nodes."""
    A = _matrix(tab)
    w = np.asarray(weights, dtype=float)[: tab.stages]
    return np.array(
        [w @ _phi(t, A) - theta ** _size(t) / _gamma(t) for t in trees(order)], dtype=float
    )


def test_tree_counts():
    assert [len(trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]


def test_registry_holds_the_documented_methods():
    assert set(TABLEAUS) == set(EXPECTED_ORDER)
    for name, tab in TABLEAUS.items():
        assert tab.name == name
        assert tab.order == EXPECTED_ORDER[name]
        assert tab.adaptive == (name in ADAPTIVE)
    assert METHODS == tuple(ALL)


def test_registry_is_read_only():
    """A user's entry would silently change what ``method=...`` means for every solve."""
    with pytest.raises(TypeError):
        TABLEAUS["rk4"] = TABLEAUS["euler"]
    with pytest.raises(TypeError):
        del TABLEAUS["rk4"]


@pytest.mark.parametrize("name", ALL)
def test_consistency(name):
    tab = TABLEAUS[name]
    s = tab.stages
    assert len(tab.c) == len(tab.b) == len(tab.a) == s
    assert tab.c[0] == 0.0
    for i, row in enumerate(tab.a):
        assert len(row) == i
        assert sum(row) == pytest.approx(tab.c[i], abs=TOL)
    assert sum(tab.b) == pytest.approx(1.0, abs=TOL)
    if tab.adaptive:
        assert len(tab.b_err) == s
        assert sum(tab.b_err) == pytest.approx(0.0, abs=TOL)
        assert max(abs(e) for e in tab.b_err) > 1e-3  # a real estimate, not all zeros
    else:
        assert tab.b_err is None


@pytest.mark.parametrize("name", ALL)
def test_order_conditions_hold_up_to_the_order(name):
    tab = TABLEAUS[name]
    for order in range(1, tab.order + 1):
        res = _order_residuals(tab, tab.b, order)
        assert np.abs(res).max() < TOL, (order, res)
    # ... and the stated order is the true one: some condition of the next order fails.
    assert np.abs(_order_residuals(tab, tab.b, tab.order + 1)).max() > 1e-6


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_method_has_one_order_less(name):
    tab = TABLEAUS[name]
    b_hat = np.asarray(tab.b) - np.asarray(tab.b_err)
    for order in range(1, tab.order):
        assert np.abs(_order_residuals(tab, b_hat, order)).max() < TOL, order
    # Otherwise the error estimate would vanish to leading order.
    assert np.abs(_order_residuals(tab, b_hat, tab.order)).max() > 1e-6


@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("theta", [0.25, 0.5, 0.8])
def test_dense_output_order_conditions(name, theta):
    """b_i(theta) . Phi(t) = theta^|t| / gamma(t) up to the interpolant's order."""
    tab = TABLEAUS[name]
    weights = tab.dense_weights(theta)
    if not tab.fsal:  # the extra slope f(t + h, y1) is a stage with a-row b at c = 1
        assert weights.shape == (tab.stages + 1,)
        tab = ButcherTableau(
            name=f"{name} with its end slope",
            order=tab.order,
            c=(*tab.c, 1.0),
            a=(*tab.a, tab.b),
            b=(*tab.b, 0.0),
        )
    assert weights.shape == (tab.stages,)
    for order in range(1, DENSE_ORDER[name] + 1):
        res = _order_residuals(tab, weights, order, theta)
        assert np.abs(res).max() < 1e-10, (order, res)
    # ... and the order is the stated one, not more.
    assert np.abs(_order_residuals(tab, weights, DENSE_ORDER[name] + 1, theta)).max() > 1e-6


@pytest.mark.parametrize("name", ALL)
def test_dense_weights_at_the_ends(name):
    tab = TABLEAUS[name]
    w1 = tab.dense_weights(1.0)
    extra = 0 if tab.fsal else 1  # non-FSAL tableaus interpolate with one more slope, f(t + h, y1)
    assert w1.shape == (tab.stages + extra,)
    np.testing.assert_allclose(w1[: tab.stages], tab.b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w1[tab.stages :], 0.0, atol=1e-12)
    np.testing.assert_allclose(tab.dense_weights(0.0), 0.0, atol=0)
    # The interpolant's slope at theta = 0 is k_0 (it is a Hermite-type interpolant).
    # b_i(theta) = sum_m P[i, m] theta^(m+1), so the slope at 0 is P[:, 0].
    expected = np.zeros(len(w1))
    expected[0] = 1.0
    np.testing.assert_allclose(tab.dense[:, 0], expected, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_fsal(name):
    assert TABLEAUS[name].fsal == (name in FSAL)


def _rk4_fields(**overrides):
    fields = dict(
        name="bad",
        order=4,
        c=(0.0, 0.5, 0.5, 1.0),
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    )
    fields.update(overrides)
    return fields


def test_valid_custom_tableau_is_accepted():
    tab = ButcherTableau(**_rk4_fields(name="my_rk4"))
    assert tab.stages == 4 and not tab.adaptive and not tab.fsal


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(a=((), (0.5,), (0.0, 0.4), (0.0, 0.0, 1.0))), "row 2"),
        (dict(c=(0.0, 0.5, 0.6, 1.0)), "row 2"),
        (dict(b=(1 / 6, 1 / 3, 1 / 3, 1 / 5)), "b sums"),
        (dict(b_err=(0.1, 0.0, 0.0, 0.0)), "b_err sums"),
        (dict(a=((), (0.5,), (0.5,), (0.0, 0.0, 1.0))), "rows of length"),
        (dict(b=(0.5, 0.5)), "entries"),
        (dict(dense=np.zeros((5, 3))), "dense output"),
    ],
)
def test_bad_tableau_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau(**_rk4_fields(**overrides))


def test_tableau_is_frozen():
    with pytest.raises(AttributeError):
        TABLEAUS["rk4"].order = 5
