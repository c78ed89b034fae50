"""MAF's tabular benchmarks (cnf.data.benchmarks) on small files written in each real format.

Each preprocessing step is checked against a plain re-computation written here, on data built
so that the step matters (a correlated pair for GAS, near-discrete columns for HEPMASS, ...),
and every malformed input must end in a ValueError (or ImportError) that names the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cnf.data import (
    BENCHMARK_FILES,
    BENCHMARK_NAMES,
    PUBLISHED_SHAPES,
    load_benchmark,
    load_bsds300,
    load_gas,
    load_hepmass,
    load_miniboone,
    load_power,
)

pandas = pytest.importorskip("pandas")
h5py = pytest.importorskip("h5py")

pytestmark = pytest.mark.deadline(30)

HEPMASS_FEATURES = [f"f{i}" for i in range(27)]
# MAF's pickle names the sensors' columns itself and they are not documented; the loader keeps
# whatever names it finds, so these stand in for them.
GAS_SENSORS = [f"sensor_{i}" for i in range(16)]


def parts_of(data) -> dict[str, np.ndarray]:
    return {part: rows.numpy() for part, rows in data.parts.items()}


def maf_split(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The last 10% (rounded down) for test, the last 10% of the rest for validation."""
    n_test = len(rows) // 10
    rest, test = rows[: len(rows) - n_test], rows[len(rows) - n_test :]
    n_val = len(rest) // 10
    return {"train": rest[: len(rest) - n_val], "val": rest[len(rest) - n_val :], "test": test}


def assert_parts(data, expected: dict[str, np.ndarray]) -> None:
    for part, rows in expected.items():
        np.testing.assert_allclose(data.parts[part].numpy(), rows, rtol=0, atol=1e-12)


def write_npy(root: Path, rel: str, values: np.ndarray) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return path


def write_gas(root: Path, frame) -> Path:
    path = root / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_pickle(path)
    return path


