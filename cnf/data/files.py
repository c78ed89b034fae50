"""A user's own data from a file: ``.npy``, ``.npz``, ``.csv`` (or ``.tsv``) and ``.pt``.

:func:`read_table` reads rows of real numbers, one point per row, and checks them: a column that
is not numeric, a missing value, NaN or Inf is an error that names the row and the column (or,
with ``drop_nonfinite=True``, the rows that hold one are dropped and counted). :func:`load_file`
also splits the rows, seeded, into train, validation and test parts (:func:`split_rows`).

Example:
    >>> table = read_table("measurements.csv", columns=["height", "weight"])  # doctest: +SKIP
    >>> data = load_file("measurements.csv", seed=0)  # doctest: +SKIP
    >>> data.part("train").shape  # doctest: +SKIP
    torch.Size([800, 2])
"""

from __future__ import annotations

import csv
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tables import TabularData, split_rows

__all__ = ["FILE_SUFFIXES", "Table", "load_file", "read_table"]

FILE_SUFFIXES = (".npy", ".npz", ".csv", ".tsv", ".pt")
"""The file types :func:`read_table` reads, by suffix."""

_MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}  # spellings of a missing CSV value


@dataclass(frozen=True)
class Table:
    """Rows read from a file.

    Attributes:
        values: float64 array ``(n, D)``, finite.
        columns: a name per column: the CSV header's, else ``x0, x1, ...``.
        path: the file.
        dropped: rows dropped for holding NaN, Inf or a missing value (``drop_nonfinite``).
        contexts: float64 array ``(n, C)`` of the context columns (a conditional model's
            ``c`` of p(x | c)), row by row with ``values``; None without them.
        context_columns: their names.
    """

    values: np.ndarray
    columns: tuple[str, ...]
    path: str
    dropped: int = 0
    contexts: np.ndarray | None = None
    context_columns: tuple[str, ...] = ()


