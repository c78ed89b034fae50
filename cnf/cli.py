"""The ``cnf`` command line: ``cnf train | eval | sample | plot``.

Flag parsing over the recipe table (:mod:`cnf.recipes`): ``cnf train`` looks up the recipe of
``--data`` and ``--architecture``, replaces what the flags set, and calls
:func:`cnf.training.fit` with the recipe's keywords, as Python code would. Its checkpoints store
the recipe's :class:`cnf.recipes.Record`, from which ``cnf eval`` and ``cnf plot`` rebuild the
split the model was trained on. argparse lives here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]

METRICS = {"nll": ("NLL", " nats"), "bits_per_dim": ("bits/dim", "")}
"""How each evaluation metric is named in messages: its label and unit."""


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _value(metric: str, value: float, digits: int) -> str:
    label, unit = METRICS[metric]
    return f"{label} {value:.{digits}f}{unit}"


def _open(checkpoint, device: torch.device):
    """The checkpoint's contents, its recipe record and its model (averaged weights if any)."""
    from .recipes import Record
    from .training import build_from_state, load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    model = build_from_state(state, weights="ema", source=str(checkpoint)).to(device)
    return state, Record.from_checkpoint(state, source=str(checkpoint)), model


# --- train -------------------------------------------------------------------------------------


def _model_settings(args: argparse.Namespace) -> dict:
    """The model flags, for :meth:`cnf.recipes.Recipe.spec` (None: the recipe's value)."""
    return dict(
        hidden=args.hidden,
        activation=args.activation,
        blocks=args.blocks,
        T=args.T,
        train_T=False if args.fixed_T else None,
        trace=args.trace,
        tol=args.tol,
        dtype=args.dtype,
    )


