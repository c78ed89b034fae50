"""Output emission: the solution at the requested times, read off each accepted step.

An output time inside an accepted step ``(t, t + h]`` is filled in as soon as the step is
accepted: the step's end point exactly (always the case on the grid of ``t`` for fixed-step
methods without a step size), an interior time by the tableau's dense output. Output times
therefore never shorten a step, and the steps do not depend on which times are asked for.

:class:`RecordedOutputs` also keeps what the checkpoint adjoint needs to replay the solve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._keep import GraphKeep
from ._rk import dense_output
from .tableaus import ButcherTableau

__all__ = ["Outputs", "Record", "RecordedOutputs"]


@dataclass
class Record:
    """What the checkpoint adjoint needs to replay a solve step by step.

    ``steps[n] = (t_n, h_n, y_n)`` for every accepted step; ``outputs[i] = (n, theta)`` says
    that output ``i`` was read from step ``n`` at ``t_n + theta h_n`` (``theta is None``: the
    step's end point exactly; ``n == -1``: the initial value).
    """

    steps: list[tuple[float, float, Tensor]] = field(default_factory=list)
    outputs: list[tuple[int, float | None]] = field(default_factory=list)
    keep: GraphKeep | None = None  # the first steps' graph, kept by the forward solve


class Outputs:
    """The solution at the output times ``ts``, filled in as steps are accepted.

    Attributes:
        ys: the outputs so far, each shaped like ``y0``; ``ys[0]`` is ``y0``.
        done: whether every output time has been reached.
        next_time: the next output time to reach (while not ``done``).
    """

    def __init__(
        self, tab: ButcherTableau, ts: list[float], y0: Tensor, interp: str | None = None
    ) -> None:
        self.tab, self.ts, self.interp = tab, ts, interp
        self.direction = 1.0 if ts[-1] >= ts[0] else -1.0
        self.ys = [y0]
        self.index = 1
        self.done = len(ts) == 1
        self.next_time = ts[-1] if self.done else ts[1]

    def emit(
        self,
        rhs: Callable[[float, Tensor], Tensor],
        t: float,
        y: Tensor,
        h: float,
        t_next: float,
        y1: Tensor,
        ks: list[Tensor],
    ) -> Tensor | None:
        """Fill in the outputs in ``(t, t_next]`` of the accepted step ``y -> y1`` of size ``h``.

        ``t_next`` is passed, not recomputed: a step that lands on an output time ends on it
        exactly, which ``t + h`` need not reproduce in floating point.

        Returns ``f(t_next, y1)`` when it is known (an FSAL tableau's last stage, or evaluated
        here for dense output), so that the next step need not evaluate it again; else None.
        """
        tab, ts = self.tab, self.ts
        k_end = ks[-1] if tab.fsal else None
        while not self.done and self.direction * (self.next_time - t_next) <= 0:
            if self.next_time == t_next:
                self._store(y1, None)
            else:
                theta = (self.next_time - t) / h
                if self.interp == "linear":  # torchdiffeq's default between fixed steps
                    self._store(torch.lerp(y, y1, theta), theta)
                else:
                    if k_end is None:
                        k_end = rhs(t_next, y1)
                    stages = ks if tab.fsal else ks + [k_end]
                    self._store(dense_output(tab, y, stages, h, theta), theta)
            self.index += 1
            self.done = self.index == len(ts)
            if not self.done:
                self.next_time = ts[self.index]
        return k_end

    def _store(self, y_out: Tensor, theta: float | None) -> None:
        self.ys.append(y_out)


class RecordedOutputs(Outputs):
    """:class:`Outputs` that also fill in a :class:`Record` of the steps and outputs."""

    def __init__(
        self,
        tab: ButcherTableau,
        ts: list[float],
        y0: Tensor,
        record: Record,
        interp: str | None = None,
    ) -> None:
        super().__init__(tab, ts, y0, interp)
        self.record = record
        record.outputs.append((-1, None))

    def emit(self, rhs, t, y, h, t_next, y1, ks):
        k_end = super().emit(rhs, t, y, h, t_next, y1, ks)
        self.record.steps.append((t, h, y.detach()))  # a kept graph stays out of the record
        if self.record.keep is not None:
            self.record.keep.accepted()
        return k_end

    def _store(self, y_out: Tensor, theta: float | None) -> None:
        self.ys.append(y_out)
        # The step being emitted is recorded after its outputs, so its index is len(steps).
        self.record.outputs.append((len(self.record.steps), theta))
