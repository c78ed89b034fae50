"""Maximum-likelihood training: the objective, the loop, checkpoints and progress.

The three parts are separate so that other objectives (flow matching) and other loops
(distributed) can reuse the rest:

* an **objective** maps ``(model, batch, generator)`` to a loss and metrics
  (:class:`MaximumLikelihood`: ``-log p(x)`` plus the RNODE regularizers);
* :func:`fit` is the loop: batches, optimiser, schedule, clipping, evaluation, EMA,
  checkpoints, resume, progress bar;
* checkpoints are plain dictionaries of tensors and numbers, written atomically and read with
  ``torch.load(..., weights_only=True)`` (:func:`save_checkpoint`, :func:`load_checkpoint`).

Randomness is derived from ``(seed, iteration)``: the batch and the Hutchinson noise of
iteration ``i`` depend on nothing else, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .flow import Flow

__all__ = [
    "CheckpointError",
    "History",
    "MaximumLikelihood",
    "TrainingError",
    "evaluate_bits_per_dim",
    "evaluate_nll",
    "fit",
    "image_sampler",
    "load_checkpoint",
    "save_checkpoint",
]

Sampler = Callable[[int, torch.Generator], Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a cnf checkpoint."""


@dataclass
class History:
    """What :func:`fit` measured, one entry per iteration (``eval_*``: per evaluation).

    Attributes:
        iteration: 1-based iteration numbers.
        loss: the objective's loss on the batch.
        nll: the batch's negative log-likelihood (nats) with the training trace estimator.
        nfe_forward, nfe_backward: function evaluations of the solves.
        seconds: wall time of each iteration.
        eval_iteration, eval_nll: iterations at which ``eval_data`` was evaluated, and its
            exact-trace NLL (nats per sample).
    """

    iteration: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nfe_forward: list[int] = field(default_factory=list)
    nfe_backward: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    eval_iteration: list[int] = field(default_factory=list)
    eval_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(**{k: list(v) for k, v in d.items()})


