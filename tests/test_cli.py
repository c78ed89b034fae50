"""Tests of the ``cnf`` command line on a tiny budget: train, eval, sample, plot, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnf.cli import main
from cnf.data import density
from cnf.training import MaximumLikelihood, fit, load_checkpoint

PICTURES = ("density.png", "samples.png", "trajectories.png", "curves.png")
PNG, GIF = b"\x89PNG\r\n\x1a\n", b"GIF8"


def _train_args(out, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        "8gaussians",
        "--iters",
        "6",
        "--batch-size",
        "64",
        "--out",
        str(out),
        "--quiet",
        "--eval-n",
        "200",
        "--plot-n",
        "500",
        "--hidden",
        "16,16",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny `cnf train` run with all its pictures, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(_train_args(out))
    return code, out


def _models_equal(path_a, path_b) -> None:
    a, b = load_checkpoint(path_a)["model"], load_checkpoint(path_b)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- train -------------------------------------------------------------------------------------


def test_train_writes_checkpoint_history_and_pictures(run):
    code, out = run
    assert code == 0
    for name in ("last.pt", "history.json", *PICTURES, "flow.gif"):
        assert (out / name).is_file(), name
    for name in PICTURES:
        assert (out / name).read_bytes().startswith(PNG), name
    assert (out / "flow.gif").read_bytes().startswith(GIF)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ("last.pt", "history.json", *PICTURES, "flow.gif")
    )  # no temporary files left over

    history = json.loads((out / "history.json").read_text())
    assert history["iteration"] == [1, 2, 3, 4, 5, 6]
    assert history["eval_iteration"] == [3, 6]
    assert all(np.isfinite(history["eval_nll"]))
    assert all(n > 0 for n in history["nfe_forward"])

    state = load_checkpoint(out / "last.pt")
    assert state["iteration"] == 6
    assert state["data"] == "8gaussians"
    assert state["spec"]["hidden"] == [16, 16]
    assert state["history"]["loss"] == history["loss"]


def test_train_prints_the_gap_to_the_entropy(tmp_path, capsys):
    code = main(_train_args(tmp_path / "r", "--iters", "2", "--no-plot"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out NLL" in printed and "entropy 2.832" in printed and "gap" in printed
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["history.json", "last.pt"]


def test_train_resume_continues_a_killed_run_exactly(run, tmp_path, monkeypatch, kill_at):
    _, straight = run
    kill_at(MaximumLikelihood, 5)  # killed during iteration 5: last.pt holds iteration 3
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(_train_args(out, "--no-plot"))
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["iteration"] == 3
    assert not (out / "history.json").exists()

    assert main(_train_args(out, "--no-plot", "--resume")) == 0
    _models_equal(out / "last.pt", straight / "last.pt")
    resumed = json.loads((out / "history.json").read_text())
    expected = json.loads((straight / "history.json").read_text())
    assert resumed["iteration"] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "eval_iteration", "eval_nll", "nfe_forward", "nfe_backward"):
        assert resumed[key] == expected[key], key


def test_train_resume_extends_a_finished_run(tmp_path):
    constant = ("--schedule", "constant", "--no-plot")
    assert main(_train_args(tmp_path / "a", *constant)) == 0
    short = tmp_path / "b"
    assert main(_train_args(short, *constant, "--iters", "3")) == 0
    assert main(_train_args(short, *constant, "--resume")) == 0
    _models_equal(short / "last.pt", tmp_path / "a" / "last.pt")
    assert json.loads((short / "history.json").read_text())["iteration"] == [1, 2, 3, 4, 5, 6]


def test_resume_on_other_data_is_an_error_message(run, tmp_path, capsys):
    _, out = run
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "last.pt").write_bytes((out / "last.pt").read_bytes())
    argv = _train_args(folder, "--no-plot", "--resume")
    assert main([*argv, "--data", "moons"]) == 2
    assert "was trained on 8gaussians (mlp, split seed None)" in capsys.readouterr().err


# --- eval, sample, plot ------------------------------------------------------------------------


def test_eval_reports_nll_entropy_and_gap(run, tmp_path, capsys):
    _, out = run
    path = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(out / "last.pt"), "--n", "300", "--tol", "1e-4"]
    assert main([*argv, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["data"] == "8gaussians" and result["n"] == 300 and result["iteration"] == 6
    assert np.isfinite(result["nll"])
    assert result["entropy"] == pytest.approx(density("8gaussians").entropy)
    assert result["entropy"] == pytest.approx(2.83, abs=0.005)
    assert result["gap"] == pytest.approx(result["nll"] - result["entropy"])
    assert result["gap"] > 0  # 6 iterations are far from the floor
    assert "gap" in capsys.readouterr().out


@pytest.mark.parametrize("ema", ["0", "0.5"])
def test_eval_uses_the_trained_weights(tmp_path, ema):
    # `cnf eval --seed 1` draws the training run's held-out set (seed + 1) at its tolerance, so it
    # must reproduce the last held-out NLL of the history: the EMA weights when there are some.
    # (--ema 0 turns the default EMA off.)
    out = tmp_path / "run"
    extra = ("--iters", "3", "--no-plot", "--ema", ema)
    assert main(_train_args(out, *extra)) == 0
    state = load_checkpoint(out / "last.pt")
    assert ("ema" in state) == (ema != "0")
    path = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(out / "last.pt"), "--n", "200", "--seed", "1"]
    assert main([*argv, "--tol", "1e-5", "--json", str(path)]) == 0
    nll = json.loads(path.read_text())["nll"]
    assert nll == pytest.approx(state["history"]["eval_nll"][-1], rel=1e-5)


def test_sample_writes_npy(run, tmp_path, capsys):
    _, out = run

    def draw(name, seed):
        path = tmp_path / "sub" / name
        argv = ["sample", "--checkpoint", str(out / "last.pt"), "--n", "123"]
        assert main([*argv, "--out", str(path), "--seed", str(seed)]) == 0
        return np.load(path)

    x = draw("a.npy", 0)
    assert x.shape == (123, 2)
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(draw("b.npy", 0), x)
    assert not np.array_equal(draw("c.npy", 1), x)
    assert "wrote 123 samples" in capsys.readouterr().out


def test_plot_writes_pictures_to_out(run, tmp_path):
    _, out = run
    pictures = tmp_path / "pictures"
    argv = ["plot", "--checkpoint", str(out / "last.pt"), "--out", str(pictures)]
    assert main([*argv, "--n", "300", "--no-gif"]) == 0
    assert sorted(p.name for p in pictures.iterdir()) == sorted(PICTURES)
    for name in PICTURES:
        assert (pictures / name).read_bytes().startswith(PNG), name


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture
def truncated(run, tmp_path):
    _, out = run
    raw = (out / "last.pt").read_bytes()
    path = tmp_path / "bad" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--n", "10"],
        ["sample", "--n", "10", "--out", "unused.npy"],
        ["plot", "--n", "10", "--no-gif"],
    ],
    ids=lambda c: c[0],
)
def test_truncated_checkpoint_is_an_error_message(truncated, capsys, command):
    code = main([command[0], "--checkpoint", str(truncated), *command[1:]])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error:") and "truncated or corrupt" in err and str(truncated) in err
    assert "Traceback" not in err
    assert not (truncated.parent / "density.png").exists()


def test_empty_checkpoint_is_an_error_message(tmp_path, capsys):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")  # e.g. a copy that failed on a full disk
    code = main(["eval", "--checkpoint", str(path), "--n", "10"])
    assert code != 0
    assert "truncated or corrupt" in capsys.readouterr().err


def test_missing_checkpoint_is_an_error_message(tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path / "none.pt")])
    assert code != 0
    assert "no checkpoint at" in capsys.readouterr().err


def test_resume_from_a_truncated_checkpoint_is_an_error_message(truncated, capsys):
    code = main(_train_args(truncated.parent, "--no-plot", "--resume"))
    assert code != 0
    assert "truncated or corrupt" in capsys.readouterr().err


def test_checkpoint_without_a_spec_is_an_error_message(tmp_path, capsys):
    # Written by fit() directly, not by `cnf train`: no model spec to rebuild the model from.
    fit(
        torch.nn.Linear(2, 2),
        torch.randn(8, 2),
        iters=1,
        batch_size=8,
        objective=lambda model, batch, gen: (model(batch).square().mean(), {}),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    try:
        code = main(["eval", "--checkpoint", str(tmp_path / "last.pt")])
        message = capsys.readouterr().err
    except SystemExit as exc:  # the message then travels in the exit (printed by Python)
        code, message = exc.code, str(exc.code)
    assert code not in (0, None)
    assert "no model spec" in message


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "nowhere"])
    assert info.value.code == 2
    assert "neither a data set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--hidden", "16,x"])
    assert info.value.code == 2
    assert "comma-separated ints" in capsys.readouterr().err


def test_python_dash_m_cnf_help():
    done = subprocess.run(
        [sys.executable, "-m", "cnf", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("train", "eval", "sample", "plot"):
        assert command in done.stdout
    assert done.stderr == ""


def test_translate_on_2d_data_is_an_error_message(tmp_path, capsys):
    argv = ["train", "--data", "moons", "--out", str(tmp_path), "--translate", "0.5"]
    assert main(argv) == 2
    assert "does not apply to 2-D data" in capsys.readouterr().err


def test_architecture_without_a_recipe_is_an_error_message(tmp_path, capsys):
    argv = ["train", "--data", "moons", "--architecture", "multiscale", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "moons has recipes for architecture(s) mlp" in capsys.readouterr().err


def test_split_seed_on_2d_data_is_an_error_message(tmp_path, capsys):
    argv = ["train", "--data", "moons", "--out", str(tmp_path), "--split-seed", "7"]
    assert main(argv) == 2
    assert "no split to seed" in capsys.readouterr().err


# --- recipes in checkpoints --------------------------------------------------------------------


def test_checkpoint_records_its_recipe(run):
    _, out = run
    state = load_checkpoint(out / "last.pt")
    assert state["recipe"] == {
        "name": "8gaussians",
        "architecture": "mlp",
        "split_seed": None,
        "options": None,
        "root": None,
    }


def test_eval_of_a_checkpoint_without_a_recipe_record(run, tmp_path):
    # checkpoints written before records existed: the spec and the data name say the recipe
    _, out = run
    state = load_checkpoint(out / "last.pt")
    del state["recipe"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    results = []
    for path in (out / "last.pt", old):
        result = tmp_path / "eval.json"
        argv = ["eval", "--checkpoint", str(path), "--n", "100", "--tol", "1e-3"]
        assert main([*argv, "--json", str(result)]) == 0
        results.append(json.loads(result.read_text()))
    assert results[0]["nll"] == results[1]["nll"]
    assert results[1]["split_seed"] is None


def test_eval_tests_on_the_split_the_model_was_trained_on(tmp_path):
    pytest.importorskip("sklearn")
    from cnf import recipes
    from cnf.data import load_digits
    from cnf.training import load

    out = tmp_path / "digits"
    flags = ("--iters", "1", "--batch-size", "8", "--hidden", "4", "--blocks", "1")
    flags += ("--tol", "1e-2", "--draws", "1", "--split-seed", "7", "--threads", "1")
    argv = ["train", "--data", "digits", "--out", str(out), "--quiet", "--no-plot", *flags]
    assert main(argv) == 0
    assert load_checkpoint(out / "best.pt")["recipe"]["split_seed"] == 7
    path = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(out / "best.pt"), "--draws", "1", "--tol", "1e-2"]
    assert main([*argv, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["split_seed"] == 7 and result["n"] == 297

    recipe, model = recipes.get("digits"), load(out / "best.pt")
    score = {"tol": 1e-2, "draws": 1, "seed": 12345}
    test7, test0 = (load_digits("test", seed=s).images for s in (7, 0))
    assert not torch.equal(test7, test0)
    assert result["bits_per_dim"] == pytest.approx(recipe.score(model, test7, **score), rel=1e-6)
    assert result["bits_per_dim"] != pytest.approx(recipe.score(model, test0, **score), rel=1e-6)
