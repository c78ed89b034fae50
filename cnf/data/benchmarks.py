"""The five tabular density benchmarks of MAF and FFJORD, read from MAF's preprocessed files.

POWER, GAS, HEPMASS, MINIBOONE and BSDS300 as distributed with MAF (Papamakarios et al. 2017,
zenodo record 1161203) and used unchanged by FFJORD (Grathwohl et al. 2019). Each loader reads
the files from a local folder and applies the preprocessing of MAF's ``datasets/*.py`` step by
step, so that the parts, their order and their normalisation are the published ones:

=========  ===  ==========  ==========  ==========  ============================================
name       D    train       val         test        preprocessing
=========  ===  ==========  ==========  ==========  ============================================
power      6    1,659,917   184,435     204,928     shuffle (seed 42), 2 columns dropped, uniform
                                                    noise; split; standardised by train + val
gas        8    852,174     94,685      105,206     3 columns dropped, then every column
                                                    correlated > 0.98 with another; standardised
                                                    by all rows; split (no shuffle)
hepmass    21   315,123     35,013      174,987     signal rows only; columns whose smallest
                                                    value repeats > 5 times dropped; standardised
                                                    by the training file; val = its last 10%
miniboone  43   29,556      3,284       3,648       split; standardised by train + val
bsds300    63   1,000,000   50,000      250,000     none (the file holds the three parts)
=========  ===  ==========  ==========  ==========  ============================================

The row counts are those MAF reports (:data:`PUBLISHED_SHAPES`); "split" means MAF's rule: the
last ``int(0.1 * n)`` rows are the test part, and the last ``int(0.1 * m)`` of the ``m`` rows
left the validation part. Everything is computed in float64 (MAF casts to float32 afterwards).

The files are not downloaded here. Unpack MAF's ``data.tar.gz`` so that
``<root>/power/data.npy`` exists and pass that folder as ``root`` (:data:`BENCHMARK_FILES` lists
the files each set needs); a set's own folder works too. GAS is a pandas pickle and BSDS300 an
HDF5 file, so those two need ``pip install 'cnf[tabular]'`` (pandas and h5py). Unpickling runs
code from the file: load only MAF's pickle or one you made yourself.

Example:
    >>> data = load_benchmark("miniboone", "~/data/maf")  # doctest: +SKIP
    >>> data.dim, data.sizes  # doctest: +SKIP
    (43, {'train': 29556, 'val': 3284, 'test': 3648})
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from .tables import TabularData

__all__ = [
    "BENCHMARK_FILES",
    "BENCHMARK_NAMES",
    "PUBLISHED_SHAPES",
    "load_benchmark",
    "load_bsds300",
    "load_gas",
    "load_hepmass",
    "load_miniboone",
    "load_power",
]

BENCHMARK_NAMES = ("power", "gas", "hepmass", "miniboone", "bsds300")
"""Names accepted by :func:`load_benchmark`."""

BENCHMARK_FILES: dict[str, tuple[str, ...]] = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
"""The files each set reads, relative to ``root`` (the folder of MAF's ``data.tar.gz``)."""

PUBLISHED_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "power": (6, 1_659_917, 184_435, 204_928),
    "gas": (8, 852_174, 94_685, 105_206),
    "hepmass": (21, 315_123, 35_013, 174_987),
    "miniboone": (43, 29_556, 3_284, 3_648),
    "bsds300": (63, 1_000_000, 50_000, 250_000),
}
"""``(D, train rows, val rows, test rows)`` as MAF reports them; the loaders do not enforce them,
so that a subset of the files still loads (a recipe may compare against them)."""

_SOURCE = (
    "MAF's preprocessed data (Papamakarios et al. 2017, https://zenodo.org/record/1161203): "
    "unpack its data.tar.gz so that <root>/power/data.npy exists and pass <root>"
)
_TABULAR_EXTRA = "pip install 'cnf[tabular]'"

# POWER's data.npy: the UCI household power columns MAF kept, in its order (MAF's noise names).
_POWER_RAW_WIDTH = 8
_POWER_DROPPED = (1, 3)  # global reactive power and global intensity
_POWER_COLUMNS = (
    "global_active_power",
    "voltage",
    "sub_metering_1",
    "sub_metering_2",
    "sub_metering_3",
    "time",
)
_GAS_DROPPED = ("Meth", "Eth", "Time")  # the concentrations (targets) and the clock
_GAS_MAX_CORRELATION = 0.98
_HEPMASS_MAX_REPEATS = 5
_MINIBOONE_WIDTH = 43
_BSDS300_WIDTH = 63
_BSDS300_PARTS = {"train": "train", "val": "validation", "test": "test"}


