"""Tests of the training loop: it lowers the NLL, resume is exact, failures keep checkpoints."""

from __future__ import annotations

import fractions
import math
import os
import stat

import numpy as np
import pytest
import torch

import cnf.training.checkpoint
from cnf.data import sample_tensor, toy_sampler
from cnf.fields import ConcatSquashMLP
from cnf.flow import CNF
from cnf.training import (
    CheckpointError,
    History,
    MaximumLikelihood,
    TrainingError,
    evaluate_nll,
    fit,
    load_checkpoint,
    save_checkpoint,
)


def _cnf(hidden=(16, 16), seed: int = 0, tol: float = 1e-3) -> CNF:
    """A small 2-D CNF with a given initialisation (loose tolerances: loop tests, not accuracy)."""
    torch.manual_seed(seed)
    return CNF(ConcatSquashMLP(2, hidden), (2,), T=0.5, rtol=tol, atol=tol)


def _quadratic(model, batch, generator):
    """A cheap objective with real, batch- and noise-dependent gradients and no ODE solve."""
    target = batch.mean() + 0.1 * torch.randn((), generator=generator, dtype=batch.dtype)
    loss = sum((p - target).square().mean() for p in model.parameters())
    return loss, {}


class _Calls:
    """Wraps an objective, counts its calls (one per iteration) and can misbehave at one of them.

    ``at``: the 1-based call (= iteration) at which ``action(model, loss)`` replaces the loss
    (or raises); ``snapshot_at``: the call before which the weights are copied.
    """

    def __init__(self, objective, at=None, action=None, snapshot_at=None):
        self.objective, self.at, self.action, self.snapshot_at = objective, at, action, snapshot_at
        self.calls, self.batches, self.snapshot = 0, [], None

    def __call__(self, model, batch, generator):
        self.calls += 1
        self.batches.append(batch.detach().clone())
        if self.calls == self.snapshot_at:
            self.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss, metrics = self.objective(model, batch, generator)
        if self.calls == self.at:
            loss = self.action(model, loss)
        return loss, metrics


def _kill(model, loss):
    raise KeyboardInterrupt  # what a Ctrl-C (or a dying job) does in the middle of an iteration


