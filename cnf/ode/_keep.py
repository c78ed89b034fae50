"""Keeping the first steps' autograd graph of a checkpointed solve, within a memory budget.

The checkpoint adjoint replays every step in the backward pass: one more forward evaluation
of each stage, under autograd. Where the graph of a step is small (a batch of 2-D points: a
few hundred kilobytes per evaluation), keeping it from the forward solve and backpropagating
through it is cheaper than recomputing it, and costs memory the budget bounds. So the forward
solve of :class:`~cnf.ode.Checkpoint` runs under autograd while its graph leaves room for
one more step; from the first step that would not fit, it detaches the state and goes on
without a graph, and only those later steps are replayed.

The size of the graph is measured once, on the first evaluation: the bytes of the tensors it
saves for the backward pass (a saved-tensor hook counts them as they are saved). Every later
evaluation is taken to be the same size (same field, same batch). A field that cannot run
under saved-tensor hooks (``torch.func`` transforms refuse them, and a caller may disable them) is
not measured, and its steps are all replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GraphKeep"]

# what torch.func says when it meets a saved-tensor hook (torch 2.x); such a field keeps no graph
_HOOKS_REFUSED = "saved tensor hooks"


class GraphKeep:
    """The bookkeeping of one solve that keeps its graph while it fits in ``limit`` bytes.

    ``kept`` is the number of leading accepted steps whose graph was kept (set when the solve
    cuts or ends), ``cut_state`` the state, still in the graph, where replaying takes over
    (None when every step was kept, or none).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.per_eval: int | None = None  # bytes; None until measured (or not measurable)
        self.evals = 0  # evaluations whose graph is kept
        self.stages = 0
        self.active = True
        self.kept: int | None = None
        self.cut_state: Tensor | None = None

    def measured(self, f: Callable) -> Callable:
        """``f`` that measures its first call's graph."""

        def call(t, y, *side):
            if self.evals:
                return f(t, y, *side)
            self.evals, saved = 1, []
            hooks = torch.autograd.graph.saved_tensors_hooks(_counter(saved), _unpack)
            try:
                hooks.__enter__()
            except RuntimeError:  # the caller disabled saved-tensor hooks: not measurable
                return f(t, y, *side)
            try:
                out = f(t, y, *side)
            except RuntimeError as error:
                if _HOOKS_REFUSED not in str(error):
                    raise
                out = None
            finally:
                hooks.__exit__(None, None, None)
            if out is None:  # per_eval stays None: this solve replays every step
                return f(t, y, *side)
            self.per_eval = sum(saved)
            return out

        return call

    def before_step(self, stages: int, steps: int, y: Tensor, k0: Tensor):
        """Before each attempted step (``steps`` accepted so far): ``(y, k0)``, detached and
        with autograd off from here on if a step of ``stages`` evaluations would not fit."""
        if not self.active:
            return y, k0
        self.stages = stages
        fits = self.per_eval is not None and (self.evals + stages) * self.per_eval <= self.limit
        if fits:
            return y, k0
        self.active, self.kept = False, steps
        self.cut_state = y if steps else None  # cut before any step: nothing kept
        torch.set_grad_enabled(False)  # the caller's enable_grad() restores the mode on exit
        return y.detach(), k0.detach()

    def accepted(self) -> None:
        """Called when a step is accepted: its graph stays."""
        self.evals += self.stages

    def finish(self, steps: int) -> None:
        """Called when the solve ends after ``steps`` accepted steps."""
        if self.active:
            self.active, self.kept = False, steps


def _counter(saved: list[int]):
    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel() * x.element_size())
        # detached, as torch's own hooks store it: x itself would tie a saved output to its
        # own node in a reference cycle that outlives the graph
        return x.detach()

    return pack


def _unpack(x: Tensor) -> Tensor:
    return x