# ----------------------------------------------------------------------------- files


def _find_files(name: str, root: str | os.PathLike[str]) -> list[Path]:
    """The paths of set ``name``'s files: under ``root`` as MAF lays them out, or directly in
    ``root`` when it is the set's own folder.

    Raises:
        ValueError: ``root`` is not a folder, or a file is missing (naming all of them).
    """
    folder = Path(root).expanduser()
    expected = BENCHMARK_FILES[name]
    if not folder.is_dir():
        raise ValueError(
            f"{name}: {folder} is not a folder; expected {', '.join(expected)} under it. "
            f"The files are {_SOURCE}"
        )
    for candidate in (
        [folder / rel for rel in expected],
        [folder / Path(rel).name for rel in expected],
    ):
        if all(path.is_file() for path in candidate):
            return candidate
    missing = [rel for rel in expected if not (folder / rel).is_file()]
    own = ", ".join(Path(rel).name for rel in expected)
    raise ValueError(
        f"{name}: expected {', '.join(expected)} under {folder}, or {own} directly in it "
        f"(missing: {', '.join(missing)}). The files are {_SOURCE}"
    )


def _optional(module: str, name: str) -> ModuleType:
    """Import ``module`` (pandas or h5py), which only GAS and BSDS300 need."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{name} is read with {module}, which is not installed: {_TABULAR_EXTRA} "
            f"(or pip install {module})"
        ) from err


def _real_matrix(values: object, path: Path, width: int | None = None) -> np.ndarray:
    """``values`` as a finite float64 array ``(n, D)``, or a ValueError naming ``path``."""
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path} should hold a non-empty table (n, D); got shape {array.shape}")
    if width is not None and array.shape[1] != width:
        raise ValueError(
            f"{path} should have {width} columns, as in MAF's file; got {array.shape[1]}"
        )
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{path} should hold real numbers; got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)  # POWER alone is 130 MB
    if not np.isfinite(array).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return array


def _read_npy(path: Path, width: int) -> np.ndarray:
    """An ``.npy`` file of shape ``(n, width)`` as float64 (no pickled objects)."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read {path} as a .npy array ({err})") from err
    return _real_matrix(values, path, width)


# ----------------------------------------------------------------------------- steps


