"""torchdiffeq's step callbacks: methods of ``func`` that the solver calls as it steps.

``func.callback_step(t0, y0, dt)`` before each step is tried, ``func.callback_accept_step(t0,
y0, dt)`` and ``func.callback_reject_step(t0, y0, dt)`` once an adaptive step is judged (fixed
steps are never judged, so those two are not called for them). ``t0`` and ``dt`` are float64
0-dim tensors, ``dt > 0`` in either direction of time, and ``y0`` has the state's structure (a
tuple for a tuple state). The adjoint's backward pass calls the ``*_adjoint`` variants
(``callback_step_adjoint``, ...) for its own steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CALLBACK_NAMES", "NO_CALLBACKS", "Callbacks", "callbacks_of"]

CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
"""The callbacks ``func`` may define (add ``_adjoint`` for the backward pass's)."""

Hook = Callable[[float, Tensor, float], None]


def _nothing(t: float, y: Tensor, h: float) -> None:
    pass


@dataclass(frozen=True)
class Callbacks:
    """The solver-side hooks ``hook(t, y, h)`` on the flat state; no-ops where ``func`` has
    none, so that the step loop calls them unconditionally."""

    step: Hook = _nothing
    accept: Hook = _nothing
    reject: Hook = _nothing


NO_CALLBACKS = Callbacks()
"""What a solve without callbacks calls: nothing."""


def callbacks_of(
    func, *, suffix: str = "", to_user: Callable[[Tensor], object], adaptive: bool
) -> Callbacks | None:
    """The callbacks ``func`` defines (``callback_step`` + ``suffix``, ...), wrapped.

    ``to_user`` turns the solver's flat state into what the user's callback receives. Returns
    None when ``func`` defines none (the solver then pays nothing for them).
    """
    found = [getattr(func, name + suffix, None) for name in CALLBACK_NAMES]
    if not any(callable(cb) for cb in found):
        return None
    if not adaptive and any(callable(cb) for cb in found[1:]):
        names = [n + suffix for n, cb in zip(CALLBACK_NAMES[1:], found[1:]) if callable(cb)]
        warnings.warn(
            f"{names} are not called by fixed-step methods (their steps are not judged); "
            f"only {'callback_step' + suffix} is",
            stacklevel=4,
        )

    def wrap(callback) -> Hook:
        if not callable(callback):
            return _nothing

        def hook(t: float, y: Tensor, h: float) -> None:
            f64 = torch.float64
            t0 = torch.tensor(t, dtype=f64, device=y.device)
            dt = torch.tensor(abs(h), dtype=f64, device=y.device)
            callback(t0, to_user(y), dt)

        return hook

    step, accept, reject = (wrap(cb) for cb in found)
    return Callbacks(step, accept, reject) if adaptive else Callbacks(step)
