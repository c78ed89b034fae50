"""cnf: continuous normalizing flows for PyTorch.

The layers, from the bottom (``docs/architecture.md`` has the map):

* :mod:`cnf.ode`: the solver core (Runge-Kutta methods, adaptive steps, adjoint strategies);
* :mod:`cnf.fields`: vector-field networks; :mod:`cnf.trace`: exact and Hutchinson divergences;
  :mod:`cnf.context`: contexts of conditional flows (label and vector embeddings);
* :mod:`cnf.settings`: the solver settings of a CNF block and the per-call context;
* :mod:`cnf.transforms`: the transform protocol, composition, reshape, logit and squeeze;
  :mod:`cnf.continuous`: the CNF block (the joint ODE as a transform);
* :mod:`cnf.flow`: a flow is a transform plus a base distribution (``log_prob``, ``sample``);
  :mod:`cnf.dense`, :mod:`cnf.multiscale`: the image models;
* :mod:`cnf.training`: objectives, the training loop, checkpoints; :mod:`cnf.recipes`: the
  table of data sets with their models and training defaults; :mod:`cnf.data`: data sets.

The higher layers (``cnf.data``, ``cnf.models``, ``cnf.plot``, ``cnf.recipes``,
``cnf.training``) are imported on first use: ``import cnf`` stays light, and
``cnf.recipes.get(...)`` works without importing the submodule first.
"""

from importlib.metadata import PackageNotFoundError, version

from .context import Conditioned, ContextEmbedding
from .continuous import CNFTransform
from .dense import DenseImageCNF
from .fields import ConcatSquashConv2d, ConcatSquashConvNet, ConcatSquashLinear, ConcatSquashMLP
from .flow import CNF, Flow, FlowOutput, SequentialFlow, StandardNormal
from .multiscale import MultiscaleCNF
from .ode import (
    Backsolve,
    ButcherTableau,
    Checkpoint,
    Solution,
    SolverError,
    SolverStats,
    odeint,
    odeint_adjoint,
    odeint_event,
    solve,
)
from .settings import SolverSettings
from .trace import divergence, divergence_exact, divergence_hutchinson, sample_noise
from .transforms import (
    Compose,
    LogitTransform,
    Reshape,
    Squeeze,
    Standardize,
    Transform,
    bits_per_dim,
    dequantize,
)

try:
    __version__ = version("cnf")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Backsolve",
    "ButcherTableau",
    "CNF",
    "CNFTransform",
    "Checkpoint",
    "Compose",
    "ConcatSquashConv2d",
    "ConcatSquashConvNet",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "Conditioned",
    "ContextEmbedding",
    "DenseImageCNF",
    "Flow",
    "FlowOutput",
    "LogitTransform",
    "MultiscaleCNF",
    "Reshape",
    "SequentialFlow",
    "Solution",
    "SolverError",
    "SolverSettings",
    "SolverStats",
    "Squeeze",
    "StandardNormal",
    "Standardize",
    "Transform",
    "bits_per_dim",
    "dequantize",
    "divergence",
    "divergence_exact",
    "divergence_hutchinson",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "sample_noise",
    "solve",
]


_LAZY = ("data", "distributed", "models", "plot", "recipes", "training")


def __getattr__(name: str):
    """``cnf.<submodule>`` for the higher layers, imported when first used (PEP 562)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cnf' has no attribute {name!r}")