def _assert_same(a, b, where: str = "state") -> None:
    """Recursive exact equality of checkpoint contents (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- a short run learns ------------------------------------------------------------------------


def test_short_run_lowers_held_out_nll():
    torch.manual_seed(0)
    model = CNF(ConcatSquashMLP(2, (32, 32)), (2,), T=0.5, rtol=1e-4, atol=1e-4)
    held_out = sample_tensor("8gaussians", 500, seed=1)
    before = evaluate_nll(model, held_out)
    iters = 60
    history = fit(
        model,
        toy_sampler("8gaussians"),
        iters=iters,
        batch_size=128,
        lr=5e-3,
        eval_data=held_out,
        eval_every=30,
        progress=False,
    )
    after = evaluate_nll(model, held_out)
    # Measured: 5.92 -> 3.75 nats (the entropy floor is 2.83).
    assert after < before - 1.0, (before, after)

    assert history.iteration == list(range(1, iters + 1))
    for name in ("loss", "nll", "nfe_forward", "nfe_backward", "seconds"):
        assert len(getattr(history, name)) == iters, name
    assert history.eval_iteration == [30, 60]
    assert len(history.eval_nll) == 2
    assert history.eval_nll[-1] == pytest.approx(after, rel=1e-6)  # the exact-trace held-out NLL
    assert history.loss == history.nll  # no regularizers: the loss is the NLL
    assert all(math.isfinite(v) for v in history.loss)
    assert all(n > 0 for n in history.nfe_forward)
    # the checkpoint adjoint is the default, and keeps this small model's whole graph: its
    # backward pass replays no step
    assert all(n == 0 for n in history.nfe_backward)
    assert all(s > 0 for s in history.seconds)
    assert History.from_dict(history.to_dict()) == history


def test_regularizers_enter_the_loss_not_the_nll():
    history = fit(
        _cnf(),
        toy_sampler("8gaussians"),
        iters=2,
        batch_size=32,
        kinetic=0.5,
        jacobian=0.5,
        progress=False,
    )
    assert all(loss > nll for loss, nll in zip(history.loss, history.nll))


# --- kill and resume ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trace", "ema", "kill_at"),
    [("exact", None, 7), ("hutchinson", None, 5), ("hutchinson", 0.9, 8)],
)
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, trace, ema, kill_at):
    iters, every = 10, 4  # killed during iteration kill_at: the last checkpoint is at 4
    last_saved = (kill_at - 1) // every * every
    data = toy_sampler("8gaussians")
    held_out = sample_tensor("8gaussians", 100, seed=1)
    common = dict(
        iters=iters,
        batch_size=64,
        lr=5e-3,
        schedule="cosine",  # the schedule's state must survive the restart too
        ema=ema,
        eval_data=held_out,
        eval_every=3,
        checkpoint_every=every,
        seed=7,
        progress=False,
    )

    model_a = _cnf()
    history_a = fit(model_a, data, solver={"trace": trace}, checkpoint_dir=tmp_path / "a", **common)

    killed = _Calls(MaximumLikelihood(solver={"trace": trace}), at=kill_at, action=_kill)
    with pytest.raises(KeyboardInterrupt):
        fit(_cnf(), data, objective=killed, checkpoint_dir=tmp_path / "b", **common)
    assert os.listdir(tmp_path / "b") == ["last.pt"]
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == last_saved

    # A new process: other initial weights, another global RNG state.
    torch.manual_seed(1234)
    model_b = _cnf(seed=99)
    resumed = _Calls(MaximumLikelihood(solver={"trace": trace}))
    history_b = fit(
        model_b, data, objective=resumed, checkpoint_dir=tmp_path / "b", resume=True, **common
    )
    assert resumed.calls == iters - last_saved  # it continued; it did not start over

    params_a, params_b = model_a.state_dict(), model_b.state_dict()
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    for name in ("iteration", "loss", "nll", "nfe_forward", "nfe_backward"):
        assert getattr(history_b, name) == getattr(history_a, name), name
    assert history_b.eval_iteration == history_a.eval_iteration == [3, 6, 9, 10]
    assert history_b.eval_nll == history_a.eval_nll

    state_a = load_checkpoint(tmp_path / "a" / "last.pt")
    state_b = load_checkpoint(tmp_path / "b" / "last.pt")
    del state_a["history"]["seconds"], state_b["history"]["seconds"]
    _assert_same(state_a, state_b)  # model, optimiser, schedule, EMA, history, iteration
    assert state_b["iteration"] == iters
    assert ("ema" in state_b) == (ema is not None)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    common = dict(iters=5, batch_size=8, progress=False, objective=_quadratic)
    data = torch.randn(40, 2)
    model_a, model_b = _cnf(), _cnf()
    fit(model_a, data, **common)
    fit(model_b, data, checkpoint_dir=tmp_path / "new", resume=True, **common)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "new" / "last.pt")["iteration"] == 5


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    common = dict(iters=4, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    data = torch.randn(40, 2)
    model = _cnf()
    fit(model, data, objective=_quadratic, **common)
    again = _Calls(_quadratic)
    resumed = _cnf(seed=5)
    history = fit(resumed, data, objective=again, resume=True, **common)
    assert again.calls == 0
    assert history.iteration == [1, 2, 3, 4]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --- non-finite losses and gradients -----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    every, bad_at = 3, 8  # checkpoints at 3 and 6; iteration 8 goes wrong
    poisoned = _Calls(
        MaximumLikelihood(),
        at=bad_at,
        action=lambda model, loss: loss * bad,
        snapshot_at=7,  # the weights after iteration 6
    )
    with pytest.raises(TrainingError, match=r"iteration 8\b") as info:
        fit(
            _cnf(),
            toy_sampler("8gaussians"),
            objective=poisoned,
            iters=20,
            batch_size=32,
            checkpoint_dir=tmp_path,
            checkpoint_every=every,
            progress=False,
        )
    assert str(tmp_path / "last.pt") in str(info.value)  # says where the good checkpoint is
    assert os.listdir(tmp_path) == ["last.pt"]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 6
    assert state["history"]["iteration"] == [1, 2, 3, 4, 5, 6]
    for name, value in state["model"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, poisoned.snapshot[name]), name


def test_non_finite_gradients_stop_before_the_weights_change(tmp_path):
    def nan_gradient(model, loss):
        # Finite value, NaN gradient: d/du sqrt(u) is infinite at u = 0, and 0 * inf = nan.
        p = next(model.parameters())
        return loss + 0.0 * torch.sqrt(p.sum() * 0.0)

    poisoned = _Calls(MaximumLikelihood(), at=5, action=nan_gradient, snapshot_at=5)
    model = _cnf()
    with pytest.raises(TrainingError, match=r"iteration 5\b"):
        fit(
            model,
            toy_sampler("8gaussians"),
            objective=poisoned,
            iters=10,
            batch_size=32,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            progress=False,
        )
    for name, value in model.state_dict().items():
        assert torch.equal(value, poisoned.snapshot[name]), name  # no step with NaN gradients
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 4


# --- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint written by fit (model, optimiser, schedule, history, iteration)."""
    fit(
        _cnf(hidden=(8,)),
        torch.randn(32, 2),
        iters=2,
        batch_size=16,
        objective=_quadratic,
        checkpoint_dir=tmp_path / "run",
        progress=False,
    )
    return tmp_path / "run" / "last.pt"


