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
import functools
import json
import math
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
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes >= 1, got {text!r}")
    return values


def _number(kind: type, low: float, high: float = math.inf, *, open_low: bool = False):
    """An argparse type: a finite ``kind`` in ``[low, high]`` (``(low, high]`` if ``open_low``),
    so that a bad value is a usage error before any work, not a failure later on."""
    noun = "an integer" if kind is int else "a number"
    if math.isinf(high):
        wanted = f"{noun} {'>' if open_low else '>='} {low:g}"
    else:
        wanted = f"{noun} in {'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_POSITIVE = _number(int, 1)
_COUNT = _number(int, 0)
_RATE = _number(float, 0, open_low=True)
_WEIGHT = _number(float, 0)
_PROBABILITY = _number(float, 0, 1)


def _decay(text: str) -> float:
    """``--ema``: 0 (off) or a decay in (0, 1)."""
    value = _number(float, 0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a decay in (0, 1), got {text}")
    return value


def _device(name: str | None) -> torch.device:
    from .training.loop import check_device

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


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
    from .models import build
    from .recipes import get
    from .training.checkpoint import check_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get(args.data, args.architecture)
    device = _device(args.device)
    out = check_folder(Path(args.out or f"runs/{args.data}"), "--out")
    spec = _spec(recipe, args)
    stages = _stages(recipe, args, out)
    record = recipe.record(root=args.root, split_seed=args.split_seed)
    kept = _resumed(recipe, args, stages, record, spec) if args.resume else {}
    spec = kept.pop("spec", spec)  # the checkpoint's model: the flags agree with it
    seeds = [settings["seed"] for settings in kept.values() if "seed" in settings]
    seed = args.seed if args.seed is not None else (seeds[0] if seeds else 0)
    torch.manual_seed(seed)
    model = build(spec).to(device)
    data = record.load()
    val = data.part("val", seed=seed + 1, n=args.eval_n)
    extra = {"spec": spec, "data": recipe.name, "recipe": record.to_dict()}
    tol = _spec_tol(spec)
    run = dict(data=data, val=val, tol=tol, device=device, extra=extra, seed=seed, kept=kept)
    for k, (stage, folder) in enumerate(stages):
        if k + 1 < len(stages) and args.resume and (stages[-1][1] / "last.pt").is_file():
            continue  # the finish has begun: this stage is done
        if k > 0:  # the finish continues the model the stage before kept
            model = _open(_kept(recipe, stages[k - 1][1]), device)[2].train()
        _train_stage(recipe, args, model, stage, folder, run, last=k + 1 == len(stages))
    return 0


def _spec_tol(spec: dict) -> float:
    """The training tolerance of a model spec (its rtol; atol is the same in every recipe)."""
    return (spec if spec["kind"] == "toy2d" else spec["options"])["rtol"]


def _kept(recipe, folder: Path) -> Path:
    """The checkpoint a finished stage keeps: ``best.pt`` where the recipe keeps the best."""
    return folder / ("best.pt" if recipe.evaluation.keep_best else "last.pt")


def _train_stage(recipe, args, model, stage: str, folder: Path, run: dict, last: bool) -> None:
    """Train ``model`` for one stage into ``folder``; the last stage reports and draws."""
    from .training import fit

    options = _stage_options(recipe, stage, args, folder, run)
    data, tol = run["data"], run["tol"]
    how = STAGE_WORDS[stage]
    trace = args.trace or recipe.model["trace"]
    print(
        f"training a CNF ({recipe.architecture}){how} on {recipe.name} ({data.describe()}): "
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
    )
    seconds = time.perf_counter() - tic
    (folder / "history.json").write_text(json.dumps(history.to_dict()))
    kept = _report_training(recipe, data, history, seconds, folder, run["device"], tol, args.draws)
    if last and not args.no_plot:
        _write_pictures(kept, folder, run["device"], n=args.plot_n, gif=not args.no_gif)


def _first(value, default):
    """``value``, or ``default`` where it is None."""
    return default if value is None else value


# --- resume ------------------------------------------------------------------------------------

FLAGS = {
    "iters": "--iters",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "clip_grad": "--clip-grad",
    "kinetic": "--kinetic",
    "jacobian": "--jacobian",
    "ema": "--ema",
    "seed": "--seed",
    "translate": "--translate",
    "coupling": "--coupling",
}
"""The training flags a checkpoint records, by the name it records them under."""

MODEL_FLAGS = {
    "hidden": ("hidden", "--hidden"),
    "activation": ("activation", "--activation"),
    "blocks": ("blocks", "--blocks"),
    "T": ("T", "--T"),
    "fixed_T": ("train_T", "--fixed-T"),
    "trace": ("trace", "--trace"),
    "tol": ("rtol", "--tol"),
    "dtype": ("dtype", "--dtype"),
}
"""The model flags: their attribute, the (generic) spec setting they set, and the flag."""


def _resumed(recipe, args, stages, record, spec: dict) -> dict:
    """What ``--resume`` continues with: ``{stage: recorded settings no flag set}`` for each
    stage with a checkpoint, and ``"spec"``, the model it holds.

    Raises:
        ValueError: a checkpoint of other data or another stage, or flags that contradict what
            the checkpoints recorded (all of them named in one message).
    """
    found, conflicts, notes = {}, [], []
    for stage, folder in stages:
        last = folder / "last.pt"
        state = _check_resume(last, record, stage)
        if state is None:
            continue
        given = _given(args, stage)
        found[stage] = {k: v for k, v in _recorded(state).items() if k not in given}
        conflicts += _setting_conflicts(last, state, given, stage, notes)
        if "spec" in state and "spec" not in found:
            found["spec"] = state["spec"]
            conflicts += _model_conflicts(recipe, args, spec, state["spec"], last)
    if conflicts:
        raise ValueError(
            "--resume: these flags contradict the run being resumed: "
            + "; ".join(conflicts)
            + ". Leave them out to continue as it began, or write to another --out"
        )
    for note in notes:
        print(note, flush=True)
    return found


def _given(args, stage: str) -> dict:
    """The settings the flags set explicitly for ``stage``, under the names checkpoints
    record them by (:data:`FLAGS`)."""
    if stage == "finish":
        given = {"iters": args.finish_ml, "seed": args.seed}
    else:
        given = {key: getattr(args, key) for key in FLAGS}
        if stage != "flow-matching":
            given["coupling"] = None
    given["translate"] = args.translate
    given = {key: value for key, value in given.items() if value is not None}
    if given.get("ema") == 0:
        given["ema"] = None  # --ema 0: no average, as fit records it
    return given


def _recorded(state: dict) -> dict:
    """The settings a checkpoint recorded (fewer in those of older versions)."""
    recorded = {**state.get("settings", {}), **state.get("flags", {})}
    if "seed" in state:
        recorded["seed"] = state["seed"]
    return recorded


def _setting_conflicts(last: Path, state: dict, given: dict, stage: str, notes: list) -> list:
    """The flags in ``given`` that contradict the checkpoint ``state``; a new ``--iters``
    beyond the iterations done is applied, and said in ``notes``."""
    recorded, done, conflicts = _recorded(state), int(state["iteration"]), []
    for key, value in given.items():
        flag = "--finish-ml" if stage == "finish" and key == "iters" else FLAGS[key]
        was = recorded.get(key, value)  # not recorded (an older checkpoint): fit decides
        if key == "iters" and value < done:
            conflicts.append(f"{flag} {value}, but {last} has {done} iterations done")
        elif key == "iters" and value != was:
            how = "extends" if value > was else "shortens"
            notes.append(f"resuming {last}: {flag} {value} {how} the run of {was} iterations")
        elif value != was:
            conflicts.append(f"{flag} {_shown(value)}, but {last} was trained with {_shown(was)}")
    return conflicts


def _model_conflicts(recipe, args, spec: dict, before: dict, last: Path) -> list:
    """The model flags given that contradict the model spec of the checkpoint ``last``."""
    new, old = (s if s["kind"] == "toy2d" else s.get("options", {}) for s in (spec, before))
    conflicts = []
    for attr, (setting, flag) in MODEL_FLAGS.items():
        key = recipe.aliases.get(setting, setting)
        value = getattr(args, attr)
        if value in (None, False) or new.get(key) == old.get(key):
            continue
        was = "its model's own" if old.get(key) is None else _shown(old[key])
        shown = "" if value is True else f" {_shown(value)}"
        conflicts.append(f"{flag}{shown}, but {last} holds a model with {setting} {was}")
    return conflicts


def _check_resume(last: Path, record, stage: str) -> dict | None:
    """The checkpoint ``last`` of a run to resume (None: none yet, a fresh run); refuses to
    continue a run on other data, or with another objective, than it began."""
    from .recipes import Record
    from .training import load_checkpoint

    if not last.is_file():
        return None  # nothing to resume: a fresh run
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
    return state


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


def _output_file(path: str | Path, flag: str) -> Path:
    """Check, before any work, that the file ``path`` can be written (its folder may be new)."""
    from .training.checkpoint import check_folder

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    check_folder(path.parent, f"the folder of {flag}")
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.json:
        _output_file(args.json, "--json")
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
    out = _output_file(args.out, "--out")
    _, record, model = _open(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        x = model.sample(args.n, generator=gen)
    if record.recipe.levels is not None:
        x = x.clamp(0.0, 1.0)  # the logit's inverse can step slightly outside [0, 1]
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
    from .training.checkpoint import check_folder

    out = check_folder(Path(args.out) if args.out else Path(args.checkpoint).parent, "--out")
    _write_pictures(args.checkpoint, out, _device(args.device), n=args.n, gif=not args.no_gif)
    return 0


# --- flags -------------------------------------------------------------------------------------


def _shown(value) -> str:
    """A default as a flag would spell it."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _by_data(value_of) -> str:
    """``value_of(recipe)`` for the default recipe of each data set, equal values grouped:
    ``"2-D data, mnist, cifar10 1000; digits 2000"`` (read from the table, never restated)."""
    from .recipes import get, names

    groups: dict[str, list[str]] = {}
    for name in names():
        groups.setdefault(_shown(value_of(get(name))), []).append(name)
    toy = [name for name in names() if get(name).kind == "toy2d"]
    if len(groups) == 1:
        return next(iter(groups))
    parts = []
    for value, data in groups.items():
        if set(toy) <= set(data):  # eight 2-D data sets share their recipe: name them once
            data = ["2-D data"] + [name for name in data if name not in toy]
        parts.append(f"{', '.join(data)} {value}")
    return "; ".join(parts)


def _fit_default(key: str, flow_matching: bool = False) -> str:
    """The help's default of a keyword of ``fit``, per data set (and for flow matching)."""
    text = "default: " + _by_data(lambda recipe: recipe.fit_options()[key])
    if flow_matching:
        fm = _by_data(lambda recipe: recipe.fit_options("flow-matching")[key])
        if fm != text[len("default: ") :]:
            text += f"; with --objective flow-matching: {fm}"
    return text


@functools.cache
def _spec_options(name: str) -> dict:
    """The model settings of a data set's default recipe (its spec, cached: building an image
    spec builds the model once)."""
    from .recipes import get

    spec = get(name).spec()
    return spec if spec["kind"] == "toy2d" else spec["options"]


def _model_default(key: str) -> str:
    """The help's default of a model setting (generic name), per data set."""

    def value(recipe):
        found = _spec_options(recipe.name).get(recipe.aliases.get(key, key))
        return "its model's own" if found is None else found

    return "default: " + _by_data(value)


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
        f"(cnf.recipes.get(data, architecture)), e.g. {examples}. With --resume, flags left "
        "out take the values the checkpoint recorded; flags that contradict it are refused.",
    )
    t.add_argument(
        "--data",
        default="8gaussians",
        choices=names(),
        help="data set (default: 8gaussians): 2-D toy data, the 8x8 digits, MNIST or CIFAR-10",
    )
    t.add_argument(
        "--architecture",
        choices=architectures(),
        help="model family (default: the data's first recipe: "
        + _by_data(lambda recipe: recipe.architecture)
        + ")",
    )
    t.add_argument("--root", help="folder of the MNIST/CIFAR-10 files")
    t.add_argument(
        "--split-seed",
        type=int,
        help="seed of the digits' train/val/test split (default: "
        + _by_data(lambda recipe: recipe.split.seed)
        + ")",
    )
    t.add_argument("--out", help="output folder (default runs/<data>)")
    _model_flags(t)
    _training_flags(t)
    _run_flags(t)
    t.set_defaults(func=cmd_train)


def _run_flags(t: argparse.ArgumentParser) -> None:
    """The flags of how ``cnf train`` runs: evaluation size, checkpoints, device, output."""
    t.add_argument(
        "--eval-n",
        type=_POSITIVE,
        help="held-out points scored during training (" + _part_size_default("val") + ")",
    )
    t.add_argument(
        "--checkpoint-every",
        type=_POSITIVE,
        default=100,
        help="iterations between writes of <out>/last.pt (default: 100)",
    )
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    t.add_argument("--device", default="auto", help=DEVICE_HELP)
    t.add_argument("--threads", type=_COUNT, default=0, help="torch threads (0: torch's default)")
    t.add_argument(
        "--plot-n",
        type=_POSITIVE,
        help="samples in the pictures (default: " + _pictures_default() + ")",
    )
    t.add_argument("--no-plot", action="store_true", help="write no pictures after training")
    t.add_argument("--no-gif", action="store_true", help="no animation of the flow (2-D data)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


DEVICE_HELP = "cpu, cuda, cuda:N, ... (default: auto, a GPU when torch sees one)"


def _part_size_default(part: str) -> str:
    """The help's default size of a held-out part, per data set (images: the whole part)."""
    return "default: " + _by_data(lambda recipe: recipe.split.sizes.get(part, "all"))


def _pictures_default() -> str:
    """The help's default number of samples in the pictures, per kind of data."""
    kinds = {"toy2d": "2-D", "image": "image"}
    return ", ".join(f"{n} for {kinds[kind]} data" for kind, (_, n) in PICTURES.items())


def _model_flags(t: argparse.ArgumentParser) -> None:
    from .fields import ACTIVATIONS

    t.add_argument(
        "--trace",
        choices=("exact", "hutchinson"),
        help="divergence of the training solves (" + _model_default("trace") + ")",
    )
    t.add_argument(
        "--tol",
        type=_RATE,
        help="rtol = atol of the training solves (" + _model_default("rtol") + ")",
    )
    t.add_argument(
        "--hidden",
        type=_ints,
        help="hidden sizes (MLPs) or channels (multiscale) (" + _model_default("hidden") + ")",
    )
    t.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        help="the field's activation (" + _model_default("activation") + ")",
    )
    t.add_argument(
        "--blocks",
        type=_POSITIVE,
        help="CNF blocks, or blocks per scale (multiscale) (" + _model_default("blocks") + ")",
    )
    t.add_argument(
        "--T",
        type=_RATE,
        help="integration time of each block, learned from this "
        "start unless --fixed-T (" + _model_default("T") + ")",
    )
    t.add_argument("--fixed-T", action="store_true", help="do not learn the integration time")
    t.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="floating-point type of the model (" + _model_default("dtype") + ")",
    )