def write_csv(path: Path, names: list[str], rows: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(names)] + [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_bsds300(root: Path, sizes=(30, 4, 6), width: int = 63, keys=None) -> dict:
    rng = np.random.default_rng(3)
    values = {
        key: rng.normal(size=(n, width)) for key, n in zip(("train", "validation", "test"), sizes)
    }
    path = root / "BSDS300" / "BSDS300.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for key in keys if keys is not None else values:
            file[key] = values[key]
    return values


# ----------------------------------------------------------------------------- POWER


def test_power_is_shuffled_and_noised_with_seed_42_in_mafs_order(tmp_path):
    raw = np.random.default_rng(0).integers(0, 50, size=(40, 8)).astype(np.float64)
    write_npy(tmp_path, "power/data.npy", raw)

    # The same draws, taken plainly: a permutation of row indices, then the noise columns in
    # the order MAF draws them (voltage, active power, sub-meterings), placed column by column.
    rng = np.random.RandomState(42)
    order = np.arange(40)
    rng.shuffle(order)
    rows = raw[order]
    voltage, active = 0.01 * rng.rand(40, 1), 0.001 * rng.rand(40, 1)
    metering = rng.rand(40, 3)
    kept = np.column_stack(
        [rows[:, 0] + active[:, 0], rows[:, 2] + voltage[:, 0], rows[:, 4:7] + metering, rows[:, 7]]
    )
    split = maf_split(kept)
    fit = np.vstack([split["train"], split["val"]])
    expected = {part: (v - fit.mean(axis=0)) / fit.std(axis=0) for part, v in split.items()}

    data = load_power(tmp_path)
    assert data.name == "power" and data.dim == 6
    assert data.sizes == {"train": 33, "val": 3, "test": 4}
    assert data.columns[1] == "voltage" and data.columns[-1] == "time"
    assert_parts(data, expected)


def is_affine_image(values: np.ndarray, of: np.ndarray) -> bool:
    """Whether sorted ``values`` are ``a + b * sorted(of)``: the same numbers, rescaled."""
    v, o = np.sort(values), np.sort(of)
    return bool(np.allclose(v, v[0] + (v[-1] - v[0]) / (o[-1] - o[0]) * (o - o[0]), atol=1e-9))


def test_power_time_column_gets_no_noise_and_the_others_do(tmp_path):
    raw = np.random.default_rng(1).normal(size=(25, 8))
    write_npy(tmp_path, "power/data.npy", raw)
    parts = parts_of(load_power(tmp_path))
    fit = np.vstack([parts["train"], parts["val"]])  # standardised by these rows
    np.testing.assert_allclose(fit.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(fit.std(axis=0), 1, atol=1e-12)
    every = np.vstack([parts[p] for p in ("train", "val", "test")])
    assert is_affine_image(every[:, 5], raw[:, 7])  # time: the raw values, rescaled
    assert not is_affine_image(every[:, 2], raw[:, 4])  # sub-metering 1: noise U[0, 1) added


def test_power_reads_its_own_folder_too(tmp_path):
    write_npy(tmp_path, "power/data.npy", np.random.default_rng(2).normal(size=(30, 8)))
    a, b = load_power(tmp_path), load_power(tmp_path / "power")
    assert_parts(b, parts_of(a))


# ----------------------------------------------------------------------------- GAS


def gas_frame(sensors: np.ndarray, names: list[str]):
    n = len(sensors)
    meta = np.column_stack([np.arange(n), np.linspace(0, 1, n) ** 2, np.cos(np.arange(n))])
    return pandas.DataFrame(
        np.column_stack([meta, sensors]), columns=["Time", "Meth", "Eth", *names]
    )


def test_gas_drops_the_first_of_a_correlated_pair_then_standardises_all_rows(tmp_path):
    rng = np.random.default_rng(4)
    a, b, d = rng.normal(size=(3, 60))
    c = 3 * a + 0.01 * rng.normal(size=60)  # correlation with a above 0.98
    write_gas(tmp_path, gas_frame(np.column_stack([a, b, c, d]), ["A", "B", "C", "D"]))

    data = load_gas(tmp_path)
    # MAF drops the first column whose row of the correlation matrix has two entries > 0.98:
    # A (its pair C comes later); the rows keep their (time) order, with no shuffle.
    assert data.columns == ("B", "C", "D")
    kept = np.column_stack([b, c, d])
    scaled = (kept - kept.mean(axis=0)) / kept.std(axis=0, ddof=1)
    assert data.sizes == {"train": 49, "val": 5, "test": 6}
    assert_parts(data, maf_split(scaled))


def test_gas_prunes_one_column_at_a_time_to_eight_of_sixteen_sensors(tmp_path):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(80, 8))
    twins = base + 0.01 * rng.normal(size=(80, 8))  # each sensor has a near copy
    write_gas(tmp_path, gas_frame(np.column_stack([base, twins]), GAS_SENSORS))
    data = load_gas(tmp_path)
    assert data.dim == 8 == PUBLISHED_SHAPES["gas"][0]
    assert data.columns == tuple(GAS_SENSORS[8:])  # the first of each pair went


def test_gas_three_correlated_columns_lose_two(tmp_path):
    rng = np.random.default_rng(6)
    a, other = rng.normal(size=(2, 50))
    trio = [a, 2 * a + 0.005 * rng.normal(size=50), -a + 0.005 * rng.normal(size=50)]
    write_gas(tmp_path, gas_frame(np.column_stack([*trio, other]), ["P", "Q", "R", "S"]))
    # -a is anti-correlated (below 0.98): R survives; of P and Q the first, P, goes.
    assert load_gas(tmp_path).columns == ("Q", "R", "S")


def test_gas_drops_every_column_of_a_duplicated_name_as_pandas_does(tmp_path):
    rng = np.random.default_rng(7)
    a, b, c = rng.normal(size=(3, 40))
    sensors = np.column_stack([a, b, a + 0.001 * c, c])
    write_gas(tmp_path, gas_frame(sensors, ["T", "T", "X", "Y"]))
    assert load_gas(tmp_path).columns == ("X", "Y")


# ----------------------------------------------------------------------------- HEPMASS


def hepmass_tables(rng, n_train: int = 120, n_test: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Label, then 27 features of which six are near-discrete (their smallest value repeats):
    like HEPMASS's jet count and b-tags. The test file carries one more column, a mass."""

    def table(n: int) -> np.ndarray:
        features = rng.normal(size=(n, 27))
        features[:, [5, 9, 13, 17, 21, 22]] = rng.integers(0, 3, size=(n, 6))
        labels = (np.arange(n) % 3 != 0).astype(np.float64)  # a third is background
        return np.column_stack([labels, features])

    return table(n_train), np.column_stack([table(n_test), np.full(n_test, 1000.0)])


def write_hepmass(root: Path, train: np.ndarray, test: np.ndarray) -> None:
    write_csv(root / "hepmass" / "1000_train.csv", ["# label", *HEPMASS_FEATURES], train)
    write_csv(root / "hepmass" / "1000_test.csv", ["# label", *HEPMASS_FEATURES, "mass"], test)


def test_hepmass_keeps_signal_drops_near_discrete_features_and_scales_by_train(tmp_path):
    rng = np.random.default_rng(8)
    train, test = hepmass_tables(rng)
    signal_rows = np.flatnonzero(train[:, 0] == 1)
    train[signal_rows[:6], 2] = -9.0  # feature f1: its minimum 6 times: dropped too ...
    train[signal_rows[10:15], 3] = -9.0  # ... f2's only 5 times: kept
    train[train[:, 0] == 0, 3] = -20.0  # (background rows do not count)
    write_hepmass(tmp_path, train, test)

    signal, signal_test = train[train[:, 0] == 1, 1:], test[test[:, 0] == 1, 1:-1]
    mean, std = signal.mean(axis=0), signal.std(axis=0, ddof=1)
    keep = [i for i in range(27) if i not in (1, 5, 9, 13, 17, 21, 22)]
    scaled = ((signal - mean) / std)[:, keep]
    n_val = len(scaled) // 10
    expected = {
        "train": scaled[: len(scaled) - n_val],
        "val": scaled[len(scaled) - n_val :],
        "test": ((signal_test - mean) / std)[:, keep],
    }
    data = load_hepmass(tmp_path)
    assert data.dim == 20 and data.columns == tuple(HEPMASS_FEATURES[i] for i in keep)
    assert data.sizes == {"train": 72, "val": 8, "test": 40}
    assert_parts(data, expected)


def test_hepmass_has_twenty_one_dimensions_like_the_real_set(tmp_path):
    train, test = hepmass_tables(np.random.default_rng(9))
    write_hepmass(tmp_path, train, test)
    assert load_hepmass(tmp_path).dim == 21 == PUBLISHED_SHAPES["hepmass"][0]


# ----------------------------------------------------------------------------- MINIBOONE, BSDS300


def test_miniboone_splits_in_file_order_and_scales_by_train_and_val(tmp_path):
    raw = np.random.default_rng(10).gamma(2.0, size=(50, 43))
    write_npy(tmp_path, "miniboone/data.npy", raw)
    split = maf_split(raw)
    fit = np.vstack([split["train"], split["val"]])
    data = load_miniboone(tmp_path)
    assert data.dim == 43 and data.sizes == {"train": 41, "val": 4, "test": 5}
    assert_parts(data, {p: (v - fit.mean(axis=0)) / fit.std(axis=0) for p, v in split.items()})


def test_bsds300_parts_are_the_files_datasets_unchanged(tmp_path):
    values = write_bsds300(tmp_path)
    data = load_benchmark("bsds300", tmp_path / "BSDS300")
    assert data.dim == 63 and data.sizes == {"train": 30, "val": 4, "test": 6}
    assert_parts(
        data, {"train": values["train"], "val": values["validation"], "test": values["test"]}
    )


def test_the_constants_describe_the_five_sets():
    assert tuple(BENCHMARK_FILES) == BENCHMARK_NAMES == tuple(PUBLISHED_SHAPES)
    assert [shape[0] for shape in PUBLISHED_SHAPES.values()] == [6, 8, 21, 43, 63]
    with pytest.raises(ValueError, match="unknown benchmark 'cifar'.*power, gas"):
        load_benchmark("cifar", ".")


# ----------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_a_missing_file_names_the_files_the_folder_and_where_to_get_them(tmp_path, name):
    with pytest.raises(ValueError) as info:
        load_benchmark(name, tmp_path)
    message = str(info.value)
    for rel in BENCHMARK_FILES[name]:
        assert rel in message
    assert str(tmp_path) in message and "zenodo.org/record/1161203" in message
    assert "<root>/power/data.npy" in message


def test_a_missing_root_says_it_is_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere is not a folder; expected power/data\.npy"):
        load_power(tmp_path / "nowhere")


def test_hepmass_without_its_test_file_says_which_one_is_missing(tmp_path):
    train, _ = hepmass_tables(np.random.default_rng(11))
    write_csv(tmp_path / "hepmass" / "1000_train.csv", ["# label", *HEPMASS_FEATURES], train)
    with pytest.raises(ValueError, match=r"missing: hepmass/1000_test\.csv\)"):
        load_hepmass(tmp_path)


# ----------------------------------------------------------------------------- malformed files


def corrupt_npy(path: Path, how: str) -> None:
    if how == "text":
        path.write_text("this is not a numpy file\n")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "1-d":
        np.save(path, np.arange(30.0))
    elif how == "strings":
        np.save(path, np.full((30, 8), "x"))
    elif how == "objects":
        np.save(path, np.empty((30, 8), dtype=object), allow_pickle=True)
    elif how == "nan":
        values = np.ones((30, 8))
        values[3, 2] = np.nan
        np.save(path, values)


@pytest.mark.parametrize(
    "how, says",
    [
        ("text", "cannot read .* as a .npy array"),
        ("truncated", "cannot read .* as a .npy array"),
        ("1-d", r"should hold a non-empty table \(n, D\); got shape \(30,\)"),
        ("strings", "should hold real numbers; got dtype <U1"),
        ("objects", "cannot read .* as a .npy array"),
        ("nan", "contains NaN or infinite values"),
    ],
)
def test_a_malformed_npy_file_is_a_value_error_naming_it(tmp_path, how, says):
    path = write_npy(tmp_path, "power/data.npy", np.random.default_rng(12).normal(size=(30, 8)))
    corrupt_npy(path, how)
    with pytest.raises(ValueError, match=says) as info:
        load_power(tmp_path)
    assert str(path) in str(info.value)


def test_npy_files_of_the_wrong_width_are_refused(tmp_path):
    write_npy(tmp_path, "power/data.npy", np.ones((30, 7)))
    write_npy(tmp_path, "miniboone/data.npy", np.ones((30, 42)))
    with pytest.raises(ValueError, match="should have 8 columns, as in MAF's file; got 7"):
        load_power(tmp_path)
    with pytest.raises(ValueError, match="should have 43 columns, as in MAF's file; got 42"):
        load_miniboone(tmp_path)


def test_too_few_rows_for_a_ten_percent_part_are_refused(tmp_path):
    write_npy(tmp_path, "power/data.npy", np.random.default_rng(13).normal(size=(9, 8)))
    with pytest.raises(ValueError, match="power: 9 rows are too few to hold out 10%"):
        load_power(tmp_path)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"\x80\x04garbage", "cannot read .* as a pickled pandas DataFrame"),
        (b"", "cannot read .* as a pickled pandas DataFrame"),
        ("a list", "should hold a pandas DataFrame"),
    ],
)
def test_a_gas_file_that_is_not_a_pickled_frame_is_a_value_error(tmp_path, content, says):
    path = tmp_path / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pandas.to_pickle([1, 2, 3], path)
    with pytest.raises(ValueError, match=says) as info:
        load_gas(tmp_path)
    assert str(path) in str(info.value)