def test_checkpoint_round_trip(checkpoint):
    state = load_checkpoint(checkpoint)
    assert {"model", "optimizer", "scheduler", "iteration", "history", "seed"} <= state.keys()
    assert state["iteration"] == 2
    model = _cnf(hidden=(8,), seed=3)
    model.load_state_dict(state["model"])  # the weights fit a model of the same spec
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o644  # an ordinary file, not mkstemp's 0600


def _flip_in_pickle(raw: bytes) -> bytes:
    # The pickle is stored uncompressed near the start; break a key's UTF-8 ("model").
    out = bytearray(raw)
    out[raw.index(b"model") + 1] ^= 0x80
    return bytes(out)


CORRUPTIONS = {
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "truncated to a tenth": lambda raw: raw[: len(raw) // 10],
    "last byte missing": lambda raw: raw[:-1],
    "empty": lambda raw: b"",
    "random bytes": lambda raw: np.random.default_rng(0).bytes(4096),
    "text": lambda raw: b"this is not a checkpoint\n" * 40,
    "flipped byte in the pickle": _flip_in_pickle,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_clear_error(checkpoint, how):
    checkpoint.write_bytes(CORRUPTIONS[how](checkpoint.read_bytes()))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint either


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {"model": {}}, {"iteration": 3}],
    ids=["list", "no iteration", "no model"],
)
def test_foreign_torch_file_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="not a cnf training checkpoint"):
        load_checkpoint(path)


def test_checkpoint_is_read_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": {}, "iteration": 1, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_resume_from_a_truncated_checkpoint_raises(checkpoint):
    raw = checkpoint.read_bytes()
    checkpoint.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fit(
            _cnf(hidden=(8,)),
            torch.randn(32, 2),
            iters=4,
            batch_size=16,
            objective=_quadratic,
            checkpoint_dir=checkpoint.parent,
            resume=True,
            progress=False,
        )


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_save_checkpoint_is_atomic(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iteration": 1})
    before = path.read_bytes()

    def torch_save_dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(cnf.training.checkpoint.torch, "save", torch_save_dies_half_way)
    with pytest.raises(type(error)):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "iteration": 2})
    with pytest.raises(type(error)):
        save_checkpoint(tmp_path / "fresh.pt", {"model": {}, "iteration": 1})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary files, no half-written fresh.pt
    assert load_checkpoint(path)["iteration"] == 1