def read_table(
    path: str | os.PathLike,
    *,
    columns: Sequence[str | int] | None = None,
    drop_nonfinite: bool = False,
    context_columns: Sequence[str | int] | None = None,
) -> Table:
    """Read a file of rows (one point per row) as a float64 table.

    Args:
        path: a ``.npy`` array ``(n, D)`` (or ``(n,)``: one column), a ``.npz`` archive holding
            one array (or one named ``data``), a ``.csv`` / ``.tsv`` file (a header line is
            recognised by its non-numeric cells; delimiter ``,``, ``;`` or tab) or a ``.pt``
            tensor (or a dict holding one tensor, or one named ``data``).
        columns: the columns to keep, by header name or 0-based index (default: all but the
            context columns); pick the numeric columns of a file that also holds text.
        drop_nonfinite: drop rows holding NaN, Inf or a missing value, instead of refusing them.
        context_columns: columns (names or indices) that are the context of a conditional
            model rather than data, returned as :attr:`Table.contexts`.

    Raises:
        ValueError: an unknown suffix, an unreadable file, a non-numeric column, NaN or Inf
            (naming the first bad row and column), no rows left, an unknown column, or a
            column that is both data and context.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    readers = {".npy": _read_npy, ".npz": _read_npz, ".pt": _read_pt, ".csv": _read_csv}
    readers[".tsv"] = _read_csv
    if suffix not in readers:
        raise ValueError(
            f"{path}: cannot read {suffix or 'a file without a suffix'}; give a "
            f"{', '.join(FILE_SUFFIXES)} file"
        )
    cells, names, lines = readers[suffix](path)
    chosen, context = _chosen(names, columns, context_columns, path)
    cells, names = cells[:, chosen + context], [names[i] for i in chosen + context]
    where = _RowNames(lines)
    values = _numeric(cells, names, path, where)
    table = _finite(values, names, path, drop_nonfinite, where)
    if not context:
        return table
    k = len(chosen)
    return Table(
        table.values[:, :k], table.columns[:k], table.path, table.dropped,
        contexts=table.values[:, k:], context_columns=table.columns[k:],
    )  # fmt: skip


def load_file(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    columns: Sequence[str | int] | None = None,
    drop_nonfinite: bool = False,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    context_columns: Sequence[str | int] | None = None,
) -> TabularData:
    """:func:`read_table`, split into train, validation and test parts by ``seed``
    (:func:`split_rows`; the same seed gives the same split); with ``context_columns``, the
    data of a conditional model (:attr:`TabularData.contexts`, split row by row)."""
    table = read_table(
        path, columns=columns, drop_nonfinite=drop_nonfinite, context_columns=context_columns
    )
    idx = split_rows(len(table.values), seed, fractions)
    source = str(table.path) + (
        f", {table.dropped} rows with NaN/Inf dropped" * bool(table.dropped)
    )
    contexts = None
    if table.contexts is not None:
        contexts = {part: table.contexts[i] for part, i in idx.items()}
    return TabularData(
        Path(path).stem,
        {part: table.values[i] for part, i in idx.items()},
        columns=table.columns,
        source=source,
        contexts=contexts,
        context_columns=table.context_columns,
    )


def _as_rows(array: np.ndarray, path: Path) -> np.ndarray:
    """A 1-D or 2-D array as ``(n, D)``; anything else is refused."""
    if array.dtype.names is not None:
        raise ValueError(f"{path}: a structured array; save a plain (n, D) array of numbers")
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"{path}: an array of shape {array.shape}; give one point per row, (n, D) (reshape "
            "images or tensors to (n, -1) first)"
        )
    return array


class _RowNames:
    """How messages name row ``i``: its 0-based index, and its line in a text file."""

    def __init__(self, lines: list[int] | None):
        self.lines = lines

    def __call__(self, i: int) -> str:
        line = f"; line {self.lines[i]} of the file" if self.lines else ""
        return f"row {i} (0-based{line})"


def _numbers(array: np.ndarray, path: Path) -> tuple[np.ndarray, list[str], None]:
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)
    ):
        raise ValueError(f"{path}: holds {array.dtype} values; a density needs real numbers")
    array = _as_rows(array, path)
    return array, [f"x{i}" for i in range(array.shape[1])], None


def _read_npy(path: Path) -> tuple[np.ndarray, list[str], None]:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        # numpy's reason for an object array suggests allow_pickle, which can run code: not ours
        raise ValueError(
            f"{path}: not a readable .npy array of numbers (damaged, or holding Python objects, "
            "which are not read: they could run code)"
        ) from None
    return _numbers(array, path)


def _one_array(found: dict, path: Path, kind: str):
    """The single array of an archive, or the one named ``data``."""
    if len(found) == 1:
        return next(iter(found.values()))
    if "data" in found:
        return found["data"]
    raise ValueError(
        f"{path}: holds {len(found)} {kind} ({', '.join(map(str, found)) or 'none'}); keep one "
        "per file, or name the one to fit 'data'"
    )


def _read_npz(path: Path) -> tuple[np.ndarray, list[str], None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            found = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from None
    return _numbers(_one_array(found, path, "arrays"), path)


def _read_pt(path: Path) -> tuple[np.ndarray, list[str], None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        reason = str(exc).split("\n")[0]
        raise ValueError(f"{path}: not a readable tensor file ({reason})") from None
    if isinstance(obj, dict):
        obj = _one_array({k: v for k, v in obj.items() if torch.is_tensor(v)}, path, "tensors")
    if not torch.is_tensor(obj):
        raise ValueError(f"{path}: holds a {type(obj).__name__}; save a tensor (n, D)")
    if obj.is_complex() or obj.dtype == torch.bool:
        raise ValueError(f"{path}: holds {obj.dtype} values; a density needs real numbers")
    return _numbers(obj.detach().to(torch.float64).numpy(), path)


def _read_csv(path: Path) -> tuple[np.ndarray, list[str], list[int]]:
    """The cells of a CSV file as strings ``(n, D)``, the header's names (or ``x0, ...``) and
    each row's line number (blank lines and ``#`` comments are skipped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not a text file (expected UTF-8 comma-separated values)"
        ) from None
    numbered = [
        (k + 1, line)
        for k, line in enumerate(text.splitlines())
        if line.strip() and not line.startswith("#")
    ]
    if not numbered:
        raise ValueError(f"{path}: the file holds no rows")
    delimiter = _delimiter(numbered[0][1], path)
    rows = list(csv.reader([line for _, line in numbered], delimiter=delimiter))
    width = len(rows[0])
    for (number, _), row in zip(numbered, rows):
        if len(row) != width:
            raise ValueError(
                f"{path}: line {number} has {len(row)} fields, the first line {width}; every "
                "row needs one value per column"
            )
    header = not all(_is_number(cell) for cell in rows[0])
    names = [c.strip() for c in rows[0]] if header else [f"x{i}" for i in range(width)]
    if not rows[header:]:
        raise ValueError(f"{path}: the file holds a header but no rows")
    lines = [number for number, _ in numbered[header:]]
    return np.array(rows[header:], dtype=object), names, lines


