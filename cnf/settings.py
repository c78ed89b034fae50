"""Solver settings of a CNF block and the per-call context that reaches every transform.

Two objects travel with a solve, each validated once when it is made:

* :class:`SolverSettings`, frozen: the method, the tolerances of each channel of the joint
  ODE, the trace estimator and its probes, and the adjoint strategy. A CNF block holds one as
  its defaults.
* :class:`Call`, frozen: what one public call (``log_prob``, ``sample``, ...) adds: the
  per-call overrides of those settings, a random ``generator`` for the Hutchinson probes, a
  ``context`` tensor handed to the field as ``field(t, z, context)``, whether the RNODE
  regularizers are integrated and whether the inverse needs its log-determinant. Composite
  transforms pass the same ``Call`` to each of their steps.

Example:
    >>> s = SolverSettings(rtol=1e-4, atol=1e-4)
    >>> call = Call.make({"trace": "hutchinson"})
    >>> call.settings(s).trace, call.settings(s).rtol
    ('hutchinson', 0.0001)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .ode import adjoint_strategy
from .ode._problem import get_tableau, positive  # one lookup of methods, one rule for numbers
from .trace import ESTIMATORS, NOISE_KINDS

__all__ = ["CALL_KEYS", "Call", "SolverSettings"]


def check_choice(name: str, value, valid):
    """``value`` if it is one of ``valid``, else a ValueError listing the valid ones."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, valid))}")
    return value