def _hold_out_tail(rows: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """MAF's split: ``(rows[:-k], rows[-k:])`` with ``k = int(0.1 * n)``, the same float
    expression so that the counts match; refuses ``k = 0`` (``rows[-0:]`` would be all rows)."""
    k = int(0.1 * rows.shape[0])
    if k < 1:
        raise ValueError(
            f"{what}: {rows.shape[0]} rows are too few to hold out 10% of them (10 at least)"
        )
    return rows[:-k], rows[-k:]


def _maf_split(rows: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Test part: the last 10% of ``rows``; validation part: the last 10% of the rest."""
    rest, test = _hold_out_tail(rows, what)
    train, val = _hold_out_tail(rest, what)
    return {"train": train, "val": val, "test": test}


def _need_rows(rows: np.ndarray, what: str) -> None:
    """Refuse fewer than 10 rows, before any statistic: 10% of them must be at least one row."""
    if rows.shape[0] < 10:
        raise ValueError(
            f"{what}: {rows.shape[0]} rows are too few to hold out 10% of them (10 at least)"
        )


def _standardise(
    parts: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray, columns, what: str
) -> dict[str, np.ndarray]:
    """``(x - mean) / std`` for every part ``(n, D)``; ``mean`` and ``std`` are ``(D,)``.

    A zero ``std`` (a constant column) is refused by name: MAF's division would fill that
    column with NaN.
    """
    constant = [str(columns[i]) for i in np.flatnonzero(~(std > 0))]
    if constant:
        raise ValueError(f"{what}: constant column(s) {', '.join(constant)} cannot be scaled")
    return {part: (rows - mean) / std for part, rows in parts.items()}


def _power_parts(raw: np.ndarray) -> dict[str, np.ndarray]:
    """POWER's preprocessing, in MAF's order of random draws.

    ``raw`` ``(N, 8)`` is shuffled by ``RandomState(42)``; columns 1 and 3 are dropped; the
    same generator then draws ``0.01 U`` for voltage, ``0.001 U`` for global active power and
    ``U`` for the three sub-meterings (``U`` uniform on [0, 1)), the time column getting none.
    The noise breaks ties of the meters' discrete readings. Then MAF's split, and standardising
    by the mean and (population) standard deviation of train and validation together.

    Returns:
        ``{"train", "val", "test"}`` arrays ``(n, 6)``.
    """
    _need_rows(raw, "power")
    rng = np.random.RandomState(42)
    data = raw.copy()
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, list(_POWER_DROPPED), axis=1)
    voltage = 0.01 * rng.rand(n, 1)
    active_power = 0.001 * rng.rand(n, 1)
    metering = rng.rand(n, 3)
    data = data + np.hstack([active_power, voltage, metering, np.zeros((n, 1))])
    parts = _maf_split(data, "power")
    fit = np.vstack([parts["train"], parts["val"]])
    return _standardise(parts, fit.mean(axis=0), fit.std(axis=0), _POWER_COLUMNS, "power")


def _drop_correlated(data: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """GAS's column pruning: while some column has a Pearson correlation above 0.98 with
    another, drop the first such column (by position), and every column of the same name,
    as pandas' ``drop`` by label does. ``data`` ``(n, D)``; returns ``(n, D')`` and names."""
    while True:
        if data.shape[1] == 1:
            return data, names
        above = (np.corrcoef(data, rowvar=False) > _GAS_MAX_CORRELATION).sum(axis=1)
        crowded = np.flatnonzero(above > 1)  # the diagonal always counts once
        if crowded.size == 0:
            return data, names
        dropped = names[crowded[0]]
        keep = [i for i, name in enumerate(names) if name != dropped]
        data, names = data[:, keep], [names[i] for i in keep]


def _gas_parts(data: np.ndarray, names: list[str], path: Path) -> tuple[dict, list[str]]:
    """GAS's preprocessing of the pickle's columns ``names`` and values ``data`` ``(N, 19)``.

    Drops ``Meth``, ``Eth`` and ``Time``, then the correlated columns
    (:func:`_drop_correlated`); standardises by the mean and sample standard deviation
    (``ddof=1``, pandas' default) of all rows, before MAF's split. The rows stay in the file's
    (time) order: MAF does not shuffle GAS.
    """
    missing = [name for name in _GAS_DROPPED if name not in names]
    if missing:
        raise ValueError(f"{path} has no column(s) {', '.join(missing)}; columns: {names}")
    keep = [i for i, name in enumerate(names) if name not in _GAS_DROPPED]
    if not keep:
        raise ValueError(f"{path} has no sensor columns besides {', '.join(_GAS_DROPPED)}")
    data, names = data[:, keep], [names[i] for i in keep]
    _need_rows(data, "gas")
    # A constant sensor would make its correlations 0/0: refuse it by name before pruning.
    _standardise({}, data.mean(axis=0), data.std(axis=0, ddof=1), names, "gas")
    data, names = _drop_correlated(data, names)
    scaled = _standardise({"all": data}, data.mean(axis=0), data.std(axis=0, ddof=1), names, "gas")
    return _maf_split(scaled["all"], "gas"), names


def _rare_minimum_columns(train: np.ndarray) -> np.ndarray:
    """HEPMASS's pruning: the indices of the columns of ``train`` ``(n, D)`` whose smallest
    value occurs at most 5 times (MAF drops the others, its near-discrete features)."""
    repeats = (train == train.min(axis=0)).sum(axis=0)
    return np.flatnonzero(repeats <= _HEPMASS_MAX_REPEATS)


def _hepmass_parts(
    train: np.ndarray, test: np.ndarray, names: list[str], paths: list[Path]
) -> tuple[dict, list[str]]:
    """HEPMASS's preprocessing of the two csv files' tables (label first).

    Keeps the signal rows (label 1) and drops the label; drops the test file's last column,
    which the training file lacks. Standardises both files by the training file's mean and
    sample standard deviation (``ddof=1``), drops the near-discrete columns
    (:func:`_rare_minimum_columns`, judged on the training file) and holds out the training
    file's last 10% for validation.
    """
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:-1]
    names = names[1:]
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"{paths[1]} should have one column more than {paths[0]} (MAF drops its last); "
            f"got {test.shape[1] + 2} and {train.shape[1] + 1}"
        )
    if test.shape[0] == 0:
        raise ValueError(f"{paths[1]} has no signal rows (label 1 in the first column)")
    _need_rows(train, f"hepmass: the signal rows of {paths[0]}")
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
    scaled = _standardise({"train": train, "test": test}, mean, std, names, "hepmass")
    keep = _rare_minimum_columns(scaled["train"])
    rest, val = _hold_out_tail(scaled["train"][:, keep], "hepmass")
    parts = {"train": rest, "val": val, "test": scaled["test"][:, keep]}
    return parts, [names[i] for i in keep]


# ----------------------------------------------------------------------------- readers


def _read_gas_pickle(path: Path) -> tuple[np.ndarray, list[str]]:
    """The pickled pandas DataFrame of GAS as ``(values (N, 19) float64, column names)``."""
    pandas = _optional("pandas", "gas")
    try:
        frame = pandas.read_pickle(path)
    # Unpickling a wrong or damaged file fails in many ways (UnpicklingError, EOFError,
    # AttributeError, ModuleNotFoundError, ...); each is the same answer: not MAF's pickle.
    except Exception as err:
        raise ValueError(
            f"cannot read {path} as a pickled pandas DataFrame ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(frame, pandas.DataFrame):
        raise ValueError(f"{path} should hold a pandas DataFrame; it holds a {type(frame)}")
    names = [str(column) for column in frame.columns]
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} has columns that are not numbers ({err})") from err
    return _real_matrix(values, path), names


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """A comma-separated file with one header line (HEPMASS's ``# label,f0,...``) as
    ``(values (n, D) float64, the header's D names without the leading "#")``."""
    try:
        with open(path, encoding="ascii") as file:
            header = file.readline()
        with warnings.catch_warnings():
            # an empty body is refused below, by name, rather than as numpy's UserWarning
            warnings.simplefilter("ignore", UserWarning)
            values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"cannot read {path} as a csv table of numbers ({err})") from err
    names = [name.strip() for name in header.strip().lstrip("#").split(",")]
    if values.size and len(names) != values.shape[1]:
        raise ValueError(
            f"{path}: its header names {len(names)} columns but its rows have {values.shape[1]}"
        )
    return _real_matrix(values, path), names


def _read_bsds300(path: Path) -> dict[str, np.ndarray]:
    """The three datasets ``train``, ``validation`` and ``test`` ``(n, 63)`` of the HDF5 file."""
    h5py = _optional("h5py", "bsds300")
    try:
        with h5py.File(path, "r") as file:
            found = {key: file[key] for key in _BSDS300_PARTS.values() if key in file.keys()}
            absent = [key for key in _BSDS300_PARTS.values() if key not in found]
            if absent or not all(isinstance(found[k], h5py.Dataset) for k in found):
                raise ValueError(
                    f"{path} should hold the datasets train, validation and test; "
                    f"missing or not datasets: {absent or sorted(found)}"
                )
            raw = {part: found[key][()] for part, key in _BSDS300_PARTS.items()}
    except OSError as err:  # h5py's answer to a file that is not HDF5, or is truncated
        raise ValueError(f"cannot read {path} as an HDF5 file ({err})") from err
    return {part: _real_matrix(rows, path, _BSDS300_WIDTH) for part, rows in raw.items()}


# ----------------------------------------------------------------------------- loaders


def _source(name: str, paths: list[Path]) -> str:
    return f"MAF's {name} ({', '.join(str(p) for p in paths)}), preprocessed as MAF and FFJORD"


def load_power(root: str | os.PathLike[str]) -> TabularData:
    """POWER: household electric power, ``D = 6``, from ``<root>/power/data.npy`` ``(N, 8)``.

    Preprocessing (MAF's ``power.py``): see :func:`_power_parts` — a shuffle and uniform noise
    from ``numpy.random.RandomState(42)``, columns 1 and 3 dropped, MAF's split, and
    standardisation by train + validation. Published: 1,659,917 / 184,435 / 204,928 rows.

    Returns:
        :class:`TabularData` with parts ``(n, 6)`` float64.

    Raises:
        ValueError: a missing folder or file, or a file that is not ``(N, 8)`` real numbers.
    """
    paths = _find_files("power", root)
    parts = _power_parts(_read_npy(paths[0], _POWER_RAW_WIDTH))
    return TabularData("power", parts, columns=_POWER_COLUMNS, source=_source("POWER", paths))


def load_gas(root: str | os.PathLike[str]) -> TabularData:
    """GAS: ethylene and CO sensor readings, ``D = 8``, from ``<root>/gas/ethylene_CO.pickle``.

    Preprocessing (MAF's ``gas.py``): see :func:`_gas_parts` — ``Meth``, ``Eth`` and ``Time``
    dropped, then columns correlated above 0.98 one at a time, standardisation by all rows
    (``ddof=1``), MAF's split without a shuffle. Published: 852,174 / 94,685 / 105,206 rows.

    Returns:
        :class:`TabularData` with parts ``(n, 8)`` float64, named by the pickle's columns.

    Raises:
        ImportError: pandas is not installed (``pip install 'cnf[tabular]'``).
        ValueError: a missing file, or one that is not a pickled DataFrame of numbers with
            the columns ``Meth``, ``Eth`` and ``Time``.
    """
    paths = _find_files("gas", root)
    data, names = _read_gas_pickle(paths[0])
    parts, names = _gas_parts(data, names, paths[0])
    return TabularData("gas", parts, columns=names, source=_source("GAS", paths))


def load_hepmass(root: str | os.PathLike[str]) -> TabularData:
    """HEPMASS: particle collisions of mass 1000, ``D = 21``, from ``<root>/hepmass/``'s
    ``1000_train.csv`` and ``1000_test.csv`` (a header line, then the label and features).

    Preprocessing (MAF's ``hepmass.py``): see :func:`_hepmass_parts` — signal rows only, the
    test file's extra last column dropped, standardisation by the training file (``ddof=1``),
    the near-discrete features dropped, the training file's last 10% for validation; the test
    part is the test file. Published: 315,123 / 35,013 / 174,987 rows.

    Returns:
        :class:`TabularData` with parts ``(n, 21)`` float64, named by the csv header.

    Raises:
        ValueError: a missing file, or one that is not a csv of numbers under one header line.
    """
    paths = _find_files("hepmass", root)
    (train, names), (test, _) = _read_csv(paths[0]), _read_csv(paths[1])
    parts, names = _hepmass_parts(train, test, names, paths)
    return TabularData("hepmass", parts, columns=names, source=_source("HEPMASS", paths))


def load_miniboone(root: str | os.PathLike[str]) -> TabularData:
    """MINIBOONE: particle identification, ``D = 43``, from ``<root>/miniboone/data.npy``.

    Preprocessing (MAF's ``miniboone.py``; its outliers and discrete columns were removed
    before the file was saved): MAF's split of the file's rows in their order, then
    standardisation by the mean and population standard deviation of train + validation.
    Published: 29,556 / 3,284 / 3,648 rows.

    Returns:
        :class:`TabularData` with parts ``(n, 43)`` float64.

    Raises:
        ValueError: a missing file, or one that is not ``(N, 43)`` real numbers.
    """
    paths = _find_files("miniboone", root)
    data = _read_npy(paths[0], _MINIBOONE_WIDTH)
    _need_rows(data, "miniboone")
    parts = _maf_split(data, "miniboone")
    fit = np.vstack([parts["train"], parts["val"]])
    columns = [f"x{i}" for i in range(data.shape[1])]
    parts = _standardise(parts, fit.mean(axis=0), fit.std(axis=0), columns, "miniboone")
    return TabularData("miniboone", parts, source=_source("MINIBOONE", paths))


def load_bsds300(root: str | os.PathLike[str]) -> TabularData:
    """BSDS300: 8x8 patches of natural images with the last pixel left out, ``D = 63``, from
    ``<root>/BSDS300/BSDS300.hdf5``, used as stored (MAF did all preprocessing beforehand).

    Published: 1,000,000 / 50,000 / 250,000 rows (the file's ``train``, ``validation`` and
    ``test``).

    Returns:
        :class:`TabularData` with parts ``(n, 63)`` float64.

    Raises:
        ImportError: h5py is not installed (``pip install 'cnf[tabular]'``).
        ValueError: a missing file, one that is not HDF5, or lacks one of the three datasets.
    """
    paths = _find_files("bsds300", root)
    parts = _read_bsds300(paths[0])
    return TabularData("bsds300", parts, source=_source("BSDS300", paths))


def load_benchmark(name: str, root: str | os.PathLike[str]) -> TabularData:
    """The benchmark ``name`` (one of :data:`BENCHMARK_NAMES`) from MAF's files under ``root``.

    Raises:
        ValueError: an unknown name, or the errors of the set's loader.
        ImportError: the set needs pandas or h5py and it is not installed.
    """
    loaders = {
        "power": load_power,
        "gas": load_gas,
        "hepmass": load_hepmass,
        "miniboone": load_miniboone,
        "bsds300": load_bsds300,
    }
    if name not in loaders:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARK_NAMES)}")
    return loaders[name](root)
