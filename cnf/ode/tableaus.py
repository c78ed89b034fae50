"""Butcher tableaus of the explicit Runge-Kutta methods, kept as validated data.

A method is its coefficients: one generic Runge-Kutta step runs all of them.
For a tableau with ``s`` stages the step from ``(t, y)`` with size ``h`` computes

    k_i = f(t + c_i h, y + h * sum_{j<i} a_ij k_j),        i = 0 .. s-1
    y1  = y + h * sum_i b_i k_i
    err = h * sum_i e_i k_i        (e = b - b_hat, the embedded lower-order difference)

and the dense output inside the step is ``y(t + theta h) = y + h * sum_i b_i(theta) k_i`` with
``b_i(theta) = sum_m P[i, m] theta^(m+1)``. For a tableau without its own continuous extension,
``P`` is the cubic Hermite interpolant written in the same form; for those the coefficient rows
run over the ``s`` stages plus one extra entry, ``f(t + h, y1)``, which an FSAL tableau already
has as its last stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from types import MappingProxyType

import numpy as np

__all__ = ["METHODS", "TABLEAUS", "ButcherTableau"]

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit Runge-Kutta method.

    Args:
        name: the method's name as passed to ``odeint(method=...)``.
        order: order of the solution ``y1``.
        c: nodes, shape ``(s,)``, ``c[0] == 0``.
        a: rows of the strictly lower triangle; ``a[i]`` has ``i`` entries.
        b: solution weights, shape ``(s,)``.
        b_err: ``b - b_hat`` for the embedded estimate, shape ``(s,)``, or ``None`` for a
            fixed-step method.
        dense: dense-output coefficients ``P`` (see module docstring), or ``None`` to use the
            cubic Hermite interpolant.
        reference: where the coefficients come from.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    dense: np.ndarray | None = field(default=None, repr=False, compare=False)
    reference: str = ""

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must hold rows of length 0..{s - 1}")
        if len(self.b) != s or (self.b_err is not None and len(self.b_err) != s):
            raise ValueError(f"{self.name}: b and b_err need {s} entries")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > _TOL:
                raise ValueError(
                    f"{self.name}: row {i} of a sums to {sum(row)}, not c = {self.c[i]}"
                )
        if abs(sum(self.b) - 1) > _TOL:
            raise ValueError(f"{self.name}: b sums to {sum(self.b)}, not 1")
        if self.b_err is not None and abs(sum(self.b_err)) > _TOL:
            raise ValueError(f"{self.name}: b_err sums to {sum(self.b_err)}, not 0")
        dense = self.dense if self.dense is not None else _hermite_dense(self)
        width = s if self.fsal else s + 1
        if dense.shape[0] != width:
            raise ValueError(f"{self.name}: dense output needs {width} rows, got {dense.shape[0]}")
        # The continuous extension must reproduce the step's end point: sum_m P[i, m] = b_i.
        end = dense.sum(axis=1)[:s]
        if (
            np.abs(end - np.asarray(self.b)).max() > 1e-10
            or np.abs(dense.sum(axis=1)[s:]).max(initial=0.0) > 1e-10
        ):
            raise ValueError(f"{self.name}: dense output at theta=1 does not match b")
        object.__setattr__(self, "dense", dense)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @cached_property
    def fsal(self) -> bool:
        """First Same As Last: the last stage is evaluated at ``(t + h, y1)``. Cached: every
        step asks."""
        s = len(self.c)
        return (
            s > 1
            and self.c[-1] == 1.0
            and tuple(self.a[-1]) == tuple(self.b[: s - 1])
            and (self.b[-1] == 0.0)
        )

    def dense_weights(self, theta: float) -> np.ndarray:
        """The weights ``b_i(theta)`` of the dense output, shape ``(rows of P,)``."""
        powers = theta ** np.arange(1, self.dense.shape[1] + 1)
        return self.dense @ powers


def _hermite_dense(tab: ButcherTableau) -> np.ndarray:
    """Cubic Hermite interpolation through (y0, f0) and (y1, f1) as weights over the stages.

    With y1 = y0 + h sum b_i k_i, the Hermite basis gives
    y(theta) = y0 + h [ (3 theta^2 - 2 theta^3) sum_i b_i k_i
                        + (theta - 2 theta^2 + theta^3) k_0 + (theta^3 - theta^2) f1 ].
    The interpolation error is O(h^4) locally and does not propagate, so outputs keep the
    order of methods up to order 4.
    """
    s = len(tab.c)
    rows = s if tab.fsal else s + 1
    P = np.zeros((rows, 3))
    P[:s] += np.outer(tab.b, [0.0, 3.0, -2.0])
    P[0] += [1.0, -2.0, 1.0]
    P[rows - 1] += [0.0, -1.0, 1.0]
    return P


def _fourth_order_from_midpoint(b: list[float], c_mid: list[float]) -> np.ndarray:
    """Quartic dense output through y0, f0, y_mid = y0 + h sum c_mid k, y1 and f1 (FSAL).

    Solves for the coefficients of theta^1..theta^4 once, at import, so the interpolation is
    the same weighted sum of stages as every other tableau's.
    """
    s = len(b)
    # Conditions on p(theta) = sum_m q_m theta^m (m = 1..4) per stage-weight component:
    # p'(0) = [i == 0], p(1/2) = c_mid_i, p(1) = b_i, p'(1) = [i == s-1].
    M = np.array(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.25, 0.125, 0.0625],
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    rhs = np.zeros((4, s))
    rhs[0, 0] = 1.0
    rhs[1] = c_mid
    rhs[2] = b
    rhs[3, s - 1] = 1.0
    return np.linalg.solve(M, rhs).T


def _poly_rows(polys: list[np.polynomial.Polynomial], degree: int) -> np.ndarray:
    rows = np.zeros((len(polys), degree))
    for i, p in enumerate(polys):
        coef = p.coef
        if abs(coef[0]) > 1e-12:
            raise ValueError("dense-output polynomials must vanish at theta = 0")
        rows[i, : len(coef) - 1] = coef[1:]
    return rows


def _frac(*xs: str | int) -> tuple[float, ...]:
    return tuple(float(Fraction(x)) for x in xs)


EULER = ButcherTableau(
    name="euler", order=1, c=(0.0,), a=((),), b=(1.0,), reference="explicit Euler"
)

MIDPOINT = ButcherTableau(
    name="midpoint",
    order=2,
    c=(0.0, 0.5),
    a=((), (0.5,)),
    b=(0.0, 1.0),
    reference="explicit midpoint rule",
)

RK4 = ButcherTableau(
    name="rk4",
    order=4,
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=_frac("1/6", "1/3", "1/3", "1/6"),
    reference="classical Runge-Kutta method (Kutta 1901)",
)

BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    c=_frac(0, "1/2", "3/4", 1),
    a=((), _frac("1/2"), _frac(0, "3/4"), _frac("2/9", "1/3", "4/9")),
    b=_frac("2/9", "1/3", "4/9", 0),
    b_err=tuple(
        x - y for x, y in zip(_frac("2/9", "1/3", "4/9", 0), _frac("7/24", "1/4", "1/3", "1/8"))
    ),
    reference="Bogacki & Shampine (1989), A 3(2) pair of Runge-Kutta formulas",
)

HEUN2 = ButcherTableau(
    name="heun2",
    order=2,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    reference="Heun (1900): the explicit trapezoidal rule",
)

HEUN3 = ButcherTableau(
    name="heun3",
    order=3,
    c=_frac(0, "1/3", "2/3"),
    a=((), _frac("1/3"), _frac(0, "2/3")),
    b=_frac("1/4", 0, "3/4"),
    reference="Heun (1900), Z. Math. Phys. 45: the third-order method with nodes 0, 1/3, 2/3",
)

# Heun's step with explicit Euler as the embedded first-order solution: the estimate is the
# difference of the two, h (k_1 - k_0) / 2. Not FSAL (the last stage is at the Euler point,
# not at y1), so f(t + h, y1) is the next step's first stage and the dense output's end slope.
ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    b_err=(-0.5, 0.5),
    reference="Heun-Euler 2(1) pair: Heun (1900) with explicit Euler as the embedded method",
)

# Fehlberg's 1(2) pair; like torchdiffeq, the step propagates the second-order solution (local
# extrapolation), whose weights are (1/512, 255/256, 1/512); the first-order one is
# (1/256, 255/256, 0). The last stage sits at the first-order point, not at y1: not FSAL.
FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    order=2,
    c=_frac(0, "1/2", 1),
    a=((), _frac("1/2"), _frac("1/256", "255/256")),
    b=_frac("1/512", "255/256", "1/512"),
    b_err=_frac("-1/512", 0, "1/512"),
    reference="Fehlberg (1969), NASA TR R-315: the Runge-Kutta-Fehlberg 1(2) pair",
)

_DOPRI5_B = _frac("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0)
_DOPRI5_BHAT = _frac("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40")
# y(t0 + h/2) = y0 + h sum c_mid_i k_i (Shampine 1986, "Some practical Runge-Kutta formulas").
_DOPRI5_CMID = [
    6025192743 / 30085553152 / 2,
    0.0,
    51252292925 / 65400821598 / 2,
    -2691868925 / 45128329728 / 2,
    187940372067 / 1594534317056 / 2,
    -1776094331 / 19743644256 / 2,
    11237099 / 235043384 / 2,
]

DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    c=_frac(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=(
        (),
        _frac("1/5"),
        _frac("3/40", "9/40"),
        _frac("44/45", "-56/15", "32/9"),
        _frac("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _frac("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_err=tuple(x - y for x, y in zip(_DOPRI5_B, _DOPRI5_BHAT)),
    dense=_fourth_order_from_midpoint(list(_DOPRI5_B), _DOPRI5_CMID),
    reference="Dormand & Prince (1980); dense output from Shampine (1986)",
)

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Table 1, with its continuous extension.
_TSIT5_C = (
    0.0,
    0.161,
    0.327,
    0.9,
    0.9800255409045096857298102862870245954942137979563024768854764293,
    1.0,
    1.0,
)
_TSIT5_B = (
    0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
    0.01,
    0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
    1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
    -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
    2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841,
    0.0,
)
_TSIT5_BHAT = (
    0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
    0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
    0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
    1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
    -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
    1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
    1.0 / 66.0,
)
_P = np.polynomial.Polynomial
_TSIT5_DENSE = _poly_rows(
    [
        -1.0530884977290216
        * _P([0, 1])
        * _P([-1.3299890189751412, 1])
        * _P([0.7139816917074209, -1.4364028541716351, 1]),
        0.1017 * _P([0, 0, 1]) * _P([1.2949852507374631, -2.1966568338249754, 1]),
        2.490627285651252793 * _P([0, 0, 1]) * _P([1.57803468208092486, -2.38535645472061657, 1]),
        -16.54810288924490272
        * _P([-1.21712927295533244, 1])
        * _P([-0.61620406037800089, 1])
        * _P([0, 0, 1]),
        47.37952196281928122
        * _P([-1.203071208372362603, 1])
        * _P([-0.658047292653547382, 1])
        * _P([0, 0, 1]),
        -34.87065786149660974 * _P([-1.2, 1]) * _P([-2.0 / 3.0, 1]) * _P([0, 0, 1]),
        2.5 * _P([-1, 1]) * _P([-0.6, 1]) * _P([0, 0, 1]),
    ],
    degree=4,
)
# The published interpolant is given to ~16 digits; fold the residual into the last stage's
# coefficient so that theta = 1 reproduces y1 to machine precision.
_TSIT5_DENSE[:, 3] += np.asarray(_TSIT5_B) - _TSIT5_DENSE.sum(axis=1)

TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    c=_TSIT5_C,
    a=(
        (),
        (0.161,),
        (
            -0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
            0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569,
        ),
        (
            2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
            -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
            4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077,
        ),
        (
            5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
            -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
            7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
            -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635,
        ),
        (
            5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
            -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
            8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
            -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
            -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206,
        ),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    b_err=tuple(x - y for x, y in zip(_TSIT5_B, _TSIT5_BHAT)),
    dense=_TSIT5_DENSE,
    reference="Tsitouras (2011), Comput. Math. Appl. 62(2) 770-775",
)

# Prince & Dormand (1981), RK8(7)13M: an eighth-order solution with a seventh-order embedded
# one, 13 stages; the coefficients are the paper's rational approximations (row sums and order
# conditions hold to ~1e-15). A 14th stage f(t + h, y1) makes the step FSAL; like torchdiffeq's
# ``dopri8`` it serves the next step and the dense output.
_DOPRI8_B = _frac(
    "14005451/335480064", 0, 0, 0, 0, "-59238493/1068277825", "181606767/758867731",
    "561292985/797845732", "-1041891430/1371343529", "760417239/1151165299",
    "118820643/751138087", "-528747749/2220607170", "1/4", 0,
)  # fmt: skip
_DOPRI8_BHAT = _frac(
    "13451932/455176623", 0, 0, 0, 0, "-808719846/976000145", "1757004468/5645159321",
    "656045339/265891186", "-3867574721/1518517206", "465885868/322736535",
    "53011238/667516719", "2/45", 0, 0,
)  # fmt: skip
_DOPRI8_A = (
    (),
    _frac("1/18"),
    _frac("1/48", "1/16"),
    _frac("1/32", 0, "3/32"),
    _frac("5/16", 0, "-75/64", "75/64"),
    _frac("3/80", 0, 0, "3/16", "3/20"),
    _frac(
        "29443841/614563906", 0, 0, "77736538/692538347", "-28693883/1125000000",
        "23124283/1800000000",
    ),
    _frac(
        "16016141/946692911", 0, 0, "61564180/158732637", "22789713/633445777",
        "545815736/2771057229", "-180193667/1043307555",
    ),
    _frac(
        "39632708/573591083", 0, 0, "-433636366/683701615", "-421739975/2616292301",
        "100302831/723423059", "790204164/839813087", "800635310/3783071287",
    ),
    _frac(
        "246121993/1340847787", 0, 0, "-37695042795/15268766246", "-309121744/1061227803",
        "-12992083/490766935", "6005943493/2108947869", "393006217/1396673457",
        "123872331/1001029789",
    ),
    _frac(
        "-1028468189/846180014", 0, 0, "8478235783/508512852", "1311729495/1432422823",
        "-10304129995/1701304382", "-48777925059/3047939560", "15336726248/1032824649",
        "-45442868181/3398467696", "3065993473/597172653",
    ),
    _frac(
        "185892177/718116043", 0, 0, "-3185094517/667107341", "-477755414/1098053517",
        "-703635378/230739211", "5731566787/1027545527", "5232866602/850066563",
        "-4093664535/808688257", "3962137247/1805957418", "65686358/487910083",
    ),
    _frac(
        "403863854/491063109", 0, 0, "-5068492393/434740067", "-411421997/543043805",
        "652783627/914296604", "11173962825/925320556", "-13158990841/6184727034",
        "3936647629/1978049680", "-160528059/685178525", "248638103/1413531060", 0,
    ),
    _DOPRI8_B[:13],
)  # fmt: skip
# The continuous extension: b_i(theta) = sum_m P[i, m] theta^(m+1), a polynomial of degree 6
# per stage (stages 1-4 have none), of order 5 (its order conditions hold for every theta; the
# tests check them). These are the polynomials whose values at theta = 1/2 torchdiffeq uses as
# its midpoint; here they are the interpolant itself, one order better than a quartic through
# that midpoint (torchdiffeq's), at no extra cost.
_DOPRI8_DENSE_ROWS = {
    0: (1.0, -6.6910181737837595697, 19.9990069333683970610, -30.0610568289666450593,
        22.1396504998094068976, -6.3448349392860401388),
    5: (0.0, -7.6142658045872677172, 52.2273532792945524050, -121.4999627731334642623,
        116.4422149550342161651, -39.6107919852202505218),
    6: (0.0, 10.7281392630428866124, -46.8919164181093621583, 83.1721004639847717481,
        -67.1451318825957197185, 20.3761213808791436958),
    7: (0.0, 0.5526637063753648783, -0.1890893225010595467, 9.5724507555993664382,
        -16.5672243527496524646, 7.3347098826795362023),
    8: (0.0, 4.2186562625665153803, -35.7075975946222072821, 87.8406057677205645007,
        -89.9916014847245016028, 32.8801774352459155182),
    9: (0.0, -0.6627209125361597559, 6.2736448083240352160, -17.4152107770762969005,
        22.6237489648532849093, -10.1588990526426760954),
    10: (0.0, -1.2636789001135462218, 10.3160881272450748458, -28.5903289514790976966,
         32.2362340167355370113, -12.5401268098782561200),
    11: (0.0, 5.4106037898590422230, -34.7650769866611817349, 81.6630950584341412934,
         -82.1020315488359848644, 29.5553001484516038033),
    12: (0.0, -7.0321379067945741781, 47.7457971078225540396, -114.9375291377009418170,
         116.2662185791119533462, -41.7923486424390588923),
    13: (0.0, 2.3537586759714983486, -19.0082099341608028453, 50.2558364226176017553,
         -53.9020777466385396792, 20.3006925822100825485),
}  # fmt: skip
_DOPRI8_DENSE = np.array([_DOPRI8_DENSE_ROWS.get(i, (0.0,) * 6) for i in range(14)])
# The polynomials are given to ~19 digits but reproduce b at theta = 1 only to ~1e-12: fold the
# residual into the highest power, as for tsit5.
_DOPRI8_DENSE[:, -1] += np.asarray(_DOPRI8_B) - _DOPRI8_DENSE.sum(axis=1)

DOPRI8 = ButcherTableau(
    name="dopri8",
    order=8,
    c=_frac(
        0,
        "1/18",
        "1/12",
        "1/8",
        "5/16",
        "3/8",
        "59/400",
        "93/200",
        "5490023248/9719169821",
        "13/20",
        "1201146811/1299019798",
        1,
        1,
        1,
    ),  # fmt: skip
    a=_DOPRI8_A,
    b=_DOPRI8_B,
    b_err=tuple(x - y for x, y in zip(_DOPRI8_B, _DOPRI8_BHAT)),
    dense=_DOPRI8_DENSE,
    reference="Prince & Dormand (1981), J. Comput. Appl. Math. 7(1) 67-75, RK8(7)13M, made "
    "FSAL; order-5 continuous extension (see _DOPRI8_DENSE_ROWS)",
)

# Read-only: the solver looks methods up here, so an entry added or replaced by a user would
# silently change what ``method="..."`` means everywhere.
TABLEAUS: Mapping[str, ButcherTableau] = MappingProxyType(
    {
        tab.name: tab
        for tab in (
            EULER,
            MIDPOINT,
            HEUN2,
            HEUN3,
            RK4,
            ADAPTIVE_HEUN,
            FEHLBERG2,
            BOSH3,
            DOPRI5,
            TSIT5,
            DOPRI8,
        )
    }
)
"""The built-in methods by name."""

METHODS: tuple[str, ...] = tuple(sorted(TABLEAUS))
"""The names ``method=`` accepts, sorted."""
