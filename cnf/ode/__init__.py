"""The solver core: explicit Runge-Kutta methods with adaptive steps and adjoint gradients."""

from .errors import SolverError
from .solve import Solution, SolverStats, odeint, odeint_adjoint, solve
from .tableaus import TABLEAUS, ButcherTableau

__all__ = [
    "TABLEAUS",
    "ButcherTableau",
    "Solution",
    "SolverError",
    "SolverStats",
    "odeint",
    "odeint_adjoint",
    "solve",
]
