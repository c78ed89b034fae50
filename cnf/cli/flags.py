"""The parser of ``cnf``: argparse types that refuse a bad value before any work, help texts
whose defaults are read from the recipe table (never restated), and the flags of each command,
each bound to its command function."""

from __future__ import annotations

import argparse
import functools
import math

from .common import shown
from .pictures import PICTURES
from .train import cmd_train
from .trained import cmd_eval, cmd_plot, cmd_sample


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


_GROUPS = {"toy2d": "2-D data", "tabular": "tables"}
"""Kinds of data whose many data sets the help names as one group where they agree."""


def _by_data(value_of) -> str:
    """``value_of(recipe)`` for the default recipe of each data set, equal values grouped:
    ``"2-D data, mnist, cifar10 1000; digits 2000"`` (read from the table, never restated)."""
    from ..recipes import get, names

    groups: dict[str, list[str]] = {}
    for name in names():
        groups.setdefault(shown(value_of(get(name))), []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    parts = []
    for value, data in groups.items():
        for kind, label in _GROUPS.items():
            members = [name for name in names() if get(name).kind == kind]
            if set(members) <= set(data):  # many data sets share their recipe: name them once
                data = [label if name == members[0] else name for name in data]
                data = [name for name in data if name not in members]
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
    from ..models import settings_of
    from ..recipes import get

    recipe = get(name)
    if recipe.kind == "tabular" and recipe.event_shape is None:  # a file: its width decides
        model = dict(recipe.model)
        factor, layers = model.pop("hidden_factor"), model.pop("layers")
        low, high = model.pop("width_range")
        return {**model, "hidden": f"{layers} layers of {factor} x D units in [{low}, {high}]"}
    return settings_of(recipe.spec())


def _model_default(key: str) -> str:
    """The help's default of a model setting (generic name), per data set."""

    def value(recipe):
        found = _spec_options(recipe.name).get(recipe.aliases.get(key, key))
        return "its model's own" if found is None else found

    return "default: " + _by_data(value)


def _train_parser(sub) -> None:
    from ..recipes import architectures, get, names

    examples = "; ".join(
        f"{name}: {dict(get(name).training)}, model {dict(get(name).model)}"
        for name in ("8gaussians", "digits", "mnist")
    )
    t = sub.add_parser(
        "train",
        help="fit a density by maximum likelihood or flow matching (2-D toy data or images)",
        description="Every default comes from the recipe of --data and --architecture "
        f"(cnf.recipes.get(data, architecture)), e.g. {examples}. With --resume, flags left "
        "out take the values the checkpoint recorded (the data flags --columns, "
        "--context-columns, --drop-nonfinite and --conditional excepted: they pick the data, "
        "so give them as the run began); flags that contradict it are refused.",
    )
    t.add_argument(
        "--data",
        default="8gaussians",
        type=_data,
        metavar="NAME|FILE",
        help="a data set (default: 8gaussians): 2-D toy data, the 8x8 digits, MNIST, CIFAR-10, "
        "tables that install with cnf, MAF's benchmarks (" + ", ".join(names()) + "), or a "
        "file of rows (.npy, .npz, .csv, .tsv, .pt), split 80/10/10 by --split-seed",
    )
    t.add_argument(
        "--architecture",
        choices=architectures(),
        help="model family (default: the data's first recipe: "
        + _by_data(lambda recipe: recipe.architecture)
        + ")",
    )
    t.add_argument("--root", help="folder of the MNIST, CIFAR-10 or MAF benchmark files")
    t.add_argument(
        "--split-seed",
        type=int,
        help="seed of the train/val/test split of the digits, a file or a bundled table "
        "(default: " + _by_data(lambda recipe: recipe.split.seed) + ")",
    )
    _table_flags(t)
    _context_flags(t)
    t.add_argument("--out", help="output folder (default runs/<data>)")
    _model_flags(t)
    _training_flags(t)
    _run_flags(t)
    t.set_defaults(func=cmd_train)


def _data(text: str) -> str:
    """``--data``: a recipe's name, or a file of a type :func:`cnf.data.read_table` reads."""
    from pathlib import Path

    from ..data import FILE_SUFFIXES
    from ..recipes import names

    if text in names() or Path(text).suffix.lower() in FILE_SUFFIXES:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a data set ({', '.join(names())}) nor a file of rows "
        f"({', '.join(FILE_SUFFIXES)})"
    )


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return names


def _table_flags(t: argparse.ArgumentParser) -> None:
    """The flags of tables read from a file."""
    t.add_argument(
        "--columns",
        type=_names,
        help="a file's columns to fit, by header name or 0-based index, comma-separated "
        "(default: all; a column that is not numeric must be left out)",
    )
    t.add_argument(
        "--drop-nonfinite",
        action="store_true",
        help="drop a file's rows holding NaN, Inf or a missing value (default: refuse them, "
        "naming the first)",
    )
    t.add_argument(
        "--no-standardize",
        action="store_true",
        help="tables: no standardization step in the model (default: one, fitted to the "
        "training rows, so that densities are in the data's units whatever their scale)",
    )


