"""Bad input to training, checkpoints and the command line: a clear error or the right result,
never a traceback, a hang or a silent wrong answer (issue 13).

Every case is tiny (a field of 8 units, a few iterations, loose tolerances), so nothing here can
run long even when a check is missing.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time

import pytest
import torch

import cnf.training.checkpoint
from cnf.cli import main
from cnf.cli.flags import build_parser
from cnf.models import build, toy_spec
from cnf.ode import SolverError
from cnf.training import (
    CheckpointError,
    MaximumLikelihood,
    TrainingError,
    evaluate_nll,
    fit,
    load,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.deadline(120)  # every case ends in an answer or an error, never a hang

DATA = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))


def _spec():
    return toy_spec(hidden=[8], rtol=1e-2, atol=1e-2)


def _model():
    torch.manual_seed(0)
    return build(_spec())


def _quadratic(model, batch, generator):
    """A cheap objective with real gradients and no ODE solve."""
    target = batch.mean() + 0.1 * torch.randn((), generator=generator, dtype=batch.dtype)
    return sum((p - target).square().mean() for p in model.parameters()), {}


def _fit(model=None, data=DATA, **settings):
    common = dict(iters=2, batch_size=8, objective=_quadratic, progress=False)
    return fit(model or _model(), data, **{**common, **settings})


def _cli(argv, capsys):
    """Run ``cnf`` in-process: (exit code, stderr); argparse's usage errors exit with 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


TRAIN = ["train", "--iters", "2", "--batch-size", "16", "--hidden", "8", "--tol", "1e-2"]
TRAIN += ["--eval-n", "16", "--plot-n", "50", "--quiet", "--no-plot", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny `cnf train` run (2 iterations) shared by the read-only checks."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


# --- 1. where checkpoints go -------------------------------------------------------------------


def _a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("where", "match"),
    [
        (lambda tmp: _a_file(tmp), "is a file"),
        (lambda tmp: _a_file(tmp) / "sub", "lies under the file"),
        (lambda tmp: _a_file(tmp) / "a" / "b", "lies under the file"),
    ],
    ids=["file", "under a file", "deep under a file"],
)
def test_checkpoint_dir_that_cannot_hold_files_is_refused_up_front(tmp_path, where, match):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def objective(model, batch, generator):
        calls.append(1)
        return _quadratic(model, batch, generator)

    with pytest.raises(ValueError, match=match):
        fit(model, DATA, iters=2, batch_size=8, objective=objective, progress=False,
            checkpoint_dir=where(tmp_path))  # fmt: skip
    assert not calls  # refused before the first step
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_checkpoint_dir_whose_last_pt_is_a_folder_is_refused(tmp_path):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(ValueError, match="folder named last.pt"):
        _fit(checkpoint_dir=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_checkpoint_dir_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="no permission"):
        _fit(checkpoint_dir=locked / "run")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_cli_out_that_is_a_file_is_an_error_before_training(tmp_path, capsys, where):
    out = _a_file(tmp_path)
    if where == "under a file":
        out = out / "run"
    tic = time.perf_counter()
    code, err = _cli([*TRAIN, "--out", out], capsys)
    assert code == 2 and err.startswith("error: --out") and "choose a folder" in err
    assert time.perf_counter() - tic < 5  # refused before any training


@pytest.mark.parametrize(
    "command",
    [
        ["plot", "--out", "{file}", "--no-gif", "--n", "10"],
        ["sample", "--out", "{folder}", "--n", "5"],
        ["sample", "--out", "{file}/x.npy", "--n", "5"],
        ["eval", "--json", "{folder}", "--n", "10"],
        ["eval", "--json", "{file}/r.json", "--n", "10"],
    ],
    ids=["plot into a file", "sample to a folder", "sample under a file", "eval json to a folder",
         "eval json under a file"],
)  # fmt: skip
def test_outputs_that_cannot_be_written_are_errors_before_work(run, tmp_path, capsys, command):
    names = {"{file}": str(_a_file(tmp_path)), "{folder}": str(tmp_path)}
    argv = [command[0], "--checkpoint", run / "last.pt"]
    for arg in command[1:]:
        for key, value in names.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    code, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("error: ")
    assert "is a folder" in err or "under the file" in err or "is a file" in err


# --- 2. training that fails: TrainingError, quickly --------------------------------------------


