"""cnf: continuous normalizing flows for PyTorch.

* :mod:`cnf.ode`: the solver core (Runge-Kutta methods, adaptive steps, adjoint gradients);
* :mod:`cnf.fields`: vector-field networks; :mod:`cnf.trace`: exact and Hutchinson divergences;
* :mod:`cnf.flow`: the CNF model (joint ODE of state and log-density) and sequences of flows;
* :mod:`cnf.transforms`, :mod:`cnf.multiscale`, :mod:`cnf.dense`: logit/squeeze steps,
  bits/dim, FFJORD's multiscale image model and the dense model for small images;
* :mod:`cnf.data`: data sets; :mod:`cnf.train`: maximum-likelihood training.
"""

from .dense import DenseImageCNF, digits_dense_model
from .fields import (
    ACTIVATIONS,
    ConcatSquashConv2d,
    ConcatSquashConvNet,
    ConcatSquashLinear,
    ConcatSquashMLP,
)
from .flow import CNF, Flow, FlowOutput, SequentialFlow, StandardNormal
from .multiscale import MultiscaleCNF, cifar10_model, digits_model, mnist_model
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
from .transforms import LogitTransform, Squeeze, bits_per_dim, dequantize

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "ConcatSquashConv2d",
    "ConcatSquashConvNet",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "DenseImageCNF",
    "Divergence",
    "Flow",
    "FlowOutput",
    "LogitTransform",
    "MultiscaleCNF",
    "Squeeze",
    "bits_per_dim",
    "cifar10_model",
    "dequantize",
    "digits_dense_model",
    "digits_model",
    "mnist_model",
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
