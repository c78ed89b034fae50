"""Tests of the recipe table: its values, that it is read-only, lookups, specs, fit keywords,
records, loaders, and that Python code following a recipe trains what ``cnf train`` trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cnf import recipes
from cnf.cli import main
from cnf.data import NAMES, sample_tensor
from cnf.models import build
from cnf.training import CheckpointError, FlowMatching, fit, load

TOY_TRAINING = {
    "iters": 1000,
    "batch_size": 512,
    "lr": 5e-3,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "clip_grad": None,
    "kinetic": 0.0,
    "jacobian": 0.0,
    "ema": 0.995,
    "eval_every": 100,
}
IMAGE_TRAINING = {**TOY_TRAINING, "batch_size": 64, "lr": 1e-3, "eval_every": 250}
DIGITS_TRAINING = {
    **IMAGE_TRAINING,
    "iters": 2000,
    "batch_size": 128,
    "lr": 1e-2,
    "kinetic": 0.01,
    "jacobian": 0.01,
}


# --- the table ---------------------------------------------------------------------------------


def test_the_table_holds_every_data_set_and_architecture():
    tables = ("file", "patches", "breast-cancer", "synthetic8")
    benchmarks = ("power", "gas", "hepmass", "miniboone", "bsds300")
    conditional = ("rotating",)
    assert recipes.names() == (
        *NAMES,
        *conditional,
        "digits",
        "mnist",
        "cifar10",
        *tables,
        *benchmarks,
    )
    assert all(recipes.architectures(name) == ("mlp",) for name in tables + benchmarks)
    assert recipes.architectures("rotating") == ("mlp",)
    assert all(recipes.architectures(name) == ("mlp",) for name in NAMES)
    assert recipes.architectures("digits") == ("dense", "multiscale")
    assert recipes.architectures("mnist") == recipes.architectures("cifar10")
    assert recipes.architectures("mnist") == ("multiscale", "dense")
    for (name, architecture), recipe in recipes.RECIPES.items():
        assert (recipe.name, recipe.architecture) == (name, architecture)


@pytest.mark.parametrize("name", NAMES)
def test_toy_recipes_keep_the_command_lines_defaults(name):
    recipe = recipes.get(name)
    assert dict(recipe.training) == TOY_TRAINING
    assert recipe.kind == "toy2d" and recipe.event_shape == (2,) and recipe.levels is None
    assert recipe.tol == 1e-4 and recipe.model["trace"] == "exact"
    assert recipe.evaluation.tol == 1e-7 and not recipe.evaluation.keep_best
    assert dict(recipe.split.sizes) == {"val": 5000, "test": 20000}
    spec = recipe.spec()
    assert spec["hidden"] == [64, 64, 64] and spec["activation"] == "tanh"
    assert (spec["T"], spec["rtol"], spec["atol"], spec["dtype"]) == (0.5, 1e-4, 1e-4, "float32")


@pytest.mark.parametrize(
    "name, architecture, training, trace, tol, translate",
    [
        ("digits", "dense", DIGITS_TRAINING, "exact", 1e-3, 0.5),
        ("digits", "multiscale", DIGITS_TRAINING, "hutchinson", 1e-3, 0.5),
        ("mnist", "multiscale", IMAGE_TRAINING, "hutchinson", 1e-5, 0.0),
        ("mnist", "dense", IMAGE_TRAINING, "hutchinson", 1e-5, 0.0),
        ("cifar10", "multiscale", IMAGE_TRAINING, "hutchinson", 1e-5, 0.0),
    ],
)
def test_image_recipes_keep_the_command_lines_defaults(
    name, architecture, training, trace, tol, translate
):
    recipe = recipes.get(name, architecture)
    assert dict(recipe.training) == training
    assert (recipe.model["trace"], recipe.tol, recipe.model["atol"]) == (trace, tol, tol)
    assert dict(recipe.augment) == {"translate": translate}
    policy = recipe.evaluation
    assert (policy.tol, policy.metric, policy.draws, policy.test_draws) == (
        1e-5,
        "bits_per_dim",
        2,
        4,
    )
    assert policy.keep_best
    # the exact trace costs a vector-Jacobian product per dimension: 64 for the digits
    assert policy.trace == ("exact" if name == "digits" else "hutchinson")
    assert recipe.levels == (17 if name == "digits" else 256)


def test_the_table_is_read_only():
    recipe = recipes.get("digits")
    with pytest.raises(TypeError):
        recipes.RECIPES["moons", "mlp"] = recipe
    with pytest.raises(TypeError):
        recipe.training["iters"] = 1
    with pytest.raises(TypeError):
        recipe.split.sizes["val"] = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.levels = 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.evaluation.tol = 1.0


def test_get_names_what_exists():
    assert recipes.get("digits").architecture == "dense"
    assert recipes.get("mnist").architecture == "multiscale"
    with pytest.raises(ValueError, match="no recipe for data 'nowhere'; choose one of: 8gauss"):
        recipes.get("nowhere")
    with pytest.raises(ValueError, match="digits has recipes for architecture.*dense, multiscale"):
        recipes.get("digits", "mlp")


def test_a_recipe_checks_itself():
    with pytest.raises(ValueError, match="bits/dim needs dequantization draws"):
        recipes.Evaluation(tol=1e-5, metric="bits_per_dim")
    with pytest.raises(ValueError, match="trace"):
        recipes.Evaluation(tol=1e-5, trace="approximate")
    toy = recipes.get("moons")
    with pytest.raises(ValueError, match="integer levels go with bits/dim"):
        dataclasses.replace(toy, levels=17)
    with pytest.raises(ValueError, match="unknown kind"):
        dataclasses.replace(toy, kind="sound")


# --- specs and fit keywords --------------------------------------------------------------------


def test_spec_takes_generic_settings():
    multiscale = recipes.get("digits", "multiscale").spec(hidden=[4], blocks=2, tol=1e-2)
    options = multiscale["options"]
    assert options["hidden_channels"] == [4] and options["blocks_per_scale"] == 2
    assert (options["rtol"], options["atol"], options["trace"]) == (1e-2, 1e-2, "hutchinson")
    dense = recipes.get("digits").spec(hidden=[8], trace=None)
    assert dense["options"]["hidden"] == [8] and dense["options"]["trace"] == "exact"
    assert recipes.get("moons").spec(train_T=False)["train_T"] is False
    with pytest.raises(ValueError, match="unknown model setting"):
        recipes.get("moons").spec(channels=3)


def test_fit_options_are_the_training_defaults_with_overrides():
    recipe = recipes.get("digits")
    assert recipe.fit_options() == DIGITS_TRAINING
    options = recipe.fit_options(iters=5, lr=None, seed=3)
    assert options == {**DIGITS_TRAINING, "iters": 5, "seed": 3}
    with pytest.raises(ValueError, match=r"\['translate'\] are not keywords of cnf.training.fit"):
        recipe.fit_options(translate=0.5)


def test_python_following_a_recipe_trains_what_cnf_train_trains(tmp_path):
    """The module docstring's example and ``cnf train`` give the same weights."""
    flags = {"iters": 3, "batch_size": 32, "eval_every": 2}
    argv = ["train", "--data", "moons", "--out", str(tmp_path), "--hidden", "8", "--no-plot"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main([*argv, "--quiet", "--eval-n", "100"]) == 0

    recipe = recipes.get("moons")
    torch.manual_seed(0)
    model, data = build(recipe.spec(hidden=[8])), recipe.load()
    fit(model, data.sampler(), **recipe.fit_options(**flags, progress=False))
    expected = load(tmp_path / "last.pt").state_dict()  # the averaged weights, as fit returns
    assert model.state_dict().keys() == expected.keys()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, expected[name]), name