@dataclass
class MaximumLikelihood:
    r"""The maximum-likelihood objective with the RNODE regularizers (Finlay et al. 2020).

    .. math::

        L = -\frac1B \sum_b \log p(x_b) + \lambda_K \frac1B \sum_b \int_0^T \|f\|^2 dt
            + \lambda_J \frac1B \sum_b \int_0^T \|\partial f / \partial z\|_F^2 dt

    Args:
        kinetic: :math:`\lambda_K`.
        jacobian: :math:`\lambda_J`.
        solver: per-call solver settings for training (e.g. ``trace="hutchinson"``).
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    solver: dict = field(default_factory=dict)

    def __call__(
        self, model: Flow, batch: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, float]]:
        regularize = self.kinetic > 0 or self.jacobian > 0
        kw = dict(self.solver)
        if generator is not None:
            kw["generator"] = generator
        out = model.evaluate(batch, regularizers=regularize, **kw)
        nll = -out.log_prob.mean()
        loss = nll
        if regularize:
            loss = loss + self.kinetic * out.kinetic.mean() + self.jacobian * out.jacobian.mean()
        return loss, {"nll": nll.detach(), "output": out}


def _derived_seed(seed: int, *keys: int) -> int:
    # A cheap, well-mixed integer hash (splitmix64) so that each iteration's randomness depends
    # only on (seed, iteration): resuming reproduces the uninterrupted run exactly.
    x = seed & 0xFFFFFFFFFFFFFFFF
    for k in keys:
        x = (x ^ (k + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class _Batches:
    """Batch ``i`` of a tensor data set (epoch-wise permutations) or of a sampler."""

    def __init__(self, data: Tensor | Sampler, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        if isinstance(data, Tensor):
            if data.shape[0] < 1:
                raise ValueError("data is empty")
            self.per_epoch = max(1, data.shape[0] // batch_size)
        elif not callable(data):
            raise ValueError(
                "data must be a tensor (n, *event_shape) or a sampler(n, generator) -> tensor"
            )

    def __call__(self, i: int) -> Tensor:
        if not isinstance(self.data, Tensor):
            return self.data(
                self.batch_size, _generator(torch.device("cpu"), _derived_seed(self.seed, 0, i))
            )
        epoch, j = divmod(i, self.per_epoch)
        g = _generator(torch.device("cpu"), _derived_seed(self.seed, 1, epoch))
        perm = torch.randperm(self.data.shape[0], generator=g)
        idx = perm[j * self.batch_size : (j + 1) * self.batch_size]
        return self.data[idx.to(self.data.device)]


@torch.no_grad()
def evaluate_nll(model: Flow, data: Tensor, *, batch_size: int = 1000, **solver) -> float:
    """Mean negative log-likelihood (nats) of ``data`` under ``model``, in batches, no gradients.

    ``solver`` overrides the model's settings (default here: the exact trace).
    """
    solver.setdefault("trace", "exact")
    total = 0.0
    for start in range(0, data.shape[0], batch_size):
        total += -model.log_prob(data[start : start + batch_size], **solver).sum().item()
    return total / data.shape[0]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically: to a temporary file beside ``path``, then rename.

    A crash while writing leaves the previous checkpoint at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not a cnf checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first or check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on damaged files (empty: IndexError)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {first}); "
            "delete it, or resume from an older copy"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{path} is not a cnf training checkpoint (no model/iteration)")
    return state


def _schedule(optimizer, schedule: str | None, iters: int):
    if schedule in (None, "constant"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
        )
    raise ValueError(f"unknown schedule {schedule!r}; choose 'constant' or 'cosine'")


def fit(
    model: Flow,
    data: Tensor | Sampler,
    *,
    iters: int | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str | None = "constant",
    clip_grad: float | None = None,
    objective: Callable | None = None,
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    solver: dict | None = None,
    eval_data: Tensor | None = None,
    eval_every: int = 0,
    eval_solver: dict | None = None,
    eval_fn: Callable[[Flow], float] | None = None,
    keep_best: bool = False,
    ema: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    extra_state: dict | None = None,
) -> History:
    """Train ``model`` by maximum likelihood (or another ``objective``) and return its history.

    Args:
        model: a :class:`cnf.flow.Flow` (e.g. :class:`cnf.CNF`).
        data: training data ``(n, *event_shape)`` (shuffled each epoch) or a sampler
            ``sampler(n, generator) -> (n, *event_shape)`` for fresh batches.
        iters, epochs: length of training (exactly one of them; ``epochs`` needs tensor data).
        batch_size, lr, weight_decay: Adam(W) settings (``AdamW`` when ``weight_decay > 0``).
        schedule: ``"constant"`` or ``"cosine"`` (decays the learning rate to 0 at the end).
        clip_grad: clip the gradient norm to this value.
        objective: ``objective(model, batch, generator) -> (loss, metrics)``; default
            :class:`MaximumLikelihood` with ``kinetic``, ``jacobian`` and ``solver``.
        kinetic, jacobian: RNODE regularizer weights for the default objective.
        solver: per-call solver settings for training solves (e.g. ``dict(trace="hutchinson")``).
        eval_data: held-out data; its exact-trace NLL is recorded every ``eval_every``
            iterations and at the end, with ``eval_solver`` settings (default exact trace).
        eval_fn: instead of ``eval_data``, any held-out score of the model, lower is better
            (e.g. validation bits/dim averaged over dequantization draws); recorded in
            ``History.eval_nll``.
        keep_best: also write ``best.pt`` in ``checkpoint_dir`` whenever the evaluation
            improves (early stopping for models that overfit).
        ema: decay of an exponential moving average of the weights used for evaluation and
            stored in checkpoints as ``"ema"`` (e.g. 0.999); None disables it.
        checkpoint_dir: write ``last.pt`` there every ``checkpoint_every`` iterations and at the
            end (atomically).
        resume: continue from ``checkpoint_dir/last.pt`` if it exists: model, optimiser,
            schedule, EMA, history and iteration; randomness is a function of
            ``(seed, iteration)``, so the result equals the uninterrupted run.
        seed: seed of batches and noise.
        device: where to train (default: where the model is).
        progress: show a tqdm progress bar (loss, NFE, iterations per second).
        extra_state: extra plain data stored in checkpoints (e.g. the CLI's model spec).

    Returns:
        :class:`History`.

    Raises:
        TrainingError: the loss or the gradients became NaN or Inf (the message names the
            iteration; the last checkpoint on disk is the last good one).
        CheckpointError: ``resume`` found a corrupt checkpoint.
    """
    if (iters is None) == (epochs is None):
        raise ValueError("give exactly one of iters or epochs")
    if epochs is not None:
        if not isinstance(data, Tensor):
            raise ValueError("epochs needs tensor data; use iters with a sampler")
        iters = epochs * max(1, data.shape[0] // batch_size)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"ema must be a decay in (0, 1), got {ema}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    if eval_data is not None and eval_fn is not None:
        raise ValueError("give eval_data or eval_fn, not both")
    if keep_best and (checkpoint_dir is None or (eval_data is None and eval_fn is None)):
        raise ValueError("keep_best needs checkpoint_dir and eval_data or eval_fn")

    if device is not None:
        model.to(device)
    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype
    if isinstance(data, Tensor):
        data = data.to(device=device, dtype=dtype)
    if eval_data is not None:
        eval_data = eval_data.to(device=device, dtype=dtype)
    if objective is None:
        objective = MaximumLikelihood(kinetic=kinetic, jacobian=jacobian, solver=dict(solver or {}))

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    optimizer = opt_cls(params, lr=lr, weight_decay=weight_decay)
    scheduler = _schedule(optimizer, schedule, iters)
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema)
        )
        if ema is not None
        else None
    )
    history = History()
    start = 0
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None and "ema" in state:
            averaged.load_state_dict(state["ema"])
        history = History.from_dict(state["history"])
        start = int(state["iteration"])

    def checkpoint(iteration: int, path: Path | None = ckpt_path) -> None:
        if path is None:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "history": history.to_dict(),
            "seed": seed,
            **(extra_state or {}),
        }
        if averaged is not None:
            state["ema"] = averaged.state_dict()
        save_checkpoint(path, state)

    evaluating = eval_data is not None or eval_fn is not None

    def evaluate(iteration: int) -> None:
        target = averaged.module if averaged is not None else model
        was_training = target.training
        target.eval()
        if eval_fn is not None:
            value = float(eval_fn(target))
        else:
            value = evaluate_nll(target, eval_data, **dict(eval_solver or {}))
        target.train(was_training)
        best = min(history.eval_nll, default=math.inf)
        history.eval_iteration.append(iteration)
        history.eval_nll.append(value)
        if keep_best and value < best:
            checkpoint(iteration, ckpt_path.with_name("best.pt"))

    batches = _Batches(data, batch_size, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, initial=start, desc="train", dynamic_ncols=True, leave=True)
    model.train()
    try:
        for i in range(start, iters):
            tic = time.perf_counter()
            batch = batches(i).to(device=device, dtype=dtype)
            noise_gen = _generator(device, _derived_seed(seed, 2, i))
            loss, metrics = objective(model, batch, noise_gen)
            if not bool(torch.isfinite(loss)):
                raise TrainingError(
                    f"loss is {loss.item()} at iteration {i + 1}; training stopped "
                    f"(the last good checkpoint is kept{f' at {ckpt_path}' if ckpt_path else ''}). "
                    "Try a lower lr, clip_grad, tighter solver tolerances or the RNODE "
                    "regularizers"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
            else:
                norm = torch.sqrt(
                    sum(
                        (p.grad.square().sum() for p in params if p.grad is not None),
                        torch.zeros((), device=device, dtype=dtype),
                    )
                )
            if not bool(torch.isfinite(norm)):
                raise TrainingError(
                    f"gradients are not finite at iteration {i + 1}; training stopped (the last "
                    "good checkpoint is kept). Try clip_grad, a lower lr or tighter tolerances"
                )
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)

            out = metrics.get("output")
            history.iteration.append(i + 1)
            history.loss.append(loss.item())
            history.nll.append(float(metrics.get("nll", loss).item()))
            history.nfe_forward.append(out.nfe if out is not None else 0)
            history.nfe_backward.append(out.nfe_backward if out is not None else 0)
            history.seconds.append(time.perf_counter() - tic)
            if evaluating and eval_every and (i + 1) % eval_every == 0 and i + 1 < iters:
                evaluate(i + 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{history.loss[-1]:.3f}",
                    nfe=f"{history.nfe_forward[-1]}/{history.nfe_backward[-1]}",
                    refresh=False,
                )
            if ckpt_path is not None and (i + 1) % checkpoint_every == 0:
                checkpoint(i + 1)
        if evaluating and (not history.eval_iteration or history.eval_iteration[-1] != iters):
            evaluate(iters)
        checkpoint(iters)
    finally:
        if bar is not None:
            bar.close()
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
    return history


def image_sampler(images: Tensor, levels: int, *, translate: float = 0.0) -> Sampler:
    """A sampler for :func:`fit` that draws training images and dequantizes them afresh.

    Args:
        images: integer images ``(n, C, H, W)`` with values in ``[0, levels)``.
        levels: number of grey levels ``k``.
        translate: probability that a drawn image is moved by one pixel, with the vertical and
            horizontal offsets drawn from ``{-1, 0, 1}`` (data augmentation against the
            overfitting of small data sets such as the digits). The vacated border is filled
            with level 0, the background of the digits and of MNIST. 0 draws exactly as
            without augmentation.

    Returns:
        ``sampler(batch, generator) -> (batch, C, H, W)``: random images (with replacement),
        ``(x + u) / k`` with ``u ~ U[0, 1)`` (:func:`cnf.transforms.dequantize`).
    """
    from .transforms import dequantize

    if not (isinstance(translate, (int, float)) and 0.0 <= translate <= 1.0):
        raise ValueError(f"translate must be a probability in [0, 1], got {translate!r}")
    if translate and images.dim() != 4:
        raise ValueError(f"translate needs images of shape (n, C, H, W), got {tuple(images.shape)}")

    def sampler(n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randint(len(images), (n,), generator=generator)
        x = images[idx]
        if translate:
            x = _translate(x, translate, generator)
        return dequantize(x, levels, generator=generator)

    return sampler


def _translate(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Move each image of ``x`` ``(n, C, H, W)`` by one pixel with probability ``p``."""
    n, c, h, w = x.shape
    offsets = torch.randint(3, (2, n), generator=generator)  # 0, 1, 2: up/left, none, down/right
    moved = torch.rand(n, generator=generator) < p
    offsets = torch.where(moved, offsets, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # zeros: level 0 enters at the border
    rows = (offsets[0, :, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


@torch.no_grad()
def evaluate_bits_per_dim(
    model: Flow,
    images: Tensor,
    levels: int,
    *,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    **solver,
) -> float:
    """Mean bits/dim of integer ``images`` under ``model``, averaged over dequantization draws.

    Each draw dequantizes every image once (seeded, so repeated calls compare like with like)
    and computes :func:`cnf.transforms.bits_per_dim` of the model's exact (by default) log-density.
    """
    from .transforms import bits_per_dim, dequantize

    solver.setdefault("trace", "exact")
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        x = dequantize(images, levels, generator=gen).to(device=ref.device, dtype=ref.dtype)
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            lp = model.log_prob(chunk, **solver)
            total += bits_per_dim(lp, chunk.shape[1:], levels).sum().item()
            count += len(chunk)
    return total / count
