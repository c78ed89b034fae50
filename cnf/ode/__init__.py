"""The solver core: explicit Runge-Kutta methods with adaptive steps and adjoint gradients.

:func:`solve` integrates :math:`dy/dt = f(t, y)` and returns the solution with statistics;
:func:`odeint` and :func:`odeint_adjoint` are drop-ins for torchdiffeq's functions. The
methods (:data:`METHODS`) are Butcher tableaus (:data:`TABLEAUS`), data run by one generic
Runge-Kutta step:

* adaptive: ``dopri5`` (default), ``tsit5``, ``dopri8``, ``bosh3``, ``fehlberg2``,
  ``adaptive_heun``;
* fixed steps: ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``.

``method="scipy_solver"`` (:func:`solve` and :func:`odeint` only) hands a forward solve to
scipy's ``solve_ivp``, for stiff problems (``options=dict(solver="Radau")``, ``"BDF"``,
``"LSODA"``), without gradients. torchdiffeq's Adams and implicit methods are not offered;
asking for one says why and which method to use instead.

Solver options (``options=``), all optional:

* every Runge-Kutta method: ``step_size`` (fixed steps; a fixed-step method without it steps
  from one output time to the next), ``max_num_steps`` (default 10000) and ``norm``, the error
  norm of the scaled error ``e / (atol + rtol * max(|y0|, |y1|))`` that must be ``<= 1`` for a
  step to stand:

  - ``"rms"`` (default): the largest RMS over the tensors of the state, each over all its
    entries, the whole batch together. It bounds the batch's root-mean-square error per step,
    not each sample's: in a batch of ``B`` samples whose others have no error, one sample's
    local error may reach ``sqrt(B)`` times the tolerance.
  - ``"sample"``: every tensor of the state is ``(B, ...)`` with the batch first; each sample's
    RMS within each tensor, the largest over the tensors and the samples. Every sample's local
    error is then within the tolerance at every step, whatever else is in its batch (a sample
    is no less accurate for being solved in a batch), at the cost of the steps the hardest
    sample needs. Data-parallel processes (:func:`agreeing_norms`) take the largest over the
    processes. In :class:`Backsolve`'s options, ``y`` and ``a`` are measured per sample and
    the parameter gradients ``g`` (no batch) as one more section, unless the seminorm leaves
    them out.
  - a function of the scaled error, in the state's structure, returning its norm;
* ``steps`` (adaptive methods): ``"shared"`` (default), one time and step size for the whole
  state, or ``"sample"``: per-sample steps (torchode's idea). Every tensor of the state is
  ``(B, ...)`` with the batch first, and every sample carries its own time, step size, PI
  controller memory and accept/reject decision, with its own error (its RMS of the scaled
  error, the largest over the state's tensors; the ``norm`` option is then left out). Each
  sample's solution is the one it gets solved alone (to rounding), and a batch costs the
  steps of its hardest sample rather than, at every moment, those of whichever sample is
  hardest then. ``func`` is called with the samples still running only: ``func(t, y)`` with
  ``t`` of shape ``(m,)``, one time per row in the state's dtype, and ``y`` those ``m`` rows
  in the state's structure; it must return their ``m`` rows (a field that reads the time per
  sample, such as :class:`cnf.fields.ConcatSquashMLP`, works as it is). Samples that reach
  the end leave the batch, so they stop costing evaluations. ``nfe`` counts the batched calls
  of ``func``; ``n_accepted``, ``n_rejected`` and ``step_size`` are the largest over the
  samples, and ``max_num_steps`` holds per sample. Gradients by backpropagation only
  (``adjoint=False``: ``odeint``, not ``odeint_adjoint``); events, ``step_t``, ``jump_t``,
  ``step_size``, fixed-step methods, step callbacks and :func:`agreeing_norms` are refused.
* adaptive methods: ``first_step`` (default: Hairer, Norsett & Wanner's estimate),
  ``min_step`` (a floor: a step of ``min_step`` stands whatever its error, with a warning),
  ``max_step``, ``step_t`` (times to step onto, e.g. kinks of ``f``), ``jump_t`` (times where
  ``f`` jumps: stepped onto, with ``f`` read on each side), ``dtype`` (accepted; times are
  always double precision), and the PI controller's ``safety`` (0.9), ``ifactor`` (10),
  ``dfactor`` (0.2), ``pcoeff`` (0.2), ``icoeff`` (0.65):
  ``h_new = h * safety * r_n^(-(pcoeff + icoeff)/q) * r_{n-1}^(pcoeff/q)`` with ``r`` the
  error ratio and ``q`` the method's order, clipped to ``[dfactor, ifactor]``;
* fixed-step methods: ``grid_constructor`` (``(func, y0, t) -> grid``, instead of
  ``step_size``), ``perturb`` (read ``f`` just inside each step's ends, for fields that jump
  on the grid) and ``interp`` (outputs between steps: ``"cubic"``, the default, or
  ``"linear"``, torchdiffeq's default).
* ``scipy_solver``: ``solver`` (solve_ivp's method, default ``"LSODA"``), ``first_step``,
  ``max_step``, ``min_step`` (LSODA), and the Jacobian settings ``jac``, ``jac_sparsity``
  (Radau, BDF), ``lband``, ``uband`` (LSODA).

``func`` receives ``t`` in the state's dtype. Its methods ``callback_step``,
``callback_accept_step`` and ``callback_reject_step`` (and their ``_adjoint`` variants, for the
backward pass) are called with ``(t0, y0, dt)`` as the solver steps.

Adaptive methods reach output times by dense output, so the times asked for never change the
steps taken. Gradients come from backpropagation through the steps, or, with ``adjoint=``, from
an adjoint strategy: :class:`Checkpoint` (replays the recorded steps: exact for the discrete
solution) or :class:`Backsolve` (solves the adjoint ODE backwards in constant memory);
:func:`adjoint_strategy` turns torchdiffeq's ``adjoint_options`` into one.

Events, as in torchdiffeq: ``odeint(func, y0, t, event_fn=...)`` (``t`` of 2 entries: the
start and the direction; fixed-step methods need ``options["step_size"]``) solves until
``event_fn(t, y)`` crosses zero (with several entries, the first to cross), found on the dense
output to a few ulps of the time, and returns ``(event_t, solution at [t[0], event_t])``;
:func:`odeint_event` (with :func:`odeint` or :func:`odeint_adjoint`) also differentiates the
event time, by the implicit function theorem. ``SolverError`` if no crossing comes within
``max_num_steps`` steps.

Data-parallel processes that each solve a shard of one batch agree on their steps inside
:func:`agreeing_norms`: every error norm is then that of the whole batch (see
:mod:`cnf.distributed`, which sets it up for training).
"""

from ._agree import agreeing_norms
from ._errors import SolverError
from ._event import odeint_event
from ._solve import Solution, SolverStats, odeint, odeint_adjoint, solve
from ._strategies import Backsolve, Checkpoint, adjoint_strategy
from .tableaus import METHODS, TABLEAUS, ButcherTableau

__all__ = [
    "Backsolve",
    "ButcherTableau",
    "Checkpoint",
    "METHODS",
    "Solution",
    "SolverError",
    "SolverStats",
    "TABLEAUS",
    "adjoint_strategy",
    "agreeing_norms",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "solve",
]