def _context_flags(t: argparse.ArgumentParser) -> None:
    """The flags of conditional models, p(x | c)."""
    t.add_argument(
        "--conditional",
        action="store_true",
        help="images: fit p(image | class label), a class-conditional model (the rotating "
        "data are conditional by themselves; a file's contexts are --context-columns)",
    )
    t.add_argument(
        "--context-columns",
        type=_names,
        help="a file's columns to condition on, by name or index, comma-separated: fit "
        "p(other columns | these), a conditional model",
    )


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
        "--nproc",
        type=_POSITIVE,
        help="train in N processes on this machine (torchrun, data-parallel: one per GPU, or "
        "CPU cores shared out); --batch-size stays the global batch, so the run trains as one "
        "process does. Under torchrun --nproc-per-node N -m cnf train, leave it out",
    )
    t.add_argument(
        "--independent-steps",
        action="store_true",
        help="with several processes, let each choose its own solver steps (no collective per "
        "step; the run then differs slightly from a one-process run)",
    )
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
    kinds = {"toy2d": "2-D", "tabular": "tabular", "image": "image"}
    return ", ".join(f"{n} for {kinds[kind]} data" for kind, (_, n) in PICTURES.items())


def _model_flag_table() -> tuple:
    """The model flags: type (or choices), what each sets, and its key in the model spec."""
    from ..fields import ACTIVATIONS

    return (
        ("--trace", ("exact", "hutchinson"), "divergence of the training solves", "trace"),
        ("--tol", _RATE, "rtol = atol of the training solves", "rtol"),
        ("--hidden", _ints, "hidden sizes (MLPs) or channels (multiscale)", "hidden"),
        ("--activation", ACTIVATIONS, "the field's activation", "activation"),
        ("--blocks", _POSITIVE, "CNF blocks, or blocks per scale (multiscale)", "blocks"),
        ("--T", _RATE, "integration time of each block, learned from this start unless "
         "--fixed-T", "T"),
        ("--dtype", ("float32", "float64"), "floating-point type of the model", "dtype"),
    )  # fmt: skip


def _model_flags(t: argparse.ArgumentParser) -> None:
    for flag, kind, what, key in _model_flag_table():
        typed = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        t.add_argument(flag, **typed, help=f"{what} ({_model_default(key)})")
        if flag == "--T":
            t.add_argument(
                "--fixed-T", action="store_true", help="do not learn the integration time"
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
    _per_data(
        t,
        "--draws",
        "dequantization draws per validation, images",
        lambda r: r.evaluation.draws,
        type=_POSITIVE,
    )
    _per_data(
        t,
        "--translate",
        "images: probability of moving a training image by one pixel, an augmentation",
        lambda r: r.augment.get("translate"),
        type=_PROBABILITY,
    )
    t.add_argument(
        "--seed", type=int, help="seed of the initial weights, batches and noise (default: 0)"
    )
    _objective_flags(t)


def _per_data(parser: argparse.ArgumentParser, flag: str, what: str, value_of, **kwargs) -> None:
    """A flag whose default differs by data set: its help lists ``value_of(recipe)`` per data."""
    parser.add_argument(flag, help=f"{what} (default: {_by_data(value_of)})", **kwargs)


def _objective_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--objective",
        choices=("likelihood", "flow-matching"),
        default="likelihood",
        help="maximum likelihood through the ODE (default), or flow matching (regression, no "
        "solve; the blocks' T are fixed to sum to 1)",
    )
    _per_data(
        t,
        "--coupling",
        "flow matching: base-data pairing",
        lambda r: r.flow_matching.objective.get("coupling"),
        choices=("none", "ot"),
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
    _per_data(e, "--n", "test points", lambda r: r.split.sizes.get("test", "all"), type=_POSITIVE)
    _per_data(e, "--tol", "solver tolerance", lambda r: r.evaluation.tol, type=_RATE)
    _per_data(
        e,
        "--draws",
        "dequantization draws, images",
        lambda r: r.evaluation.test_draws,
        type=_POSITIVE,
    )
    _per_data(
        e, "--batch-size", "points per solve", lambda r: r.evaluation.batch_size, type=_POSITIVE
    )
    e.add_argument(
        "--seed",
        type=int,
        default=12345,
        help="seed of the fresh 2-D test points and the dequantization (default: 12345)",
    )
    e.add_argument(
        "--data",
        metavar="FILE",
        help="score on the rows of this file instead of the run's test part (models of "
        "tables: the columns it was trained on, in its units)",
    )
    e.add_argument(
        "--drop-nonfinite",
        action="store_true",
        help="--data: drop rows holding NaN, Inf or a missing value (default: refuse them)",
    )
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(func=cmd_eval)

    _sample_parser(sub)

    q = sub.add_parser("plot", help="write the pictures of a trained model")
    q.add_argument("--checkpoint", required=True, help="a checkpoint of cnf train")
    q.add_argument("--out", help="folder (default: the checkpoint's)")
    q.add_argument("--n", type=_POSITIVE, help="samples (default: " + _pictures_default() + ")")
    q.add_argument("--no-gif", action="store_true", help="no animation of the flow (2-D data)")
    q.add_argument("--device", default="auto", help=DEVICE_HELP)
    q.set_defaults(func=cmd_plot)


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples to a .npy (or, for tables, .csv) file")
    s.add_argument("--checkpoint", required=True, help="a checkpoint of cnf train")
    s.add_argument("--n", type=_POSITIVE, default=10000, help="samples (default: 10000)")
    s.add_argument(
        "--out",
        default="samples.npy",
        help="the .npy or .csv file, in the data's units (default: samples.npy); a .csv has a "
        "header of the data's column names",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the base samples (default: 0)")
    s.add_argument(
        "--context",
        metavar="VALUES",
        help="a conditional model's context for every sample: a class label (e.g. 3), or the "
        "context's numbers, comma-separated (e.g. 0.5, or 1.7,80 for two context columns)",
    )
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cnf``: each command's namespace has ``func``, the function to run."""
    p = argparse.ArgumentParser(
        prog="cnf", description="Continuous normalizing flows: train, evaluate, sample, plot."
    )
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _other_parsers(sub)
    return p