FIT_FLAGS = (
    ("--iters", _POSITIVE, "training iterations", True),
    ("--batch-size", _POSITIVE, "points per iteration", True),
    ("--lr", _RATE, "Adam's learning rate", True),
    ("--weight-decay", _WEIGHT, "AdamW's weight decay; 0: Adam", False),
    ("--schedule", ("constant", "cosine"), "learning-rate schedule", False),
    ("--clip-grad", _RATE, "clip the gradients' norm to this", False),
    ("--kinetic", _WEIGHT, "RNODE kinetic-energy weight", False),
    ("--jacobian", _WEIGHT, "RNODE Jacobian-norm weight", False),
    ("--ema", _decay, "EMA decay of the weights; 0 turns it off", False),
    ("--eval-every", _COUNT, "iterations between held-out scores; 0: only at the end", True),
)
"""The flags that set a keyword of ``fit``: type (or choices), what it does, and whether flow
matching has its own default."""


def _training_flags(t: argparse.ArgumentParser) -> None:
    for flag, kind, what, flow_matching in FIT_FLAGS:
        key = flag[2:].replace("-", "_")
        typed = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        t.add_argument(flag, **typed, help=f"{what} ({_fit_default(key, flow_matching)})")
    t.add_argument(
        "--draws",
        type=_POSITIVE,
        help="dequantization draws per validation (images; default: "
        + _by_data(lambda r: r.evaluation.draws)
        + ")",
    )
    t.add_argument(
        "--translate",
        type=_PROBABILITY,
        help="images: probability of moving a training image by one pixel (augmentation; "
        "default: " + _by_data(lambda r: r.augment.get("translate")) + ")",
    )
    t.add_argument(
        "--seed", type=int, help="seed of the initial weights, batches and noise (default: 0)"
    )
    _objective_flags(t)


