r"""The CNF block: the joint ODE of state and log-density as a :class:`~cnf.transforms.Transform`.

Convention (the generative direction of Chen et al. 2018 and of flow matching): the base lives
at :math:`t = 0`, the data at :math:`t = T`. A vector field :math:`f(t, z)` (or
:math:`f(t, z, c)` with a context :math:`c`) carries base points to data,

.. math::

    \frac{dz}{dt} = f(t, z), \qquad \frac{d \log p(z(t))}{dt} = -\operatorname{tr}
    \frac{\partial f}{\partial z},

so for data :math:`x = z(T)`, integrating backwards from :math:`T` to :math:`0`,

.. math::

    \log\left|\det \frac{\partial z(0)}{\partial x}\right|
    = -\int_0^T \operatorname{tr} \frac{\partial f}{\partial z}(t, z(t))\, dt ,

which is the ``logdet`` of the data-to-base pass. The same solve can carry the RNODE
regularizers of Finlay et al. (2020) as extra channels, :math:`\int_0^T \|f\|^2 dt` (kinetic
energy) and :math:`\int_0^T \|\partial f / \partial z\|_F^2 dt` (estimated with the Hutchinson
probe), when the call asks for ``regularizers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .context import with_context
from .fields import solve_context
from .ode import solve
from .ode._problem import positive
from .settings import Call, SolverSettings, check_choice
from .trace import divergence, sample_noise
from .transforms.core import FlowOutput, Transform, check_event_shape, check_points

__all__ = ["CNFTransform", "JointODE", "trajectory_times", "with_context"]


class JointODE(nn.Module):
    """The right-hand side of the joint ODE for one solve.

    Built afresh for every solve, holding that solve's probes; the state is
    ``(z, logdet[, kinetic, jacobian])`` with every channel but ``z`` of shape ``(batch,)``.
    """

    def __init__(self, field, trace: str, noise: Tensor | None, regularizers: bool):
        super().__init__()
        self.field, self.trace, self.noise, self.regularizers = field, trace, noise, regularizers

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        z = state[0]
        d = divergence(
            self.field, t, z, estimator=self.trace, noise=self.noise, frobenius=self.regularizers
        )
        if not self.regularizers:
            return d.f, d.div
        kinetic = d.f.reshape(d.f.shape[0], -1).square().sum(1)
        return d.f, d.div, kinetic, d.frobenius


def trajectory_times(times, like: Tensor, direction: str) -> Tensor:
    """``times`` as a finite 1-D tensor of at least two times in ``like``'s dtype and device,
    increasing for ``direction="generative"``, decreasing for ``"normalizing"``.

    Raises:
        ValueError: saying what ``times`` must be.
    """
    try:
        times = torch.as_tensor(times, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"times must be a 1-D sequence of numbers, got {type(times).__name__}"
        ) from None
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError("times must be a 1-D sequence of at least two times")
    if not bool(torch.isfinite(times).all()):
        raise ValueError("times contain NaN or Inf")
    diffs = times.diff()
    if direction == "generative" and not bool((diffs > 0).all()):
        raise ValueError("direction='generative' needs strictly increasing times")
    if direction == "normalizing" and not bool((diffs < 0).all()):
        raise ValueError("direction='normalizing' needs strictly decreasing times")
    return times


class CNFTransform(Transform):
    r"""One CNF block: the map from data :math:`z(T)` to base :math:`z(0)` of :math:`dz/dt = f`.

    Args:
        field: ``field(t, z) -> dz/dt`` for ``z`` of shape ``(batch, *event_shape)``, an
            ``nn.Module`` (e.g. :class:`cnf.fields.ConcatSquashMLP`); called as
            ``field(t, z, context)`` when a call passes a ``context``.
        event_shape: shape of one point, e.g. ``(2,)`` or ``(1, 28, 28)``.
        T: integration time.
        train_T: learn ``T`` (``T = T0 s^2`` with the parameter ``s`` starting at 1; the square
            keeps it positive, as FFJORD's parametrisation does).
        settings: the block's default :class:`~cnf.settings.SolverSettings`; keyword
            arguments (``trace=...``, ``rtol=...``) build one instead.

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> block = CNFTransform(ConcatSquashMLP(2, (16,)), (2,), trace="exact")
        >>> z, logdet = block(torch.randn(5, 2))
        >>> z.shape, logdet.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(
        self,
        field: nn.Module,
        event_shape: Sequence[int],
        *,
        T: float = 1.0,
        train_T: bool = False,
        settings: SolverSettings | None = None,
        **setting_kwargs,
    ):
        super().__init__()
        if not isinstance(field, nn.Module):
            raise ValueError("field must be an nn.Module (its parameters are what trains)")
        T = positive("T", T)
        shape = check_event_shape(event_shape)
        if settings is not None and setting_kwargs:
            raise ValueError("give settings or setting keywords, not both")
        self.settings = settings if settings is not None else SolverSettings(**setting_kwargs)
        self.in_shape = self.out_shape = shape
        self.field = field
        # T0 is a Python float, exact in every dtype; a learned T is T0 * s^2
        self.T0 = float(T)
        self.T_scale = nn.Parameter(torch.ones(())) if train_T else None

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one point (the same on both sides)."""
        return self.in_shape

    def extra_repr(self) -> str:
        s, learned = self.settings, " (learned)" if self.T_scale is not None else ""
        return (
            f"event_shape={tuple(self.in_shape)}, T={self.T0:g}{learned}, method={s.method}, "
            f"trace={s.trace}, rtol={s.rtol:g}, atol={s.atol:g}"
        )

    @property
    def T(self) -> Tensor:
        """The integration time (a 0-dim tensor; differentiable when ``train_T``)."""
        ref = self.reference()
        return self.span(torch.empty((), dtype=ref.dtype if ref is not None else None))

    def span(self, like: Tensor) -> Tensor:
        """``T`` as a 0-dim tensor with ``like``'s dtype and device."""
        if self.T_scale is None:
            return torch.full((), self.T0, dtype=like.dtype, device=like.device)
        T = self.T0 * self.T_scale.to(like.dtype).square()
        if not bool(torch.isfinite(T)):
            raise ValueError(
                f"this block's learned T is {T.item()}: its parameter T_scale is not finite, "
                "so the model's weights are broken (e.g. training diverged); load a good "
                "checkpoint or build the model afresh"
            )
        return T

    def solve(self, y: Tensor, t: Tensor, call: Call, logdet: bool):
        """Integrate from ``t[0]`` to ``t[-1]`` starting at ``y``; a :class:`cnf.ode.Solution`.

        With ``logdet`` the state is the joint one (plus the regularizer channels when
        ``call.regularizers``); without, the field alone.
        """
        s = call.settings(self.settings)
        regularizers = logdet and call.regularizers
        field = with_context(self.field, call.context)
        if not logdet:
            rhs, state, rtol, atol = field, y, s.rtol, s.atol
        else:
            noise = None
            if s.trace == "hutchinson" or regularizers:
                noise = sample_noise(
                    y.shape, s.noise, probes=s.probes, generator=call.generator,
                    dtype=y.dtype, device=y.device,
                )  # fmt: skip
            rhs = JointODE(field, s.trace, noise, regularizers)
            zeros = y.new_zeros(y.shape[0])
            state = (y, zeros, zeros, zeros) if regularizers else (y, zeros)
            rtol, atol = s.tolerances(regularizers)
        with solve_context(self.field):
            return self._run(rhs, state, t, s, rtol, atol, field, call)

    def _run(self, rhs, state, t, s, rtol, atol, field, call):
        if s.adjoint is None:
            return solve(rhs, state, t, method=s.method, rtol=rtol, atol=atol, options=s.options)
        params = tuple(p for p in field.parameters() if p.requires_grad)
        # the tensor the field reads (embedded, if the field embeds): the adjoint differentiates it
        context = getattr(field, "context", None) if call.context is not None else None
        if context is not None and context.requires_grad:
            params += (context,)
        return solve(
            rhs, state, t, method=s.method, rtol=rtol, atol=atol, options=s.options,
            adjoint=s.adjoint, adjoint_params=params,
        )  # fmt: skip

    def forward_and_logdet(self, x: Tensor, call: Call) -> FlowOutput:
        T = self.span(x)
        sol = self.solve(x, torch.stack([T, torch.zeros_like(T)]), call, logdet=True)
        out = FlowOutput(z=sol.ys[0][-1], logdet=sol.ys[1][-1], stats=[sol.stats])
        if call.regularizers:
            # integrated from T down to 0: the channels hold minus the integrals over [0, T]
            out.kinetic, out.jacobian = -sol.ys[2][-1], -sol.ys[3][-1]
        return out

    def inverse_and_logdet(self, z: Tensor, call: Call) -> FlowOutput:
        T = self.span(z)
        t = torch.stack([torch.zeros_like(T), T])
        sol = self.solve(z, t, call, logdet=call.with_logdet)
        if not call.with_logdet:
            return FlowOutput(z=sol.ys[-1], logdet=z.new_zeros(z.shape[0]), stats=[sol.stats])
        # logdet = int_0^T tr(df/dz) dt = log|det dx/dz|
        return FlowOutput(z=sol.ys[0][-1], logdet=sol.ys[1][-1], stats=[sol.stats])

    def trajectory(self, x: Tensor, times, direction: str, call: Call) -> Tensor:
        """States at ``times`` (1-D, in ``[0, T]``) starting from ``x`` at ``times[0]``.

        ``direction="generative"`` needs increasing times (base to data), ``"normalizing"``
        decreasing ones. Returns ``(len(times), batch, *event_shape)``.
        """
        check_choice("direction", direction, ("generative", "normalizing"))
        x = check_points(x, self.in_shape, "x", self.reference())
        times = trajectory_times(times, x, direction)
        T = float(self.span(x).detach())
        eps = 1e-6 * max(T, 1.0)
        if times.min().item() < -eps or times.max().item() > T + eps:
            raise ValueError(f"times must lie in [0, T] = [0, {T:g}]")
        return self.solve(x, times, call, logdet=False).ys
