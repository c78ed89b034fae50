"""What the commands share: the ``--device`` flag, opening a checkpoint, naming a metric, and
spelling a value as a flag would."""

from __future__ import annotations

import torch

METRICS = {"nll": ("NLL", " nats"), "bits_per_dim": ("bits/dim", "")}
"""How each evaluation metric is named in messages: its label and unit."""


def pick_device(name: str | None) -> torch.device:
    """The device of a ``--device`` flag: ``auto`` (or None) picks a GPU when torch sees one."""
    from ..training.loop import check_device

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def metric_value(metric: str, value: float, digits: int) -> str:
    """A metric's value as messages show it, e.g. ``"NLL 2.345 nats"``."""
    label, unit = METRICS[metric]
    return f"{label} {value:.{digits}f}{unit}"


def open_checkpoint(checkpoint, device: torch.device):
    """The checkpoint's contents, its recipe record and its model (averaged weights if any)."""
    from ..recipes import Record
    from ..training import build_from_state, load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    model = build_from_state(state, weights="ema", source=str(checkpoint)).to(device)
    return state, Record.from_checkpoint(state, source=str(checkpoint)), model


def shown(value) -> str:
    """A value as a flag would spell it."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