@dataclass(frozen=True)
class SolverSettings:
    r"""How a CNF block solves its joint ODE; validated on construction, immutable.

    Attributes:
        method: a Runge-Kutta method of :data:`cnf.ode.METHODS` (``"dopri5"``, ...).
        rtol, atol: tolerances of the state channel ``z``.
        logp_rtol, logp_atol: tolerances of the log-density channel (None: ``rtol``,
            ``atol``). The RNODE regularizer channels are integrated at the loose
            ``max(rtol, 1e-2)``: only their gradients matter.
        trace: ``"exact"`` or ``"hutchinson"`` (one vector-Jacobian product per probe).
        noise: ``"rademacher"`` or ``"gaussian"`` probes (Hutchinson and the Jacobian
            regularizer), drawn once per solve.
        probes: number of Hutchinson probes averaged.
        adjoint: the adjoint strategy of the gradients (:class:`cnf.ode.Checkpoint`,
            :class:`cnf.ode.Backsolve`), or None for backpropagation through the solver. Given
            as a bool, True means checkpoint.
        adjoint_options: torchdiffeq-style options turned into the strategy on construction
            (e.g. ``{"mode": "backsolve", "norm": "seminorm"}``); stored as None afterwards.
        options: solver options passed to :func:`cnf.ode.solve` (``step_size``,
            ``max_num_steps``, ...), stored read-only. ``{"norm": "sample"}`` holds every
            sample's error (z, log-density and regularizer channels) within the tolerances,
            so a sample's log-density does not depend on its batch (see :mod:`cnf.ode`).
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    logp_rtol: float | None = None
    logp_atol: float | None = None
    trace: str = "exact"
    noise: str = "rademacher"
    probes: int = 1
    adjoint: Any = True
    adjoint_options: Mapping | None = None
    options: Mapping | None = None

    def __post_init__(self) -> None:
        get_tableau(self.method)  # torchdiffeq methods cnf lacks get a reason and a neighbour
        check_choice("trace", self.trace, ESTIMATORS)
        check_choice("noise", self.noise, NOISE_KINDS)
        probes = self.probes
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        put = object.__setattr__  # frozen: normalise the fields in place once
        put(self, "rtol", positive("rtol", self.rtol))
        put(self, "atol", positive("atol", self.atol))
        put(self, "logp_rtol", positive("logp_rtol", self.logp_rtol, optional=True))
        put(self, "logp_atol", positive("logp_atol", self.logp_atol, optional=True))
        strategy = self.adjoint
        if isinstance(strategy, bool) or self.adjoint_options is not None:
            enabled = strategy if isinstance(strategy, bool) else True
            strategy = adjoint_strategy(enabled, dict(self.adjoint_options or {}))
        elif strategy is not None:
            strategy = adjoint_strategy(strategy)
        put(self, "adjoint", strategy)
        put(self, "adjoint_options", None)
        if self.options is not None:
            if not isinstance(self.options, Mapping):
                raise ValueError(f"options must be a dict of solver options, got {self.options!r}")
            if self.options.get("steps", "shared") != "shared":
                raise ValueError(
                    "CNF blocks solve with shared steps: per-sample steps (options['steps']) "
                    "are for cnf.ode.solve and odeint; use options=dict(norm='sample') here"
                )
            put(self, "options", MappingProxyType(dict(self.options)))

    def replace(self, **changes) -> SolverSettings:
        """A copy with ``changes`` applied and validated; None values leave a field as it is.

        ``adjoint_options`` alone switches the strategy and keeps the adjoint on.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        if "adjoint_options" in changes and "adjoint" not in changes:
            changes["adjoint"] = self.adjoint is not None
        return dataclasses.replace(self, **changes) if changes else self

    def tolerances(self, regularizers: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(rtol, atol)`` per channel of the joint state ``(z, logp[, kinetic, jacobian])``."""
        rtol = [self.rtol, self.rtol if self.logp_rtol is None else self.logp_rtol]
        atol = [self.atol, self.atol if self.logp_atol is None else self.logp_atol]
        if regularizers:
            loose = max(self.rtol, 1e-2)
            rtol += [loose, loose]
            atol += [loose, loose]
        return tuple(rtol), tuple(atol)


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(SolverSettings))
CALL_KEYS = (*SETTING_KEYS, "generator", "context")
"""Keyword arguments every public flow method takes: the :class:`SolverSettings` fields (for
this call only), ``generator`` and ``context``."""


@dataclass(frozen=True, eq=False)
class Call:
    """What one public call hands to every transform it runs (see the module docstring).

    Build it with :meth:`make`, which validates the keywords once; the transforms read it.

    Attributes:
        overrides: solver settings for this call only, applied over each block's defaults.
        generator: random generator of the Hutchinson probes (on the data's device).
        context: a conditioning tensor ``(batch, ...)`` passed to fields as
            ``field(t, z, context)``; None for unconditional use.
        regularizers: integrate the RNODE regularizers (data-to-base passes).
        with_logdet: the inverse pass needs its log-determinant (``sample_with_log_prob``).
    """

    overrides: Mapping = field(default_factory=dict)
    generator: torch.Generator | None = None
    context: Tensor | None = None
    regularizers: bool = False
    with_logdet: bool = True
    _resolved: dict = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, keywords: Mapping[str, Any], **flags) -> Call:
        """A call from public keyword arguments (:data:`CALL_KEYS`) and ``flags``.

        Raises:
            TypeError: an unknown keyword.
            ValueError: an invalid setting (checked here, once for every block).
        """
        unknown = set(keywords) - set(CALL_KEYS)
        if unknown:
            raise TypeError(
                f"unknown keyword(s) {sorted(unknown)}; per-call settings are {list(CALL_KEYS)}"
            )
        kw = dict(keywords)
        generator, context = kw.pop("generator", None), kw.pop("context", None)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if context is not None and not isinstance(context, Tensor):
            raise ValueError(f"context must be a tensor, got {type(context).__name__}")
        overrides = MappingProxyType({k: v for k, v in kw.items() if v is not None})
        SolverSettings().replace(**overrides)  # validate the values now, not per block
        return cls(overrides, generator, context, **flags)

    def settings(self, defaults: SolverSettings) -> SolverSettings:
        """``defaults`` with this call's overrides (computed once per distinct defaults)."""
        if not self.overrides:
            return defaults
        key = id(defaults)
        if key not in self._resolved:
            self._resolved[key] = (defaults, defaults.replace(**self.overrides))
        return self._resolved[key][1]
