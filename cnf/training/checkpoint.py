"""Checkpoints: the file format, atomic writes, safe reads, old formats, and ready models.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists, read back with
``torch.load(..., weights_only=True)`` (no arbitrary code runs on loading). Format 2, written by
:func:`cnf.training.fit`:

========================  ===================================================================
``"format"``              2
``"model"``               the model's ``state_dict()`` (the weights being trained)
``"optimizer"``           the optimiser's ``state_dict()``
``"scheduler"``           the learning-rate schedule's ``state_dict()``
``"ema"``                 with ``ema=``: the averaged weights, same keys as ``"model"``
``"ema_updates"``         with ``ema=``: how many updates the average has seen
``"history"``             :meth:`History.to_dict`
``"iteration"``           iterations done
``"seed"``                the run's seed
``"settings"``            the :func:`fit` settings a resume must match (``iters``, ``lr``, ...)
anything else             ``extra_state`` of :func:`fit` (the CLI: ``"spec"``, ``"data"``, ...)
========================  ===================================================================

Checkpoints without ``"format"`` come from older versions of cnf: their ``"ema"`` is a
``torch.optim.swa_utils.AveragedModel`` state (``"module.<name>"`` keys and ``"n_averaged"``),
and their weights may carry the parameter names of an older model layout. :func:`upgrade`
turns them into format 2. Checkpoints written before ``"settings"`` existed are read as they are
(a resume then has nothing to compare its settings with).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .history import History

if TYPE_CHECKING:
    from cnf.flow import Flow

__all__ = [
    "FORMAT",
    "RESERVED_KEYS",
    "CheckpointError",
    "build_from_state",
    "check_folder",
    "check_weights",
    "load",
    "load_checkpoint",
    "load_weights",
    "remove_stale_temporaries",
    "restore_training",
    "save_checkpoint",
    "training_state",
    "upgrade",
]

FORMAT = 2
"""The checkpoint format that this version writes."""

RESERVED_KEYS = (
    "format",
    "model",
    "optimizer",
    "scheduler",
    "ema",
    "ema_updates",
    "history",
    "iteration",
    "seed",
    "settings",
)
"""Keys the training loop writes; ``extra_state`` may not use them."""

STALE_SECONDS = 60.0
"""Age after which a temporary file of :func:`save_checkpoint` counts as left by a killed write:
a live write renews its file's modification time far more often than this."""

WEIGHTS = ("ema", "raw")
"""Choices of :func:`load`'s ``weights``."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, not a cnf checkpoint, or does not fit."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` atomically: to a temporary file beside ``path``, then rename.

    A crash or an interrupt while writing leaves the previous file at ``path`` intact and no
    temporary file behind.

    Args:
        path: the checkpoint file; missing folders are created.
        state: tensors, numbers, strings and containers of them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(
    path: str | os.PathLike, older_than: float = STALE_SECONDS
) -> list[Path]:
    """Delete the temporary files that killed writes of :func:`save_checkpoint` left beside
    ``path`` (``<name>.XXXXXXXX.tmp``), when untouched for ``older_than`` seconds.

    A ``SIGKILL`` during a write gives ``save_checkpoint`` no chance to clean up; the age spares
    the file of a write still in progress in another process.

    Returns:
        The files removed.
    """
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.[a-z0-9_]{8}\.tmp")
    if not path.parent.is_dir():
        return []
    removed, now = [], time.time()
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or not candidate.is_file():
            continue
        try:
            if now - candidate.stat().st_mtime >= older_than:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # another process cleaned it up first
            continue
    return removed


def check_folder(folder: str | os.PathLike, what: str = "checkpoint_dir") -> Path:
    """Make sure files can be written in ``folder`` (it may not exist yet), before any work.

    Args:
        folder: the folder to write in.
        what: how to name it in messages (a keyword or a flag).

    Returns:
        ``folder`` as a :class:`Path`.

    Raises:
        ValueError: ``folder`` is a file, lies under a file, or cannot be written.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise ValueError(f"{what} {folder} {where}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder}: no permission to write in {existing}; choose another")
    return folder


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict[str, Any]:
    """Read a checkpoint as it is on disk (``weights_only=True``), in any format.

    Args:
        path: the file.
        map_location: as in ``torch.load``.

    Returns:
        The raw dictionary; see :func:`upgrade` to bring an old one to format 2.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not a cnf checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"no checkpoint at {path}: it is a folder; give the file in it (e.g. "
            f"{path / 'last.pt'})"
        )
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first or check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on damaged files (empty: IndexError)
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{path} is not a cnf training checkpoint (no model/iteration)")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in full, as one line."""
    message = str(exc)
    if message.startswith("Weights only load failed"):
        # torch's first paragraph proposes weights_only=False; give the reason and the risk only
        reason = " ".join(p.strip() for p in re.split(r"\n\s*\n", message)[1:] if p.strip())
        return (
            f"checkpoint {path} is truncated or corrupt, or holds objects other than tensors and "
            f"plain data (not a file cnf wrote): {reason or message} cnf reads checkpoints with "
            "weights_only=True because loading such a file with weights_only=False can run "
            "arbitrary code hidden in it. Delete it, or resume from an older copy"
        )
    reason = " ".join(message.split()) or "no details"
    return (
        f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {reason}); delete "
        "it, or resume from an older copy"
    )


