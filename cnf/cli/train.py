"""``cnf train``: the recipe of ``--data`` and ``--architecture`` with the flags' values in
place of its own, trained by :func:`cnf.training.fit` in one stage (likelihood, or flow
matching) or two (flow matching, then a likelihood finish); then the report and the pictures."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path

import torch

from .common import metric_value, open_checkpoint, pick_device
from .pictures import write_pictures
from .resume import resumed


def _model_settings(args: argparse.Namespace, recipe, data) -> dict:
    """The model flags, for :meth:`cnf.recipes.Recipe.spec` (None: the recipe's value); a
    table's model also takes the data's width."""
    table = {}
    if recipe.kind == "tabular":
        table = {"dim": data.dim, "standardize": False if args.no_standardize else None}
    return dict(
        table,
        context=getattr(data, "embedding", None),
        hidden=args.hidden,
        activation=args.activation,
        blocks=args.blocks,
        T=args.T,
        train_T=False if args.fixed_T else None,
        trace=args.trace,
        tol=args.tol,
        dtype=args.dtype,
    )


def _fit_settings(args: argparse.Namespace, out: Path, device: torch.device, seed: int) -> dict:
    """The flags that are keywords of :func:`cnf.training.fit` (None: the recipe's value)."""
    names = ("iters", "batch_size", "lr", "weight_decay", "schedule", "clip_grad", "kinetic")
    settings = {name: getattr(args, name) for name in (*names, "jacobian", "eval_every", "ema")}
    settings["ema"] = None if args.ema == 0 else args.ema  # 0 turns the average off below
    return dict(
        settings,
        checkpoint_dir=out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=seed,
        device=device,
        progress=not args.quiet,
    )


STAGE_WORDS = {
    "likelihood": "",
    "flow-matching": " by flow matching",
    "finish": " by maximum likelihood from the flow-matching model",
}
"""How ``cnf train`` names each training stage in its messages."""


def _spec(recipe, args: argparse.Namespace, data) -> dict:
    """The model spec of the flags; for flow matching, fixed ``T`` adding up to 1."""
    if args.objective == "likelihood":
        return recipe.spec(**_model_settings(args, recipe, data))
    if args.T is not None and not args.fixed_T:
        raise ValueError("flow matching needs a fixed T: add --fixed-T (the blocks' T sum to 1)")
    return recipe.flow_matching_spec(**_model_settings(args, recipe, data))


def _recipe_and_record(args: argparse.Namespace):
    """The recipe of ``--data`` (a name, or a file: the ``file`` recipe) and the record of the
    run's data; flags that do not apply to that data are refused."""
    from ..recipes import get, names

    if args.data in names():
        recipe, root = get(args.data, args.architecture), args.root
        if args.columns or args.drop_nonfinite or args.context_columns:
            raise ValueError(
                "--columns, --context-columns and --drop-nonfinite apply to a file given to --data"
            )
    else:
        if args.root:
            raise ValueError("--root is the folder of MNIST, CIFAR-10 or MAF's files; a file "
                             "given to --data needs none")  # fmt: skip
        recipe, root = get("file", args.architecture), args.data
    if args.no_standardize and recipe.kind != "tabular":
        raise ValueError("--no-standardize applies to tables; other data have no such step")
    if args.conditional and recipe.kind != "image":
        raise ValueError(
            "--conditional fits images given their class labels; the rotating data are "
            "conditional by themselves, and a file's contexts are its --context-columns"
        )
    options = {"columns": args.columns, "drop_nonfinite": args.drop_nonfinite or None}
    options.update(context_columns=args.context_columns, conditional=args.conditional or None)
    return recipe, recipe.record(root=root, split_seed=args.split_seed, **options)


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


def _stage_options(recipe, stage: str, args, folder: Path, run: dict) -> dict:
    """The keywords of :func:`cnf.training.fit` for one stage; the training flags apply to the
    stage the objective names, the finish takes the recipe's plan and ``--finish-ml``; on
    ``--resume``, what the stage's checkpoint recorded replaces what no flag set."""
    settings = _fit_settings(args, folder, run["device"], run["seed"])
    if stage == "finish":
        names = ("checkpoint_dir", "checkpoint_every", "resume", "seed", "device", "progress")
        settings = {k: settings[k] for k in names}
        settings["iters"] = args.finish_ml
    options = recipe.fit_options(stage, **settings)
    if args.ema == 0 and stage != "finish":
        options["ema"] = None
    kept = run["kept"].get(stage, {})
    options.update({k: v for k, v in kept.items() if k in options})
    coupling = args.coupling or kept.get("coupling")
    if stage == "flow-matching" and coupling is not None:
        coupling = None if coupling == "none" else coupling
        options["objective"] = dataclasses.replace(options["objective"], coupling=coupling)
    return options


def cmd_train(args: argparse.Namespace) -> int:
    """``cnf train``: train the recipe the flags pick, with their values, stage by stage; with
    ``--nproc N``, the same command in N processes (under torchrun: data-parallel)."""
    from .. import distributed

    if args.nproc is not None and not distributed.launched():
        _recipe_and_record(args)  # refuse bad flags here, not in N processes
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    world = distributed.init(backend="gloo" if args.device == "cpu" else None)
    try:
        if world is None or world.main:
            return _train(args, world)
        with contextlib.redirect_stdout(io.StringIO()):  # rank 0 speaks for all
            return _train(args, world)
    finally:
        if world is not None:
            distributed.finish()


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            kept.append(word)
    return kept


def _train(args: argparse.Namespace, world) -> int:
    """``cnf train`` in this process (one of several under torchrun: ``world``)."""
    from ..models import build
    from ..training.checkpoint import check_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, record = _recipe_and_record(args)
    device = (
        world.device if world is not None and args.device == "auto" else pick_device(args.device)
    )
    out = check_folder(Path(args.out or f"runs/{Path(args.data).stem}"), "--out")
    data = record.load()  # before the model: a table's model takes its width
    spec = _spec(recipe, args, data)
    stages = _stages(recipe, args, out)
    kept = resumed(recipe, args, stages, record, spec) if args.resume else {}
    spec = kept.pop("spec", spec)  # the checkpoint's model: the flags agree with it
    seeds = [settings["seed"] for settings in kept.values() if "seed" in settings]
    seed = args.seed if args.seed is not None else (seeds[0] if seeds else 0)
    torch.manual_seed(seed)
    model = recipe.fit_data_steps(build(spec), data).to(device)  # a table: densities in its units
    extra = {"spec": spec, "data": recipe.name, "recipe": record.to_dict()}
    if recipe.kind == "tabular":  # the names label samples
        extra["columns"] = list(data.columns)
        if data.contexts is not None:
            extra["context_columns"] = list(data.context_columns)
    val = data.part("val", seed=seed + 1, n=args.eval_n)
    tol = _spec_tol(spec)
    run = dict(data=data, val=val, tol=tol, device=device, extra=extra, seed=seed, kept=kept)
    run["main"] = world is None or world.main
    for k, (stage, folder) in enumerate(stages):
        if k + 1 < len(stages) and args.resume and (stages[-1][1] / "last.pt").is_file():
            continue  # the finish has begun: this stage is done
        if k > 0:  # the finish continues the model the stage before kept
            model = open_checkpoint(_kept(recipe, stages[k - 1][1]), device)[2].train()
        _train_stage(recipe, args, model, stage, folder, run, last=k + 1 == len(stages))
    return 0


def _spec_tol(spec: dict) -> float:
    """The training tolerance of a model spec (its rtol; atol is the same in every recipe)."""
    from ..models import settings_of

    return settings_of(spec)["rtol"]


def _kept(recipe, folder: Path) -> Path:
    """The checkpoint a finished stage keeps: ``best.pt`` where the recipe keeps the best."""
    return folder / ("best.pt" if recipe.evaluation.keep_best else "last.pt")


def _train_stage(recipe, args, model, stage: str, folder: Path, run: dict, last: bool) -> None:
    """Train ``model`` for one stage into ``folder``; the last stage reports and draws."""
    from ..models import settings_of, trace_reason
    from ..training import fit

    options = _stage_options(recipe, stage, args, folder, run)
    data, tol = run["data"], run["tol"]
    how = STAGE_WORDS[stage]
    trace = settings_of(run["extra"]["spec"])["trace"]
    if recipe.model.get("trace") == "auto" and args.trace is None:  # the recipe decided: why
        spec = run["extra"]["spec"]
        trace += f" ({trace_reason(spec['dim'], spec['hidden'])})"
    name = getattr(data, "name", recipe.name)
    print(
        f"training a CNF ({recipe.architecture}){how} on {name} ({data.describe()}): "
        f"{options['iters']} iterations, batch {options['batch_size']}, trace {trace}, "
        f"tol {tol:g}, device {run['device']}; writing {folder}/",
        flush=True,
    )
    translate = _first(args.translate, run["kept"].get(stage, {}).get("translate"))
    translate = _first(translate, recipe.augment.get("translate"))
    coupling = getattr(options.get("objective"), "coupling", None)
    flags = {"translate": translate}
    if stage == "flow-matching":
        flags["coupling"] = coupling or "none"
    tic = time.perf_counter()
    history = fit(
        model,
        data.sampler(translate),
        **options,
        **recipe.validation(run["val"], tol=tol, draws=args.draws),
        extra_state={**run["extra"], "stage": stage, "flags": flags},
        agree_steps=not args.independent_steps,
    )
    seconds = time.perf_counter() - tic
    if not run["main"]:  # rank 0 reports and draws
        return
    (folder / "history.json").write_text(json.dumps(history.to_dict()))
    kept = _report_training(recipe, data, history, seconds, folder, run["device"], tol, args.draws)
    if last and not args.no_plot:
        write_pictures(kept, folder, run["device"], n=args.plot_n, gif=not args.no_gif)


def _first(value, default):
    """``value``, or ``default`` where it is None."""
    return default if value is None else value


def _report_training(recipe, data, history, seconds, out, device, tol, draws) -> Path:
    """Print how training ended; return the checkpoint to draw: ``best.pt`` or ``last.pt``."""
    metric = recipe.evaluation.metric
    if not recipe.evaluation.keep_best:
        held_out = metric_value(metric, history.eval_nll[-1], 3)
        line = f"done in {seconds:.0f} s; held-out {held_out}"
        if data.entropy is not None:
            gap = history.eval_nll[-1] - data.entropy
            line += f" (entropy {data.entropy:.3f}, gap {gap:.3f})"
        print(line, flush=True)
        return out / "last.pt"
    best = min(range(len(history.eval_nll)), key=history.eval_nll.__getitem__)
    model = open_checkpoint(out / "best.pt", device)[2]
    # the test value at cnf eval's tolerance, or at the training one if that is tighter
    test_tol = min(tol, recipe.evaluation.tol)
    test = recipe.score(model, data.part("test"), tol=test_tol, draws=draws)
    validation = metric_value(metric, history.eval_nll[best], 3)
    line = (
        f"done in {seconds:.0f} s; best validation {validation} "
        f"at iteration {history.eval_iteration[best]}; its test {metric_value(metric, test, 3)} "
        f"(tol {test_tol:g})"
    )
    if data.entropy is not None:
        line += f"; entropy {data.entropy:.3f}, gap {test - data.entropy:.3f}"
    print(line, flush=True)
    return out / "best.pt"
