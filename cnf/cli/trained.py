"""The commands on a trained model: ``cnf eval`` (test NLL or bits/dim), ``cnf sample`` (a
.npy file of samples) and ``cnf plot`` (its pictures)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import metric_value, open_checkpoint, pick_device
from .pictures import write_pictures


def _output_file(path: str | Path, flag: str) -> Path:
    """Check, before any work, that the file ``path`` can be written (its folder may be new)."""
    from ..training.checkpoint import check_folder

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    check_folder(path.parent, f"the folder of {flag}")
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    """``cnf eval``: score a checkpoint on the test part of its data; print (and ``--json``)."""
    device = pick_device(args.device)
    if args.json:
        _output_file(args.json, "--json")
    state, record, model = open_checkpoint(args.checkpoint, device)
    recipe, data = record.recipe, record.load()
    policy = recipe.evaluation
    test = data.part("test", seed=args.seed, n=args.n)
    tol = policy.tol if args.tol is None else args.tol
    draws = policy.test_draws if args.draws is None else args.draws
    tic = time.perf_counter()
    value = recipe.score(
        model,
        test,
        tol=tol,
        draws=draws,
        seed=args.seed,
        batch_size=args.batch_size or policy.batch_size,
    )
    result = {
        "data": recipe.name,
        "n": len(test),
        policy.metric: value,
        "trace": policy.trace,
        "split_seed": record.split_seed,
        "iteration": int(state["iteration"]),
        "tol": tol,
        "seconds": time.perf_counter() - tic,
    }
    msg = f"{recipe.name}: test {metric_value(policy.metric, value, 4)} on {len(test)} points"
    if policy.metric == "bits_per_dim":
        result["draws"] = draws
        msg += f", {draws} dequantization draws"
    msg += f" ({policy.trace} trace, tol {tol:g})"
    if data.entropy is not None:
        result.update(entropy=data.entropy, gap=value - data.entropy)
        msg += f"; entropy {data.entropy:.4f}, gap {value - data.entropy:.4f}"
    print(msg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """``cnf sample``: draw ``--n`` samples of a checkpoint's model to a .npy file."""
    device = pick_device(args.device)
    out = _output_file(args.out, "--out")
    _, record, model = open_checkpoint(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=gen)
    if record.recipe.levels is not None:
        x = x.clamp(0.0, 1.0)  # the logit's inverse can step slightly outside [0, 1]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.detach().cpu().numpy())
    print(f"wrote {args.n} samples to {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``cnf plot``: write the pictures of a checkpoint's model (next to it by default)."""
    from ..training.checkpoint import check_folder

    out = check_folder(Path(args.out) if args.out else Path(args.checkpoint).parent, "--out")
    write_pictures(args.checkpoint, out, pick_device(args.device), n=args.n, gif=not args.no_gif)
    return 0
