"""Long quality runs (``python -m pytest -m slow``): the README's targets, 2-D, tables, conditional.

Each trains with ``cnf train``'s defaults (about two minutes on 2 cores) and evaluates the exact
NLL as ``cnf eval`` does (2-D data: on 20000 fresh samples; tables: on the test part).
"""

import json

import pytest

from cnf.cli import main

# Target gap to the entropy floor after the default main job (issue 4); pinwheel's entropy has
# no closed form, so its target is the NLL itself (entropy ~2.32 nats, target gap 0.10).
TARGETS = {
    "8gaussians": ("gap", 0.05),
    "pinwheel": ("nll", 2.32 + 0.10),
    "checkerboard": ("gap", 0.25),
}


def _train_and_evaluate(name: str, tmp_path, checkpoint: str) -> dict:
    """``cnf train --data NAME`` with its defaults, then ``cnf eval`` of ``checkpoint``: its
    JSON result."""
    out = tmp_path / name
    assert main(["train", "--data", name, "--out", str(out), "--quiet", "--no-plot"]) == 0
    result_file = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / checkpoint), "--json", str(result_file)]) == 0
    return json.loads(result_file.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_default_main_job_reaches_target(name, tmp_path):
    result = _train_and_evaluate(name, tmp_path, "last.pt")
    key, bound = TARGETS[name]
    assert result[key] <= bound, result


@pytest.mark.slow
def test_the_table_recipe_comes_near_the_known_entropy(tmp_path):
    """The tables' defaults on synthetic8 (8-D, entropy 5.806 nats, exact density): about two
    minutes on one thread to within 0.5 nats of the entropy (0.41 measured when the defaults
    were set; the 2-D targets are tighter, but 8 dimensions in 2000 steps are harder)."""
    pytest.importorskip("sklearn")
    result = _train_and_evaluate("synthetic8", tmp_path, "best.pt")
    assert result["gap"] <= 0.5, result


@pytest.mark.slow
def test_the_conditional_recipe_comes_near_the_true_conditional_entropy(tmp_path):
    """``cnf train --data rotating`` (x | c: three Gaussians turned by pi c and scaled by
    exp(c / 2), exact density): the defaults (1000 steps, a few minutes on one thread) end
    within 0.15 nats of the expected conditional entropy E_c H(x | c) = 2.035 on 20000 fresh
    test pairs (0.078 measured when the defaults were set), as ``cnf eval`` reports it."""
    result = _train_and_evaluate("rotating", tmp_path, "last.pt")
    assert result["gap"] <= 0.15, result
