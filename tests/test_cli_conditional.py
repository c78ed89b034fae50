"""``cnf train | eval | sample`` on conditional data, p(x | c), end to end on a tiny budget: the
rotating 2-D family, class-conditional digits and a file with context columns; every flag that
does not fit the data refused before any training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cnf.cli import main
from cnf.context import ContextEmbedding
from cnf.data import load_file
from cnf.training import load, load_checkpoint

pytestmark = pytest.mark.deadline(60)

PNG = b"\x89PNG\r\n\x1a\n"
TOY = ["--iters", "2", "--batch-size", "32", "--hidden", "8", "--tol", "1e-3", "--quiet",
       "--eval-every", "0", "--eval-n", "64", "--plot-n", "64", "--no-gif"]  # fmt: skip
DIGITS = ["--iters", "2", "--batch-size", "8", "--hidden", "4", "--tol", "1e-2", "--blocks",
          "1", "--eval-every", "0", "--draws", "1", "--quiet", "--plot-n", "10"]  # fmt: skip
TABLE = ["--hidden", "8", "--iters", "2", "--eval-every", "2", "--quiet"]


def _sample(checkpoint, out, *extra: str) -> int:
    return main(["sample", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def _error(capsys, match: str) -> str:
    """The error message printed, checked to be one ``error:`` line matching ``match``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err
    return err


# --- the rotating 2-D family -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotating(tmp_path_factory):
    out = tmp_path_factory.mktemp("rotating") / "run"
    assert main(["train", "--data", "rotating", "--out", str(out), *TOY]) == 0
    return out


def test_rotating_trains_a_conditional_model_and_draws_it_per_context(rotating):
    names = ("densities.png", "samples.png", "trajectories.png", "curves.png")
    for name in names:
        assert (rotating / name).read_bytes().startswith(PNG), name
    assert not (rotating / "flow.gif").exists()
    state = load_checkpoint(rotating / "last.pt")
    assert state["data"] == "rotating" and state["iteration"] == 2
    assert state["spec"]["context"]["inputs"] == 1
    assert "columns" not in state and "context_columns" not in state


