"""What a training run measured, as named columns.

Two tables share one object: one row per iteration (``iteration``, ``loss``, ``seconds`` and
whatever the objective reported, e.g. ``nll`` or ``fm_loss``) and one row per evaluation
(``eval_iteration`` and ``eval_nll``). Columns are read as attributes (``history.nll``) or
through :meth:`History.to_dict`, whose plain lists go into checkpoints, JSON files and
:func:`cnf.plot.plot_curves`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["History"]

Number = float | int


class History:
    """Named metrics of a run: per iteration, and per evaluation (names ``eval_*``).

    Every column of a table has one value per row, so the lists line up. A metric that a row
    does not report is NaN there (e.g. a metric an objective only reports from some iteration
    on), which keeps the columns aligned and plottable.

    Attributes:
        iteration: 1-based iteration numbers; ``loss`` and ``seconds`` (wall time) always
            accompany them, then the objective's metrics (:class:`MaximumLikelihood`:
            ``nll``, ``nfe_forward``, ``nfe_backward``).
        eval_iteration, eval_nll: iterations at which the model was evaluated and the score
            (held-out NLL in nats or any lower-is-better score of ``eval_fn``).

    Example:
        >>> h = History()
        >>> h.record(1, loss=2.5, seconds=0.1, nll=2.5)
        >>> h.record_eval(1, nll=2.7)
        >>> h.nll, h.eval_nll
        ([2.5], [2.7])
    """

    STEP_KEY, EVAL_KEY = "iteration", "eval_iteration"

    def __init__(self) -> None:
        self._steps: dict[str, list[Number]] = {self.STEP_KEY: [], "loss": [], "seconds": []}
        self._evals: dict[str, list[Number]] = {self.EVAL_KEY: [], "eval_nll": []}

    def record(self, iteration: int, **values: Number) -> None:
        """Append the row of ``iteration``: ``loss``, ``seconds`` and any named metric."""
        _append(self._steps, self.STEP_KEY, iteration, values)

    def record_eval(self, iteration: int, **values: Number) -> None:
        """Append an evaluation at ``iteration``; ``nll=...`` is stored as ``eval_nll``."""
        named = {f"eval_{name}": value for name, value in values.items()}
        _append(self._evals, self.EVAL_KEY, iteration, named)

    def improved(self) -> bool:
        """Whether the latest evaluation is strictly the lowest ``eval_nll`` so far."""
        scores = self._evals["eval_nll"]
        return bool(scores) and scores[-1] < min(scores[:-1], default=math.inf)

    def last(self) -> dict[str, Number]:
        """The latest iteration's row, ``{name: value}`` (empty before the first one)."""
        if not self._steps[self.STEP_KEY]:
            return {}
        return {name: column[-1] for name, column in self._steps.items()}

    def __len__(self) -> int:
        return len(self._steps[self.STEP_KEY])

    def __getattr__(self, name: str) -> list[Number]:
        if name.startswith("_"):  # not a column; also keeps copy/pickle away from recursion
            raise AttributeError(name)
        for table in (self._steps, self._evals):
            if name in table:
                return table[name]
        raise AttributeError(f"History has no metric {name!r}; it has {sorted(self.to_dict())}")

    def to_dict(self) -> dict[str, list[Number]]:
        """Every column as a fresh list: ``{"iteration": [...], "loss": [...], ...}``."""
        return {name: list(column) for name, column in {**self._steps, **self._evals}.items()}

    @classmethod
    def from_dict(cls, columns: Mapping[str, Sequence[Number]]) -> History:
        """The inverse of :meth:`to_dict` (also reads the histories of older checkpoints).

        Raises:
            ValueError: a table's columns have different lengths.
        """
        history = cls()
        for name, column in columns.items():
            table = history._evals if name.startswith("eval_") else history._steps
            table[name] = list(column)
        for table in (history._steps, history._evals):
            if len({len(column) for column in table.values()}) > 1:
                lengths = {name: len(column) for name, column in table.items()}
                raise ValueError(f"history columns differ in length: {lengths}")
        return history

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"History({len(self)} iterations, metrics {sorted(self.to_dict())})"


def _append(table: dict[str, list], key: str, index: int, values: Mapping[str, Number]) -> None:
    """Add one row to ``table``: NaN for columns it lacks, NaN history for new columns."""
    rows = len(table[key])
    for name in values.keys() - table.keys():
        table[name] = [math.nan] * rows
    table[key].append(index)
    for name, column in table.items():
        if name != key:
            column.append(values.get(name, math.nan))
