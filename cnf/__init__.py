"""cnf: continuous normalizing flows for PyTorch.

The solver core (:mod:`cnf.ode`) integrates ODEs with its own Runge-Kutta methods and computes
gradients with its own adjoint method.
"""

from .ode import (
    TABLEAUS,
    ButcherTableau,
    Solution,
    SolverError,
    SolverStats,
    odeint,
    odeint_adjoint,
    solve,
)

__version__ = "0.1.0"

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