def _objective_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--objective",
        choices=("likelihood", "flow-matching"),
        default="likelihood",
        help="maximum likelihood through the ODE (default), or flow matching (regression, no "
        "solve; the blocks' T are fixed to sum to 1)",
    )
    t.add_argument(
        "--coupling",
        choices=("none", "ot"),
        help="flow matching: base-data pairing (default: "
        + _by_data(lambda r: r.flow_matching.objective.get("coupling"))
        + ")",
    )
    t.add_argument(
        "--finish-ml",
        type=_COUNT,
        metavar="ITERS",
        help="flow matching: then continue by maximum likelihood for ITERS iterations (0: no "
        "finish; default: " + _by_data(lambda r: r.flow_matching.finish_iters) + "); the "
        "flow-matching stage writes <out>/flow_matching/",
    )


def _other_parsers(sub) -> None:
    e = sub.add_parser("eval", help="test NLL (2-D: fresh samples) or bits/dim (images)")
    e.add_argument(
        "--checkpoint", required=True, help="a checkpoint of cnf train (last.pt, best.pt)"
    )
    e.add_argument(
        "--n",
        type=_POSITIVE,
        help="test points (default: " + _by_data(lambda r: r.split.sizes.get("test", "all")) + ")",
    )
    e.add_argument(
        "--tol",
        type=_RATE,
        help="solver tolerance (default: " + _by_data(lambda r: r.evaluation.tol) + ")",
    )
    e.add_argument(
        "--draws",
        type=_POSITIVE,
        help="dequantization draws (images; default: "
        + _by_data(lambda r: r.evaluation.test_draws)
        + ")",
    )
    e.add_argument(
        "--batch-size",
        type=_POSITIVE,
        help="points per solve (default: " + _by_data(lambda r: r.evaluation.batch_size) + ")",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=12345,
        help="seed of the fresh 2-D test points and the dequantization (default: 12345)",
    )
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples to a .npy file")
    s.add_argument("--checkpoint", required=True, help="a checkpoint of cnf train")
    s.add_argument("--n", type=_POSITIVE, default=10000, help="samples (default: 10000)")
    s.add_argument("--out", default="samples.npy", help="the .npy file (default: samples.npy)")
    s.add_argument("--seed", type=int, default=0, help="seed of the base samples (default: 0)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("plot", help="write the pictures of a trained model")
    q.add_argument("--checkpoint", required=True, help="a checkpoint of cnf train")
    q.add_argument("--out", help="folder (default: the checkpoint's)")
    q.add_argument("--n", type=_POSITIVE, help="samples (default: " + _pictures_default() + ")")
    q.add_argument("--no-gif", action="store_true", help="no animation of the flow (2-D data)")
    q.add_argument("--device", default="auto", help=DEVICE_HELP)
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
    from .ode import SolverError
    from .training import CheckpointError, TrainingError

    try:
        return args.func(args)
    except (CheckpointError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except SolverError as exc:  # e.g. evaluating a model too stiff for the tolerance asked
        print(f"error: the ODE solver failed: {exc}", file=sys.stderr)
    except OSError as exc:  # a full disk, a file that vanished, no permission
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
