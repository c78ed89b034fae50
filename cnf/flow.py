r"""Continuous normalizing flows: the joint ODE of state and log-density.

Convention (the generative direction of Chen et al. 2018 and of flow matching): the base
distribution lives at :math:`t = 0`, the data at :math:`t = T`. A vector field :math:`f(t, z)`
carries base points to data,

.. math::

    \frac{dz}{dt} = f(t, z), \qquad \frac{d \log p(z(t))}{dt} = -\operatorname{tr}
    \frac{\partial f}{\partial z},

so for data :math:`x = z(T)`, integrating backwards from :math:`T` to :math:`0`,

.. math::

    \log p_x(x) = \log p_{base}(z(0)) + \log\left|\det \frac{\partial z(0)}{\partial x}\right|,
    \qquad \log\left|\det \frac{\partial z(0)}{\partial x}\right|
    = -\int_0^T \operatorname{tr} \frac{\partial f}{\partial z}(t, z(t))\, dt .

:meth:`Flow.transform` returns ``(z, logdet)`` with exactly that ``logdet``, so
``log_prob(x) == base.log_prob(z) + logdet``.

The same solve can carry the RNODE regularizers of Finlay et al. (2020) as extra channels,
:math:`\int_0^T \|f\|^2 dt` (kinetic energy) and :math:`\int_0^T \|\partial f / \partial z\|_F^2
dt` (estimated with the Hutchinson probe); ask for them with
:meth:`Flow.evaluate` ``(x, regularizers=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .ode import SolverStats, solve
from .ode.tableaus import TABLEAUS
from .trace import ESTIMATORS, NOISE_KINDS, divergence, sample_noise

__all__ = ["CNF", "Flow", "FlowOutput", "SequentialFlow", "StandardNormal"]

_SOLVE_KEYS = (
    "trace",
    "noise",
    "probes",
    "generator",
    "method",
    "rtol",
    "atol",
    "logp_rtol",
    "logp_atol",
    "options",
    "adjoint",
    "adjoint_options",
)


@dataclass
class FlowOutput:
    """Everything one pass of a flow computed.

    Attributes:
        z: the image of the input, ``(batch, *event_shape)`` (base points for
            :meth:`Flow.evaluate`, data points for :meth:`Flow.sample_with_log_prob`).
        logdet: ``log|det dz/dx|`` of the map that was applied, ``(batch,)``.
        log_prob: ``log p(x)`` of the data points, ``(batch,)``.
        kinetic: :math:`\\int_0^T \\|f\\|^2 dt` summed over CNF blocks, ``(batch,)``, or None.
        jacobian: :math:`\\int_0^T \\|\\partial f/\\partial z\\|_F^2 dt` (Hutchinson estimate),
            ``(batch,)``, or None.
        stats: solver statistics of every CNF block's solve, in order; the backward fields are
            filled in by ``loss.backward()`` when the solve used the adjoint.
    """

    z: Tensor
    logdet: Tensor
    log_prob: Tensor | None = None
    kinetic: Tensor | None = None
    jacobian: Tensor | None = None
    stats: list[SolverStats] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        """Forward function evaluations, summed over blocks."""
        return sum(s.nfe for s in self.stats)

    @property
    def nfe_backward(self) -> int:
        """Backward function evaluations, summed over blocks (after ``backward()``)."""
        return sum(s.nfe_backward for s in self.stats)


class StandardNormal(nn.Module):
    """The standard normal over ``event_shape``; follows the model's device and dtype.

    Same interface as a ``torch.distributions.Distribution`` for what flows use:
    ``log_prob(z) -> (batch,)`` and ``sample(shape, generator=None)``.
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = torch.Size(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """:math:`-\\frac12 \\|z\\|^2 - \\frac D2 \\log 2\\pi` per sample."""
        d = self.event_shape.numel()
        dims = tuple(range(-len(self.event_shape), 0))
        return -0.5 * z.square().sum(dims) - 0.5 * d * math.log(2 * math.pi)

    def sample(
        self,
        sample_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Standard normal draws of shape ``(*sample_shape, *event_shape)``.

        ``dtype``/``device`` default to the module's (it follows ``.to()``).
        """
        a = self._anchor
        shape = (*sample_shape, *self.event_shape)
        return torch.randn(
            shape, generator=generator, dtype=dtype or a.dtype, device=device or a.device
        )


def _is_int(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


def _sample_shape(n) -> tuple[int, ...]:
    if _is_int(n):
        shape = (n,)
    elif isinstance(n, (tuple, list, torch.Size)):
        shape = tuple(n)
    else:
        shape = None
    if not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(f"the number of samples must be a positive int or shape, got {n!r}")
    return shape


class Flow(nn.Module):
    """A density :math:`p(x) = p_{base}(z) |\\det \\partial z / \\partial x|`, ``z = transform(x)``.

    Subclasses implement ``_forward(x, regularizers, opts) -> FlowOutput`` (data to base) and
    ``_inverse(z, opts, with_logdet) -> FlowOutput`` (base to data, with
    ``logdet = log|det dx/dz|``); this class validates input, owns the base distribution and
    derives every public method.

    Solver settings can be overridden per call with keyword arguments (``trace``, ``noise``,
    ``probes``, ``generator``, ``method``, ``rtol``, ``atol``, ``logp_rtol``, ``logp_atol``,
    ``options``, ``adjoint``, ``adjoint_options``): e.g. train with
    ``trace="hutchinson"`` at 1e-5 and evaluate with ``log_prob(x, trace="exact", rtol=1e-7,
    atol=1e-7)``. An override applies to that call only; nothing switches silently.
    """

    def __init__(self, event_shape: Sequence[int], base=None):
        super().__init__()
        self.event_shape = torch.Size(event_shape)
        if not self.event_shape or any(d < 1 for d in self.event_shape):
            raise ValueError(
                f"event_shape must be non-empty and positive, got {tuple(event_shape)}"
            )
        if base is None:
            base = StandardNormal(self.event_shape)
        elif torch.Size(getattr(base, "event_shape", ())) != self.event_shape:
            raise ValueError(
                f"base has event_shape {tuple(getattr(base, 'event_shape', ()))}, but the flow's "
                f"is {tuple(self.event_shape)}; use e.g. torch.distributions.Independent(..., "
                f"{len(self.event_shape)}) to make them match"
            )
        self.base = base

    # ------------------------------------------------------------------ public API

    def forward(self, x: Tensor, **overrides) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, **overrides)

    def log_prob(self, x: Tensor, **overrides) -> Tensor:
        """Exact log-density of data points.

        Args:
            x: data, shape ``(batch, *event_shape)``.
            **overrides: solver settings for this call (see the class docstring).

        Returns:
            ``log p(x)``, shape ``(batch,)``.
        """
        return self.evaluate(x, **overrides).log_prob

    def transform(self, x: Tensor, **overrides) -> tuple[Tensor, Tensor]:
        """Map data to the base: ``(z, logdet)`` with ``log_prob(x) == base.log_prob(z) + logdet``.

        Returns:
            ``z`` of shape ``(batch, *event_shape)`` and ``logdet = log|det dz/dx|`` of shape
            ``(batch,)``.
        """
        out = self._forward(self._check(x, "x"), False, self._options(overrides))
        return out.z, out.logdet

    def evaluate(self, x: Tensor, *, regularizers: bool = False, **overrides) -> FlowOutput:
        """One pass from data to base with everything training needs.

        Args:
            x: data, shape ``(batch, *event_shape)``.
            regularizers: also integrate the RNODE regularizers (kinetic energy and Jacobian
                Frobenius norm) as extra channels of the same solve.
            **overrides: solver settings for this call.

        Returns:
            :class:`FlowOutput` with ``z``, ``logdet``, ``log_prob`` and, with
            ``regularizers=True``, ``kinetic`` and ``jacobian``; ``stats`` per CNF block.
        """
        out = self._forward(self._check(x, "x"), regularizers, self._options(overrides))
        out.log_prob = self.base.log_prob(out.z) + out.logdet
        return out

    def inverse(self, z: Tensor, **overrides) -> Tensor:
        """Map base points to data: ``x`` of shape ``(batch, *event_shape)``."""
        return self._inverse(self._check(z, "z"), self._options(overrides), False).z

    def sample(self, n: int | Sequence[int], **overrides) -> Tensor:
        """Draw samples: ``n`` (or ``sample_shape``) base points carried to the data side.

        Returns:
            samples of shape ``(*sample_shape, *event_shape)``.
        """
        return self._sample(n, self._options(overrides), with_log_prob=False)[0]

    def sample_with_log_prob(self, n: int | Sequence[int], **overrides) -> tuple[Tensor, Tensor]:
        """Draw samples and their log-density from one solve.

        Returns:
            ``(x, log_prob)`` of shapes ``(*sample_shape, *event_shape)`` and ``sample_shape``.
        """
        return self._sample(n, self._options(overrides), with_log_prob=True)

    def _sample(self, n, opts: dict, with_log_prob: bool) -> tuple[Tensor, Tensor | None]:
        shape = _sample_shape(n)
        generator = opts.get("generator")
        ref = self._reference()
        if isinstance(self.base, StandardNormal):
            z = self.base.sample(
                (math.prod(shape),),
                generator=generator,
                dtype=None if ref is None else ref.dtype,
                device=None if ref is None else ref.device,
            )
        else:
            if generator is not None:
                raise ValueError(
                    "this flow's base is a torch.distributions object, which takes no generator; "
                    "seed with torch.manual_seed instead, or use the default StandardNormal base"
                )
            z = self.base.sample((math.prod(shape),))
            if ref is not None:
                z = z.to(dtype=ref.dtype, device=ref.device)
        out = self._inverse(z, opts, with_log_prob)
        x = out.z.reshape(*shape, *self.event_shape)
        if not with_log_prob:
            return x, None
        # log p(x) = log p_base(z) - log|det dx/dz|
        return x, (self.base.log_prob(z) - out.logdet).reshape(shape)

    # ------------------------------------------------------------------ helpers

    def _options(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(_SOLVE_KEYS)
        if unknown:
            raise TypeError(
                f"unknown keyword(s) {sorted(unknown)}; per-call settings are {list(_SOLVE_KEYS)}"
            )
        return overrides

    def _reference(self) -> Tensor | None:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return None

    def _check(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        expected = ("batch", *self.event_shape)
        if x.dim() != len(self.event_shape) + 1 or x.shape[1:] != self.event_shape:
            raise ValueError(
                f"{name} must have shape {expected} (batch first), got {tuple(x.shape)}"
            )
        ref = self._reference()
        if ref is not None and (x.dtype != ref.dtype or x.device != ref.device):
            raise ValueError(
                f"{name} is {x.dtype} on {x.device} but the model is {ref.dtype} on {ref.device}; "
                f"move one to the other (e.g. model.to({name}.dtype) or {name}.to(device))"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        return x

    def _forward(self, x: Tensor, regularizers: bool, opts: dict) -> FlowOutput:
        raise NotImplementedError

    def _inverse(self, z: Tensor, opts: dict, with_logdet: bool) -> FlowOutput:
        raise NotImplementedError


class _JointODE(nn.Module):
    """The right-hand side of the joint ODE for one solve.

    Built afresh for every solve, holding that solve's noise; the state is
    ``(z, logdet[, kinetic, jacobian])`` with every channel but ``z`` of shape ``(batch,)``.
    """

    def __init__(self, field: nn.Module, trace: str, noise: Tensor | None, regularizers: bool):
        super().__init__()
        self.field = field
        self.trace = trace
        self.noise = noise
        self.regularizers = regularizers

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        z = state[0]
        d = divergence(
            self.field, t, z, estimator=self.trace, noise=self.noise, frobenius=self.regularizers
        )
        if not self.regularizers:
            return d.f, d.div
        kinetic = d.f.reshape(d.f.shape[0], -1).square().sum(1)
        return d.f, d.div, kinetic, d.frobenius


def _check_choice(name: str, value, valid):
    """``value`` if it is one of ``valid``, else a ValueError listing the valid ones."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, valid))}")
    return value


class CNF(Flow):
    r"""A continuous normalizing flow: the density carried by :math:`dz/dt = f(t, z)`, t in [0, T].

    Args:
        field: ``field(t, z) -> dz/dt`` for ``z`` of shape ``(batch, *event_shape)``, an
            ``nn.Module`` (e.g. :class:`cnf.fields.ConcatSquashMLP`).
        event_shape: shape of one data point, e.g. ``(2,)`` or ``(1, 28, 28)``.
        T: integration time.
        train_T: learn ``T`` (parametrised as ``T = s^2``, FFJORD's choice, to stay positive).
        trace: ``"exact"`` or ``"hutchinson"`` (unbiased, one vector-Jacobian product per
            probe; the noise is drawn once per solve and held fixed across its steps and its
            backward pass).
        noise: ``"rademacher"`` or ``"gaussian"`` probes for Hutchinson and the Jacobian
            regularizer.
        probes: number of Hutchinson probes averaged.
        method, rtol, atol: the solver (see :func:`cnf.solve`).
        logp_rtol, logp_atol: tolerances of the log-density channel (default: ``rtol``,
            ``atol``); the regularizer channels are integrated at ``max(rtol, 1e-2)``-like loose
            tolerances, since only their gradients matter.
        adjoint: gradients by the adjoint method (memory independent of the number of steps)
            instead of backpropagation through the solver.
        adjoint_options: see :func:`cnf.solve` (default: checkpoint mode).
        base: base distribution with ``event_shape``; default :class:`StandardNormal`.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> flow = CNF(ConcatSquashMLP(2, hidden=(32, 32)), event_shape=(2,))
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        field: nn.Module,
        event_shape: Sequence[int],
        *,
        T: float = 1.0,
        train_T: bool = False,
        trace: str = "exact",
        noise: str = "rademacher",
        probes: int = 1,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        logp_rtol: float | None = None,
        logp_atol: float | None = None,
        adjoint: bool = True,
        adjoint_options: dict | None = None,
        base=None,
    ):
        super().__init__(event_shape, base)
        if not isinstance(field, nn.Module):
            raise ValueError("field must be an nn.Module (its parameters are what trains)")
        if not (isinstance(T, (int, float)) and T > 0 and math.isfinite(T)):
            raise ValueError(f"T must be a positive number, got {T!r}")
        self.field = field
        # T is kept as a Python float, exact in every dtype; a learned T is T0 * s^2 with the
        # parameter s starting at exactly 1 (the square keeps T positive, as FFJORD's sqrt
        # parametrisation does).
        self.T0 = float(T)
        self.T_scale = nn.Parameter(torch.ones(())) if train_T else None
        self.defaults = dict(
            trace=trace,
            noise=noise,
            probes=probes,
            method=method,
            rtol=rtol,
            atol=atol,
            logp_rtol=logp_rtol,
            logp_atol=logp_atol,
            adjoint=adjoint,
            adjoint_options=adjoint_options,
            options=None,
        )
        self._settings({})  # validate the defaults now, not at the first call

    @property
    def T(self) -> Tensor:
        """The integration time (a 0-dim tensor; differentiable when ``train_T``)."""
        ref = self._reference()
        return self._span(torch.empty((), dtype=ref.dtype if ref is not None else None))

    def _span(self, like: Tensor) -> Tensor:
        """``T`` as a 0-dim tensor with ``like``'s dtype and device."""
        if self.T_scale is None:
            return torch.full((), self.T0, dtype=like.dtype, device=like.device)
        return self.T0 * self.T_scale.to(like.dtype).square()

    def _settings(self, opts: dict) -> dict:
        s = {**self.defaults, **{k: v for k, v in opts.items() if v is not None}}
        _check_choice("trace", s["trace"], ESTIMATORS)
        _check_choice("noise", s["noise"], NOISE_KINDS)
        _check_choice("method", s["method"], sorted(TABLEAUS))
        probes = s["probes"]
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        for key in ("rtol", "atol", "logp_rtol", "logp_atol"):
            v = s[key]
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{key} must be a positive number, got {v!r}")
        return s

    def _solve(self, y: Tensor, t: Tensor, opts: dict, regularizers: bool, logdet: bool):
        """Integrate the joint ODE from ``t[0]`` to ``t[-1]`` starting at ``y``."""
        s = self._settings(opts)
        batch = y.shape[0]
        needs_noise = logdet and (s["trace"] == "hutchinson" or regularizers)
        noise = None
        if needs_noise:
            noise = sample_noise(
                y.shape,
                s["noise"],
                probes=s["probes"],
                generator=s.get("generator"),
                dtype=y.dtype,
                device=y.device,
            )
        zeros = y.new_zeros(batch)
        if not logdet:
            rhs = _FieldOnly(self.field)
            state, rtol, atol = y, s["rtol"], s["atol"]
        else:
            rhs = _JointODE(self.field, s["trace"], noise, regularizers)
            r_logp = s["logp_rtol"] if s["logp_rtol"] is not None else s["rtol"]
            a_logp = s["logp_atol"] if s["logp_atol"] is not None else s["atol"]
            state = (y, zeros)
            rtol, atol = [s["rtol"], r_logp], [s["atol"], a_logp]
            if regularizers:
                state += (zeros, zeros)
                loose = max(s["rtol"], 1e-2)
                rtol += [loose, loose]
                atol += [loose, loose]
            rtol, atol = tuple(rtol), tuple(atol)
        params = tuple(p for p in self.field.parameters() if p.requires_grad)
        sol = solve(
            rhs,
            state,
            t,
            method=s["method"],
            rtol=rtol,
            atol=atol,
            options=s["options"],
            adjoint=s["adjoint"],
            adjoint_params=params if s["adjoint"] else None,
            adjoint_options=s["adjoint_options"] if s["adjoint"] else None,
        )
        return sol

    def _forward(self, x: Tensor, regularizers: bool, opts: dict) -> FlowOutput:
        T = self._span(x)
        t = torch.stack([T, torch.zeros_like(T)])
        sol = self._solve(x, t, opts, regularizers, logdet=True)
        z, logdet = sol.ys[0][-1], sol.ys[1][-1]
        out = FlowOutput(z=z, logdet=logdet, stats=[sol.stats])
        if regularizers:
            # Integrated from T down to 0: the channels hold minus the integrals over [0, T].
            out.kinetic, out.jacobian = -sol.ys[2][-1], -sol.ys[3][-1]
        return out

    def _inverse(self, z: Tensor, opts: dict, with_logdet: bool) -> FlowOutput:
        T = self._span(z)
        t = torch.stack([torch.zeros_like(T), T])
        sol = self._solve(z, t, opts, False, logdet=with_logdet)
        if not with_logdet:
            return FlowOutput(z=sol.ys[-1], logdet=z.new_zeros(z.shape[0]), stats=[sol.stats])
        # logdet = int_0^T tr(df/dz) dt = log|det dx/dz|
        return FlowOutput(z=sol.ys[0][-1], logdet=sol.ys[1][-1], stats=[sol.stats])

    def trajectory(
        self,
        x: Tensor,
        times: Tensor | Sequence[float],
        *,
        direction: str = "generative",
        **overrides,
    ) -> Tensor:
        """States along the flow at the requested times, for plots.

        Args:
            x: base points (``direction="generative"``: integrated from ``times[0]`` upwards) or
                data points (``direction="normalizing"``: integrated from ``times[0]``
                downwards), shape ``(batch, *event_shape)``; ``x`` is the state at
                ``times[0]``.
            times: 1-D times in ``[0, T]``, increasing for ``"generative"`` and decreasing for
                ``"normalizing"``; e.g. ``torch.linspace(0, T, 50)``.
            direction: ``"generative"`` (base to data) or ``"normalizing"`` (data to base).

        Returns:
            states of shape ``(len(times), batch, *event_shape)``.
        """
        _check_choice("direction", direction, ("generative", "normalizing"))
        x = self._check(x, "x")
        times = torch.as_tensor(times, dtype=x.dtype, device=x.device)
        if times.dim() != 1 or times.numel() < 2:
            raise ValueError("times must be a 1-D sequence of at least two times")
        T = float(self._span(x).detach())
        eps = 1e-6 * max(T, 1.0)
        if times.min().item() < -eps or times.max().item() > T + eps:
            raise ValueError(f"times must lie in [0, T] = [0, {T:g}]")
        diffs = times.diff()
        increasing = bool((diffs > 0).all())
        if direction == "generative" and not increasing:
            raise ValueError("direction='generative' needs strictly increasing times")
        if direction == "normalizing" and not bool((diffs < 0).all()):
            raise ValueError("direction='normalizing' needs strictly decreasing times")
        return self._solve(x, times, self._options(overrides), False, logdet=False).ys


class _FieldOnly(nn.Module):
    """The field alone, for solves that need no log-density (sampling without densities)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.field(t, z)


class SequentialFlow(Flow):
    """Flows applied in sequence; their log-determinants add up.

    ``steps[0]`` is applied first on the way from data to base (``transform``, ``log_prob``)
    and last on the way back (``inverse``, ``sample``). The steps' own base distributions are
    not used: the sequence has its own ``base``.

    Args:
        steps: :class:`Flow` objects (e.g. several :class:`CNF` blocks), all with the
            sequence's ``event_shape``.
        base: base distribution; default :class:`StandardNormal`.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> flow = SequentialFlow([CNF(ConcatSquashMLP(2, (16,)), (2,)) for _ in range(2)])
        >>> flow.log_prob(torch.randn(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, steps: Sequence[Flow], base=None):
        steps = list(steps)
        if not steps or not all(isinstance(s, Flow) for s in steps):
            raise ValueError("steps must be a non-empty sequence of Flow objects (e.g. CNF)")
        shapes = {tuple(s.event_shape) for s in steps}
        if len(shapes) != 1:
            raise ValueError(f"all steps need the same event_shape, got {sorted(shapes)}")
        super().__init__(steps[0].event_shape, base)
        self.steps = nn.ModuleList(steps)

    def _forward(self, x: Tensor, regularizers: bool, opts: dict) -> FlowOutput:
        total = FlowOutput(z=x, logdet=x.new_zeros(x.shape[0]))
        for step in self.steps:
            out = step._forward(total.z, regularizers, opts)
            total = _accumulate(total, out)
        return total

    def _inverse(self, z: Tensor, opts: dict, with_logdet: bool) -> FlowOutput:
        total = FlowOutput(z=z, logdet=z.new_zeros(z.shape[0]))
        for step in reversed(self.steps):
            out = step._inverse(total.z, opts, with_logdet)
            total = _accumulate(total, out)
        return total

    def trajectory(
        self,
        x: Tensor,
        times: Tensor | Sequence[float],
        *,
        direction: str = "generative",
        **overrides,
    ) -> Tensor:
        """States along a sequence of CNF blocks, on one time axis through all of them.

        The generative direction runs through the blocks from the last to the first
        (``steps[-1]`` acts on base points); block ``k`` of that order occupies the times
        ``[o_k, o_k + T_k]`` with ``o_k`` the sum of the earlier blocks' ``T``. Arguments and
        result are as for :meth:`CNF.trajectory`, with times in ``[0, sum of T]``.
        """
        _check_choice("direction", direction, ("generative", "normalizing"))
        x = self._check(x, "x")
        if not all(isinstance(s, CNF) for s in self.steps):
            raise ValueError("trajectory needs every step to be a CNF block")
        taus = torch.as_tensor(times, dtype=x.dtype).detach().tolist()
        forward = direction == "generative"
        segments, start = [], 0.0
        for block in reversed(self.steps):
            span = float(block._span(x).detach())
            segments.append((block, start, start + span))
            start += span
        if len(taus) < 2:
            raise ValueError("times must be a 1-D sequence of at least two times")
        if not forward:
            segments.reverse()
        states, state, now, rest = [x], x, taus[0], taus[1:]
        for block, a, b in segments:
            end = b if forward else a
            if (end <= now) if forward else (end >= now):
                continue  # this block lies behind the starting time
            inside = [tau for tau in rest if (tau <= end if forward else tau >= end)]
            rest = rest[len(inside) :]
            local = [now - a] + [tau - a for tau in inside]
            if rest and local[-1] != end - a:
                local.append(end - a)  # carry the state to the block's far end
            if len(local) > 1:
                ys = block.trajectory(state, local, direction=direction, **overrides)
                states.extend(ys[1 : 1 + len(inside)])
                state, now = ys[-1], end
            if not rest:
                break
        if rest:
            raise ValueError(f"times must lie in [0, {start:g}] (the sum of the blocks' T)")
        return torch.stack(states)


def _accumulate(total: FlowOutput, out: FlowOutput) -> FlowOutput:
    def add(a, b):
        return b if a is None else (a if b is None else a + b)

    return FlowOutput(
        z=out.z,
        logdet=total.logdet + out.logdet,
        kinetic=add(total.kinetic, out.kinetic),
        jacobian=add(total.jacobian, out.jacobian),
        stats=total.stats + out.stats,
    )