def upgrade(state: Mapping[str, Any], model: nn.Module, source: str = "checkpoint") -> dict:
    """Bring a checkpoint of any known format to format 2, with ``model``'s parameter names.

    Format 2 passes through. An older checkpoint has its averaged weights unwrapped from
    ``AveragedModel``'s layout, and weights whose names differ from ``model.state_dict()`` are
    renamed by position: models register their tensors in the same order across the renaming,
    so the ``k``-th tensor of the file is the ``k``-th of the model when every shape matches.

    Args:
        state: from :func:`load_checkpoint`.
        model: the model the weights are for.
        source: how to name the checkpoint in messages (its path).

    Returns:
        A new dictionary in format 2 (the input is left as it is).

    Raises:
        CheckpointError: a format newer than this version, or old weights that do not map
            one-to-one onto ``model``.
    """
    version = state.get("format", 1)
    if version == FORMAT:
        return dict(state)
    if version != 1:
        raise CheckpointError(
            f"{source} has checkpoint format {version!r}; this cnf reads formats 1 and "
            f"{FORMAT}: upgrade cnf"
        )
    new = {**state, "format": FORMAT}
    new["model"] = _rename_by_position(state["model"], model, source)
    if "ema" in state:
        prefix = "module."  # AveragedModel keeps the copy it averages as .module
        averaged = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
        new["ema"] = _rename_by_position(averaged, model, source)
        new["ema_updates"] = int(state["ema"].get("n_averaged", 0))
    return new


def _rename_by_position(weights: Mapping[str, Tensor], model: nn.Module, source: str) -> dict:
    target = model.state_dict()
    if set(weights) == set(target):
        return dict(weights)
    pairs = list(zip(weights.items(), target.items()))
    if len(weights) != len(target) or any(w.shape != t.shape for (_, w), (_, t) in pairs):
        raise CheckpointError(
            f"{source} was written by an older cnf and its {len(weights)} weight tensors do not "
            f"match the model's {len(target)} one-to-one (names or shapes differ); build the "
            "model with the settings that trained it, or train again"
        )
    return {name: w for (_, w), (name, _) in pairs}


def load_weights(model: nn.Module, weights: Mapping[str, Tensor], source: str = "checkpoint"):
    """``model.load_state_dict(weights)`` (strict), with a :class:`CheckpointError` on mismatch."""
    check_weights(weights, source)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(
            f"the weights in {source} do not fit the model ({reason}); build the model with the "
            "settings that trained it"
        ) from None


