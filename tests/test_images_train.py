"""Training on images: a short digits run lowers the bits/dim, and the CLI runs end to end."""

import json

import pytest
import torch

from cnf.cli import main
from cnf.dense import digits_dense_model
from cnf.multiscale import digits_model
from cnf.training import evaluate_bits_per_dim, fit, image_sampler

pytest.importorskip("sklearn")

from cnf.data import load_digits  # noqa: E402


@pytest.mark.parametrize(
    "make",
    [
        lambda: digits_dense_model(hidden=(32, 32), rtol=1e-3, atol=1e-3),
        lambda: digits_model(hidden_channels=(8, 8), rtol=1e-3, atol=1e-3),
    ],
    ids=["dense", "multiscale"],
)
def test_short_digits_run_lowers_test_bits_per_dim(make):
    torch.manual_seed(0)
    model = make()
    train = load_digits("train").images
    test = load_digits("test").images[:64]
    solver = {
        "trace": "hutchinson",
        "rtol": 1e-3,
        "atol": 1e-3,
        "generator": torch.Generator().manual_seed(0),
    }
    before = evaluate_bits_per_dim(model, test, 17, draws=1, **solver)
    fit(model, image_sampler(train, 17), iters=25, batch_size=32, lr=1e-2, progress=False)
    solver["generator"] = torch.Generator().manual_seed(0)
    after = evaluate_bits_per_dim(model, test, 17, draws=1, **solver)
    assert after < before - 0.3, (before, after)
    assert after < 8.0


@pytest.mark.parametrize("architecture", ["dense", "multiscale"])
def test_cli_trains_and_evaluates_digits(tmp_path, capsys, architecture):
    out = tmp_path / "digits"
    argv = [
        "train",
        "--architecture",
        architecture,
        "--data",
        "digits",
        "--out",
        str(out),
        "--iters",
        "2",
        "--batch-size",
        "8",
        "--hidden",
        "4",
        "--tol",
        "1e-2",
        "--eval-every",
        "1000",
        "--draws",
        "1",
        "--quiet",
        "--no-plot",
        "--threads",
        "1",
        "--blocks",
        "2",
        "--translate",
        "0.5",
    ]
    assert main(argv) == 0
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    spec = torch.load(out / "best.pt", weights_only=True)["spec"]
    assert spec["architecture"] == architecture
    # the dense field trains with its analytic exact trace; a conv field's would cost 64 VJPs
    assert spec["options"]["trace"] == ("exact" if architecture == "dense" else "hutchinson")
    assert spec["options"]["blocks" if architecture == "dense" else "blocks_per_scale"] == 2
    assert "test bits/dim" in capsys.readouterr().out
    result = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "best.pt"),
                "--draws",
                "1",
                "--tol",
                "1e-2",
                "--json",
                str(result),
            ]
        )
        == 0
    )
    values = json.loads(result.read_text())
    assert values["n"] == 297 and values["trace"] == "exact" and values["bits_per_dim"] > 0
    samples = tmp_path / "s.npy"
    assert (
        main(["sample", "--checkpoint", str(out / "best.pt"), "--n", "3", "--out", str(samples)])
        == 0
    )
    import numpy as np

    x = np.load(samples)
    assert x.shape == (3, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
