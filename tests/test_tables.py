"""A user's own data: files of every format, their errors, the seeded split, the tabular model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnf import recipes
from cnf.data import TabularData, load_file, read_table, split_rows
from cnf.models import (
    build,
    exact_trace_affordable,
    fit_standardization,
    tabular_spec,
    trace_reason,
)

pytestmark = pytest.mark.deadline(60)

ROWS = np.array([[1.5, -2.0, 3e3], [0.25, 4.0, -1e-3], [7.0, 8.5, 9.0], [1e-8, 2.0, 5.0]])


def _csv(path, text: str):
    path.write_text(text)
    return path


# --- formats -----------------------------------------------------------------------------------


def test_every_format_reads_the_same_rows(tmp_path):
    t = torch.as_tensor(ROWS)
    np.save(tmp_path / "a.npy", ROWS)
    np.savez(tmp_path / "b.npz", ROWS)
    np.savez(tmp_path / "c.npz", data=ROWS, labels=np.arange(4))
    torch.save(t, tmp_path / "d.pt")
    torch.save({"data": t, "labels": torch.arange(4)}, tmp_path / "e.pt")
    lines = [",".join(repr(float(v)) for v in row) for row in ROWS]
    _csv(tmp_path / "f.csv", "\n".join(lines) + "\n")
    _csv(tmp_path / "g.csv", "# measured\nu, v ,w\n" + "\n\n".join(lines) + "\n")
    _csv(tmp_path / "h.tsv", "\n".join(line.replace(",", "\t") for line in lines))
    _csv(tmp_path / "i.csv", "\n".join(line.replace(",", ";") for line in lines))
    for name in ("a.npy", "b.npz", "c.npz", "d.pt", "e.pt", "f.csv", "g.csv", "h.tsv", "i.csv"):
        table = read_table(tmp_path / name)
        np.testing.assert_array_equal(table.values, ROWS, err_msg=name)
        assert table.values.dtype == np.float64 and table.dropped == 0
    assert read_table(tmp_path / "g.csv").columns == ("u", "v", "w")
    assert read_table(tmp_path / "a.npy").columns == ("x0", "x1", "x2")


def test_one_column_and_integer_arrays(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(5))
    table = read_table(tmp_path / "a.npy")
    assert table.values.shape == (5, 1) and table.values.dtype == np.float64


def test_columns_pick_by_name_or_index_in_the_order_given(tmp_path):
    path = _csv(tmp_path / "a.csv", "id,x,y\nr1,1,10\nr2,2,20\n")
    for columns in (["y", "x"], [2, 1], ["2", "x"]):
        table = read_table(path, columns=columns)
        np.testing.assert_array_equal(table.values, [[10, 1], [20, 2]])
        assert table.columns == ("y", "x")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, columns, match",
    [
        ("id,x\nr1,1\nr2,2\n", None, r"'id' are not numeric \(row 0 \(0-based; line 2 of the "),
        (
            "x,y\n1,2\n3,oops\n",
            None,
            r"row 1 \(0-based; line 3 of the file\), column 'y' holds 'oops'",
        ),
        ("x,y\n1,2\n3,\n", None, r"1 row\(s\) hold NaN.*row 1 .*line 3.*column 'y'"),
        ("x,y\n1,2\n3,inf\n", None, r"row 1 .*column 'y' \(inf\).*--drop-nonfinite"),
        ("x,y\n1,2\nnan,4\n", None, r"column 'x'"),
        ("x,y\n1,2\n", ["z"], "no column 'z'; its columns are x, y"),
        ("x,y\n1,2\n", [5], "no column 5; it has 2"),
        ("x,y\n1,2\n", ["x", 0], "name a column twice"),
        ("x,y\n1,2\n3\n", None, "line 3 has 1 fields, the first line 2"),
        ("x,y\n", None, "a header but no rows"),
        ("\n# nothing\n", None, "holds no rows"),
    ],
)
def test_bad_csv_files_name_the_row_and_column(tmp_path, text, columns, match):
    path = _csv(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=match):
        read_table(path, columns=columns)


def test_rows_with_nan_inf_or_missing_values_can_be_dropped(tmp_path):
    path = _csv(tmp_path / "a.csv", "x,y\n1,2\n3,\nnan,4\n5,6\n7,-inf\n8,9\n")
    table = read_table(path, drop_nonfinite=True)
    np.testing.assert_array_equal(table.values, [[1, 2], [5, 6], [8, 9]])
    assert table.dropped == 3
    with pytest.raises(ValueError, match="no rows left after dropping"):
        read_table(_csv(tmp_path / "b.csv", "x\nnan\n"), drop_nonfinite=True)


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 2, 2))), r"shape \(2, 2, 2\)"),
        (lambda p: np.save(p.with_suffix(".npy"), np.ones(3, complex)), "complex128 values"),
        (lambda p: np.save(p.with_suffix(".npy"), np.ones(3, bool)), "bool values"),
        (lambda p: np.save(p.with_suffix(".npy"), np.array([{}]), allow_pickle=True), "objects"),
        (lambda p: p.with_suffix(".npy").write_bytes(b"\x93NUMPY garbage"), "not a readable"),
        (lambda p: np.savez(p.with_suffix(".npz"), a=np.ones(2), b=np.ones(2)), "2 arrays"),
        (lambda p: p.with_suffix(".npz").write_bytes(b"PK junk"), "not a readable .npz"),
        (lambda p: p.with_suffix(".pt").write_bytes(b"junk"), "not a readable tensor file"),
        (lambda p: torch.save([1, 2], p.with_suffix(".pt")), "holds a list"),
        (lambda p: torch.save(torch.ones(2, dtype=torch.cfloat), p.with_suffix(".pt")), "complex"),
        (lambda p: p.with_suffix(".csv").write_bytes(b"\xff\xfe\x00"), "not a text file"),
        (lambda p: p.with_suffix(".xlsx").write_bytes(b""), r"cannot read \.xlsx"),
    ],
)
def test_bad_files_are_named_with_the_reason(tmp_path, write, match):
    stem = tmp_path / "bad"
    write(stem)
    (path,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match=match):
        read_table(path)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_table(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="is not a file"):
        read_table(tmp_path)


# --- the split ---------------------------------------------------------------------------------


def test_the_split_is_seeded_disjoint_and_complete():
    parts = split_rows(1000, seed=3)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [800, 100, 100]
    joined = np.concatenate(list(parts.values()))
    np.testing.assert_array_equal(np.sort(joined), np.arange(1000))
    again, other = split_rows(1000, seed=3), split_rows(1000, seed=4)
    assert all(np.array_equal(parts[p], again[p]) for p in parts)
    assert not np.array_equal(parts["test"], other["test"])
    small = split_rows(4, seed=0)
    assert [len(small[p]) for p in ("train", "val", "test")] == [2, 1, 1]
    with pytest.raises(ValueError, match="3 rows are too few to split"):
        split_rows(3, seed=0)


def test_load_file_splits_the_rows_of_the_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "x.npy", x)
    data = load_file(tmp_path / "x.npy", seed=1)
    assert isinstance(data, TabularData) and data.dim == 3 and data.name == "x"
    parts = [data.part(p).numpy() for p in ("train", "val", "test")]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts), axis=0), np.sort(x, axis=0))
    assert data.sizes == {"train": 40, "val": 5, "test": 5}
    assert torch.equal(data.sampler(), data.part("train"))  # fit shuffles it by epochs
    with pytest.raises(ValueError, match="does not apply to tables"):
        data.sampler(translate=0.5)


# --- the model ---------------------------------------------------------------------------------


def test_the_exact_trace_is_the_default_where_it_is_affordable():
    assert exact_trace_affordable(256, [1024, 1024]) and exact_trace_affordable(4, [8, 8, 8])
    assert not exact_trace_affordable(8, [80, 80, 80])
    assert tabular_spec(63, hidden_factor=10)["trace"] == "exact"
    assert tabular_spec(21, hidden=[64, 64, 64])["trace"] == "hutchinson"
    assert tabular_spec(21, hidden=[64, 64, 64], trace="exact")["trace"] == "exact"
    assert tabular_spec(5, hidden_factor=20, layers=3)["hidden"] == [100, 100, 100]
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        tabular_spec(0)
    assert "costs no more than Hutchinson's" in trace_reason(63, [64, 64])
    assert "D x D product per row at D = 21" in trace_reason(21, [64, 64, 64])


def test_log_prob_in_data_units_is_the_standardized_models_plus_the_affine_logdet():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64) * torch.tensor([1e3, 1e-2, 1.0])
    x = x + torch.tensor([5e4, 0.0, -3.0], dtype=torch.float64)
    spec = tabular_spec(3, hidden=[16, 16], rtol=1e-9, atol=1e-9, dtype="float64")
    torch.manual_seed(0)
    model = fit_standardization(build(spec), x[:200])
    mean, std = x[:200].mean(0), x[:200].std(0)
    torch.manual_seed(0)
    inner = build({**spec, "standardize": False})
    expected = inner.log_prob((x[200:] - mean) / std) - std.log().sum()
    torch.testing.assert_close(model.log_prob(x[200:]), expected, rtol=0, atol=1e-8)


def test_a_constant_column_cannot_be_standardized_and_is_named(tmp_path):
    x = np.column_stack([np.arange(10.0), np.full(10, 4.0), np.arange(10.0) ** 2])
    np.save(tmp_path / "c.npy", x)
    data = recipes.get("file").load(tmp_path / "c.npy")
    with pytest.raises(ValueError, match=r"column\(s\) \['x1'\] are constant"):
        recipes.get("file").new_model(data)


def test_the_few_lines_of_python_train_what_cnf_train_trains(tmp_path):
    """The docstring of Recipe.new_model and ``cnf train --data FILE`` give the same weights."""
    from cnf.cli import main
    from cnf.training import fit, load

    x = np.random.default_rng(0).normal(size=(120, 2)) * [100.0, 0.1]
    np.save(tmp_path / "mine.npy", x)
    argv = ["train", "--data", str(tmp_path / "mine.npy"), "--out", str(tmp_path / "run"),
            "--hidden", "8", "--iters", "3", "--eval-every", "2", "--quiet",
            "--no-plot"]  # fmt: skip
    assert main(argv) == 0

    recipe = recipes.get("file")
    data = recipe.load(tmp_path / "mine.npy")
    torch.manual_seed(0)
    model = recipe.new_model(data, hidden=[8])
    options = recipe.fit_options(iters=3, eval_every=2, progress=False)
    fit(model, data.sampler(), **options, checkpoint_dir=tmp_path / "py",
        **recipe.validation(data.part("val")))  # fmt: skip
    expected = load(tmp_path / "run" / "last.pt").state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, expected[name]), name


def test_recipes_of_the_benchmarks_follow_ffjord():
    power, hepmass = recipes.get("power"), recipes.get("hepmass")
    assert power.spec()["hidden"] == [60, 60, 60] and power.spec()["blocks"] == 5
    assert power.spec()["activation"] == "tanh" and power.spec()["trace"] == "hutchinson"
    assert hepmass.spec()["hidden"] == [210, 210] and hepmass.spec()["blocks"] == 10
    assert recipes.get("bsds300").spec()["dim"] == 63
    assert power.fit_options()["batch_size"] == 10000 and power.fit_options()["lr"] == 1e-3
    assert power.evaluation.trace == "exact"  # FFJORD's test used the brute-force trace
    with pytest.raises(ValueError, match="power has 6 columns, not dim=5"):
        power.spec(dim=5)
    with pytest.raises(ValueError, match="file: pass dim"):
        recipes.get("file").spec()
    with pytest.raises(ValueError, match="fixed by MAF's preprocessing"):
        power.load("somewhere", split_seed=1)


def test_a_tables_density_integrates_to_one_in_its_units():
    """A 1-D table in thousands: the model's density, standardization included, integrates
    to one on a grid in the data's own units (an untrained CNF is still a density)."""
    x = np.random.default_rng(1).normal(2e3, 300.0, size=(200, 1))
    data = TabularData("one", {"train": x[:160], "val": x[160:180], "test": x[180:]})
    torch.manual_seed(0)
    model = recipes.get("file").new_model(data, hidden=[16, 16], tol=1e-8, dtype="float64")
    grid = torch.linspace(2e3 - 3e3, 2e3 + 3e3, 4001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        density = model.log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=2e-4)
    assert math.isfinite(density.max().item())