def _fit_settings(args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """The flags that are keywords of :func:`cnf.training.fit` (None: the recipe's value)."""
    names = ("iters", "batch_size", "lr", "weight_decay", "schedule", "clip_grad", "kinetic")
    settings = {name: getattr(args, name) for name in (*names, "jacobian", "eval_every", "ema")}
    settings["ema"] = None if args.ema == 0 else args.ema  # 0 turns the average off below
    return dict(
        settings,
        checkpoint_dir=out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
    )


STAGE_WORDS = {
    "likelihood": "",
    "flow-matching": " by flow matching",
    "finish": " by maximum likelihood from the flow-matching model",
}
"""How ``cnf train`` names each training stage in its messages."""


def _spec(recipe, args: argparse.Namespace) -> dict:
    """The model spec of the flags; for flow matching, fixed ``T`` adding up to 1."""
    if args.objective == "likelihood":
        return recipe.spec(**_model_settings(args))
    if args.T is not None and not args.fixed_T:
        raise ValueError("flow matching needs a fixed T: add --fixed-T (the blocks' T sum to 1)")
    return recipe.flow_matching_spec(**_model_settings(args))


def _stages(recipe, args: argparse.Namespace, out: Path) -> list[tuple[str, Path]]:
    """The training stages of the flags and the folder of each: the last one writes ``out``."""
    if args.objective == "likelihood":
        for flag in ("coupling", "finish_ml"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                raise ValueError(f"{name} applies to --objective flow-matching only")
        return [("likelihood", out)]
    if args.kinetic or args.jacobian:
        raise ValueError("--kinetic and --jacobian weight the likelihood; flow matching has none")
    finish = recipe.flow_matching.finish_iters if args.finish_ml is None else args.finish_ml
    if finish < 0:
        raise ValueError(f"--finish-ml must be >= 0 iterations, got {finish}")
    if finish == 0:
        return [("flow-matching", out)]
    return [("flow-matching", out / "flow_matching"), ("finish", out)]


def _stage_options(recipe, stage: str, args: argparse.Namespace, folder: Path, device) -> dict:
    """The keywords of :func:`cnf.training.fit` for one stage; the training flags apply to the
    stage the objective names, the finish takes the recipe's plan and ``--finish-ml``."""
    settings = _fit_settings(args, folder, device)
    if stage == "finish":
        names = ("checkpoint_dir", "checkpoint_every", "resume", "seed", "device", "progress")
        settings = {k: settings[k] for k in names}
        settings["iters"] = args.finish_ml
    options = recipe.fit_options(stage, **settings)
    if args.ema == 0 and stage != "finish":
        options["ema"] = None
    if stage == "flow-matching" and args.coupling is not None:
        coupling = None if args.coupling == "none" else args.coupling
        options["objective"] = dataclasses.replace(options["objective"], coupling=coupling)
    return options


def cmd_train(args: argparse.Namespace) -> int:
    from .models import build
    from .recipes import get

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get(args.data, args.architecture)
    device = _device(args.device)
    out = Path(args.out or f"runs/{args.data}")
    spec = _spec(recipe, args)
    stages = _stages(recipe, args, out)
    torch.manual_seed(args.seed)
    model = build(spec).to(device)
    record = recipe.record(root=args.root, split_seed=args.split_seed)
    if args.resume:
        for stage, folder in stages:
            _check_resume(folder / "last.pt", record, stage)
    data = record.load()
    tol = recipe.tol if args.tol is None else args.tol
    val = data.part("val", seed=args.seed + 1, n=args.eval_n)
    extra = {"spec": spec, "data": recipe.name, "recipe": record.to_dict()}
    run = dict(data=data, val=val, tol=tol, device=device, extra=extra)
    for k, (stage, folder) in enumerate(stages):
        if k + 1 < len(stages) and args.resume and (stages[-1][1] / "last.pt").is_file():
            continue  # the finish has begun: this stage is done
        if k > 0:  # the finish continues the model the stage before kept
            model = _open(_kept(recipe, stages[k - 1][1]), device)[2].train()
        _train_stage(recipe, args, model, stage, folder, run, last=k + 1 == len(stages))
    return 0


def _kept(recipe, folder: Path) -> Path:
    """The checkpoint a finished stage keeps: ``best.pt`` where the recipe keeps the best."""
    return folder / ("best.pt" if recipe.evaluation.keep_best else "last.pt")


def _train_stage(recipe, args, model, stage: str, folder: Path, run: dict, last: bool) -> None:
    """Train ``model`` for one stage into ``folder``; the last stage reports and draws."""
    from .training import fit

    options = _stage_options(recipe, stage, args, folder, run["device"])
    data, tol = run["data"], run["tol"]
    how = STAGE_WORDS[stage]
    trace = args.trace or recipe.model["trace"]
    print(
        f"training a CNF ({recipe.architecture}){how} on {recipe.name} ({data.describe()}): "
        f"{options['iters']} iterations, batch {options['batch_size']}, trace {trace}, "
        f"tol {tol:g}, device {run['device']}; writing {folder}/",
        flush=True,
    )
    tic = time.perf_counter()
    history = fit(
        model,
        data.sampler(args.translate),
        **options,
        **recipe.validation(run["val"], tol=tol, draws=args.draws),
        extra_state={**run["extra"], "stage": stage},
    )
    seconds = time.perf_counter() - tic
    (folder / "history.json").write_text(json.dumps(history.to_dict()))
    kept = _report_training(recipe, data, history, seconds, folder, run["device"], tol, args.draws)
    if last and not args.no_plot:
        _write_pictures(kept, folder, run["device"], n=args.plot_n, gif=not args.no_gif)


def _check_resume(last: Path, record, stage: str) -> None:
    """Refuse to continue a run on other data, or with another objective, than it began."""
    from .recipes import Record
    from .training import load_checkpoint

    if not last.is_file():
        return  # nothing to resume: a fresh run
    state = load_checkpoint(last)
    before = Record.from_checkpoint(state, source=str(last))
    keys = ("name", "architecture", "split_seed")
    if any(getattr(before, key) != getattr(record, key) for key in keys):
        raise ValueError(
            f"{last} was trained on {before.name} ({before.architecture}, split seed "
            f"{before.split_seed}); resume it with the same --data, --architecture and "
            "--split-seed, or write to another --out"
        )
    was = state.get("stage", "likelihood")  # runs before flow matching were all likelihood
    if was != stage:
        raise ValueError(
            f"{last} holds a {was} stage, but these flags train {stage} there; resume with the "
            "flags it began with (--objective, --finish-ml), or write to another --out"
        )


def _report_training(recipe, data, history, seconds, out, device, tol, draws) -> Path:
    """Print how training ended; return the checkpoint to draw: ``best.pt`` or ``last.pt``."""
    metric = recipe.evaluation.metric
    if not recipe.evaluation.keep_best:
        line = f"done in {seconds:.0f} s; held-out {_value(metric, history.eval_nll[-1], 3)}"
        if data.entropy is not None:
            gap = history.eval_nll[-1] - data.entropy
            line += f" (entropy {data.entropy:.3f}, gap {gap:.3f})"
        print(line, flush=True)
        return out / "last.pt"
    best = min(range(len(history.eval_nll)), key=history.eval_nll.__getitem__)
    model = _open(out / "best.pt", device)[2]
    # the test value at cnf eval's tolerance, or at the training one if that is tighter
    test_tol = min(tol, recipe.evaluation.tol)
    test = recipe.score(model, data.part("test"), tol=test_tol, draws=draws)
    print(
        f"done in {seconds:.0f} s; best validation {_value(metric, history.eval_nll[best], 3)} "
        f"at iteration {history.eval_iteration[best]}; its test {_value(metric, test, 3)} "
        f"(tol {test_tol:g})",
        flush=True,
    )
    return out / "best.pt"


# --- eval, sample, plot ------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    device = _device(args.device)
    state, record, model = _open(args.checkpoint, device)
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
    msg = f"{recipe.name}: test {_value(policy.metric, value, 4)} on {len(test)} points"
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
    device = _device(args.device)
    _, record, model = _open(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=gen)
    if record.recipe.levels is not None:
        x = x.clamp(0.0, 1.0)  # the logit's inverse can step slightly outside [0, 1]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.detach().cpu().numpy())
    print(f"wrote {args.n} samples to {out}")
    return 0


def _toy_pictures(model, record, n: int, device, gif: bool, out: Path) -> tuple[dict, list]:
    from . import plot
    from .data import DENSITY_NAMES, density

    data = record.load().part("test", seed=0, n=n).numpy()
    true = density(record.name) if record.name in DENSITY_NAMES else None
    gen = torch.Generator(device=device).manual_seed(0)
    figures = {
        "density.png": plot.plot_density(model, data=data, true_density=true),
        "samples.png": plot.plot_samples(model.sample(n, generator=gen).detach(), data=data),
        "trajectories.png": plot.plot_trajectories(model),
    }
    if not gif:
        return figures, []
    plot.animate_flow(model, out / "flow.gif")
    return figures, ["flow.gif"]


def _image_pictures(model, record, n: int, device, gif: bool, out: Path) -> tuple[dict, list]:
    from . import plot

    test = record.load().part("test", n=n).float() / record.recipe.levels
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        samples = model.sample(n, generator=gen).clamp(0.0, 1.0)
    figures = {"samples.png": plot.plot_images(samples, test, titles=("model samples", "test"))}
    return figures, []  # no animation of images


PICTURES = {"toy2d": (_toy_pictures, 20000), "image": (_image_pictures, 64)}
"""Per kind of model: the function that draws its pictures (figures, and the names of files it
wrote itself) and their default number of samples."""


def _write_pictures(checkpoint, out: Path, device, *, n: int | None, gif: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from . import plot

    state, record, model = _open(checkpoint, device)
    out.mkdir(parents=True, exist_ok=True)
    draw, default_n = PICTURES[record.recipe.kind]
    figures, files = draw(model, record, n or default_n, device, gif, out)
    figures["curves.png"] = plot.plot_curves(state["history"])
    for fname, fig in figures.items():
        fig.savefig(out / fname, dpi=120, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote {', '.join([*figures, *files])} to {out}/", flush=True)


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    _write_pictures(args.checkpoint, out, _device(args.device), n=args.n, gif=not args.no_gif)
    return 0


# --- flags -------------------------------------------------------------------------------------


def _train_parser(sub) -> None:
    from .recipes import architectures, get, names

    examples = "; ".join(
        f"{name}: {dict(get(name).training)}, model {dict(get(name).model)}"
        for name in ("8gaussians", "digits", "mnist")
    )
    t = sub.add_parser(
        "train",
        help="fit a density by maximum likelihood or flow matching (2-D toy data or images)",
        description="Every default comes from the recipe of --data and --architecture "
        f"(cnf.recipes.get(data, architecture)), e.g. {examples}.",
    )
    t.add_argument("--data", default="8gaussians", choices=names())
    t.add_argument(
        "--architecture",
        choices=architectures(),
        help="model family (default: the data's first recipe: mlp for 2-D data, dense for "
        "digits, multiscale for MNIST/CIFAR-10)",
    )
    t.add_argument("--root", help="folder of the MNIST/CIFAR-10 files")
    t.add_argument("--split-seed", type=int, help="seed of the digits' train/val/test split")
    t.add_argument("--out", help="output folder (default runs/<data>)")
    _model_flags(t)
    _training_flags(t)
    t.add_argument("--eval-n", type=int, help="held-out points for the curves (2-D data)")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--plot-n", type=int, help="samples in the pictures")
    t.add_argument("--no-plot", action="store_true")
    t.add_argument("--no-gif", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _model_flags(t: argparse.ArgumentParser) -> None:
    from .fields import ACTIVATIONS

    t.add_argument("--trace", choices=("exact", "hutchinson"), help="trace of training solves")
    t.add_argument("--tol", type=float, help="rtol = atol of the training solves")
    t.add_argument("--hidden", type=_ints, help="hidden sizes (MLPs) or channels (multiscale)")
    t.add_argument("--activation", choices=ACTIVATIONS, help="the field's activation")
    t.add_argument("--blocks", type=int, help="CNF blocks, or blocks per scale (multiscale)")
    t.add_argument("--T", type=float)
    t.add_argument("--fixed-T", action="store_true", help="do not learn the integration time")
    t.add_argument("--dtype", choices=("float32", "float64"))


def _training_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--iters", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=("constant", "cosine"))
    t.add_argument("--clip-grad", type=float)
    t.add_argument("--kinetic", type=float)
    t.add_argument("--jacobian", type=float)
    t.add_argument("--ema", type=float, help="EMA decay of the weights; 0 turns it off")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--draws", type=int, help="dequantization draws per validation (images)")
    t.add_argument(
        "--translate",
        type=float,
        help="images: probability of moving a training image by one pixel (augmentation)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--objective",
        choices=("likelihood", "flow-matching"),
        default="likelihood",
        help="maximum likelihood through the ODE, or flow matching (regression, no solve; the "
        "blocks' T are fixed to sum to 1)",
    )
    t.add_argument(
        "--coupling",
        choices=("none", "ot"),
        help="flow matching: base-data pairing (default: the recipe's)",
    )
    t.add_argument(
        "--finish-ml",
        type=int,
        metavar="ITERS",
        help="flow matching: then continue by maximum likelihood for ITERS iterations (0: no "
        "finish; default: the recipe's); the flow-matching stage writes <out>/flow_matching/",
    )


def _other_parsers(sub) -> None:
    e = sub.add_parser("eval", help="test NLL (2-D: fresh samples) or bits/dim (images)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n", type=int, help="test points (default: 20000 fresh 2-D points, or all)")
    e.add_argument("--tol", type=float, help="solver tolerance (default: the recipe's)")
    e.add_argument("--draws", type=int, help="dequantization draws (images; default 4)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples to a .npy file")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--out", default="samples.npy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("plot", help="write the pictures of a trained model")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", help="folder (default: the checkpoint's)")
    q.add_argument("--n", type=int, help="samples (default: 20000 2-D points, 64 images)")
    q.add_argument("--no-gif", action="store_true")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=cmd_plot)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnf", description="Continuous normalizing flows: train, evaluate, sample, plot."
    )
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _other_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .training import CheckpointError, TrainingError

    try:
        return args.func(args)
    except (CheckpointError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