def test_stages_give_the_flow_matching_plan_and_the_finish():
    recipe = recipes.get("digits")
    plan = recipe.flow_matching
    fm = recipe.fit_options("flow-matching")
    assert isinstance(fm["objective"], FlowMatching) and fm["objective"] == plan.make_objective()
    assert fm["kinetic"] == fm["jacobian"] == 0.0  # they weight the likelihood
    assert {k: fm[k] for k in plan.training} == dict(plan.training)
    finish = recipe.fit_options("finish", iters=7)
    assert "objective" not in finish and finish["iters"] == 7
    assert finish["batch_size"] == DIGITS_TRAINING["batch_size"]  # the likelihood's defaults
    assert finish["lr"] == plan.finish["lr"] and finish["kinetic"] == plan.finish["kinetic"]
    assert plan.make_objective(coupling="ot", time="logit-normal").time == "logit-normal"
    with pytest.raises(ValueError, match="training stage 'regression'"):
        recipe.fit_options("regression")


def test_flow_matching_specs_fix_T_to_add_up_to_one():
    digits = recipes.get("digits").flow_matching_spec()["options"]
    assert (digits["blocks"], digits["T"], digits["train_T"]) == (2, 0.5, False)
    assert digits["hidden"] == [512, 512]  # the plan's wider field; flags still win:
    assert recipes.get("digits").flow_matching_spec(hidden=[8])["options"]["hidden"] == [8]
    moons = recipes.get("moons").flow_matching_spec(blocks=4)
    assert (moons["T"], moons["train_T"]) == (0.25, False)
    with pytest.raises(ValueError, match="fixed integration time"):
        recipes.get("moons").flow_matching_spec(train_T=True)
    with pytest.raises(ValueError, match="does not train the multiscale model"):
        recipes.get("digits", "multiscale").flow_matching_spec()


