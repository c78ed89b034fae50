"""Training: objectives, the loop and its hooks, checkpoints, history and evaluation.

* :class:`Objective`: ``objective(model, batch, generator) -> (loss, metrics)``; maximum
  likelihood with the RNODE regularizers is :class:`MaximumLikelihood`; regression on the
  straight-path velocity is :class:`FlowMatching` (with :func:`ot_pairing` for OT couplings).
* :func:`fit`: the loop (settings in :class:`FitConfig`), with hooks for the weight average,
  evaluation, checkpoints and progress (:mod:`cnf.training.hooks`).
* :func:`save_checkpoint`, :func:`load_checkpoint`: the checkpoint files (format 2);
  :func:`load`: a ready model from a checkpoint, with the averaged weights by default.
* :class:`History`: named metrics per iteration and per evaluation.
* :func:`evaluate_nll`, :func:`evaluate_bits_per_dim`, :func:`image_sampler`: held-out scores
  and the image training sampler.

Example:
    >>> from cnf.training import fit, load  # doctest: +SKIP
    >>> history = fit(flow, toy_sampler("pinwheel"), iters=500, checkpoint_dir="run")
    >>> flow = load("run/last.pt")  # with extra_state={"spec": spec}
"""

from .checkpoint import CheckpointError, build_from_state, load, load_checkpoint, save_checkpoint
from .evaluation import evaluate_bits_per_dim, evaluate_nll
from .flow_matching import TIME_DISTRIBUTIONS, FlowMatching, ot_pairing
from .history import History
from .hooks import EMA, Checkpointing, Evaluation, Hook, ProgressBar
from .loop import FitConfig, Trainer, TrainingError, fit
from .objectives import MaximumLikelihood, Metric, Objective
from .sampling import Sampler, image_sampler, split_context

__all__ = [
    "EMA",
    "TIME_DISTRIBUTIONS",
    "CheckpointError",
    "Checkpointing",
    "Evaluation",
    "FitConfig",
    "FlowMatching",
    "History",
    "Hook",
    "MaximumLikelihood",
    "Metric",
    "Objective",
    "ProgressBar",
    "Sampler",
    "Trainer",
    "TrainingError",
    "build_from_state",
    "evaluate_bits_per_dim",
    "evaluate_nll",
    "fit",
    "image_sampler",
    "load",
    "load_checkpoint",
    "ot_pairing",
    "save_checkpoint",
    "split_context",
]