def test_gas_without_its_columns_or_with_text_or_a_constant_sensor_is_refused(tmp_path):
    rng = np.random.default_rng(14)
    frame = gas_frame(rng.normal(size=(40, 3)), ["A", "B", "C"])
    write_gas(tmp_path, frame.drop(columns="Meth"))
    with pytest.raises(ValueError, match=r"has no column\(s\) Meth; columns: \['Time'"):
        load_gas(tmp_path)
    write_gas(tmp_path, frame.assign(B="text"))
    with pytest.raises(ValueError, match="has columns that are not numbers"):
        load_gas(tmp_path)
    write_gas(tmp_path, frame.assign(B=1.5))
    with pytest.raises(ValueError, match=r"gas: constant column\(s\) B cannot be scaled"):
        load_gas(tmp_path)


def test_malformed_hepmass_csv_files_are_value_errors_naming_them(tmp_path):
    train, test = hepmass_tables(np.random.default_rng(15))
    write_hepmass(tmp_path, train, test)
    path = tmp_path / "hepmass" / "1000_train.csv"
    text = path.read_text()
    path.write_text(text[: len(text) - 30])  # a download cut mid-row
    with pytest.raises(ValueError, match="cannot read .*1000_train.csv as a csv table"):
        load_hepmass(tmp_path)
    write_csv(path, ["# label", *HEPMASS_FEATURES[:-1]], train)
    with pytest.raises(ValueError, match="header names 27 columns but its rows have 28"):
        load_hepmass(tmp_path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="cannot read .*1000_train.csv as a csv table"):
        load_hepmass(tmp_path)
    path.write_text("# label,f0\n")
    with pytest.raises(ValueError, match=r"1000_train.csv should hold a non-empty table"):
        load_hepmass(tmp_path)


