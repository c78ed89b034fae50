"""Tabular data: rows of real numbers, split into train, validation and test parts.

:class:`TabularData` is what every tabular loader returns, whether it reads a user's file
(:func:`cnf.data.read_table`), one of the standard benchmarks (:mod:`cnf.data.benchmarks`) or a
set that installs with scikit-learn (:mod:`cnf.data.bundled`). It has the members the training
front ends use (``sampler``, ``part``, ``describe``, ``entropy``), so a recipe treats it like
the toy and image data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["PARTS", "TabularData", "split_rows"]

PARTS = ("train", "val", "test")
"""The parts of every split, in order."""


class TabularData:
    """Rows of ``D`` real numbers in three parts, as float64 tensors ``(n, D)``.

    Args:
        name: the data set (for messages and the record of a run).
        parts: ``{"train": ..., "val": ..., "test": ...}``, arrays or tensors ``(n, D)``
            with the same ``D``; each part needs at least one row, the training part two.
        columns: a name per column (default ``x0, x1, ...``).
        entropy: the data's differential entropy in nats where it is known (synthetic data),
            so that the gap of a model's NLL to it can be reported; else None.
        source: where the rows came from, for :meth:`describe`.
        contexts: for a conditional model, each part's contexts ``(n, C)`` row by row with
            its points (``parts``); :meth:`sampler` and :meth:`part` then give
            ``(points, contexts)`` pairs. None: unconditional data.
        context_columns: a name per context column (default ``c0, c1, ...``).

    Raises:
        ValueError: a part is missing, empty or not finite, or the parts' widths differ.
    """

    def __init__(
        self,
        name: str,
        parts: Mapping[str, np.ndarray | Tensor],
        *,
        columns: Sequence[str] | None = None,
        entropy: float | None = None,
        source: str = "",
        contexts: Mapping[str, np.ndarray | Tensor] | None = None,
        context_columns: Sequence[str] | None = None,
    ):
        missing = [p for p in PARTS if p not in parts]
        if missing or set(parts) - set(PARTS):
            raise ValueError(f"parts must be exactly {PARTS}, got {sorted(parts)}")
        self.parts = {p: torch.as_tensor(np.asarray(parts[p]), dtype=torch.float64) for p in PARTS}
        widths = {p: (tuple(v.shape[1:]) if v.dim() == 2 else None) for p, v in self.parts.items()}
        if len(set(widths.values())) != 1 or None in widths.values():
            raise ValueError(f"{name}: every part must be (n, D) with one D, got {widths}")
        for p, values in self.parts.items():
            if len(values) < (2 if p == "train" else 1):
                raise ValueError(f"{name}: the {p} part has {len(values)} rows; too few")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name}: the {p} part contains NaN or Inf")
        self.name, self.entropy, self.source = name, entropy, source
        dim = self.dim
        self.columns = tuple(columns) if columns is not None else tuple(f"x{i}" for i in range(dim))
        if len(self.columns) != dim:
            raise ValueError(f"{name}: {len(self.columns)} column names for {dim} columns")
        self.contexts, self.context_columns = None, ()
        if contexts is not None:
            self._set_contexts(contexts, context_columns)

    def _set_contexts(self, contexts, names) -> None:
        c = {p: torch.as_tensor(np.asarray(contexts[p]), dtype=torch.float64) for p in PARTS}
        for p, values in c.items():
            if values.dim() != 2 or len(values) != len(self.parts[p]):
                raise ValueError(
                    f"{self.name}: the {p} part's contexts must be (n, C) with its {len(values)} "
                    f"rows, got {tuple(values.shape)}"
                )
        width = c["train"].shape[1]
        self.contexts = c
        self.context_columns = tuple(names or (f"c{i}" for i in range(width)))

    @property
    def embedding(self) -> dict | None:
        """What a model of these data embeds: ``{"inputs": C}`` (the keywords of
        :class:`cnf.context.ContextEmbedding`) for conditional data, else None."""
        return None if self.contexts is None else {"inputs": self.contexts["train"].shape[1]}

    @property
    def dim(self) -> int:
        """The number of columns, ``D``."""
        return self.parts["train"].shape[1]

    @property
    def sizes(self) -> dict[str, int]:
        return {part: len(rows) for part, rows in self.parts.items()}

    def describe(self) -> str:
        sizes = " / ".join(f"{n} {part}" for part, n in self.sizes.items())
        line = f"{sizes} rows of {self.dim} columns"
        if self.contexts is not None:
            line += f" given {len(self.context_columns)} context column(s)"
        return line + (f", {self.source}" if self.source else "")

    def sampler(self, translate: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The training rows (with their contexts, for conditional data):
        :func:`cnf.training.fit` shuffles them once per epoch."""
        if translate is not None:
            raise ValueError("--translate moves images by a pixel; it does not apply to tables")
        return self.part("train")

    def part(
        self, name: str, *, seed: int = 0, n: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The rows of part ``name`` (the first ``n`` if given), or ``(rows, contexts)`` for
        conditional data; ``seed`` is unused, the split being fixed when the data were loaded."""
        if name not in self.parts:
            raise ValueError(f"unknown part {name!r}; choose one of {list(PARTS)}")
        if self.contexts is None:
            return self.parts[name][:n]
        return self.parts[name][:n], self.contexts[name][:n]


def split_rows(
    n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """A seeded split of ``n`` row indices into train, validation and test parts.

    The rows are permuted by ``numpy.random.default_rng(seed)``; the validation and test parts
    take ``round(n * fraction)`` rows each (at least one), the training part the rest.

    Args:
        n: rows in the data.
        seed: the split's seed (recorded by ``cnf train`` in its checkpoints).
        fractions: the parts' shares of the rows, adding up to 1.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, each sorted.

    Raises:
        ValueError: too few rows to leave two for training and one for each held-out part.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be 3 positive shares adding up to 1, got {fractions}")
    n_val, n_test = (max(1, round(n * f)) for f in fractions[1:])
    if n - n_val - n_test < 2:
        raise ValueError(
            f"{n} rows are too few to split into train, validation and test parts (at least 4 "
            "are needed: 2 to train on, 1 to validate, 1 to test)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    cut = n - n_val - n_test
    return {
        "train": np.sort(perm[:cut]),
        "val": np.sort(perm[cut : cut + n_val]),
        "test": np.sort(perm[cut + n_val :]),
    }
