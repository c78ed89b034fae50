"""cnf: continuous normalizing flows for PyTorch.

* :mod:`cnf.ode`: the solver core (Runge-Kutta methods, adaptive steps, adjoint gradients);
* :mod:`cnf.fields`: vector-field networks; :mod:`cnf.trace`: exact and Hutchinson divergences;
* :mod:`cnf.flow`: the CNF model (joint ODE of state and log-density) and sequences of flows;
* :mod:`cnf.data`: data sets; :mod:`cnf.train`: maximum-likelihood training.
"""

from .fields import (
    ACTIVATIONS,
    ConcatSquashConv2d,
    ConcatSquashConvNet,
    ConcatSquashLinear,
    ConcatSquashMLP,
)
from .flow import CNF, Flow, FlowOutput, SequentialFlow, StandardNormal
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

from .trace import Divergence, divergence, divergence_exact, divergence_hutchinson, sample_noise

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "ConcatSquashConv2d",
    "ConcatSquashConvNet",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "Divergence",
    "Flow",
    "FlowOutput",
    "SequentialFlow",
    "StandardNormal",
    "divergence",
    "divergence_exact",
    "divergence_hutchinson",
    "sample_noise",
    "TABLEAUS",
    "ButcherTableau",
    "Solution",
    "SolverError",
    "SolverStats",
    "odeint",
    "odeint_adjoint",
    "solve",
]
