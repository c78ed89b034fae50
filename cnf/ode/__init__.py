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
  from one output time to the next) and ``max_num_steps`` (default 10000);
* adaptive methods: ``first_step`` (default: Hairer, Norsett & Wanner's estimate),
  ``min_step``, ``max_step``, and the PI controller's ``safety`` (0.9), ``ifactor`` (10),
  ``dfactor`` (0.2), ``pcoeff`` (0.2), ``icoeff`` (0.65):
  ``h_new = h * safety * r_n^(-(pcoeff + icoeff)/q) * r_{n-1}^(pcoeff/q)`` with ``r`` the
  error ratio and ``q`` the method's order, clipped to ``[dfactor, ifactor]``;
* ``scipy_solver``: ``solver`` (solve_ivp's method, default ``"LSODA"``), ``first_step``,
  ``max_step``, ``min_step`` (LSODA), and the Jacobian settings ``jac``, ``jac_sparsity``
  (Radau, BDF), ``lband``, ``uband`` (LSODA).

Adaptive methods reach output times by dense output, so the times asked for never change the
steps taken. Gradients come from backpropagation through the steps, or, with ``adjoint=``, from
an adjoint strategy: :class:`Checkpoint` (replays the recorded steps: exact for the discrete
solution) or :class:`Backsolve` (solves the adjoint ODE backwards in constant memory);
:func:`adjoint_strategy` turns torchdiffeq's ``adjoint_options`` into one.
"""

from ._errors import SolverError
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
    "odeint",
    "odeint_adjoint",
    "solve",
]
