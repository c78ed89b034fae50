"""Adjoint strategies: how gradients of a solve are computed, as small validated objects.

``solve(..., adjoint=Checkpoint())`` or ``adjoint=Backsolve(norm="seminorm")`` chooses one;
``adjoint=True`` means :class:`Checkpoint`. torchdiffeq's keywords (``adjoint_options`` with
``mode``/``norm``/solver options, ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method``) are
turned into a strategy by :func:`adjoint_strategy` and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ._problem import check_options, get_tableau, positive

__all__ = [
    "ADJOINT_KEYWORDS",
    "AdjointStrategy",
    "Backsolve",
    "Checkpoint",
    "adjoint_strategy",
    "to_strategy",
]

NORMS = ("rms", "seminorm")
MODES = ("checkpoint", "backsolve")

Tolerance = float | tuple[float, ...]

ADJOINT_KEYWORDS = ("adjoint_options", "adjoint_rtol", "adjoint_atol", "adjoint_method")
"""torchdiffeq's keywords that :func:`to_strategy` turns into a strategy."""


@dataclass(frozen=True)
class Checkpoint:
    r"""Differentiate the forward solve by replaying its recorded steps (the default adjoint).

    The forward solve keeps the accepted states :math:`y_n` and step sizes :math:`h_n` (not
    the autograd graph). Going backwards, each step is recomputed from :math:`y_n` under
    autograd and differentiated at once,

    .. math:: a_n = \big(\partial y_{n+1} / \partial y_n\big)^\top a_{n+1},

    which is the exact gradient of the discrete solution the forward pass returned: it matches
    backpropagation through the solver to rounding, and stays stable where the continuous
    adjoint is not (stiff or dissipative fields, whose reverse-time dynamics blow up). Memory
    grows by one state per step; one replayed step costs the stages that produced it.

    Replaying costs a second forward evaluation of every stage. Where the autograd graph is
    small, keeping it is cheaper: the forward solve keeps the graph of its first steps while
    the bytes that graph saves, plus one more step at the size of the first evaluations, fit in
    ``graph_memory``, and backpropagates through it; only the steps after it are replayed.
    Measured on one CPU thread: a batch of 2-D points (some hundred kilobytes per evaluation)
    keeps every step, and its training step costs about a quarter less; the digits' dense
    model (batch 128) keeps all but a step or two and trains in 0.67x the time. A step whose
    graph alone would exceed the budget (dopri5: seven times the first evaluation) is never
    kept, and such a model replays every step, as with ``graph_memory=0``. The gradients are
    the same to rounding either way.

    Args:
        graph_memory: bytes of autograd graph the forward solve may keep (default 256 MiB);
            ``0`` replays every step. Step callbacks for the backward pass
            (``callback_step_adjoint`` & co.) see the replayed steps only, so a ``func`` that
            has them keeps no graph.

    Raises:
        ValueError: ``graph_memory`` is not an int >= 0.

    Example:
        >>> ys = solve(field, y0, t, adjoint=Checkpoint()).ys  # doctest: +SKIP
    """

    graph_memory: int = 256 * 2**20

    def __post_init__(self) -> None:
        size = self.graph_memory
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"graph_memory must be an int >= 0 (bytes), got {size!r}")


@dataclass(frozen=True)
class Backsolve:
    r"""Solve the adjoint ODE backwards in time (Chen et al. 2018), in constant memory.

    Between consecutive output times the augmented state :math:`[y, a, g]` follows

    .. math::
        \dot y = f(t, y), \qquad \dot a = -a^\top \partial f / \partial y, \qquad
        \dot g = -a^\top \partial f / \partial \theta,

    backwards from :math:`[y(t_i), a_i, g]`, with :math:`y` restarted from the stored forward
    output at every output time. The gradients are those of the exact solution, to the
    backward solve's tolerance.

    Args:
        norm: ``"rms"`` controls the error of all of ``[y, a, g]``; ``"seminorm"`` (Kidger,
            Chen & Lyons 2021) leaves ``g`` out: it does not feed back into the dynamics, so
            controlling its error only costs steps. Or a function, as in torchdiffeq, of the
            scaled error as the tuple ``(t, *y, *adj_y, *adj_params)`` (``t`` is a zero
            0-dim tensor: cnf's backward solve carries no time channel) returning its norm.
        rtol, atol: tolerances of the backward solve, a number or one per tensor of a tuple
            state (None: the forward's).
        method: method of the backward solve, one of :data:`cnf.ode.METHODS` (None: the
            forward's).
        options: solver options of the backward solve (None: the defaults; the forward's
            options are not reused).

    Raises:
        ValueError: an unknown norm, method or option, or a tolerance that is not positive.

    Example:
        >>> Backsolve(norm="seminorm", rtol=1e-5)
        Backsolve(norm='seminorm', rtol=1e-05, atol=None, method=None, options=None)
    """

    norm: str | Callable = "rms"
    rtol: Tolerance | None = None
    atol: Tolerance | None = None
    method: str | None = None
    # Read-only once validated; left out of the hash (a mapping has none), kept in equality.
    options: Mapping | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not callable(self.norm) and self.norm not in NORMS:
            hint = (
                " (the per-sample norm is a solver option: "
                "Backsolve(norm='rms' or 'seminorm', options=dict(norm='sample')))"
                if self.norm == "sample"
                else ""
            )
            raise ValueError(
                f"unknown adjoint norm {self.norm!r}; choose one of {', '.join(NORMS)}, or "
                f"pass a function of the tuple (t, *y, *adj_y, *adj_params){hint}"
            )
        put = object.__setattr__  # frozen: normalise the fields once, here
        put(self, "rtol", _tolerance("adjoint_rtol", self.rtol))
        put(self, "atol", _tolerance("adjoint_atol", self.atol))
        adaptive = True if self.method is None else get_tableau(self.method).adaptive
        if self.options is not None:
            options = check_options(self.options, self.method, adaptive)
            if options.get("steps", "shared") != "shared":
                raise ValueError(
                    "Backsolve's options cannot ask for per-sample steps (steps='sample'): "
                    "the adjoint solves the batch with shared steps; leave 'steps' out"
                )
            put(self, "options", MappingProxyType(options) if options else None)


