"""What happens around the optimisation steps: averaging, evaluation, checkpoints, progress.

The loop (:class:`cnf.training.loop.Trainer`) calls every hook at three points:
:meth:`Hook.start` once before the first step (after a resume), :meth:`Hook.after_step` after
each optimiser step, and :meth:`Hook.finish` once after the last; :meth:`Hook.close` always runs,
also after an error. Hooks run in the order given, which matters: the average is updated before
the evaluation reads it, and the evaluation is recorded before the checkpoint stores it.

A hook sees the trainer's ``model``, ``history``, ``iteration`` (steps done), ``iters`` (steps in
all), ``evaluation_model`` (the average when there is one) and ``state()`` (a checkpoint).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .checkpoint import remove_stale_temporaries, save_checkpoint

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["EMA", "Checkpointing", "Evaluation", "Hook", "ProgressBar"]


class Hook:
    """Base of the loop's hooks; every method does nothing unless overridden."""

    def start(self, trainer: Trainer) -> None:
        """Before the first step of this call (``trainer.iteration`` > 0 after a resume)."""

    def after_step(self, trainer: Trainer) -> None:
        """After the optimiser step that made ``trainer.iteration`` steps."""

    def finish(self, trainer: Trainer) -> None:
        """After the last step (also when a resumed run had none left)."""

    def close(self) -> None:
        """Release resources; runs after :meth:`finish` or an error."""


class EMA(Hook):
    r"""An exponential moving average of the weights, :math:`\bar w \leftarrow \beta \bar w +
    (1 - \beta) w` after every step (the first step copies :math:`w`).

    The average lives in a copy of the model (:attr:`module`), which evaluation uses; the
    trained model is never changed by it.

    Args:
        model: the model being trained.
        decay: :math:`\beta \in (0, 1)`, e.g. 0.999.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1), got {decay}")
        self.decay, self._module = decay, copy.deepcopy(model)
        self._module.requires_grad_(False)
        # the pairs of tensors, found once: walking the module tree every step cost more than
        # the update itself for the small 2-D models (buffers are copied, not averaged)
        self._average = [p.detach() for p in self._module.parameters()]
        self._source = [p.detach() for p in model.parameters()]
        self._updates = 0

    @property
    def module(self) -> nn.Module:
        """The model with the averaged weights."""
        return self._module

    @property
    def updates(self) -> int:
        """Steps averaged so far."""
        return self._updates

    def weights(self) -> dict[str, Tensor]:
        """The averaged weights, with the model's own ``state_dict`` keys."""
        return self._module.state_dict()

    def load(self, weights: Mapping[str, Tensor], updates: int) -> None:
        """Restore an average saved as :meth:`weights` and :attr:`updates`."""
        self._module.load_state_dict(weights)
        self._updates = int(updates)

    def after_step(self, trainer: Trainer) -> None:
        with torch.no_grad():
            if self._updates == 0:
                torch._foreach_copy_(self._average, self._source)
            else:  # w_bar + (1 - beta) (w - w_bar), in one call for all tensors
                torch._foreach_lerp_(self._average, self._source, 1.0 - self.decay)
        self._updates += 1


class Evaluation(Hook):
    """Score the model every ``every`` steps and after the last; record it as ``eval_nll``.

    Args:
        score: ``score(model) -> float``, lower is better (e.g. held-out NLL); it gets the
            trainer's ``evaluation_model`` in eval mode.
        every: steps between evaluations; 0: only after the last step.
    """

    def __init__(self, score: Callable[[nn.Module], float], every: int = 0):
        if not (isinstance(every, int) and every >= 0):
            raise ValueError(f"eval_every must be an int >= 0, got {every!r}")
        self.score, self.every = score, every

    def after_step(self, trainer: Trainer) -> None:
        i = trainer.iteration
        if self.every and i % self.every == 0 and i < trainer.iters:
            self.evaluate(trainer)

    def finish(self, trainer: Trainer) -> None:
        done = trainer.history.eval_iteration
        if not done or done[-1] != trainer.iters:  # a resumed, finished run has its score
            self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> None:
        """Score ``trainer.evaluation_model`` now and record it."""
        model = trainer.evaluation_model
        was_training = model.training
        model.eval()
        world = getattr(trainer, "world", None)
        try:
            if world is None:
                value = float(self.score(model))
            else:  # the package's evaluators score their rows of the data and sum
                with world.evaluation():
                    value = float(self.score(model))
                value = world.broadcast(value)  # a score of the user's own: rank 0's counts
        finally:
            model.train(was_training)
        trainer.history.record_eval(trainer.iteration, nll=value)


class Checkpointing(Hook):
    """Write ``last.pt`` every ``every`` steps and at the end; ``best.pt`` on improvement.

    ``best.pt`` is written when an evaluation made during this call is the lowest so far
    (:meth:`History.improved`), so the hook must come after :class:`Evaluation`. At the start
    and the end of a run the hook also removes what killed writes left in the folder
    (:func:`cnf.training.checkpoint.remove_stale_temporaries`).

    Args:
        directory: where the files go (created when needed).
        every: steps between ``last.pt`` writes.
        keep_best: also write ``best.pt``.
        write: False in the processes of a data-parallel run other than rank 0: they keep
            count of what rank 0 writes (for their error messages) and write nothing.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every: int = 100,
        keep_best: bool = False,
        write: bool = True,
    ):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"checkpoint_every must be a positive int, got {every!r}")
        self.last = Path(directory) / "last.pt"
        self.best = Path(directory) / "best.pt"
        self.every, self.keep_best, self._evaluations = every, keep_best, 0
        self.write = write
        self.saved: int | None = None  # the iteration last.pt holds for this run, if any

    def start(self, trainer: Trainer) -> None:
        self._evaluations = len(trainer.history.eval_iteration)
        self.saved = trainer.iteration if trainer.iteration > 0 else None  # resumed from last.pt
        self._tidy()

    def after_step(self, trainer: Trainer) -> None:
        self._save_best(trainer)
        if trainer.iteration % self.every == 0:
            self._save_last(trainer)

    def finish(self, trainer: Trainer) -> None:
        self._save_best(trainer)
        self._save_last(trainer)
        self._tidy()

    def _save_last(self, trainer: Trainer) -> None:
        if self.write:
            save_checkpoint(self.last, trainer.state())
        self.saved = trainer.iteration

    def _tidy(self) -> None:
        # a killed run cannot remove the temporary file of the write it was killed in
        for path in (self.last, self.best) if self.write else ():
            remove_stale_temporaries(path)

    def _save_best(self, trainer: Trainer) -> None:
        evaluations = len(trainer.history.eval_iteration)
        improved = evaluations > self._evaluations and trainer.history.improved()
        if self.keep_best and self.write and improved:
            save_checkpoint(self.best, trainer.state())
        self._evaluations = evaluations


class ProgressBar(Hook):
    """A tqdm bar on stderr with the loss and the objective's latest metrics."""

    def __init__(self):
        self.bar = None

    def start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.iters, initial=trainer.iteration, desc="train", dynamic_ncols=True
        )

    def after_step(self, trainer: Trainer) -> None:
        row = trainer.history.last()
        shown = {k: v for k, v in row.items() if k not in ("iteration", "seconds")}
        self.bar.update(1)
        self.bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"
