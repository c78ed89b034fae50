r"""Events: solve until ``event_fn(t, y)`` crosses zero, and gradients through the event time.

**Finding the event.** :func:`odeint_until_event` steps the ODE with the usual controller, one
accepted step at a time, and evaluates the event function at the end of each. The event
function :math:`c(t, y)` may have several entries; each entry :math:`c_i` gets the sign
:math:`s_i` it has at the start (an entry that starts at exactly zero takes the sign of its rate
:math:`\dot c_i = \partial_t c_i + \partial_y c_i \cdot f` in the direction of integration, so
a ball thrown up from the ground, :math:`c = y`, does not stop at once), and

.. math::
    g(t) = \min_i\, s_i\, c_i(t, y(t))

is positive until the first entry crosses zero. The first accepted step whose end has
:math:`g \le 0` brackets the crossing; inside it the solution is the tableau's dense output, a
polynomial in time, and the crossing of :math:`g` along it is found by regula falsi with the
Illinois modification (a bisection step whenever the bracket fails to halve twice in a row)
until the bracket is a few float64 units in the last place wide. The event time returned is
the bracket's far end: the first time found where the event has happened (:math:`g \le 0`).
A crossing and a crossing back inside one step, or a zero touched without crossing, are not
seen (as in torchdiffeq).

With :func:`cnf.ode.odeint` the search's steps are the solve that autograd differentiates (the
state at the event is the dense output at the fixed time :math:`t^*`). With
:func:`cnf.ode.odeint_adjoint` the search runs without a graph and, where gradients are wanted,
the adjoint solve runs from :math:`t_0` to :math:`t^*` (with the search's first step, so the
same steps but the last); the values returned stay the search's.

**Gradients through the event time.** The event time :math:`t^*` is defined implicitly by
:math:`c(t^*, y(t^*; \theta)) = 0`, with :math:`\theta` anything the solution depends on
(``y0``, ``t0``, the parameters of ``func``) and :math:`c` the entry that crossed. Differentiating
this identity,

.. math::
    \partial_t c + \partial_y c \cdot \Big( f(t^*, y^*)\, \frac{dt^*}{d\theta}
        + \frac{\partial y(t^*)}{\partial \theta} \Big) + \partial_\phi c\,
        \frac{d\phi}{d\theta} = 0
    \quad\Longrightarrow\quad
    \frac{dt^*}{d\theta} = -\frac{\partial_y c \cdot \partial y(t^*)/\partial\theta
        + \partial_\phi c\, d\phi/d\theta}{\dot c}, \qquad
    \dot c = \partial_t c + \partial_y c \cdot f(t^*, y^*),

where :math:`\partial y(t^*)/\partial\theta` is the derivative of the solution at the *fixed*
time :math:`t^*` (what backpropagation through the solve, or its adjoint, gives) and
:math:`\phi` are parameters of the event function itself. The state returned,
:math:`y^* = y(t^*(\theta); \theta)`, moves with the event time too:
:math:`dy^*/d\theta = \partial y(t^*)/\partial\theta + f(t^*, y^*)\, dt^*/d\theta`. So a loss
:math:`L(t^*, y^*)` with incoming gradients :math:`\bar t = \partial L/\partial t^*` and
:math:`\bar y = \partial L/\partial y^*` has

.. math::
    \frac{dL}{d\theta} = \Big(\bar y - \lambda\, \partial_y c\Big) \cdot
        \frac{\partial y(t^*)}{\partial \theta} - \lambda\, \partial_\phi c\,
        \frac{d\phi}{d\theta}, \qquad
    \lambda = \frac{\bar t + \bar y \cdot f(t^*, y^*)}{\dot c}:

:class:`EventGradient` sends :math:`\bar y - \lambda \partial_y c` on to the fixed-time solution
(whose own backward pass carries it to ``y0``, ``t0`` and the parameters of ``func``) and
:math:`-\lambda \partial_\phi c` to the event function's parameters. Only :math:`c`, its first
derivatives and one evaluation of ``f`` at the event are needed. A tangential crossing
(:math:`\dot c = 0`) has an infinite :math:`dt^*/d\theta`, and the gradient is not finite.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._callbacks import NO_CALLBACKS
from ._control import Config, check_finite_start, check_step, make_controller
from ._errors import SolverError
from ._problem import Problem, State, check_adjoint_params, number
from ._rk import dense_output, rk_step
from ._solve import odeint, solve
from ._time import with_initial_time_gradient

__all__ = ["EventFunction", "EventGradient", "odeint_event", "odeint_until_event"]

# The solver defaults, stated once (in solve's signature).
_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(solve).parameters.items()
    if name in ("method", "rtol", "atol")
}
# Illinois converges superlinearly; bisection from a step to a few ulps takes ~60 halvings.
_MAX_ITERATIONS = 200
_EPS = 2.0**-52


def _inner(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype))


class EventFunction:
    """The user's ``event_fn(t, y)`` on the solver's flat state: checked, and signed.

    Args:
        event_fn: ``event_fn(t, y) -> Tensor``, ``t`` a 0-dim tensor and ``y`` the state in the
            user's structure (a tuple for a tuple state); any number of entries.
        problem: the checked problem (the state's structure, the time's dtype).
    """

    def __init__(self, event_fn: Callable, problem: Problem) -> None:
        if not callable(event_fn):
            raise ValueError(
                f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}"
            )
        self.fn, self.problem = event_fn, problem
        self.shape: torch.Size | None = None
        self.signs: Tensor | None = None

    def time(self, t: float) -> Tensor:
        return torch.full((), t, dtype=self.problem.t_dtype, device=self.problem.device)

    def values(self, t: Tensor, y: Tensor) -> Tensor:
        """``c(t, y)`` for a 0-dim time and a flat state, checked to be a real tensor."""
        c = self.fn(t, self.problem.to_user(y))
        if self.shape is None or not isinstance(c, Tensor) or c.shape != self.shape:
            self._check(c)
        return c

    def _check(self, c) -> None:
        if not isinstance(c, Tensor) or not c.is_floating_point() or c.numel() == 0:
            what = type(c).__name__
            if isinstance(c, Tensor):
                what = f"a {c.dtype} tensor of shape {tuple(c.shape)}"
            raise ValueError(
                "event_fn(t, y) must return a floating-point tensor with at least one entry "
                f"(the event is where an entry crosses zero); it returned {what}"
            )
        if self.shape is not None and c.shape != self.shape:
            raise ValueError(
                f"event_fn(t, y) returned shape {tuple(c.shape)}, but {tuple(self.shape)} at the "
                "start; it must return the same shape at every call"
            )
        self.shape = c.shape

    def start(self, t0: float, y0: Tensor, f0: Callable[[], Tensor], direction: float) -> None:
        """Fix each entry's sign ``s_i`` at the start (the sign of its rate where it is zero).

        ``f0()`` gives ``f(t0, y0)``, only evaluated where an entry starts at zero.
        """
        with torch.no_grad():
            c0 = self.values(self.time(t0), y0.detach())
        if not bool(torch.isfinite(c0).all()):
            raise ValueError(f"event_fn(t0, y0) is not finite: {c0}")
        signs = torch.sign(c0)
        if bool((signs == 0).any()):
            with torch.no_grad():
                f = f0()
            rate = self._rate(t0, y0.detach(), f)
            signs = torch.where(signs == 0, torch.sign(direction * rate), signs)
            if bool((signs == 0).any()):
                raise ValueError(
                    "event_fn(t0, y0) is zero at the start and does not move off zero there "
                    f"(entries {signs.eq(0).nonzero().flatten().tolist()} of {tuple(c0.shape)}); "
                    "start off the event, or give an event function that crosses zero"
                )
        self.signs = signs

    def _rate(self, t0: float, y0: Tensor, f0: Tensor) -> Tensor:
        """``dc/dt = dc/dt + dc/dy . f`` at the start, one forward-mode derivative."""
        t = self.time(t0)
        with torch.enable_grad():
            _, rate = torch.autograd.functional.jvp(
                self.values, (t, y0), (torch.ones_like(t), f0.to(y0.dtype))
            )
        return rate

    def combined(self, t: Tensor, y: Tensor) -> Tensor:
        """``g = min_i s_i c_i(t, y)``: positive before the event, a 0-dim tensor."""
        return (self.values(t, y) * self.signs).min()

    def signed(self, t: float, y: Tensor) -> float:
        """:meth:`combined` as a number, without a graph."""
        with torch.no_grad():
            return float(self.combined(self.time(t), y))


@dataclass
class _Step:
    """An accepted step ``t -> t_next = t + h`` (``y -> y1``) with its dense-output stages."""

    t: float
    h: float
    t_next: float
    y: Tensor
    y1: Tensor
    stages: list[Tensor]
    k_end: Tensor

    def state(self, cfg: Config, time: float) -> Tensor:
        """The solution at ``time`` inside the step (the end point exactly at ``t_next``)."""
        if time == self.t_next:
            return self.y1
        return dense_output(cfg.tableau, self.y, self.stages, self.h, (time - self.t) / self.h)


def _far_end(cfg: Config, t0: float, direction: float) -> float:
    """Where the controller aims: nowhere for adaptive steps; past the last step for fixed."""
    if cfg.adaptive:
        return direction * math.inf
    return t0 + direction * cfg.step_size * cfg.max_num_steps


def _accepted_step(
    rhs, cfg: Config, control, t: float, y: Tensor, k0: Tensor, t_max: float
) -> _Step:
    """Propose and try steps from ``(t, y)`` until the controller accepts one.

    ``t_max``: the largest time the time's dtype holds.
    """
    tab, cb = cfg.tableau, cfg.callbacks or NO_CALLBACKS
    while True:
        h, t_next = control.propose(t, t)
        if not abs(t_next) <= t_max:
            raise SolverError(
                f"event_fn did not cross zero before the time overflowed (t={t:.6g}); "
                "check event_fn: the event never happens on this solution",
                t=t,
                step_size=h,
            )
        check_step(cfg, t, h, t_next, getattr(control, "failure", None))
        cb.step(t, y, h)
        y1, ks = rk_step(rhs, tab, t, y, k0, h)
        if not control.accept(ks, y1, h, t):
            cb.reject(t, y, h)
        else:
            cb.accept(t, y, h)
            k_end = ks[-1] if tab.fsal else rhs(t_next, y1)
            stages = ks if tab.fsal else ks + [k_end]
            return _Step(t, h, t_next, y, y1, stages, k_end)


def find_event(
    problem: Problem, cfg: Config, event: EventFunction, y0: Tensor, direction: float
) -> tuple[float, Tensor, float]:
    """Step from ``y0`` at ``t0`` until the event; returns ``t*``, ``y(t*)`` and the first step.

    ``y(t*)`` is differentiable through the steps where gradients are enabled.
    """
    if cfg.landmarks is not None or cfg.perturb:
        # the event search steps on its own (see _accepted_step), without the jump handling
        raise ValueError(
            "options step_t, jump_t and perturb are not supported with event_fn; solve up to "
            "the jump with odeint first, then search for the event from there"
        )
    rhs, t = problem.rhs, problem.ts[0]
    k0 = rhs(t, y0)
    check_finite_start(cfg, k0, t)
    event.start(t, y0, lambda: k0, direction)
    control = make_controller(cfg, rhs, t, y0, k0, _far_end(cfg, t, direction))
    first, y, g = control.step_size, y0, event.signed(t, y0)
    t_max = torch.finfo(problem.t_dtype).max
    for _ in range(cfg.max_num_steps):
        step = _accepted_step(rhs, cfg, control, t, y, k0, t_max)
        g1 = event.signed(step.t_next, step.y1)
        if not (math.isfinite(g1) and (cfg.adaptive or bool(torch.isfinite(step.y1).all()))):
            raise _not_finite(step, cfg, g1)
        if g1 <= 0:
            t_star = _locate(step, cfg, event, g, g1)
            return t_star, step.state(cfg, t_star), first
        t, y, k0, g = step.t_next, step.y1, step.k_end, g1
    raise SolverError(
        f"event_fn did not cross zero within max_num_steps={cfg.max_num_steps} steps (reached "
        f"t={t:.17g}); raise options['max_num_steps']"
        + ("" if cfg.adaptive else " or options['step_size']")
        + ", or check event_fn: the event may never happen on this solution",
        t=t,
        step_size=control.step_size,
    )


def _not_finite(step: _Step, cfg: Config, g: float) -> SolverError:
    if bool(torch.isfinite(step.y1).all()):
        what, advice = "event_fn(t, y) is not finite", "check event_fn"
    elif cfg.adaptive:
        what = "the solution overflows"
        advice = "it grows without bound and the event may never happen; check the vector field"
    else:
        what, advice = (
            "the solution is not finite",
            "reduce the step size or use an adaptive method",
        )
    return SolverError(
        f"{what} before the event, at t={step.t_next:.17g} (step {abs(step.h):.3g}, signed "
        f"event value {g}); {advice}",
        t=step.t_next,
        step_size=abs(step.h),
    )


def _locate(step: _Step, cfg: Config, event: EventFunction, ga: float, gb: float) -> float:
    """The crossing of ``g`` along the step's dense output, ``g(t) > 0 >= g(t_next)``.

    Regula falsi with the Illinois modification, bisecting where the bracket shrinks slowly;
    returns the bracket's far end (where ``g <= 0``) once it is a few ulps of a float64 time
    wide (the state there is wanted to the state's precision, whatever the time's dtype).
    """
    a, b = step.t, step.t_next
    tol = 4 * _EPS * max(abs(a), abs(b), abs(step.h))
    side, slow = 0, 0
    with torch.no_grad():
        for _ in range(_MAX_ITERATIONS):
            width = abs(b - a)
            if gb == 0 or width <= tol:
                break
            c = a + (b - a) / 2 if (ga <= 0 or slow >= 2) else b - gb * (b - a) / (gb - ga)
            if not min(a, b) < c < max(a, b):
                c = a + (b - a) / 2
                if c in (a, b):
                    break
            gc = event.signed(c, step.state(cfg, c))
            if gc <= 0:  # the crossing is before c: c is the new far end
                b, gb, ga = c, gc, ga / 2 if side == -1 else ga
                side = -1
            else:
                a, ga, gb = c, gc, gb / 2 if side == 1 else gb
                side = 1
            slow = slow + 1 if abs(b - a) > width / 2 else 0
    return b


def _check_event_problem(problem: Problem, method: str, options) -> Config:
    if len(problem.ts) != 2:
        raise ValueError(
            f"with event_fn, t must have exactly 2 entries (the start time and, by its sign "
            f"relative to it, the direction), got {len(problem.ts)}"
        )
    cfg = problem.config(method, options)
    if cfg.sample_steps:
        raise ValueError(
            "event_fn does not support options['steps']='sample' (the event stops the whole "
            "batch at one time); use steps='shared' (the default)"
        )
    if not cfg.adaptive and cfg.step_size is None:
        raise ValueError(
            f"the fixed-step method {method!r} needs options['step_size'] to find an event "
            "(as in torchdiffeq): it has no output times to step between"
        )
    if problem.y0.numel() == 0:
        raise ValueError("event_fn needs a state with at least one entry; y0 is empty")
    return cfg


def odeint_until_event(
    func: Callable,
    y0: State,
    t: Tensor,
    event_fn: Callable,
    *,
    adjoint,
    method: str = _DEFAULTS["method"],
    rtol=_DEFAULTS["rtol"],
    atol=_DEFAULTS["atol"],
    options=None,
    adjoint_params: Sequence[Tensor] | None = None,
) -> tuple[Tensor, State]:
    """:func:`cnf.ode.odeint` (``adjoint=False``) or ``odeint_adjoint`` with ``event_fn``.

    Returns ``(event_t, solution)``: ``event_t`` a 0-dim tensor of ``t``'s dtype and device
    (a constant: :func:`odeint_event` adds its gradient), ``solution`` of shape
    ``(2, *y0.shape)`` (a tuple for a tuple state): ``y0`` and ``y(event_t)``, differentiable
    as the solution at the fixed time ``event_t``.
    """
    problem = Problem(func, y0, t, rtol, atol)
    cfg = _check_event_problem(problem, method, options)
    event = EventFunction(event_fn, problem)
    direction = 1.0 if problem.ts[1] > problem.ts[0] else -1.0
    if adjoint is False:
        if adjoint_params is not None:
            raise ValueError("adjoint_params only apply to odeint_adjoint")
        start = problem.y0
        if torch.is_grad_enabled() and problem.t.requires_grad:
            start = with_initial_time_gradient(problem, start)
        t_star, y_star, _ = find_event(problem, cfg, event, start, direction)
        ys = torch.stack([start, y_star])
    else:
        params = check_adjoint_params(func, adjoint_params)
        with torch.no_grad():
            t_star, y_star, first = find_event(problem, cfg, event, problem.y0, direction)
        ys = torch.stack([problem.y0, y_star])
        needs_grad = problem.y0.requires_grad or problem.t.requires_grad or len(params) > 0
        if torch.is_grad_enabled() and needs_grad:
            if cfg.adaptive:  # the same first step: the same steps until the last
                options = {"first_step": first, **(options or {})}
            times = torch.cat([problem.t[:1], problem.t.new_tensor([t_star])])
            solution = solve(
                func, y0, times, method=method, rtol=rtol, atol=atol, options=options,
                adjoint=adjoint, adjoint_params=params,
            ).ys  # fmt: skip
            ys = _stitch(problem, ys, solution)
    event_t = torch.tensor(t_star, dtype=problem.t.dtype, device=problem.t.device)
    return event_t, problem.unflatten(ys)


def _stitch(problem: Problem, found: Tensor, solution: State) -> Tensor:
    """The values found, with the gradients of the adjoint ``solution`` up to the event time.

    The adjoint's solve ends on the event time exactly, so its last step (and value) differs
    from the search's by the local error; the values returned stay the search's.
    """
    parts = solution if problem.is_tuple else (solution,)
    flat = torch.cat([p.reshape(2, -1) for p in parts], dim=1).view_as(found)
    return torch.stack([flat[0], found[1] + (flat[1] - flat[1].detach())])


class EventGradient(torch.autograd.Function):
    """The identity on ``(event_t, y(event_t))`` whose backward adds the event time's motion.

    ``y_event`` comes in as the solution at the fixed time ``event_t`` (its graph reaches
    ``y0``, ``t0`` and ``func``'s parameters); the backward pass sends it
    ``grad_y - lambda dc/dy`` and the event function's parameters ``-lambda dc/dphi``, with
    ``lambda = (grad_t + grad_y . f) / (dc/dt + dc/dy . f)`` (the module docstring derives it).
    ``event_t`` itself is a constant of the solve and gets no gradient.
    """

    @staticmethod
    def forward(ctx, event: EventFunction, event_t: Tensor, y_event: Tensor, *params: Tensor):
        ctx.event = event
        ctx.save_for_backward(event_t, y_event, *params)
        return event_t.clone(), y_event.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_t: Tensor, grad_y: Tensor):
        event_t, y, *params = ctx.saved_tensors
        event = ctx.event
        with torch.enable_grad():
            t_ = event_t.detach().requires_grad_()
            y_ = y.detach().requires_grad_()
            c = event.combined(t_.to(event.problem.t_dtype), y_)
            grads = torch.autograd.grad(c, (t_, y_, *params), allow_unused=True)
        dc_dt, dc_dy, *dc_dphi = (
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, (t_, y_, *params))
        )
        f = event.problem.rhs(float(event_t), y)
        rate = dc_dt.to(y.dtype) + _inner(dc_dy, f)
        lam = (grad_t.to(y.dtype) + _inner(grad_y, f)) / rate
        grad_params = tuple((-lam * g).to(g.dtype) for g in dc_dphi)
        return (None, None, grad_y - lam * dc_dy, *grad_params)


def _event_params(event_fn, event_params) -> tuple[Tensor, ...]:
    if event_params is None:
        params = event_fn.parameters() if isinstance(event_fn, nn.Module) else ()
    else:
        params = tuple(event_params)
        if not all(isinstance(p, Tensor) for p in params):
            raise ValueError("event_params must be a sequence of tensors")
    return tuple(p for p in params if p.requires_grad)


def _start_time(t0, y0: State) -> Tensor:
    if isinstance(t0, Tensor):
        if t0.numel() != 1:
            raise ValueError(f"t0 must be one time, got a tensor of shape {tuple(t0.shape)}")
        return t0.reshape(1)
    like = y0[0] if isinstance(y0, (tuple, list)) and y0 else y0
    dtype = like.dtype if isinstance(like, Tensor) else torch.get_default_dtype()
    return torch.tensor([number("t0", t0)], dtype=dtype)


def odeint_event(
    func: Callable,
    y0: State,
    t0: Tensor | float,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    event_params: Sequence[Tensor] | None = None,
    **kwargs,
) -> tuple[Tensor, State]:
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero, with gradients through the event.

    A drop-in for ``torchdiffeq.odeint_event``: ``odeint_interface(func, y0, [t0, t0 +- 1],
    event_fn=event_fn, **kwargs)`` finds the event (:func:`cnf.ode.odeint` by default, or
    :func:`cnf.ode.odeint_adjoint`), and :class:`EventGradient` makes the event time and the
    state there differentiable by the implicit function theorem (see :mod:`cnf.ode._event`).

    Args:
        func: ``func(t, y) -> dy/dt``.
        y0: the initial state, a tensor or a tuple of tensors.
        t0: the initial time, a one-element tensor (or a number).
        event_fn: ``event_fn(t, y) -> Tensor``; the event is where the first of its entries
            crosses zero.
        reverse_time: integrate towards earlier times.
        odeint_interface: the solver to call.
        event_params: the tensors ``event_fn`` depends on whose gradients are wanted (default:
            ``event_fn.parameters()`` for an ``nn.Module``, else none).
        kwargs: the solver's keywords (``method``, ``rtol``, ``atol``, ``options``, ...).

    Returns:
        ``(event_t, solution)``: the event time, a 0-dim tensor of ``t0``'s dtype, and the
        solution at ``[t0, event_t]``, shape ``(2, *y0.shape)`` (a tuple for a tuple state).

    Example:
        >>> y0 = torch.tensor([0.0, 9.81])  # height and upward speed of a ball
        >>> fall = lambda t, y: torch.stack([y[1], torch.full_like(y[1], -9.81)])
        >>> t, _ = odeint_event(fall, y0, torch.tensor(0.0), event_fn=lambda t, y: y[0])
        >>> round(t.item(), 4)
        2.0
    """
    t0 = _start_time(t0, y0)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    problem = Problem(func, y0, t, 1.0, 1.0)  # the structure and f; the tolerances are unused
    event = EventFunction(event_fn, problem)
    direction = -1.0 if reverse_time else 1.0
    t_0 = problem.ts[0]
    event.start(t_0, problem.y0, lambda: problem.rhs(t_0, problem.y0), direction)
    parts = solution if problem.is_tuple else (solution,)
    y_event = torch.cat([p[-1].reshape(-1) for p in parts]).view_as(problem.y0)
    params = _event_params(event_fn, event_params)
    event_t, y_event = EventGradient.apply(event, event_t, y_event, *params)
    ends = problem.unflatten(y_event.unsqueeze(0))
    ends = ends if problem.is_tuple else (ends,)
    out = tuple(torch.cat([p[:-1], e]) for p, e in zip(parts, ends))
    return event_t, out if problem.is_tuple else out[0]