def test_hepmass_test_file_must_carry_the_extra_column_maf_drops(tmp_path):
    train, test = hepmass_tables(np.random.default_rng(16))
    write_hepmass(tmp_path, train, test)
    # a test file shaped like the training file
    write_csv(tmp_path / "hepmass" / "1000_test.csv", ["# label", *HEPMASS_FEATURES], train)
    with pytest.raises(ValueError, match="1000_test.csv should have one column more"):
        load_hepmass(tmp_path)


@pytest.mark.parametrize(
    "damage, says",
    [
        ("not hdf5", "cannot read .* as an HDF5 file"),
        ("truncated", "cannot read .* as an HDF5 file"),
        ("no validation", r"train, validation and test; missing or not datasets: \['validation'\]"),
        ("narrow", "should have 63 columns"),
    ],
)
def test_a_malformed_bsds300_file_is_a_value_error_naming_it(tmp_path, damage, says):
    path = tmp_path / "BSDS300" / "BSDS300.hdf5"
    if damage == "no validation":
        write_bsds300(tmp_path, keys=("train", "test"))
    else:
        write_bsds300(tmp_path, width=62 if damage == "narrow" else 63)
    if damage == "not hdf5":
        path.write_text("plain text")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ValueError, match=says) as info:
        load_bsds300(tmp_path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- optional modules


@pytest.mark.parametrize("module, name", [("pandas", "gas"), ("h5py", "bsds300")])
def test_a_missing_optional_module_says_how_to_install_it(tmp_path, monkeypatch, module, name):
    write_gas(tmp_path, gas_frame(np.random.default_rng(17).normal(size=(30, 2)), ["A", "B"]))
    write_bsds300(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import now fails, as if not installed
    with pytest.raises(
        ImportError, match=rf"pip install 'cnf\[tabular\]' \(or pip install {module}"
    ):
        load_benchmark(name, tmp_path)