def test_python_following_the_two_stages_trains_what_cnf_train_trains(tmp_path):
    argv = ["train", "--data", "moons", "--out", str(tmp_path), "--hidden", "8", "--no-plot",
            "--quiet", "--eval-n", "100", "--objective", "flow-matching", "--iters", "4",
            "--batch-size", "32", "--finish-ml", "3"]  # fmt: skip
    assert main(argv) == 0

    recipe = recipes.get("moons")
    torch.manual_seed(0)
    model, data = build(recipe.flow_matching_spec(hidden=[8])), recipe.load()
    stage = recipe.fit_options("flow-matching", iters=4, batch_size=32, progress=False)
    fit(model, data.sampler(), **stage)
    fit(model, data.sampler(), **recipe.fit_options("finish", iters=3, progress=False))
    expected = load(tmp_path / "last.pt").state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, expected[name]), name


# --- data and records --------------------------------------------------------------------------


def test_toy_parts_are_seeded_fresh_draws():
    data = recipes.get("moons").load()
    assert data.entropy is None and recipes.get("8gaussians").load().entropy > 2.8
    val = data.part("val", seed=1)
    assert val.shape == (5000, 2) and val.dtype == torch.float64
    assert torch.equal(val, sample_tensor("moons", 5000, 1, dtype=torch.float64))
    assert data.part("test", seed=2, n=7).shape == (7, 2)
    with pytest.raises(ValueError, match="pass no root"):
        recipes.get("moons").load(root="somewhere")
    with pytest.raises(ValueError, match="does not apply to 2-D data"):
        data.sampler(translate=0.5)


def test_image_splits_follow_the_split_seed():
    pytest.importorskip("sklearn")
    from cnf.data import load_digits

    recipe = recipes.get("digits")
    default, seven = recipe.load(), recipe.load(split_seed=7)
    assert default.sizes == dict(recipe.split.sizes) == {"train": 1300, "val": 200, "test": 297}
    for part in ("train", "val", "test"):
        assert torch.equal(default.part(part), load_digits(part).images)
        assert torch.equal(seven.part(part), load_digits(part, seed=7).images)
    assert default.part("test", n=5).shape == (5, 1, 8, 8)
    batch = default.sampler()(4, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 1, 8, 8) and 0 <= batch.min() and batch.max() < 1


def test_records_round_trip_and_read_old_checkpoints():
    record = recipes.get("digits").record(split_seed=7)
    assert record == recipes.Record("digits", "dense", 7, None)
    assert recipes.Record.from_checkpoint({"recipe": record.to_dict()}) == record
    assert recipes.get("mnist").record(root="/data").to_dict()["root"] == "/data"
    assert recipes.get("digits").record().split_seed == 0
    # before records: the spec and the data name say which recipe, with its default split
    old_toy = {"spec": {"kind": "toy2d"}, "data": "moons"}
    assert recipes.Record.from_checkpoint(old_toy) == recipes.Record("moons", "mlp")
    old_image = {"spec": {"kind": "image"}, "data": "mnist", "root": "/d"}
    assert recipes.Record.from_checkpoint(old_image) == recipes.Record(
        "mnist", "multiscale", None, "/d"
    )
    with pytest.raises(CheckpointError, match="x.pt names no data set"):
        recipes.Record.from_checkpoint({"model": {}}, source="x.pt")


def test_validation_scores_the_held_out_part():
    recipe = recipes.get("moons")
    torch.manual_seed(0)
    model = build(recipe.spec(hidden=[8]))
    val = recipe.load().part("val", seed=1, n=50)
    keywords = recipe.validation(val)
    assert keywords["keep_best"] is False
    assert keywords["eval_fn"](model) == recipe.score(model, val, tol=recipe.tol)
    history = fit(model, recipe.load().sampler(), iters=1, **keywords, progress=False)
    assert len(history.eval_nll) == 1
