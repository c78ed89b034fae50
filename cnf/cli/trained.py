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
    from ..training import split_context

    device = pick_device(args.device)
    if args.json:
        _output_file(args.json, "--json")
    state, record, model = open_checkpoint(args.checkpoint, device)
    recipe = record.recipe
    policy = recipe.evaluation
    if args.data is not None:
        data = None
        test = _rows_of(args.data, record, model, args.drop_nonfinite)
        test = tuple(part[: args.n] for part in test) if isinstance(test, tuple) else test[: args.n]
    else:
        data = record.load()
        test = data.part("test", seed=args.seed, n=args.n)
    points, _ = split_context(test)
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
        "data": args.data or recipe.name,
        "n": len(points),
        policy.metric: value,
        "trace": policy.trace,
        "split_seed": record.split_seed,
        "iteration": int(state["iteration"]),
        "tol": tol,
        "seconds": time.perf_counter() - tic,
    }
    where = args.data or getattr(data, "name", recipe.name)
    msg = f"{where}: test {metric_value(policy.metric, value, 4)} on {len(points)} points"
    if recipe.kind == "tabular":
        msg += " (per row, in the data's units)"
    if policy.metric == "bits_per_dim":
        result["draws"] = draws
        msg += f", {draws} dequantization draws"
    msg += f" ({policy.trace} trace, tol {tol:g})"
    if data is not None and data.entropy is not None:
        result.update(entropy=data.entropy, gap=value - data.entropy)
        msg += f"; entropy {data.entropy:.4f}, gap {value - data.entropy:.4f}"
    print(msg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _rows_of(path: str, record, model, drop_nonfinite: bool):
    """The rows of the file ``path`` to score a checkpoint's model of tables on: its recorded
    columns, as many as the model has, float64 ``(n, D)``."""
    from ..data import read_table

    if record.recipe.kind == "image":
        raise ValueError("--data scores a model of tables or 2-D points on a file; this "
                         "checkpoint holds an image model")  # fmt: skip
    columns = (record.options or {}).get("columns")
    context_columns = (record.options or {}).get("context_columns")
    try:
        table = read_table(
            path,
            columns=columns,
            drop_nonfinite=drop_nonfinite,
            context_columns=context_columns,
        )
    except ValueError as exc:
        if not columns:
            raise
        raise ValueError(
            f"{exc} (the model was trained on columns {columns}"
            + (f" given {context_columns})" if context_columns else ")")
        ) from None
    want = model.event_shape.numel()
    if table.values.shape[1] != want:
        picked = f" (its columns {', '.join(map(str, columns))})" if columns else ""
        raise ValueError(
            f"{path} has {table.values.shape[1]} columns{picked}, but the checkpoint's model "
            f"has {want}: give a file with the columns it was trained on, in the same order"
        )
    if table.dropped:
        print(f"dropped {table.dropped} rows of {path} holding NaN, Inf or a missing value")
    if table.contexts is not None:
        return torch.as_tensor(table.values), torch.as_tensor(table.contexts)
    return torch.as_tensor(table.values)


def _write_samples(out: Path, x: np.ndarray, columns) -> None:
    """``x`` ``(n, *event_shape)`` to ``.npy``, or to ``.csv`` with a header of ``columns``."""
    if out.suffix.lower() == ".csv":
        if x.ndim != 2:
            raise ValueError(
                f"a .csv file holds rows; these samples are {x.shape[1:]} each: use .npy"
            )
        header = ",".join(columns or (f"x{i}" for i in range(x.shape[1])))
        np.savetxt(out, x, delimiter=",", header=header, comments="", fmt="%.9g")
    else:
        np.save(out, x)


def cmd_sample(args: argparse.Namespace) -> int:
    """``cnf sample``: draw ``--n`` samples of a checkpoint's model to a .npy or .csv file."""
    device = pick_device(args.device)
    out = _output_file(args.out, "--out")
    if out.suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"--out {out}: write samples to a .npy or .csv file")
    state, record, model = open_checkpoint(args.checkpoint, device)
    given, what = _context_flag(args.context, model, state)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=gen, **given)
    if record.recipe.levels is not None:
        x = x.clamp(0.0, 1.0)  # the logit's inverse can step slightly outside [0, 1]
    out.parent.mkdir(parents=True, exist_ok=True)
    x, columns = x.detach().cpu().numpy(), state.get("columns")
    if given and out.suffix.lower() == ".csv" and state.get("context_columns"):
        # a row of p(x | c) holds its context too, under the context columns' names
        c = given["context"].double().cpu().numpy()
        x, columns = (
            np.hstack([x, np.broadcast_to(c, (len(x), c.size))]),
            [
                *columns,
                *state["context_columns"],
            ],
        )
    _write_samples(out, x, columns)
    print(f"wrote {args.n} samples{what} to {out}")
    return 0


def _context_flag(text: str | None, model, state) -> tuple[dict, str]:
    """``{"context": c}`` of ``cnf sample --context`` for a conditional model (``{}`` for an
    unconditional one), and how messages name it."""
    from ..models import settings_of

    embedding = settings_of(state.get("spec") or {}).get("context")
    if embedding is None:
        if text is not None:
            raise ValueError("--context: this model is unconditional; leave the flag out")
        return {}, ""
    names = state.get("context_columns")
    if embedding["classes"] is not None:
        want = f"a class label in 0..{embedding['classes'] - 1}"
    else:
        want = f"{embedding['inputs']} number(s)" + (f" ({', '.join(names)})" if names else "")
    if text is None:
        raise ValueError(f"this model is conditional: pass --context, {want}")
    ref = next(model.parameters())
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--context {text!r}: give {want}") from None
    if embedding["classes"] is not None:
        label = values[0] if len(values) == 1 else -1.0
        if label != int(label) or not 0 <= label < embedding["classes"]:
            raise ValueError(f"--context {text!r}: give {want}")
        return {"context": torch.tensor(int(label), device=ref.device)}, f" of class {int(label)}"
    if len(values) != embedding["inputs"] or not all(map(np.isfinite, values)):
        raise ValueError(f"--context {text!r}: give {want}, comma-separated")
    context = torch.tensor(values, dtype=ref.dtype, device=ref.device)
    return {"context": context}, f" given context {text}"


def cmd_plot(args: argparse.Namespace) -> int:
    """``cnf plot``: write the pictures of a checkpoint's model (next to it by default)."""
    from ..training.checkpoint import check_folder

    out = check_folder(Path(args.out) if args.out else Path(args.checkpoint).parent, "--out")
    write_pictures(args.checkpoint, out, pick_device(args.device), n=args.n, gif=not args.no_gif)
    return 0
