"""The training loop: :func:`fit`, its settings (:class:`FitConfig`) and :class:`Trainer`.

One step draws batch ``i`` and the noise of iteration ``i`` (both pure functions of
``(seed, i)``), asks the objective for the loss, checks it, back-propagates, checks the
gradients, steps the optimiser and the schedule, and records the objective's metrics. Everything
else (the weight average, evaluation, checkpoints, the progress bar) is a hook
(:mod:`cnf.training.hooks`).

The loop touches the model only through the objective (``objective(model, batch, generator)``)
and its parameters and ``state_dict``, so a wrapped model trains the same way.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from cnf import distributed
from cnf.ode import SolverError
from cnf.ode._problem import number, positive

from .checkpoint import (
    RESERVED_KEYS,
    check_folder,
    load_checkpoint,
    restore_training,
    training_state,
)
from .evaluation import evaluate_nll
from .history import History
from .hooks import EMA, Checkpointing, Evaluation, Hook, ProgressBar
from .objectives import MaximumLikelihood, Objective, resolve_metrics
from .sampling import (
    Batches,
    Sampler,
    derived_seed,
    place_context,
    seeded_generator,
    split_context,
)

__all__ = [
    "FINAL_WEIGHTS",
    "RESUME_SETTINGS",
    "SCHEDULES",
    "FitConfig",
    "Trainer",
    "TrainingError",
    "check_device",
    "fit",
]

SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules of :func:`fit`."""

FINAL_WEIGHTS = ("ema", "raw")
"""What the model holds after :func:`fit` when it kept an average (``final_weights``)."""

NOISE_STREAM = 2
"""The ``derived_seed`` stream of the objective's noise (batches use 0 and 1)."""

RESUME_SETTINGS = (
    "batch_size",
    "lr",
    "weight_decay",
    "schedule",
    "clip_grad",
    "kinetic",
    "jacobian",
    "ema",
)
"""Settings of :class:`FitConfig` that a checkpoint records (with ``iters`` and ``seed``) and a
resume must repeat: changing one would make the continued run a different run."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, gradient, batch or weight, or a solve that
    failed); the message names the iteration, the cause and the last good checkpoint."""


