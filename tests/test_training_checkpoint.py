"""Checkpoints of cnf.training: format 2, load() with averaged weights, older formats."""

from __future__ import annotations

import pytest
import torch

from cnf.models import build, toy_spec
from cnf.training import CheckpointError, fit, load, load_checkpoint, save_checkpoint
from cnf.training.checkpoint import FORMAT, upgrade


def _quadratic(model, batch, generator):
    """A cheap objective with real, batch- and noise-dependent gradients and no ODE solve."""
    target = batch.mean() + 0.1 * torch.randn((), generator=generator, dtype=batch.dtype)
    return sum((p - target).square().mean() for p in model.parameters()), {}


DATA = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))


def _spec():
    return toy_spec(hidden=[8], rtol=1e-3, atol=1e-3)


def _train(folder, iters=4, **kw):
    """A model of the spec trained by fit, and its checkpoint folder."""
    torch.manual_seed(0)
    model = build(_spec())
    common = dict(iters=iters, batch_size=16, objective=_quadratic, progress=False, seed=3)
    fit(model, DATA, checkpoint_dir=folder, extra_state={"spec": _spec()}, **common, **kw)
    return model, {**common, **kw}


def _old_layout(state: dict) -> dict:
    """``state`` as the first cnf wrote it: no format, other parameter names, the average in
    AveragedModel's layout (``module.<name>`` and ``n_averaged``)."""
    old = {k: v for k, v in state.items() if k not in ("format", "ema", "ema_updates")}
    old["model"] = {f"old_net.{i}": w for i, w in enumerate(state["model"].values())}
    if "ema" in state:
        ema = {f"module.old_net.{i}": w for i, w in enumerate(state["ema"].values())}
        old["ema"] = {**ema, "n_averaged": torch.tensor(state["ema_updates"])}
    return old


def _same_weights(model, weights) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))


def test_format_2_keys(tmp_path):
    _train(tmp_path, ema=0.5)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["format"] == FORMAT == 2
    assert {"model", "optimizer", "scheduler", "ema", "ema_updates", "history"} <= state.keys()
    assert {"iteration", "seed", "spec"} <= state.keys()
    assert state["ema"].keys() == state["model"].keys()  # the average is a plain state dict
    assert state["ema_updates"] == 4


@pytest.mark.parametrize("final_weights", ["ema", "raw"])
def test_fit_ends_with_the_weights_asked_for(tmp_path, final_weights):
    model, _ = _train(tmp_path, ema=0.5, final_weights=final_weights)
    state = load_checkpoint(tmp_path / "last.pt")
    assert not _same_weights(build(_spec()), state["ema"])
    assert not all(torch.equal(state["ema"][k], v) for k, v in state["model"].items())
    chosen = state["ema" if final_weights == "ema" else "model"]
    assert _same_weights(model, chosen)


def test_load_gives_the_averaged_model_by_default(tmp_path):
    _train(tmp_path, ema=0.5)
    state = load_checkpoint(tmp_path / "last.pt")
    averaged, raw = load(tmp_path / "last.pt"), load(tmp_path / "last.pt", weights="raw")
    assert _same_weights(averaged, state["ema"]) and _same_weights(raw, state["model"])
    assert not averaged.training and not raw.training
    x = torch.randn(5, 2)
    assert averaged.log_prob(x).shape == (5,)


def test_load_without_an_average_gives_the_trained_weights(tmp_path):
    _train(tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    assert "ema" not in state
    assert _same_weights(load(tmp_path / "last.pt"), state["model"])


def test_load_rejects_bad_requests(tmp_path):
    model = build(_spec())
    del model.spec  # a model built in Python: no spec to rebuild it from
    fit(
        model,
        DATA,
        iters=1,
        batch_size=16,
        objective=_quadratic,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(CheckpointError, match="no model spec"):
        load(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="weights must be one of"):
        load(tmp_path / "last.pt", weights="best")


def test_a_model_built_from_a_spec_is_stored_with_it(tmp_path):
    """fit stores ``model.spec``, so load rebuilds a model trained from Python alone."""
    model = build(_spec())
    fit(model, DATA, iters=1, batch_size=16, objective=_quadratic, checkpoint_dir=tmp_path,
        progress=False)  # fmt: skip
    assert load_checkpoint(tmp_path / "last.pt")["spec"] == model.spec
    assert _same_weights(load(tmp_path / "last.pt"), model.state_dict())
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path / "nothing.pt")


def test_old_checkpoint_is_migrated_by_position(tmp_path):
    _train(tmp_path, ema=0.5)
    state = load_checkpoint(tmp_path / "last.pt")
    save_checkpoint(tmp_path / "old.pt", _old_layout(state))
    assert _same_weights(load(tmp_path / "old.pt"), state["ema"])
    assert _same_weights(load(tmp_path / "old.pt", weights="raw"), state["model"])
    upgraded = upgrade(load_checkpoint(tmp_path / "old.pt"), build(_spec()))
    assert upgraded["format"] == 2 and upgraded["ema_updates"] == state["ema_updates"]
    assert list(upgraded["model"]) == list(state["model"])


@pytest.mark.parametrize("damage", ["one tensor fewer", "another shape"])
def test_old_checkpoint_that_does_not_map_is_a_clear_error(tmp_path, damage):
    _train(tmp_path)
    old = _old_layout(load_checkpoint(tmp_path / "last.pt"))
    first = next(iter(old["model"]))
    if damage == "one tensor fewer":
        del old["model"][first]
    else:
        old["model"][first] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "old.pt", old)
    with pytest.raises(CheckpointError, match="older cnf.*one-to-one.*settings that trained it"):
        load(tmp_path / "old.pt")


def test_new_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    _train(tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    save_checkpoint(tmp_path / "other.pt", {**state, "spec": toy_spec(hidden=[8, 8])})
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "future.pt", {**state, "format": FORMAT + 1})
    with pytest.raises(CheckpointError, match="upgrade cnf"):
        load(tmp_path / "future.pt")


def test_resume_from_an_old_checkpoint_equals_the_uninterrupted_run(tmp_path):
    full, common = _train(tmp_path / "full", iters=6, ema=0.5, checkpoint_every=3)
    _train(tmp_path / "cut", iters=3, ema=0.5)
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    save_checkpoint(tmp_path / "old" / "last.pt", _old_layout(cut))
    resumed = build(_spec())
    history = fit(
        resumed, DATA, **{**common, "iters": 6}, checkpoint_dir=tmp_path / "old", resume=True
    )
    assert _same_weights(resumed, full.state_dict())
    assert history.iteration == list(range(1, 7))
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "old" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 6
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