def test_save_checkpoint_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iteration": 1})
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iteration": 2})
    state = load_checkpoint(path)
    assert state["iteration"] == 2 and torch.equal(state["model"]["w"], torch.zeros(2))
    assert os.listdir(path.parent) == ["last.pt"]


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(iters=3, epochs=1), "exactly one of iters or epochs"),
        (dict(), "exactly one of iters or epochs"),
        (dict(epochs=1, data="sampler"), "epochs needs tensor data"),
        (dict(iters=0), "iters must be an int >= 1"),
        (dict(iters=2.5), "iters must be an int >= 1"),
        (dict(iters=3, batch_size=0), "batch_size must be an int >= 1"),
        (dict(iters=3, schedule="linear"), "unknown schedule 'linear'"),
        (dict(iters=3, ema=1.0), "ema must be a decay in"),
        (dict(iters=3, ema=0.0), "ema must be a decay in"),
        (dict(iters=3, ema=-0.5), "ema must be a decay in"),
        (dict(iters=3, resume=True), "resume needs checkpoint_dir"),
        (dict(iters=3, data=[[0.0, 1.0]]), "data must be a tensor"),
        (dict(iters=3, data=torch.zeros(0, 2)), "data is empty"),
        (dict(iters=3, bogus=1), r"unknown keyword\(s\) \['bogus'\]"),
        (dict(iters=3, kinetic=0.1), "configure the default objective"),
        (dict(iters=3, final_weights="best"), "final_weights must be one of"),
        (dict(iters=3, extra_state={"model": {}}), "checkpoint's own keys"),
        (dict(iters=3, clip_grad=0.0), "clip_grad must be a positive"),
        (dict(iters=3, eval_fn=len, eval_every=-1), "eval_every must be an int"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_are_value_errors(tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    data = kwargs.pop("data", torch.randn(16, 2))
    if isinstance(data, str):
        data = toy_sampler("8gaussians")
    model = _cnf(hidden=(8,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, data, objective=_quadratic, progress=False, **kwargs)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --- epochs, batches, progress -----------------------------------------------------------------


def test_epochs_cover_each_sample_once_per_epoch():
    batch = 8
    data = torch.arange(4 * batch * 2, dtype=torch.float32).reshape(4 * batch, 2)  # unique rows
    recorder = _Calls(_quadratic)
    history = fit(
        _cnf(hidden=(8,)), data, epochs=2, batch_size=batch, objective=recorder, progress=False
    )
    assert history.iteration == list(range(1, 9))  # 4 batches per epoch
    assert recorder.calls == 8
    assert all(b.shape == (batch, 2) for b in recorder.batches)
    rows = [tuple(r.tolist()) for b in recorder.batches for r in b]
    every_row = sorted(tuple(r.tolist()) for r in data)
    first, second = rows[: 4 * batch], rows[4 * batch :]
    assert sorted(first) == every_row and sorted(second) == every_row
    assert first != second  # reshuffled each epoch
    assert first != [tuple(r.tolist()) for r in data]  # and shuffled at all


def test_epochs_drop_the_incomplete_last_batch():
    recorder = _Calls(_quadratic)
    fit(
        _cnf(hidden=(8,)),
        torch.randn(4 * 8 + 5, 2),
        epochs=1,
        batch_size=8,
        objective=recorder,
        progress=False,
    )
    assert recorder.calls == 4
    assert all(b.shape == (8, 2) for b in recorder.batches)


def test_batches_depend_on_the_seed_only():
    def batches(seed):
        recorder = _Calls(_quadratic)
        fit(
            _cnf(hidden=(8,)),
            toy_sampler("8gaussians"),
            iters=3,
            batch_size=16,
            objective=recorder,
            seed=seed,
            progress=False,
        )
        return recorder.batches

    a = batches(0)
    torch.manual_seed(42)  # the global RNG plays no part
    b, c = batches(0), batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # a fresh batch each iteration


def test_progress_bar_shows_iterations(capsys):
    fit(_cnf(hidden=(8,)), torch.randn(32, 2), iters=3, batch_size=8, objective=_quadratic)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err


def test_eval_fn_and_keep_best_write_the_best_checkpoint(tmp_path):
    """eval_fn scores the model; best.pt holds the weights of the lowest score seen."""
    model = _cnf()
    scores = iter([3.0, 1.0, 2.0, 5.0])
    snapshots = {}

    def score(m):
        value = next(scores)
        snapshots[value] = {k: v.clone() for k, v in m.state_dict().items()}
        return value

    history = fit(
        model,
        sample_tensor("8gaussians", 64, seed=0, dtype=torch.float32),
        iters=8,
        batch_size=16,
        objective=_quadratic,
        eval_fn=score,
        eval_every=2,
        checkpoint_dir=tmp_path,
        keep_best=True,
        progress=False,
    )
    assert history.eval_iteration == [2, 4, 6, 8] and history.eval_nll == [3.0, 1.0, 2.0, 5.0]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["iteration"] == 4
    assert all(torch.equal(best["model"][k], v) for k, v in snapshots[1.0].items())
    with pytest.raises(ValueError, match="keep_best"):
        fit(_cnf(), toy_sampler("8gaussians"), iters=2, keep_best=True, progress=False)
    with pytest.raises(ValueError, match="not both"):
        fit(
            _cnf(),
            toy_sampler("8gaussians"),
            iters=2,
            eval_fn=score,
            progress=False,
            eval_data=sample_tensor("8gaussians", 8, seed=0),
        )