@dataclass(frozen=True, eq=False)
class FitConfig:
    """The settings of :func:`fit` (its keyword arguments), checked when made.

    Attributes:
        iters, epochs: length of training; exactly one of them (``epochs`` needs tensor data:
            one epoch is ``n // batch_size`` steps).
        batch_size: points per step.
        lr, weight_decay: Adam's learning rate; ``AdamW`` with this decay when it is > 0.
        schedule: ``"constant"`` or ``"cosine"`` (down to 0 at the last step).
        clip_grad: clip the gradients' global norm to this value; None: no clipping.
        objective: an :class:`Objective`; None: :class:`MaximumLikelihood` with ``kinetic``,
            ``jacobian`` and ``solver``, which apply to that default only.
        kinetic, jacobian: RNODE weights of the default objective.
        solver: solver settings of the default objective, e.g. ``{"trace": "hutchinson"}``.
        eval_data: held-out points (or ``(points, contexts)``); their NLL (:func:`evaluate_nll`
            with ``eval_solver``, default exact trace) is recorded as ``eval_nll`` every
            ``eval_every`` steps and after the last.
        eval_every: steps between evaluations; 0: only after the last.
        eval_solver: solver settings of the ``eval_data`` evaluation.
        eval_fn: instead of ``eval_data``, any held-out score ``eval_fn(model) -> float``
            (lower is better), e.g. validation bits/dim; recorded as ``eval_nll``.
        keep_best: also write ``best.pt`` in ``checkpoint_dir`` whenever the evaluation
            improves (early stopping for models that overfit).
        ema: decay of an exponential moving average of the weights (e.g. 0.999), used for
            evaluation and stored in checkpoints; None: no average.
        final_weights: with ``ema``, what the model holds when :func:`fit` returns:
            ``"ema"`` (default) the average, ``"raw"`` the optimiser's weights. Checkpoints
            always hold both.
        checkpoint_dir: write ``last.pt`` there every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between ``last.pt`` writes.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists, with the settings it
            records (:data:`RESUME_SETTINGS` and ``seed``; others are refused). ``iters`` may
            grow: the run is extended (a cosine schedule then decays over the new length).
        extra_state: plain data stored in every checkpoint (e.g. the model spec).
        seed: seed of batches and noise.
        device: where to train; None: where the model is.
        progress: show a progress bar on stderr.
        agree_steps: under ``torch.distributed`` (:mod:`cnf.distributed`), the processes add
            up their solvers' error norms so that all of them take the steps one process would
            take on the whole batch; False lets each process choose its own steps (no
            collective per step, but the gradient is then no longer the one-process one).
    """

    iters: int | None = None
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str | None = "constant"
    clip_grad: float | None = None
    objective: Objective | None = None
    kinetic: float = 0.0
    jacobian: float = 0.0
    solver: Mapping[str, Any] | None = None
    eval_data: Tensor | None = None
    eval_every: int = 0
    eval_solver: Mapping[str, Any] | None = None
    eval_fn: Callable[[nn.Module], float] | None = None
    keep_best: bool = False
    ema: float | None = None
    final_weights: str = "ema"
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 100
    resume: bool = False
    extra_state: Mapping[str, Any] | None = None
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = True
    agree_steps: bool = True

    def __post_init__(self):
        self._check_length()
        self._check_numbers()
        self._check_choices()
        self._check_combinations()

    @classmethod
    def from_keywords(cls, settings: Mapping[str, Any]) -> FitConfig:
        """``FitConfig(**settings)``, with a ValueError naming the valid keywords if needed."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"fit got unknown keyword(s) {unknown}; valid: {valid}")
        return cls(**settings)

    def _check_length(self) -> None:
        if (self.iters is None) == (self.epochs is None):
            raise ValueError("give exactly one of iters or epochs")
        for name in ("iters", "epochs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), 1)
        _count("batch_size", self.batch_size, 1)

    def _check_numbers(self) -> None:
        """The package's one rule for numbers (no strings or bools), then each one's range."""
        positive("lr", self.lr)
        positive("clip_grad", self.clip_grad, optional=True)
        for name in ("weight_decay", "kinetic", "jacobian"):
            value = number(name, getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.ema is not None and not 0.0 < number("ema", self.ema) < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1), got {self.ema}")
        _count("checkpoint_every", self.checkpoint_every, 1)
        _count("eval_every", self.eval_every, 0)
        _count("seed", self.seed)

    def _check_choices(self) -> None:
        if self.schedule not in (None, *SCHEDULES):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose 'constant' or 'cosine'")
        if self.final_weights not in FINAL_WEIGHTS:
            raise ValueError(
                f"final_weights must be one of {FINAL_WEIGHTS}, got {self.final_weights!r}"
            )
        taken = set(RESERVED_KEYS) & set(self.extra_state or {})
        if taken:
            raise ValueError(f"extra_state may not use the checkpoint's own keys {sorted(taken)}")

    def _check_combinations(self) -> None:
        if self.objective is not None and not callable(self.objective):
            raise ValueError("objective must be callable: objective(model, batch, generator)")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")
        if self.eval_data is not None and self.eval_fn is not None:
            raise ValueError("give eval_data or eval_fn, not both")
        evaluates = self.eval_data is not None or self.eval_fn is not None
        if self.keep_best and (self.checkpoint_dir is None or not evaluates):
            raise ValueError("keep_best needs checkpoint_dir and eval_data or eval_fn")
        if self.objective is not None and (self.kinetic or self.jacobian or self.solver):
            raise ValueError(
                "kinetic, jacobian and solver configure the default objective; with your own "
                "objective, set them on it (e.g. MaximumLikelihood(kinetic=..., solver=...))"
            )

    def steps(self, data: Tensor | Sampler) -> int:
        """Steps in all: ``iters``, or ``epochs`` times the full batches of tensor ``data``."""
        if self.epochs is None:
            return self.iters
        data, _ = split_context(data)
        if not isinstance(data, Tensor):
            raise ValueError("epochs needs tensor data; use iters with a sampler")
        return self.epochs * max(1, data.shape[0] // self.batch_size)


def _count(name: str, value, low: int | None = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``low``; a ValueError otherwise."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or (low is not None and value < low):
        at_least = "" if low is None else f" >= {low}"
        raise ValueError(f"{name} must be an int{at_least}, got {value!r}")
    return int(value)


def fit(model: nn.Module, data: Tensor | Sampler, **settings: Any) -> History:
    """Train ``model`` on ``data`` and return what was measured.

    The default objective is maximum likelihood (:class:`MaximumLikelihood`). Randomness is a
    function of ``(seed, iteration)``, so a run resumed from its checkpoint ends exactly as the
    uninterrupted run would have.

    **Several processes.** Under ``torchrun`` (after :func:`cnf.distributed.init`) ``fit``
    trains data-parallel with ``DistributedDataParallel``: ``batch_size`` is the global batch,
    each process trains on its rows of it, and with ``agree_steps`` the processes train as one
    process does on the same global batch, to rounding (:mod:`cnf.distributed`). Rank 0 writes
    the checkpoints and shows the progress bar; every process returns the same history.

    **Averaged weights.** With ``ema=...`` the model holds the average when ``fit`` returns
    (``final_weights="ema"``, the default, matching :func:`cnf.training.load`); pass
    ``final_weights="raw"`` to keep the optimiser's weights.

    Args:
        model: a :class:`cnf.Flow` or any module the objective can call.
        data: training points ``(n, *event_shape)`` (shuffled each epoch) or a sampler
            ``sampler(n, generator) -> (n, *event_shape)`` of fresh batches; for a conditional
            model, the pair ``(points, contexts)`` (one context per point: vectors ``(n, C)``
            or labels ``(n,)``), or a sampler returning that pair. The objective then gets
            each batch's contexts as ``context=``, and ``eval_data`` is a pair too.
        **settings: the fields of :class:`FitConfig`: ``iters`` or ``epochs``;
            ``batch_size``, ``lr``, ``weight_decay``, ``schedule``, ``clip_grad``;
            ``objective`` or ``kinetic``, ``jacobian``, ``solver``; ``eval_data``,
            ``eval_every``, ``eval_solver``, ``eval_fn``, ``keep_best``; ``ema``,
            ``final_weights``; ``checkpoint_dir``, ``checkpoint_every``, ``resume``,
            ``extra_state``; ``seed``, ``device``, ``progress``.

    Returns:
        :class:`History`: ``iteration``, ``loss``, ``seconds``, the objective's metrics
        (``nll``, ``nfe_forward``, ``nfe_backward``, ...), ``eval_iteration``, ``eval_nll``.

    Raises:
        ValueError: bad settings (before anything changes): among them tensor ``data`` or
            ``eval_data`` with NaN or Inf rows, a ``checkpoint_dir`` that cannot be written, a
            device this machine lacks, or a ``resume`` whose checkpoint records other settings
            or more iterations than ``iters``.
        TrainingError: the loss, the gradients, a sampler's batch or the weights became NaN or
            Inf, or the ODE solver failed (:class:`cnf.ode.SolverError`, the cause); the
            message names the iteration and the last good checkpoint on disk.
        CheckpointError: ``resume`` found a corrupt checkpoint, one of another model, or one
            with NaN or Inf weights.

    Example:
        >>> history = fit(flow, toy_sampler("pinwheel"), iters=500, ema=0.999)  # doctest: +SKIP
        >>> history.nll[-1], history.eval_nll  # doctest: +SKIP
    """
    return Trainer(model, data, FitConfig.from_keywords(settings)).run()


class Trainer:
    """One training run: the pieces :func:`fit` builds from a :class:`FitConfig`, and the loop.

    Attributes:
        model, objective, optimizer, scheduler, history: as the names say.
        iteration: steps done; ``iters``: steps in all.
        ema: the :class:`cnf.training.hooks.EMA` hook, or None.
        hooks: in call order: average, evaluation, progress bar, checkpoints.
    """

    def __init__(self, model: nn.Module, data: Tensor | Sampler, config: FitConfig):
        self.model, self.config, self.iters = model, config, config.steps(data)
        ref = next(model.parameters())
        self.device = check_device(config.device) if config.device is not None else ref.device
        self.dtype = ref.dtype
        data, context = split_context(data)
        if isinstance(data, Tensor):
            check_finite_rows(data, "data")
            data = data.to(device=self.device, dtype=self.dtype)
        if context is not None:
            check_finite_rows(context, "the data's contexts")
            data = (data, self._place(context))
        self.batches = Batches(data, config.batch_size, config.seed)
        self.world = distributed.current()
        self.rows = self._shard_rows()
        self.objective = config.objective or MaximumLikelihood(
            kinetic=config.kinetic, jacobian=config.jacobian, solver=dict(config.solver or {})
        )
        evaluation = self._evaluation()
        self.checkpoints = None
        writes = self.world is None or self.world.main  # rank 0 writes for all
        if config.checkpoint_dir is not None:
            if writes:
                _check_checkpoint_dir(config.checkpoint_dir)
            self.checkpoints = Checkpointing(
                config.checkpoint_dir, config.checkpoint_every, config.keep_best, write=writes
            )
        model.to(self.device)  # after every check: a bad call leaves the model as it was
        self.parallel = None
        if self.world is not None:
            self.parallel = distributed.parallel_model(model, self.objective, self.world)
        self.params = [p for p in model.parameters() if p.requires_grad]
        adam = torch.optim.AdamW if config.weight_decay > 0 else torch.optim.Adam
        # foreach: one kernel per operation for all tensors (torch uses it on GPUs only by
        # default; on CPU the per-tensor loop cost as much as a 2-D flow-matching step)
        self.optimizer = adam(
            self.params, lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
        self.scheduler = learning_rate_schedule(self.optimizer, config.schedule, self.iters)
        self.ema = EMA(model, config.ema) if config.ema is not None else None
        progress = ProgressBar() if config.progress and writes else None
        hooks = (self.ema, evaluation, progress, self.checkpoints)
        self.hooks: list[Hook] = [hook for hook in hooks if hook is not None]
        self.history, self.iteration = History(), 0

    def _shard_rows(self) -> tuple[int, int]:
        """This process's rows ``start, stop`` of every batch (all of them in one process)."""
        total = self.config.batch_size
        if self.world is None:
            return 0, total
        if total < self.world.size:
            raise ValueError(
                f"batch_size={total} is the global batch, shared by {self.world.size} processes: "
                f"give at least one point per process (batch_size >= {self.world.size})"
            )
        return self.world.rows(total)

    def _evaluation(self) -> Evaluation | None:
        config = self.config
        if config.eval_fn is not None:
            return Evaluation(config.eval_fn, config.eval_every)
        if config.eval_data is None:
            return None
        held_out, context = split_context(config.eval_data, "eval_data")
        if held_out.shape[0] < 1:
            raise ValueError("eval_data is empty; give held-out points, or none")
        check_finite_rows(held_out, "eval_data")
        held_out = held_out.to(device=self.device, dtype=self.dtype)
        if context is not None:
            check_finite_rows(context, "eval_data's contexts")
            context = self._place(context)
        solver = dict(config.eval_solver or {})
        score = functools.partial(evaluate_nll, data=held_out, context=context, **solver)
        return Evaluation(score, config.eval_every)

    def _place(self, context: Tensor) -> Tensor:
        return place_context(context, self.dtype, self.device)

    @property
    def evaluation_model(self) -> nn.Module:
        """The model that evaluation scores: the average if there is one."""
        return self.ema.module if self.ema is not None else self.model

    def run(self) -> History:
        """Resume if asked, train to ``iters`` steps, run the hooks; returns the history."""
        if self.config.resume:
            self.resume()
        self.model.train()
        try:
            for hook in self.hooks:
                hook.start(self)
            while self.iteration < self.iters:
                self.step()
                self._call_hooks("after_step")
            self._call_hooks("finish")
            if self.world is not None:  # rank 0's last checkpoint is on disk for everyone
                self.world.barrier()
        finally:
            for hook in self.hooks:
                hook.close()
        if self.ema is not None and self.config.final_weights == "ema":
            self.model.load_state_dict(self.ema.weights())
        return self.history

    def _call_hooks(self, point: str) -> None:
        """Call ``hook.<point>(self)`` on every hook; a failed solve (in an evaluation) stops
        training with a :class:`TrainingError`."""
        for hook in self.hooks:
            try:
                getattr(hook, point)(self)
            except SolverError as exc:
                name = type(hook).__name__
                what = f"the ODE solver failed in {name} after iteration {self.iteration}"
                self._stop(f"{what} ({exc})", exc)

    def step(self) -> None:
        """One optimiser step on batch ``iteration``; records its row of the history."""
        i, tic = self.iteration, time.perf_counter()
        batch, context = self._batch(i)
        noise = seeded_generator(self.device, derived_seed(self.config.seed, NOISE_STREAM, i))
        # a context only where there is one: objectives written for unconditional data take none
        given = {} if context is None else {"context": context}
        if self.world is not None:
            loss, values = self._parallel_step(i, batch, noise, given)
        else:
            try:
                loss, metrics = self.objective(self.model, batch, noise, **given)
                if not bool(torch.isfinite(loss)):
                    self._stop(f"loss is {loss.item()} at iteration {i + 1}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except SolverError as exc:  # the weights no longer give a solvable ODE
                self._stop(f"the ODE solver failed at iteration {i + 1} ({exc})", exc)
            values = resolve_metrics(metrics)  # after backward: adjoint NFE are known now
            loss = loss.item()
        if not bool(torch.isfinite(self._gradient_norm())):
            self._stop(f"gradients are not finite at iteration {i + 1}")
        self.optimizer.step()
        self.scheduler.step()
        if not bool(torch.isfinite(self._weight_size())):
            what = f"the weights became NaN or Inf in the step of iteration {i + 1}"
            self._stop(what, changed=True)
        self.iteration = i + 1
        self.history.record(i + 1, loss=loss, **values, seconds=time.perf_counter() - tic)

    def _parallel_step(self, i: int, batch: Tensor, noise, given) -> tuple[float, dict]:
        """The forward and backward pass of one process's rows under DDP; returns the global
        batch's loss and metrics (the same numbers on every process, so that every process
        takes the same decisions below).

        The loss is scaled by this process's share of the global batch and DDP sums the
        gradients, so the gradient is that of the global batch's mean loss. A non-finite loss
        is judged after the backward pass, from the sum over the processes: judged locally,
        one process would stop while the others waited in the gradients' reduction.
        """
        start, stop = self.rows
        total, agree = self.config.batch_size, self.config.agree_steps
        share = (stop - start) / total
        try:
            with self.world.training_step(start, stop, total, agree):
                loss, metrics = self.parallel(batch, noise, given)
                self.optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
        except SolverError as exc:
            self._stop(f"the ODE solver failed at iteration {i + 1} ({exc})", exc)
        values = resolve_metrics(metrics)
        names = list(values)
        local = [loss.item(), *(values[name] for name in names)]
        totals = distributed.sum_over(self.world, *(share * v for v in local))
        loss_value = totals[0]
        if not math.isfinite(loss_value):
            self._stop(f"loss is {loss_value} at iteration {i + 1} (mean over the processes)")
        for name, total in zip(names, totals[1:]):
            # counts (NFE) stay ints where the processes agree: shares such as 1/3 round
            whole = isinstance(values[name], int) and abs(total - round(total)) < 1e-9
            values[name] = round(total) if whole else total
        return loss_value, values

    def _batch(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Batch ``i`` and its contexts (None: unconditional) on the training device; a
        sampler's batch is checked for NaN and Inf (tensor data was checked once, up front)."""
        batch, context = split_context(self.batches(i), "the sampler's batch")
        if not isinstance(self.batches.data, Tensor):
            for part in (batch, context):
                if part is not None and not bool(torch.isfinite(part).all()):
                    rows = _non_finite_rows(part)
                    self._stop(
                        f"the sampler's batch of iteration {i + 1} has NaN or Inf values in "
                        f"{len(rows)} row(s), the first at index {rows[0]}; fix the sampler"
                    )
        if self.world is not None:  # after the check of the whole batch: every process stops
            batch, context = self._my_rows(batch), self._my_rows(context)
        batch = batch.to(device=self.device, dtype=self.dtype)
        return batch, None if context is None else self._place(context)

    def _my_rows(self, part: Tensor | None) -> Tensor | None:
        """This process's rows of a global batch's points or contexts."""
        return None if part is None else part[self.rows[0] : self.rows[1]]

    def _weight_size(self) -> Tensor:
        """The largest absolute weight (max-norm: no overflow on large but finite weights)."""
        with torch.no_grad():
            return torch.nn.utils.get_total_norm(self.params, math.inf, foreach=True)

    def _gradient_norm(self) -> Tensor:
        if self.config.clip_grad is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())

    def _stop(self, what: str, cause: Exception | None = None, changed: bool = False) -> None:
        """Raise the :class:`TrainingError` of ``what``, saying where the last good weights are
        (``changed``: the failing step had already changed the weights in memory)."""
        when = (
            "after its step made the weights unusable"
            if changed
            else "before this step changed the weights"
        )
        saved = self.checkpoints.saved if self.checkpoints is not None else None
        if saved is not None:
            kept = f"the last good checkpoint is {self.checkpoints.last} (iteration {saved})"
        elif self.checkpoints is not None:
            kept = f"no checkpoint was written yet (it would be {self.checkpoints.last})"
        else:
            kept = "no checkpoints are kept (no checkpoint_dir)"
        raise TrainingError(
            f"{what}; training stopped {when}; {kept}. Try a lower lr, clip_grad, tighter "
            "solver tolerances or the RNODE regularizers"
        ) from cause

    def state(self) -> dict[str, Any]:
        """The run as a checkpoint (format 2, :mod:`cnf.training.checkpoint`); a model built
        from a spec (:func:`cnf.models.build`) stores it, so that :func:`load` rebuilds it."""
        extra = dict(self.config.extra_state or {})
        spec = getattr(getattr(self.model, "module", self.model), "spec", None)
        if isinstance(spec, dict):
            extra.setdefault("spec", spec)
        return training_state(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=self.history,
            iteration=self.iteration,
            seed=self.config.seed,
            ema=self.ema,
            settings=self.settings(),
            extra=extra,
        )

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records of the run's settings: ``iters`` and
        :data:`RESUME_SETTINGS`, as plain values."""
        config = self.config
        values = {name: getattr(config, name) for name in RESUME_SETTINGS}
        values["schedule"] = values["schedule"] or "constant"  # None means constant
        return {"iters": self.iters, **values}

    def resume(self) -> None:
        """Continue from ``last.pt`` when it exists (else start afresh).

        Raises:
            ValueError: the checkpoint has more iterations done than ``iters``, or was written
                with other :data:`RESUME_SETTINGS` or another seed (all of them are named).
        """
        path = self.checkpoints.last
        state = self._read_last(path)
        if state is None:
            return
        self._check_resumable(state, path)
        self.history, self.iteration = restore_training(
            state,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            ema=self.ema,
            source=str(path),
        )

    def _read_last(self, path: os.PathLike) -> dict[str, Any] | None:
        """The checkpoint at ``path`` (None: there is none). Under DDP rank 0 reads it and
        every process gets rank 0's copy, or rank 0's error, so that all resume alike (or
        all fail alike) even where the others cannot see rank 0's disk."""
        if self.world is None:
            return load_checkpoint(path, map_location=self.device) if path.exists() else None
        found: Any = None
        if self.world.main:
            try:
                found = load_checkpoint(path, map_location="cpu") if path.exists() else None
            except Exception as exc:  # noqa: BLE001 - handed to the others, then raised
                found = exc
        found = self.world.broadcast(found)
        if isinstance(found, Exception):
            raise found
        return found

    def _check_resumable(self, state: Mapping[str, Any], path: os.PathLike) -> None:
        done = int(state["iteration"])
        if done > self.iters:
            raise ValueError(
                f"{path} has {done} iterations done, more than iters={self.iters}: resuming "
                f"would leave a checkpoint that contradicts its history; pass iters >= {done}, "
                "or train in another checkpoint_dir"
            )
        recorded = dict(state.get("settings", {}))  # none in checkpoints of older versions
        if "seed" in state:
            recorded["seed"] = state["seed"]
        now = {**self.settings(), "seed": self.config.seed}
        conflicts = [
            f"{name}={now[name]!r} (it has {value!r})"
            for name, value in recorded.items()
            if name != "iters" and name in now and now[name] != value
        ]
        if conflicts:
            raise ValueError(
                f"{path} was trained with other settings than these: {'; '.join(conflicts)}. "
                "Resume with the settings it was trained with, or start a new run in another "
                "checkpoint_dir (cnf.training.load gives the trained model)"
            )


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, when this machine has it.

    Raises:
        ValueError: an unknown device name, or CUDA / MPS that torch cannot use here.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc}); use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise ValueError(
                f"device {device} is not available: torch sees {count} CUDA device(s) here; "
                "use 'cpu' (or 'auto' on the command line)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps is not available here; use 'cpu'")
    return device