def check_weights(weights: Mapping[str, Any], source: str = "checkpoint", what: str = "") -> None:
    """Refuse weights with NaN or Inf entries: a model built from them cannot be solved.

    Args:
        weights: a ``state_dict``.
        source: how to name the checkpoint in messages.
        what: which weights they are, e.g. ``"averaged "``.

    Raises:
        CheckpointError: naming the first tensor that is not finite.
    """
    for name, tensor in weights.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(
                f"the {what}weights in {source} are not finite: {name} has {bad} NaN or Inf "
                f"entries of {tensor.numel()} (the run had diverged, or the file was altered); "
                "use an earlier checkpoint, or train again (e.g. with a lower lr)"
            )


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: History,
    iteration: int,
    seed: int,
    ema=None,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a run needs to continue, as a format-2 checkpoint (see the module docstring).

    Args:
        model, optimizer, scheduler: their ``state_dict()`` is stored.
        history, iteration, seed: the run so far.
        ema: an :class:`cnf.training.hooks.EMA`, or None.
        settings: the run's settings as plain numbers and strings (what a resume must match).
        extra: plain data stored beside (keys other than :data:`RESERVED_KEYS`).
    """
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history.to_dict(),
        "iteration": iteration,
        "seed": seed,
        **(extra or {}),
    }
    if settings is not None:
        state["settings"] = dict(settings)
    if ema is not None:
        state["ema"], state["ema_updates"] = ema.weights(), ema.updates
    return state


def restore_training(
    state: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema=None,
    source: str = "checkpoint",
) -> tuple[History, int]:
    """Load a checkpoint's run into ``model``, ``optimizer``, ``scheduler`` and ``ema``.

    The inverse of :func:`training_state`; older formats are upgraded first. An ``ema`` is
    restored only when the checkpoint has an average (else it starts from the model).

    Returns:
        The history so far and the number of iterations done.

    Raises:
        CheckpointError: the weights do not fit ``model``.
    """
    state = upgrade(state, model, source)
    load_weights(model, state["model"], source)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and "ema" in state:
        check_weights(state["ema"], source, what="averaged ")
        ema.load(state["ema"], state["ema_updates"])
    return History.from_dict(state["history"]), int(state["iteration"])


def build_from_state(
    state: Mapping[str, Any],
    *,
    weights: str = "ema",
    source: str = "checkpoint",
    model: nn.Module | None = None,
) -> Flow:
    """A ready model from a checkpoint's contents: :func:`load` without the file.

    Args:
        state: from :func:`load_checkpoint`; it needs ``"spec"`` (a :mod:`cnf.models` spec)
            unless ``model`` is given.
        weights: ``"ema"`` (default): the averaged weights if the checkpoint has them, else
            the trained ones; ``"raw"``: the trained weights, never the average.
        source: how to name the checkpoint in messages.
        model: a freshly built model to load the weights into (for models built in Python,
            which have no spec); None: build it from the spec.

    Returns:
        The model, built by :func:`cnf.models.build` (or ``model``), in eval mode.
    """
    # imported here: cnf.models may come to import cnf.training (recipes), not the reverse
    from cnf.models import build

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if model is None and "spec" not in state:
        raise CheckpointError(
            f"{source} has no model spec; pass the model to load it into (load(path, "
            "model=...)), or write it with fit(..., extra_state={'spec': spec})"
        )
    model = build(state["spec"]) if model is None else model
    state = upgrade(state, model, source)
    chosen = "ema" if weights == "ema" and "ema" in state else "model"
    load_weights(model, state[chosen], source)
    return model.eval()


def load(path: str | os.PathLike, *, weights: str = "ema", map_location=None, model=None) -> Flow:
    """Rebuild a trained model from a checkpoint of :func:`cnf.training.fit` or ``cnf train``.

    By default the model gets the exponential moving average of the weights when the run kept
    one (``fit(..., ema=...)``): that is the model the run evaluated and chose ``best.pt`` by.
    Without an average, or with ``weights="raw"``, it gets the weights the optimiser produced.

    Args:
        path: ``last.pt``, ``best.pt`` or any checkpoint with a ``"spec"``.
        weights: ``"ema"`` (default) or ``"raw"``, as above.
        map_location: where to put the model: a device or its name (default: the CPU); other
            ``torch.load`` locations apply to the tensors read only.
        model: load into this freshly built model instead of building one from the spec
            (for a model put together in Python).

    Returns:
        The model (a :class:`cnf.Flow`), in eval mode.

    Raises:
        CheckpointError: the file is missing or corrupt, has no spec, or its weights do not
            fit the model the spec builds.

    Example:
        >>> flow = load("runs/pinwheel/last.pt")  # doctest: +SKIP
        >>> x = flow.sample(1000)  # doctest: +SKIP
    """
    state = load_checkpoint(path, map_location=map_location)
    model = build_from_state(state, weights=weights, source=str(path), model=model)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model