def _delimiter(line: str, path: Path) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {d: line.count(d) for d in (",", ";", "\t")}
    return max(counts, key=counts.get) if any(counts.values()) else ","


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return cell.strip().lower() in _MISSING


def _chosen(names: list[str], columns, context_columns, path: Path) -> tuple[list, list]:
    """The indices of the data columns and of the context columns."""
    context = [] if context_columns is None else _indices(names, context_columns, path)
    if columns is None:
        chosen = [i for i in range(len(names)) if i not in context]
        if not chosen:
            raise ValueError(f"{path}: every column is a context column; no data is left")
        return chosen, context
    chosen = _indices(names, columns, path)
    both = [names[i] for i in chosen if i in context]
    if both:
        raise ValueError(
            f"{path}: column(s) {', '.join(map(repr, both))} are both data and context; a "
            "column is one or the other"
        )
    return chosen, context


def _indices(names: list[str], columns, path: Path) -> list[int]:
    """The indices of ``columns`` (names or 0-based indices) among ``names``."""
    columns = list(columns)
    if not columns:
        raise ValueError("columns is empty; name at least one column")
    chosen = []
    for c in columns:
        if isinstance(c, str) and c in names:
            chosen.append(names.index(c))
        elif isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.strip().isdigit()):
            i = int(c)
            if not 0 <= i < len(names):
                raise ValueError(
                    f"{path}: no column {i}; it has {len(names)} (0 to {len(names) - 1})"
                )
            chosen.append(i)
        else:
            raise ValueError(f"{path}: no column {c!r}; its columns are {', '.join(names)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"columns {columns} name a column twice")
    return chosen


def _numeric(cells: np.ndarray, names: list[str], path: Path, where: _RowNames) -> np.ndarray:
    """Cells as float64; a cell that is not a number names its row and column."""
    if cells.dtype != object:
        return cells.astype(np.float64)
    values = np.empty(cells.shape, dtype=np.float64)
    bad_columns = []
    for j in range(cells.shape[1]):
        column = [str(c).strip() for c in cells[:, j]]
        column = ["nan" if c.lower() in _MISSING else c for c in column]
        try:
            values[:, j] = np.array(column, dtype=np.float64)
        except ValueError:
            row = next(i for i, c in enumerate(column) if not _is_number(c))
            bad_columns.append((names[j], row, column[row]))
    if bad_columns:
        first = bad_columns[0]
        raise ValueError(
            f"{path}: column(s) {', '.join(repr(n) for n, _, _ in bad_columns)} are not numeric "
            f"({where(first[1])}, column {first[0]!r} holds {first[2]!r}); pick the numeric "
            "columns (--columns, or columns= in Python), or encode the others as numbers"
        )
    return values


def _finite(
    values: np.ndarray, names: list[str], path: Path, drop: bool, where: _RowNames
) -> Table:
    """Refuse (or drop) the rows holding NaN, Inf or a missing value."""
    bad = ~np.isfinite(values)
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows) and not drop:
        row = int(rows[0])
        col = int(np.flatnonzero(bad[row])[0])
        raise ValueError(
            f"{path}: {len(rows)} row(s) hold NaN, Inf or a missing value, the first {where(row)} "
            f"in column {names[col]!r} ({values[row, col]}); "
            "fix or remove them, or drop such rows (--drop-nonfinite, or drop_nonfinite=True)"
        )
    kept = np.delete(values, rows, axis=0)
    if len(kept) == 0:
        raise ValueError(f"{path}: no rows left" + (" after dropping NaN/Inf rows" if drop else ""))
    return Table(kept, tuple(names), str(path), dropped=len(rows))