AdjointStrategy = Checkpoint | Backsolve


def _tolerance(name: str, tol) -> Tolerance | None:
    if tol is None:
        return None
    if isinstance(tol, Sequence) and not isinstance(tol, str):
        return tuple(positive(f"{name}[{i}]", x) for i, x in enumerate(tol))
    return positive(name, tol)


def adjoint_strategy(adjoint, adjoint_options: Mapping | None = None) -> AdjointStrategy | None:
    """Validate an adjoint setting and turn it into a strategy, once, ahead of any solve.

    Args:
        adjoint: ``False``/``None`` (backpropagate through the solver), ``True``
            (:class:`Checkpoint`, or what ``adjoint_options`` asks for), or a strategy.
        adjoint_options: torchdiffeq-style options with ``adjoint=True``: ``mode``
            (``"checkpoint"``, the default, or ``"backsolve"``) and, with backsolve, ``norm``
            and the backward solver's options.

    Returns:
        :class:`Checkpoint`, :class:`Backsolve`, or None for no adjoint.

    Raises:
        ValueError: an unknown mode, norm or option, options that the mode does not take, or
            options next to a strategy or ``adjoint=False``.

    Example:
        >>> adjoint_strategy(True, {"mode": "backsolve", "norm": "seminorm"})
        Backsolve(norm='seminorm', rtol=None, atol=None, method=None, options=None)
    """
    return to_strategy(adjoint, adjoint_options)


def to_strategy(
    adjoint,
    adjoint_options: Mapping | None = None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method: str | None = None,
    *,
    implied_backsolve: bool = False,
) -> AdjointStrategy | None:
    """:func:`adjoint_strategy` with ``adjoint_rtol``/``adjoint_atol``/``adjoint_method``.

    ``implied_backsolve`` is torchdiffeq's reading (its adjoint always solves backwards): a
    backsolve-only setting without a ``mode`` picks :class:`Backsolve` instead of failing.
    """
    options, rtol, atol, method = adjoint_options, adjoint_rtol, adjoint_atol, adjoint_method
    values = (options or None, rtol, atol, method)  # an empty dict of options is no setting
    given = [name for name, v in zip(ADJOINT_KEYWORDS, values) if v is not None]
    if isinstance(adjoint, (Checkpoint, Backsolve)):
        if given:
            raise ValueError(
                f"{given} given next to adjoint={adjoint!r}; put the settings in the strategy, "
                "e.g. adjoint=Backsolve(norm='seminorm', rtol=1e-5)"
            )
        return adjoint
    if adjoint is None or adjoint is False:
        if given:
            raise ValueError(
                f"{given} only apply to adjoint solves; pass adjoint=True (or a strategy) or "
                "leave them out"
            )
        return None
    if adjoint is not True:
        raise ValueError(
            f"adjoint must be True, False, Checkpoint() or Backsolve(...), got {adjoint!r}"
        )
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"adjoint_options must be a dict, got {options!r}")
    settings = [name for name in given if name != "adjoint_options"]
    return _from_options(dict(options or {}), rtol, atol, method, settings, implied_backsolve)


def _from_options(
    options: dict, rtol, atol, method, keywords: list[str], implied_backsolve: bool
) -> AdjointStrategy:
    """The strategy ``adjoint_options`` and the ``keywords`` given (rtol, atol, method) ask for."""
    mode = options.pop("mode", None)
    settings = sorted(options) + keywords
    if mode is None:
        mode = "backsolve" if implied_backsolve and settings else "checkpoint"
    if mode not in MODES:
        raise ValueError(f"unknown adjoint mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "backsolve":
        norm = options.pop("norm", "rms")
        return Backsolve(norm=norm, rtol=rtol, atol=atol, method=method, options=options or None)
    if options.get("norm") == "rms":  # every adjoint's default: naming it changes nothing
        settings.remove("norm")
    if settings:
        raise ValueError(
            f"{settings} only apply to adjoint_options=dict(mode='backsolve') (or "
            "adjoint=Backsolve(...)); the checkpoint adjoint replays the forward steps"
        )
    return Checkpoint()
