"""`cnf train --objective flow-matching`: the same models, trained by regression, used as usual."""

from __future__ import annotations

import json

import pytest
import torch

from cnf.cli import main
from cnf.continuous import CNFTransform
from cnf.data import sample_tensor, toy_sampler
from cnf.training import (
    FlowMatching,
    MaximumLikelihood,
    evaluate_nll,
    fit,
    load,
    load_checkpoint,
)

SMALL = ["--iters", "30", "--batch-size", "64", "--hidden", "16,16", "--quiet", "--eval-n", "200"]


def test_flow_matching_trains_a_cnf_that_eval_and_plot_read_unchanged(tmp_path):
    out = tmp_path / "fm"
    args = ["train", "--objective", "flow-matching", "--coupling", "ot", "--out", str(out)]
    assert main([*args, *SMALL, "--no-plot", "--finish-ml", "0"]) == 0
    state = load_checkpoint(out / "last.pt")
    history = state["history"]
    assert "fm_loss" in history and "nfe_forward" not in history  # no solve while training
    assert history["fm_loss"][-1] < history["fm_loss"][0]
    model = load(out / "last.pt")
    blocks = [m for m in model.modules() if isinstance(m, CNFTransform)]
    assert [b.T_scale for b in blocks] == [None] and blocks[0].T0 == 1.0  # fixed T = 1
    result = tmp_path / "eval.json"
    assert (
        main(["eval", "--checkpoint", str(out / "last.pt"), "--n", "500", "--json", str(result)])
        == 0
    )
    assert json.loads(result.read_text())["nll"] < 10
    assert main(["plot", "--checkpoint", str(out / "last.pt"), "--n", "300", "--no-gif"]) == 0
    assert (out / "density.png").is_file()


def test_dense_digits_blocks_share_the_unit_time_axis(tmp_path):
    out = tmp_path / "digits"
    args = ["train", "--data", "digits", "--objective", "flow-matching", "--out", str(out)]
    assert main([*args, "--iters", "2", "--hidden", "16", "--quiet", "--no-plot"]) == 0
    blocks = [m for m in load(out / "last.pt").modules() if isinstance(m, CNFTransform)]
    assert len(blocks) == 2 and [b.T0 for b in blocks] == [0.5, 0.5]
    assert all(b.T_scale is None for b in blocks)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--coupling", "ot"], "flow-matching only"),
        (["--finish-ml", "5"], "flow-matching only"),
        (["--objective", "flow-matching", "--finish-ml", "-1"], ">= 0"),
        (["--objective", "flow-matching", "--kinetic", "0.1"], "no"),
        (["--objective", "flow-matching", "--T", "0.5"], "fixed-T"),
    ],
)
def test_flags_that_do_not_apply_are_errors(tmp_path, capsys, extra, match):
    try:
        code = main(["train", "--out", str(tmp_path / "x"), *SMALL, "--no-plot", *extra])
    except SystemExit as exc:  # a value no flag accepts is a usage error of argparse
        code = exc.code
    assert code == 2
    assert match in capsys.readouterr().err


def test_a_likelihood_finish_continues_a_flow_matching_model(tmp_path):
    # the maximum-likelihood finish from Python: the same model, another objective
    out = tmp_path / "fm"
    assert (
        main(
            [
                "train",
                "--objective",
                "flow-matching",
                "--out",
                str(out),
                *SMALL,
                "--no-plot",
                "--finish-ml",
                "0",
            ]
        )
        == 0  # fmt: skip
    )
    model = load(out / "last.pt", weights="raw").train()
    held_out = sample_tensor("8gaussians", 500, seed=3)
    before = evaluate_nll(model, held_out, rtol=1e-5, atol=1e-5)
    finish = MaximumLikelihood(solver={"rtol": 1e-4, "atol": 1e-4})
    fit(
        model, toy_sampler("8gaussians"), iters=20, batch_size=128, objective=finish, progress=False
    )
    after = evaluate_nll(model, held_out, rtol=1e-5, atol=1e-5)
    assert after < before, (before, after)


FINISHED = ["--objective", "flow-matching", "--finish-ml", "4", "--iters", "6", "--no-plot"]
TWO_STAGES = [*FINISHED, *SMALL[2:], "--checkpoint-every", "2", "--eval-every", "3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Flow matching for 6 iterations, then a likelihood finish of 4, without interruption."""
    out = tmp_path_factory.mktemp("fm") / "straight"
    assert main(["train", "--out", str(out), *TWO_STAGES]) == 0
    return out


def _same_model(a, b) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["iteration"] == sb["iteration"]
    for name, value in sa["model"].items():
        assert torch.equal(value, sb["model"][name]), name


def test_the_finish_writes_both_stages_and_keeps_the_flow_matching_one(straight):
    fm = load_checkpoint(straight / "flow_matching" / "last.pt")
    final = load_checkpoint(straight / "last.pt")
    assert (fm["iteration"], fm["stage"]) == (6, "flow-matching")
    assert (final["iteration"], final["stage"]) == (4, "finish")
    assert "fm_loss" in fm["history"] and "nfe_forward" in final["history"]
    assert final["spec"] == fm["spec"]  # the same model, T fixed, continued by likelihood


@pytest.mark.parametrize("objective, killed_at", [(FlowMatching, 5), (MaximumLikelihood, 4)])
def test_a_two_stage_run_killed_in_either_stage_resumes_exactly(
    straight, tmp_path, monkeypatch, kill_at, objective, killed_at
):
    kill_at(objective, killed_at)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out", str(out), *TWO_STAGES])
    monkeypatch.undo()
    assert main(["train", "--out", str(out), *TWO_STAGES, "--resume"]) == 0
    _same_model(out / "last.pt", straight / "last.pt")
    _same_model(out / "flow_matching" / "last.pt", straight / "flow_matching" / "last.pt")
    resumed = json.loads((out / "history.json").read_text())
    expected = json.loads((straight / "history.json").read_text())
    resumed.pop("seconds"), expected.pop("seconds")
    assert resumed == expected


def test_resuming_with_another_objective_is_an_error_message(straight, tmp_path, capsys):
    argv = ["train", "--out", str(straight), *SMALL[2:], "--no-plot", "--resume"]
    assert main(argv) == 2  # likelihood flags on a finished two-stage run
    assert "holds a finish stage" in capsys.readouterr().err