def check_finite_rows(data: Tensor, what: str) -> None:
    """Refuse ``data`` ``(n, ...)`` with NaN or Inf entries, naming the first bad row.

    Raises:
        ValueError: some row has a NaN or Inf entry.
    """
    if not data.is_floating_point() or bool(torch.isfinite(data).all()):
        return
    rows = _non_finite_rows(data)
    raise ValueError(
        f"{what} has NaN or Inf values in {len(rows)} of its {data.shape[0]} rows, the first "
        f"at index {rows[0]} ({what}[{rows[0]}]); remove or repair those rows"
    )


def _non_finite_rows(data: Tensor) -> list[int]:
    """Indices of the rows of ``data`` ``(n, ...)`` that hold a NaN or Inf."""
    bad = ~torch.isfinite(data.reshape(data.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _check_checkpoint_dir(folder: str | os.PathLike) -> None:
    """The checkpoint folder must be writable, and its ``last.pt`` and ``best.pt`` files."""
    folder = check_folder(folder, "checkpoint_dir")
    for name in ("last.pt", "best.pt"):
        if (folder / name).is_dir():
            raise ValueError(
                f"checkpoint_dir {folder} has a folder named {name}; move it, or choose another "
                "checkpoint_dir"
            )


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, schedule: str | None, iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    r"""The learning-rate factor per step: 1 (``"constant"``, None), or cosine decay
    :math:`\tfrac12 (1 + \cos(\pi \min(i, n) / n))` over ``iters`` = :math:`n` steps."""
    if schedule in (None, "constant"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
        )
    raise ValueError(f"unknown schedule {schedule!r}; choose 'constant' or 'cosine'")