def test_eval_of_rotating_prints_the_nll_entropy_and_gap(rotating, tmp_path, capsys):
    js = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(rotating / "last.pt"), "--n", "100", "--tol", "1e-3"]
    assert main([*argv, "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "test NLL" in printed and "on 100 points" in printed
    assert "entropy" in printed and "gap" in printed
    result = json.loads(js.read_text())
    assert result["n"] == 100 and np.isfinite(result["nll"])
    assert result["gap"] == pytest.approx(result["nll"] - result["entropy"])


def test_sample_given_a_context_is_the_models_own_draw(rotating, tmp_path, capsys):
    s = tmp_path / "s.npy"
    assert _sample(rotating / "last.pt", s, "--n", "50", "--context", "0.5") == 0
    assert "given context 0.5" in capsys.readouterr().out
    drawn = np.load(s)
    assert drawn.shape == (50, 2)
    model = load(rotating / "last.pt")
    ref = next(model.parameters())
    context = torch.tensor([0.5], dtype=ref.dtype)
    with torch.no_grad():
        expected = model.sample(50, context=context, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(drawn, expected.numpy())

    again, other = tmp_path / "again.npy", tmp_path / "other.npy"
    assert _sample(rotating / "last.pt", again, "--n", "50", "--context", "0.5") == 0
    assert _sample(rotating / "last.pt", other, "--n", "50", "--context", "-1") == 0
    np.testing.assert_array_equal(np.load(again), drawn)  # the same seed: the same samples
    assert not np.array_equal(np.load(other), drawn)  # another context: another draw


@pytest.mark.parametrize(
    "extra, match",
    [
        ((), r"this model is conditional: pass --context, 1 number"),
        (("--context", "0.1,0.2"), r"--context '0.1,0.2': give 1 number"),
        (("--context", "a"), r"--context 'a'"),
        (("--context", "nan"), r"--context 'nan'"),
    ],
)
def test_sample_of_rotating_needs_one_number(rotating, tmp_path, capsys, extra, match):
    assert _sample(rotating / "last.pt", tmp_path / "s.npy", *extra) == 2
    _error(capsys, match)
    assert not (tmp_path / "s.npy").exists()


def test_rotating_trains_by_flow_matching_without_a_coupling(tmp_path, capsys):
    out = tmp_path / "fm"
    argv = ["train", "--data", "rotating", "--objective", "flow-matching", "--finish-ml", "0"]
    assert main([*argv, "--out", str(out), *TOY, "--no-plot"]) == 0
    assert "by flow matching on rotating" in capsys.readouterr().out
    state = load_checkpoint(out / "last.pt")
    assert state["stage"] == "flow-matching" and state["flags"]["coupling"] == "none"
    assert state["spec"]["context"]["inputs"] == 1
    assert _sample(out / "last.pt", tmp_path / "s.npy", "--n", "5", "--context", "0") == 0


# --- class-conditional digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--data", "digits", "--conditional", "--out", str(out), *DIGITS]) == 0
    return out


def test_conditional_digits_train_and_draw_a_row_per_class(digits):
    assert (digits / "classes.png").read_bytes().startswith(PNG)
    assert (digits / "curves.png").is_file() and not (digits / "samples.png").exists()
    state = load_checkpoint(digits / "last.pt")
    assert state["spec"]["options"]["context"]["classes"] == 10
    assert state["recipe"]["options"] == {"conditional": True}


def test_sample_of_a_class_writes_images(digits, tmp_path, capsys):
    s = tmp_path / "s.npy"
    assert _sample(digits / "last.pt", s, "--n", "4", "--context", "3") == 0
    assert "of class 3" in capsys.readouterr().out
    images = np.load(s)
    assert images.shape == (4, 1, 8, 8) and images.min() >= 0.0 and images.max() <= 1.0
    again = tmp_path / "again.npy"
    assert _sample(digits / "last.pt", again, "--n", "4", "--context", "3.0") == 0
    np.testing.assert_array_equal(np.load(again), images)  # 3.0 is the label 3


@pytest.mark.parametrize("label", ["10", "2.5", "-1", "1,2"])
def test_sample_refuses_a_label_out_of_range(digits, tmp_path, capsys, label):
    assert _sample(digits / "last.pt", tmp_path / "s.npy", "--context", label) == 2
    _error(capsys, r"give a class label in 0\.\.9")
    assert not (tmp_path / "s.npy").exists()


def test_eval_of_conditional_digits_scores_the_test_part(digits, tmp_path, capsys):
    js = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(digits / "last.pt"), "--n", "20", "--draws", "1"]
    assert main([*argv, "--tol", "1e-2", "--json", str(js)]) == 0
    assert "test bits/dim" in capsys.readouterr().out
    result = json.loads(js.read_text())
    assert result["n"] == 20 and result["draws"] == 1 and np.isfinite(result["bits_per_dim"])


# --- a file with context columns ---------------------------------------------------------------


def _write_people(path, n=200, seed=0, columns=("height", "weight", "age")):
    """Rows of height and weight that grow with age (in years, 20 to 60)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20.0, 60.0, n)
    height = 160.0 + 0.2 * age + rng.normal(0.0, 8.0, n)
    weight = 0.5 * height + 0.3 * age + rng.normal(0.0, 5.0, n)
    values = {"height": height, "weight": weight, "age": age}
    lines = [",".join(columns)]
    lines += [",".join(f"{values[k][i]:.3f}" for k in columns) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    folder = tmp_path_factory.mktemp("people")
    _write_people(folder / "people.csv")
    argv = ["train", "--data", str(folder / "people.csv"), "--out", str(folder / "run")]
    assert main([*argv, "--context-columns", "age", "--split-seed", "2", *TABLE]) == 0
    return folder


def test_a_file_with_a_context_column_fits_the_rest_given_it(people):
    state = load_checkpoint(people / "run" / "best.pt")
    assert state["columns"] == ["height", "weight"] and state["context_columns"] == ["age"]
    assert state["recipe"]["options"] == {"context_columns": ["age"]}
    assert state["spec"]["dim"] == 2 and state["spec"]["context"]["inputs"] == 1
    assert (people / "run" / "pairs.png").read_bytes().startswith(PNG)

    data = load_file(people / "people.csv", seed=2, context_columns=["age"])
    train_ages = data.contexts["train"]
    model = load(people / "run" / "best.pt")
    embeddings = [m for m in model.modules() if isinstance(m, ContextEmbedding)]
    assert embeddings  # one per block, each fitted to the training rows' ages
    for embedding in embeddings:
        torch.testing.assert_close(embedding.mean, train_ages.mean(0).to(embedding.mean.dtype))


def test_sample_csv_of_a_file_model_holds_its_context_column(people, tmp_path, capsys):
    s = tmp_path / "s.csv"
    assert _sample(people / "run" / "best.pt", s, "--n", "30", "--context", "40") == 0
    assert "given context 40" in capsys.readouterr().out
    assert s.read_text().splitlines()[0] == "height,weight,age"
    rows = np.loadtxt(s, delimiter=",", skiprows=1)
    assert rows.shape == (30, 3) and np.all(rows[:, 2] == 40.0)
    npy = tmp_path / "s.npy"
    assert _sample(people / "run" / "best.pt", npy, "--n", "30", "--context", "40") == 0
    np.testing.assert_allclose(np.load(npy), rows[:, :2], rtol=1e-6)  # the same draw


def test_eval_of_a_file_model_reads_its_columns_and_context(people, tmp_path, capsys):
    best = str(people / "run" / "best.pt")
    assert main(["eval", "--checkpoint", best]) == 0
    assert "test NLL" in capsys.readouterr().out
    reordered = tmp_path / "new.csv"  # the columns found by name, in any order
    _write_people(reordered, n=30, seed=5, columns=("age", "weight", "height"))
    js = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", best, "--data", str(reordered), "--json", str(js)]) == 0
    assert "new.csv: test NLL" in capsys.readouterr().out
    assert json.loads(js.read_text())["n"] == 30

    ageless = tmp_path / "ageless.csv"
    _write_people(ageless, n=30, columns=("height", "weight"))
    assert main(["eval", "--checkpoint", best, "--data", str(ageless)]) == 2
    _error(capsys, "'age'")


def test_resume_with_other_context_columns_is_refused(people, capsys):
    argv = ["train", "--data", str(people / "people.csv"), "--out", str(people / "run")]
    before = load_checkpoint(people / "run" / "last.pt")["iteration"]
    again = [*argv, "--split-seed", "2", "--resume", *TABLE]
    assert main([*again, "--context-columns", "weight"]) == 2
    _error(capsys, "--context-columns")
    assert load_checkpoint(people / "run" / "last.pt")["iteration"] == before


def test_two_context_columns_take_two_numbers(tmp_path, capsys):
    _write_people(tmp_path / "people.csv", n=60)
    argv = ["train", "--data", str(tmp_path / "people.csv"), "--out", str(tmp_path / "run")]
    assert main([*argv, "--context-columns", "age,weight", "--no-plot", *TABLE]) == 0
    best = tmp_path / "run" / "best.pt"
    assert load_checkpoint(best)["context_columns"] == ["age", "weight"]
    assert _sample(best, tmp_path / "s.csv", "--context", "40") == 2
    _error(capsys, r"give 2 number\(s\) \(age, weight\)")
    assert _sample(best, tmp_path / "s.csv", "--n", "5", "--context", "40,70.5") == 0
    text = (tmp_path / "s.csv").read_text().splitlines()
    assert text[0] == "height,age,weight"
    rows = np.loadtxt(text[1:], delimiter=",")
    assert rows.shape == (5, 3) and np.all(rows[:, 1:] == [40.0, 70.5])


# --- flags that do not fit the data ------------------------------------------------------------


@pytest.mark.parametrize(
    "data, extra, match",
    [
        ("8gaussians", ("--conditional",), "--conditional fits images"),
        ("rotating", ("--conditional",), "--conditional fits images"),
        ("FILE", ("--conditional",), "--conditional fits images"),
        ("digits", ("--context-columns", "age"), "apply to a file given to --data"),
        ("FILE", ("--context-columns", "shoe"), "shoe"),
        ("FILE", ("--columns", "height,age", "--context-columns", "age"), "age"),
    ],
)
def test_flags_that_do_not_fit_the_data_are_refused(tmp_path, capsys, data, extra, match):
    if data == "FILE":
        data = str(tmp_path / "people.csv")
        _write_people(tmp_path / "people.csv", n=40)
    assert main(["train", "--data", data, "--out", str(tmp_path / "run"), *TABLE, *extra]) == 2
    _error(capsys, match)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_sample_of_an_unconditional_model_refuses_a_context(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "8gaussians", "--out", str(out), *TOY, "--no-plot"]) == 0
    assert _sample(out / "last.pt", tmp_path / "s.npy", "--context", "0.5") == 2
    _error(capsys, "this model is unconditional")
    assert not (tmp_path / "s.npy").exists()
