"""``cnf train --data FILE`` and the commands on its checkpoints: a CSV from training to
evaluation to samples, in the data's own units; every bad input refused before any training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cnf.cli import main
from cnf.recipes import Record
from cnf.training import load_checkpoint

pytestmark = pytest.mark.deadline(120)

QUICK = ["--hidden", "8", "--iters", "4", "--eval-every", "2", "--quiet", "--no-plot"]


def _write_csv(path, n=200, seed=0, extra_text_column=True):
    """Rows of (an id,) a column in thousands, one in thousandths and a skewed one."""
    rng = np.random.default_rng(seed)
    a = rng.normal(2000.0, 300.0, n)
    b = 1e-6 * a + rng.normal(0.0, 1e-4, n)
    c = rng.exponential(3.0, n)
    lines = ["id,height,ratio,score"] if extra_text_column else ["height,ratio,score"]
    for i in range(n):
        row = f"{a[i]:.4f},{b[i]:.8f},{c[i]:.4f}"
        lines.append(f"r{i},{row}" if extra_text_column else row)
    path.write_text("\n".join(lines) + "\n")
    return np.column_stack([a, b, c])


def _train(tmp_path, *extra, data=None):
    csv = data or tmp_path / "m.csv"
    return main(["train", "--data", str(csv), "--out", str(tmp_path / "run"), *QUICK, *extra])


def test_a_csv_from_training_to_evaluation_to_samples(tmp_path, capsys):
    rows = _write_csv(tmp_path / "m.csv")
    assert _train(tmp_path, "--columns", "height,ratio,score", "--split-seed", "3") == 0
    out = capsys.readouterr().out
    assert "on m (160 train / 20 val / 20 test rows of 3 columns" in out and "trace exact" in out

    state = load_checkpoint(tmp_path / "run" / "best.pt")
    record = Record.from_checkpoint(state)
    assert record.name == "file" and record.split_seed == 3
    assert record.root == str((tmp_path / "m.csv").resolve())
    assert record.options == {"columns": ["height", "ratio", "score"]}
    assert state["columns"] == ["height", "ratio", "score"] and state["spec"]["dim"] == 3
    mean = state["model"]["transform.steps.0.mean"]  # fitted to the training rows
    train = record.load().part("train")
    torch.testing.assert_close(mean, train.mean(0).to(mean.dtype))
    assert torch.equal(mean, state["ema"]["transform.steps.0.mean"])

    js = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["n"] == 20 and result["split_seed"] == 3 and np.isfinite(result["nll"])
    # in the data's units: the NLL carries log(300) + log(1e-4) + log(3) of the columns' scales
    assert 0.0 < result["nll"] < 20.0

    _write_csv(tmp_path / "new.csv", n=30, seed=9)
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                 "--data", str(tmp_path / "new.csv")]) == 0  # fmt: skip
    assert "new.csv: test NLL" in capsys.readouterr().out

    samples = tmp_path / "s.csv"
    assert main(["sample", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--n", "500",
                 "--out", str(samples)]) == 0  # fmt: skip
    assert samples.read_text().splitlines()[0] == "height,ratio,score"
    drawn = np.loadtxt(samples, delimiter=",", skiprows=1)
    assert drawn.shape == (500, 3)
    # samples in the data's units: the column in thousands stays in thousands
    assert abs(np.median(drawn[:, 0]) - np.median(rows[:, 0])) < 600
    assert np.median(np.abs(drawn[:, 1])) < 1e-2
    assert main(["sample", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--n", "3",
                 "--out", str(tmp_path / "s.npy")]) == 0  # fmt: skip
    assert np.load(tmp_path / "s.npy").shape == (3, 3)


def test_the_split_seed_changes_the_split_and_the_model_keeps_the_data_units(tmp_path):
    _write_csv(tmp_path / "m.csv", extra_text_column=False)
    for seed in ("0", "1"):
        out = tmp_path / f"run{seed}"
        argv = ["train", "--data", str(tmp_path / "m.csv"), "--out", str(out), "--split-seed", seed]
        assert main([*argv, *QUICK]) == 0
    a, b = (Record.from_checkpoint(load_checkpoint(tmp_path / f"run{s}" / "last.pt")) for s in "01")
    test_a, test_b = (r.load().part("test") for r in (a, b))
    assert not torch.equal(test_a, test_b)


def _no_run(tmp_path) -> bool:
    """Nothing was trained: no checkpoint was written."""
    return not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    "text, extra, match",
    [
        ("id,x\nr1,1\nr2,2\n", (), "'id' are not numeric"),
        ("x,y\n" + "1,2\n" * 9 + "3,nan\n", (), r"row 9 \(0-based; line 11 of the file\).*'y'"),
        ("x,y\n" + "".join(f"{i},5\n" for i in range(10)), (), r"\['y'\] are constant"),
        ("x\n1\n2\n3\n", (), "3 rows are too few to split"),
        ("x,y\n1,2\n", ("--columns", "z"), "no column 'z'"),
        ("x,y\n1,2\n", ("--root", "somewhere"), "needs none"),
    ],
)
def test_bad_files_end_with_a_clear_error_before_any_training(tmp_path, capsys, text, extra, match):
    (tmp_path / "m.csv").write_text(text)
    assert _train(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err
    assert _no_run(tmp_path)


def test_drop_nonfinite_trains_on_the_rest(tmp_path, capsys):
    lines = ["x,y"] + [f"{i},{i * i % 7}" for i in range(40)] + ["3,", "inf,2"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    assert _train(tmp_path, "--drop-nonfinite") == 0
    assert "2 rows with NaN/Inf dropped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--data", "moons", "--columns", "a"], "apply to a file given to --data"),
        (["train", "--data", "moons", "--no-standardize"], "--no-standardize applies to tables"),
    ],
)
def test_table_flags_on_other_data_are_refused(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "run"), *QUICK]) == 2
    assert match in capsys.readouterr().err


def test_unknown_data_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "nosuchset"])
    assert exit_.value.code == 2
    assert "neither a data set" in capsys.readouterr().err


def test_eval_refuses_a_file_of_another_width_and_sample_other_suffixes(tmp_path, capsys):
    _write_csv(tmp_path / "m.csv", extra_text_column=False)
    assert _train(tmp_path) == 0
    np.save(tmp_path / "two.npy", np.zeros((5, 2)))
    best = str(tmp_path / "run" / "best.pt")
    assert main(["eval", "--checkpoint", best, "--data", str(tmp_path / "two.npy")]) == 2
    assert "has 2 columns, but the checkpoint's model has 3" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", best, "--out", str(tmp_path / "s.txt")]) == 2
    assert "a .npy or .csv file" in capsys.readouterr().err


def test_resume_keeps_the_standardization_choice(tmp_path, capsys):
    _write_csv(tmp_path / "m.csv", extra_text_column=False)
    assert _train(tmp_path, "--no-standardize") == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["spec"]["standardize"] is False
    assert not any("mean" in k for k in state["model"])
    assert _train(tmp_path, "--resume", "--iters", "6") == 0  # takes the checkpoint's model
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 6


@pytest.mark.parametrize("name", ["breast-cancer", "patches"])
def test_real_tables_that_install_offline_train_and_evaluate(tmp_path, capsys, name):
    """End to end on real data: a few iterations of the recipe, its test NLL, its pictures."""
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    argv = ["train", "--data", name, "--out", str(out), "--iters", "3", "--eval-every", "3",
            "--batch-size", "64", "--eval-n", "200", "--quiet", "--plot-n", "300"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"on {name} (" in text and "trace exact" in text and "best validation NLL" in text
    assert (out / "pairs.png").read_bytes().startswith(b"\x89PNG")
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--n", "100"]) == 0
    assert "test NLL" in capsys.readouterr().out


def test_a_file_trains_by_flow_matching_too(tmp_path, capsys):
    """The standardization is a data-side step before the blocks: flow matching trains the
    blocks on standardized rows, and the exact likelihood stays in the data's units."""
    _write_csv(tmp_path / "m.csv", extra_text_column=False)
    assert _train(tmp_path, "--objective", "flow-matching") == 0
    assert "by flow matching on m (" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["stage"] == "flow-matching" and state["spec"]["train_T"] is False
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "best.pt")]) == 0
    assert "(per row, in the data's units)" in capsys.readouterr().out