class _Solves:
    """An objective that raises the solver's error at one call, as a diverged model would."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.at:
            raise SolverError("step size underflow at t=0.3", t=0.3, step_size=1e-12)
        return _quadratic(model, batch, generator)


def test_solver_error_in_a_step_is_a_training_error_naming_iteration_and_checkpoint(tmp_path):
    with pytest.raises(TrainingError) as info:
        _fit(objective=_Solves(at=4), iters=6, checkpoint_dir=tmp_path, checkpoint_every=2)
    message = str(info.value)
    assert "ODE solver failed at iteration 4" in message and "step size underflow" in message
    assert f"last good checkpoint is {tmp_path / 'last.pt'} (iteration 2)" in message
    assert isinstance(info.value.__cause__, SolverError)
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2


def test_solver_error_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        _fit(objective=_Solves(at=1), checkpoint_dir=tmp_path)


def test_solver_error_in_an_evaluation_is_a_training_error():
    def score(model):
        raise SolverError("too many steps", t=0.1, step_size=1e-3)

    with pytest.raises(TrainingError, match="solver failed in Evaluation after iteration 2"):
        _fit(eval_fn=score)


def test_weights_that_become_non_finite_stop_training(tmp_path):
    # lr = 1e308 turns Adam's first step (about lr * sign(gradient)) into inf weights
    with pytest.raises(TrainingError, match="weights became NaN or Inf .* iteration 1"):
        _fit(lr=1e308, checkpoint_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()  # nothing non-finite was saved


def test_divergent_learning_rate_is_a_training_error_quickly(tmp_path):
    # the issue's `cnf train --lr 1e3`: the learned time and weights blow up in the first steps
    tic = time.perf_counter()
    with pytest.raises(TrainingError, match="iteration"):
        fit(_model(), DATA, iters=20, batch_size=16, lr=1e3, progress=False,
            checkpoint_dir=tmp_path)  # fmt: skip
    assert time.perf_counter() - tic < 20


def test_cli_reports_a_training_error_with_exit_code_2(tmp_path, capsys, monkeypatch):
    calls, original = {"n": 0}, MaximumLikelihood.__call__

    def fails_at_2(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SolverError("step size underflow at t=0.3", t=0.3, step_size=1e-12)
        return original(self, model, batch, generator)

    monkeypatch.setattr(MaximumLikelihood, "__call__", fails_at_2)
    code, err = _cli([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.startswith("error: the ODE solver failed at iteration 2")
    assert "last good checkpoint" in err and "(iteration 1)" in err


# --- 3. non-finite data ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["data", "eval_data"])
def test_non_finite_rows_are_found_up_front_and_named(bad, where):
    data = DATA.clone()
    data[17, 1] = bad
    data[21, 0] = bad
    settings = {"eval_data": data} if where == "eval_data" else {}
    calls = []

    def objective(model, batch, generator):
        calls.append(1)
        return _quadratic(model, batch, generator)

    with pytest.raises(ValueError, match=rf"{where} has NaN or Inf values in 2 of its 32 rows, "
                       r"the first at index 17"):  # fmt: skip
        _fit(data=data if where == "data" else DATA, objective=objective, **settings)
    assert not calls


def test_empty_eval_data_is_refused():
    with pytest.raises(ValueError, match="eval_data is empty"):
        _fit(eval_data=DATA[:0])


def test_a_sampler_batch_with_nan_names_the_iteration():
    def sampler(n, generator):
        x = torch.randn(n, 2, generator=generator)
        if sampler.calls == 2:
            x[3] = math.nan
        sampler.calls += 1
        return x

    sampler.calls = 0
    with pytest.raises(TrainingError, match="sampler's batch of iteration 3 .* index 3"):
        _fit(data=sampler, iters=5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: evaluate_nll(m, DATA[:0]), "data is empty"),
        (lambda m: evaluate_nll(m, DATA, batch_size=0), "batch_size must be a positive int"),
    ],
    ids=["no points", "batch of none"],
)
def test_evaluation_of_nothing_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model())


# --- 4. resume with other settings -------------------------------------------------------------


def test_resume_with_fewer_iters_than_done_is_refused_and_changes_nothing(tmp_path):
    _fit(iters=4, checkpoint_dir=tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="has 4 iterations done, more than iters=2"):
        _fit(iters=2, checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_with_other_settings_names_every_conflict(tmp_path):
    _fit(iters=2, checkpoint_dir=tmp_path, lr=1e-3)
    with pytest.raises(ValueError) as info:
        _fit(iters=4, checkpoint_dir=tmp_path, resume=True, lr=0.1, batch_size=4, seed=3)
    message = str(info.value)
    for part in ("lr=0.1 (it has 0.001)", "batch_size=4 (it has 8)", "seed=3 (it has 0)"):
        assert part in message


def test_resume_with_more_iters_extends_the_run(tmp_path):
    _fit(iters=2, checkpoint_dir=tmp_path)
    history = _fit(iters=3, checkpoint_dir=tmp_path, resume=True)
    assert history.iteration == [1, 2, 3]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 3 and state["settings"]["iters"] == 3


def test_cli_resume_refuses_contradicting_flags_all_at_once(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    argv = [*TRAIN, "--out", folder, "--resume", "--lr", "0.1", "--hidden", "16", "--seed", "4"]
    code, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("error: --resume: these flags contradict")
    for part in ("--lr 0.1, but", "--seed 4, but", "--hidden 16, but", "hidden 8"):
        assert part in err
    code, err = _cli([*argv[:-6], "--resume", "--iters", "1"], capsys)
    assert code == 2 and "--iters 1, but" in err and "has 2 iterations done" in err


def test_cli_resume_without_flags_continues_the_recorded_run(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    # no --iters, --hidden or --tol: the checkpoint's 2 iterations and model, not the recipe's
    argv = ["train", "--out", folder, "--resume", "--quiet", "--no-plot", "--eval-n", "16"]
    code, _ = _cli(argv, capsys)
    assert code == 0
    state = load_checkpoint(folder / "last.pt")
    assert state["iteration"] == 2 and state["spec"]["hidden"] == [8]


def test_cli_resume_with_more_iters_says_it_extends(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    code = main([*TRAIN, "--out", str(folder), "--resume", "--iters", "3"])
    assert code == 0
    assert "--iters 3 extends the run of 2 iterations" in capsys.readouterr().out
    assert load_checkpoint(folder / "last.pt")["iteration"] == 3


# --- 5. temporary files of killed writes -------------------------------------------------------


def test_stale_temporaries_of_killed_writes_are_removed_when_a_run_starts(tmp_path):
    _fit(checkpoint_dir=tmp_path)
    stale = tmp_path / "last.pt.ab3_x9zq.tmp"  # what SIGKILL during save_checkpoint leaves
    fresh = tmp_path / "best.pt.q1w2e3r4.tmp"  # a write in progress elsewhere: too new to touch
    other = tmp_path / "notes.ab3_x9zq.tmp"  # not ours
    for path in (stale, fresh, other):
        path.write_bytes(b"PK half a checkpoint")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    _fit(iters=3, checkpoint_dir=tmp_path, resume=True)
    assert not stale.exists()
    assert fresh.exists() and other.exists()


# --- 6. checkpoints with non-finite weights ----------------------------------------------------


@pytest.fixture
def nan_checkpoint(run, tmp_path):
    state = load_checkpoint(run / "last.pt")
    name = next(iter(state["ema"]))
    state["ema"][name] = torch.full_like(state["ema"][name], math.nan)
    state["model"][name] = torch.full_like(state["model"][name], math.inf)
    path = tmp_path / "nan" / "last.pt"
    save_checkpoint(path, state)
    return path, name


def test_load_of_non_finite_weights_is_a_checkpoint_error_naming_the_tensor(nan_checkpoint):
    path, name = nan_checkpoint
    for weights in ("ema", "raw"):
        with pytest.raises(CheckpointError, match=rf"not finite: {name} has \d+ NaN or Inf"):
            load(path, weights=weights)


@pytest.mark.parametrize("command", ["eval", "sample", "plot", "resume"])
def test_cli_on_non_finite_weights_is_an_error_message(nan_checkpoint, capsys, command):
    path, name = nan_checkpoint
    if command == "resume":
        argv = [*TRAIN, "--out", path.parent, "--resume", "--iters", "3"]
    else:
        argv = [command, "--checkpoint", path, "--n", "10"]
        argv += {"sample": ["--out", path.parent / "s.npy"], "plot": ["--no-gif"]}.get(command, [])
    code, err = _cli(argv, capsys)
    assert code == 2 and "are not finite" in err and name in err


# --- 7. whole messages -------------------------------------------------------------------------


def test_load_errors_keep_the_whole_reason_and_the_code_warning(tmp_path):
    class Bomb:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "bomb.pt"
    torch.save({"model": {}, "iteration": 1, "x": Bomb()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "system" in message  # torch's reason: the global it refused
    assert "can run arbitrary code" in message
    assert "Re-running" not in message and "will likely succeed" not in message


def test_messages_are_not_cut(tmp_path, monkeypatch):
    reason = "word " * 100 + "END"

    def fails(*args, **kwargs):
        raise RuntimeError(reason)

    path = tmp_path / "x.pt"
    path.write_bytes(b"x")
    monkeypatch.setattr(cnf.training.checkpoint.torch, "load", fails)
    with pytest.raises(CheckpointError, match="END"):
        load_checkpoint(path)


# --- 8. help for every flag --------------------------------------------------------------------


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["train", "eval", "sample", "plot"])
def test_every_flag_has_a_help_text(command):
    sub = _subparsers()[command]
    missing = [
        a.option_strings[0]
        for a in sub._actions
        if a.option_strings and not (a.help and a.help.strip())
    ]
    assert not missing, f"cnf {command}: flags without help: {missing}"


def test_train_help_gives_defaults_from_the_recipes():
    from cnf.recipes import get

    helps = {a.option_strings[0]: a.help for a in _subparsers()["train"]._actions if a.help}
    iters = helps["--iters"]
    assert f"2-D data, mnist, cifar10 {get('8gaussians').training['iters']}" in iters
    assert re.search(rf"digits[^;]* {get('digits').training['iters']}", iters)
    assert str(get("8gaussians").fit_options("flow-matching")["iters"]) in iters
    assert f"{get('8gaussians').training['lr']:g}" in helps["--lr"]


# --- other bad flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "--iters", "0"], "--iters: expected an integer >= 1"),
        (["train", "--iters", "-5"], "--iters: expected an integer >= 1"),
        (["train", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every: expected an integer >= 1"),
        (["train", "--eval-n", "0"], "--eval-n: expected an integer >= 1"),
        (["train", "--eval-every", "-1"], "--eval-every: expected an integer >= 0"),
        (["train", "--lr", "nan"], "--lr: expected a number > 0"),
        (["train", "--lr", "0"], "--lr: expected a number > 0"),
        (["train", "--tol=-1e-3"], "--tol: expected a number > 0"),
        (["train", "--ema", "1"], "--ema: expected 0 (off) or a decay"),
        (["train", "--translate", "2"], "--translate: expected a number in [0, 1]"),
        (["train", "--hidden", "0,8"], "--hidden: expected comma-separated sizes >= 1"),
        (["eval", "--checkpoint", "x", "--n", "0"], "--n: expected an integer >= 1"),
        (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size: expected"),
        (["sample", "--checkpoint", "x", "--n", "0"], "--n: expected an integer >= 1"),
        (["plot", "--checkpoint", "x", "--n", "-1"], "--n: expected an integer >= 1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_flag_values_are_usage_errors(capsys, argv, match):
    code, err = _cli(argv, capsys)
    assert code == 2 and "error: argument " + match in err


@pytest.mark.parametrize(
    ("device", "match"),
    [("gpu", "unknown device 'gpu'"), ("cuda:7", "not available"), ("mps", "not available")],
)
def test_devices_this_machine_lacks_are_error_messages(tmp_path, capsys, device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    code, err = _cli([*TRAIN, "--out", tmp_path / "r", "--device", device], capsys)
    assert code == 2 and match in err
    with pytest.raises(ValueError, match=match):
        _fit(device=device)


def test_cuda_without_cuda_is_an_error_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _cli(["eval", "--checkpoint", tmp_path / "x.pt", "--device", "cuda"], capsys)
    assert code == 2 and "torch sees 0 CUDA device(s)" in err


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: tmp, "it is a folder"),
        (lambda tmp: (tmp / "t.pt").write_text("hello") and tmp / "t.pt", "truncated or corrupt"),
        (lambda tmp: torch.save({"a": 1}, tmp / "o.pt") or tmp / "o.pt", "not a cnf training"),
        (lambda tmp: torch.save([1, 2], tmp / "l.pt") or tmp / "l.pt", "not a cnf training"),
    ],
    ids=["a folder", "a text file", "another torch file", "a list"],
)
def test_eval_of_things_that_are_not_checkpoints(tmp_path, capsys, make, match):
    code, err = _cli(["eval", "--checkpoint", make(tmp_path), "--n", "10"], capsys)
    assert code == 2 and match in err


def test_checkpoint_of_another_kind_of_model_is_an_error_message(run, tmp_path, capsys):
    state = load_checkpoint(run / "last.pt")
    save_checkpoint(tmp_path / "k.pt", {**state, "spec": {**state["spec"], "kind": "spline"}})
    code, err = _cli(["eval", "--checkpoint", tmp_path / "k.pt", "--n", "10"], capsys)
    assert code == 2 and "unknown model kind 'spline'" in err


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"lr": "1e-3"}, "lr must be a number.*without quotes"),
        ({"lr": -1.0}, "lr must be a positive"),
        ({"lr": math.nan}, "lr must be a positive"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"iters": True}, "iters must be an int >= 1"),
        ({"weight_decay": -1}, "weight_decay must be a finite number >= 0"),
        ({"clip_grad": "1"}, "clip_grad must be a number"),
        ({"kinetic": math.inf}, "kinetic must be a finite number >= 0"),
        ({"ema": True}, "ema must be a number"),
        ({"ema": 1.0}, r"ema must be a decay in \(0, 1\)"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1"),
        ({"eval_every": -1}, "eval_every must be an int >= 0"),
        ({"seed": "a"}, "seed must be an int, got 'a'"),
    ],
)
def test_fit_numbers_follow_the_one_rule(settings, match):
    """The same rule as the solver's tolerances: numbers, not strings or bools, in range."""
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, torch.randn(32, 2), **{"iters": 1, "progress": False, **settings})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
