"""Conditional flows p(x | c): cnf against zuko's conditional NSF at equal training time.

    pip install -e '.[bench,images]'
    python scripts/bench_conditional.py [--sets rotating digits] [--seeds 0 1] \\
        [--budget-rotating 90] [--budget-digits 180] [--out docs/bench_conditional.md] \\
        [--pictures docs/img]
    python scripts/bench_conditional.py --quick      # a smoke run: seconds per model, no files

Every model of a set gets the same training seconds (``--budget-rotating``, ``--budget-digits``)
on one thread (``--threads``), once per seed of ``--seeds`` (the seed sets the initial weights
and the batches), and sees the same batches in the same order: batch ``i`` is the recipe's
sampler called with a generator seeded by ``derived_seed(seed, 0, i)``
(:class:`cnf.training.sampling.Batches`, what cnf's Trainer draws), at the recipe's batch size
(cnf's flow-matching plan has its own). Each model is validated every ``budget / --evals``
seconds and at the end with the clock paused (validation and test time are not training time);
the weights with the best validation score are kept and tested. The run-loop, clock and
bookkeeping are ``scripts/bench_tabular.py``'s (``Run``, ``WallBudget``, ``run_cnf``): see its
docstring for how cnf's Trainer is stopped on the clock and its ``best.pt`` checked.

* ``rotating`` (:mod:`cnf.data.conditional`): 2-D points whose three-blob law turns and scales
  with a context c ~ U[-1, 1]. Fresh training pairs; validation 5000 pairs (seed 1), test 20000
  (seed 0), as ``cnf train`` / ``cnf eval`` draw them. Score: mean NLL of x given c in nats,
  reported as the gap to the true conditional NLL of the same test pairs (the mean of
  ``-conditional_density("rotating").log_density(x, c)``; its expectation is E_c H(x | c) =
  2.0349 nats).
* ``digits``: scikit-learn's 8x8 digits (17 grey levels, split 1300/200/297) given their class
  label. Score: bits/dim of the dequantized images given the label, :func:`cnf.transforms.
  bits_per_dim` of log p((x + u) / 17 | y); validation as the recipe's policy (2 dequantization
  draws), test over its ``test_draws`` (4) with the noise seeded by ``--test-seed``: every model
  is scored on the same dequantized test images. The conditional models must beat the
  unconditional ones.

Models (a set runs those of ``--models`` that apply to it):

* ``cnf``: the recipe (``cnf.recipes.get(SET)``): ``new_model(data)`` with the context
  embedding of the data (``data.embedding``: c through a small MLP; labels through a table),
  ``fit_options()`` (maximum likelihood, the recipe's EMA, learning rate, RNODE weights,
  digits' one-pixel translations), ``validation(val)`` at the training tolerance, tested by
  ``recipe.score`` (exact trace, the recipe's test tolerance). Iterations unbounded unless
  ``--cnf-iters`` (so the cosine schedule stays near its initial rate).
* ``cnf-fm``: the same recipe's flow-matching plan (``new_model(data, flow_matching=True)``,
  ``fit_options("flow-matching")``), validated and tested by exact likelihood like ``cnf``.
* ``cnf-uncond``, ``cnf-fm-uncond`` (digits): ``cnf`` and ``cnf-fm`` on the images without
  their labels.
* ``nsf``: ``zuko.flows.NSF`` with ``--transforms`` (5) transforms of hidden layers ``--hidden``
  (128 128), Adam at ``--lr`` (1e-3), on the same batches. rotating: NSF(2, context=1) on x and
  c as they are (no standardization: x lies within the splines' [-5, 5], c in [-1, 1]). digits:
  cnf's own fixed ``LogitTransform((1, 8, 8), alpha)`` with the digits model's alpha
  (``cnf.dense.DIGITS_DENSE``) as a pre-step, flattened, then NSF(64, context=10) reading the
  one-hot label; the logit's log-determinant is added, so the density is of the same
  dequantized images in [0, 1) as cnf's. Checked once per run in float64: the bits/dim so
  computed equal those of zuko's own flow with the logit as its first transforms (torch's
  affine and inverse sigmoid; zuko's log-determinant bookkeeping).
* ``nsf-uncond`` (digits, not run by default): the same NSF without the labels.

Also checked once: bits/dim computed here (zuko's evaluator: the same dequantization loop)
equal ``recipe.score``'s for the cnf model on the same images and noise. The markdown table
(``--out``) gives per model the means over seeds and the test score's spread (max - min); the
raw curves (training seconds, iteration, validation score) go to the same name with
``.json``. ``--pictures FOLDER`` draws the best cnf models (lowest validation score over the
seeds): ``conditional_rotating.png`` (model and true density at c = -1 ... 1) and
``conditional_digits.png`` (ten samples of each label).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tabular import (  # noqa: E402
    Run,
    cpu_name,
    finish,
    parameters,
    run_cnf,
    train_peer,
)

from cnf import recipes  # noqa: E402
from cnf.data import conditional_density  # noqa: E402
from cnf.dense import DIGITS_DENSE  # noqa: E402
from cnf.training.sampling import Batches, split_context  # noqa: E402
from cnf.transforms import LogitTransform, bits_per_dim, dequantize  # noqa: E402

try:
    import zuko
    from torch.distributions import AffineTransform, SigmoidTransform
    from zuko.lazy import Flow as ZukoFlow
    from zuko.lazy import UnconditionalTransform
except ImportError:  # pragma: no cover - optional peer
    zuko = None

SETS = ("rotating", "digits")
MODELS = {
    "rotating": ("cnf", "cnf-fm", "nsf"),
    "digits": ("cnf", "cnf-uncond", "cnf-fm", "cnf-fm-uncond", "nsf", "nsf-uncond"),
}
ALL_MODELS = ("cnf", "cnf-uncond", "cnf-fm", "cnf-fm-uncond", "nsf", "nsf-uncond")
DEFAULT_MODELS = ("cnf", "cnf-uncond", "cnf-fm", "nsf")
CONTEXTS = [-1, -0.5, 0, 0.5, 1]  # the rotating picture's columns


# --- the data of a set ---------------------------------------------------------------------------


@dataclass
class Bench:
    """One set: its recipe, conditional data and parts, the unconditional ones (digits), how a
    zuko density is built (``make(conditional)``) and scored (``score(density, part)``), the
    keywords of ``recipe.score`` for tests, and the true test NLL where it is known."""

    name: str
    recipe: recipes.Recipe
    data: object
    val: tuple
    test: tuple
    make: object
    score: object
    test_options: dict = field(default_factory=dict)
    plain: tuple | None = None  # (data, val, test) without the contexts
    truth: float | None = None
    units: object = None  # units(density, test) -> largest difference of two computations


def rotating_bench(args) -> Bench:
    recipe = recipes.get("rotating")
    data = recipe.load()
    val, test = data.part("val", seed=1, n=args.rows), data.part("test", seed=0, n=args.rows)
    truth = -conditional_density("rotating").log_density(*test).mean().item()

    def make(conditional: bool = True) -> ZukoDensity:
        return ZukoDensity(zuko_nsf(2, 1, args))

    def score(density, part) -> float:
        x, c = part
        with torch.no_grad():
            return -density.log_prob(x, c).double().mean().item()

    return Bench("rotating", recipe, data, val, test, make, score, truth=truth)


def digits_bench(args) -> Bench:
    recipe = recipes.get("digits", "dense")
    data, plain = recipe.load(conditional=True), recipe.load()
    val, test = data.part("val", n=args.rows), data.part("test", n=args.rows)
    shape, levels, policy = recipe.event_shape, recipe.levels, recipe.evaluation
    alpha = recipe.spec()["options"].get("alpha", DIGITS_DENSE["alpha"])  # the model's logit
    classes = data.embedding["classes"]
    test_options = {"draws": policy.test_draws, "seed": args.test_seed}

    def make(conditional: bool = True) -> ZukoDensity:
        dim = int(torch.Size(shape).numel())
        nsf = zuko_nsf(dim, classes if conditional else 0, args)
        return ZukoDensity(nsf, LogitTransform(shape, alpha), classes if conditional else None)

    def score(density, part, draws=policy.draws, seed=0) -> float:
        images, labels = split_context(part)
        return bits_given(density.log_prob, images, labels, levels, draws, seed)

    def units(density, part) -> float:
        return check_units(density, *split_context(part), levels, args.test_seed)

    plain_parts = (plain, plain.part("val", n=args.rows), plain.part("test", n=args.rows))
    return Bench(
        "digits", recipe, data, val, test, make, score, test_options, plain_parts, units=units
    )


def bits_given(log_prob, images, labels, levels, draws, seed, batch=256) -> float:
    """Mean bits/dim over ``draws`` dequantizations of ``images`` (noise from one generator
    seeded with ``seed``: :func:`cnf.training.evaluate_bits_per_dim`'s loop, for any
    ``log_prob(x, labels) -> (n,)``)."""
    gen, total = torch.Generator().manual_seed(seed), 0.0
    with torch.no_grad():
        for _ in range(draws):
            x = dequantize(images, levels, generator=gen)
            for start in range(0, len(x), batch):
                rows = slice(start, start + batch)
                given = None if labels is None else labels[rows]
                lp = log_prob(x[rows], given)
                total += bits_per_dim(lp, x.shape[1:], levels).sum().item()
    return total / (draws * len(images))


# --- zuko ----------------------------------------------------------------------------------------


def zuko_nsf(features: int, context: int, args) -> nn.Module:
    return zuko.flows.NSF(
        features, context=context, transforms=args.transforms, hidden_features=tuple(args.hidden)
    )


class ZukoDensity(nn.Module):
    """A zuko flow as a density of the data cnf's models see: for images, cnf's fixed logit
    transform first (its log-determinant added) and the image flattened; labels one-hot."""

    def __init__(self, flow: nn.Module, logit: LogitTransform | None = None, classes=None):
        super().__init__()
        self.flow, self.logit, self.classes = flow, logit, classes

    def log_prob(self, x, c=None):
        dtype = next(self.flow.parameters()).dtype
        x, logdet = x.to(dtype), 0.0
        if self.logit is not None:
            x, logdet = self.logit(x)
            x = x.flatten(1)
        if c is not None and self.classes is not None:
            c = F.one_hot(c, self.classes)
        dist = self.flow() if c is None else self.flow(c.to(dtype))
        return dist.log_prob(x) + logdet


def _logit():
    return SigmoidTransform().inv


def check_units(density: ZukoDensity, images, labels, levels, seed) -> float:
    """The largest difference, in float64, between the bits/dim of one dequantization of
    ``images`` computed by ``density`` (cnf's logit, then zuko) and by zuko alone, its flow
    given the logit as its first transforms (zuko's own log-determinant bookkeeping)."""
    d = copy.deepcopy(density).double()
    gen = torch.Generator().manual_seed(seed)
    x = dequantize(images, levels, generator=gen, dtype=torch.float64)
    a, dim = d.logit.alpha, x[0].numel()
    squash = UnconditionalTransform(
        AffineTransform,
        *(torch.full((dim,), v, dtype=torch.float64) for v in (a, 1 - 2 * a)),
        buffer=True,
    )
    wrapped = ZukoFlow(
        [squash, UnconditionalTransform(_logit), *d.flow.transform.transforms], d.flow.base
    )
    context = None if d.classes is None else F.one_hot(labels, d.classes).double()
    with torch.no_grad():
        ours = bits_per_dim(d.log_prob(x, labels), x.shape[1:], levels)
        theirs = bits_per_dim(wrapped(context).log_prob(x.flatten(1)), x.shape[1:], levels)
    return (ours - theirs).abs().max().item()


def run_zuko(bench: Bench, label: str, args) -> Run:
    """zuko's NSF trained by Adam on the recipe's batches, validated and tested like cnf."""
    torch.manual_seed(args.seed)
    conditional = not label.endswith("-uncond")
    data, val, test = (bench.data, bench.val, bench.test) if conditional else bench.plain
    density = bench.make(conditional)
    spare = copy.deepcopy(density)
    batch_size = bench.recipe.fit_options()["batch_size"]
    batches = Batches(data.sampler(), batch_size, args.seed)
    optimizer = torch.optim.Adam(density.parameters(), lr=args.lr)

    def snapshot():
        return {k: v.detach().clone() for k, v in density.state_dict().items()}

    def test_score(state) -> float:
        spare.load_state_dict(state)
        return bench.score(spare, test, **bench.test_options)

    run = Run(bench.name, label, args, lambda: bench.score(density, val), snapshot, test_score)

    def loss_of(batch) -> torch.Tensor:
        x, c = split_context(batch)
        return -density.log_prob(x, c).mean()

    it, seconds = train_peer(run, optimizer, loss_of, batches, f"{bench.name} {label}")
    with run.clock.pause():
        final = test_score(run.best_state)
        check = None if bench.units is None else bench.units(spare, test)
    if check is not None and check > 1e-8:
        raise RuntimeError(f"{label}: bits/dim computed two ways differ by {check:.3g}")
    options = {"transforms": args.transforms, "hidden": list(args.hidden), "lr": args.lr}
    options["batch_size"] = batch_size
    run.result = finish(run, it, seconds, final, parameters(density), data, options)
    run.result["units_check"] = check
    return run


# --- cnf -----------------------------------------------------------------------------------------


def run_cnf_model(bench: Bench, label: str, args) -> Run:
    """``cnf``, ``cnf-fm`` or ``cnf-uncond`` through bench_tabular's ``run_cnf``; flow
    matching's iterations (its cosine's length) are ``--fm-iters``, the others'
    ``--cnf-iters``."""
    plain = label.endswith("-uncond")
    parts = bench.plain if plain else (bench.data, bench.val, bench.test)
    if label.startswith("cnf-fm"):
        args = argparse.Namespace(**{**vars(args), "cnf_iters": args.fm_iters})
    with tempfile.TemporaryDirectory() as folder:
        return run_cnf(
            bench.name,
            bench.recipe,
            parts[0],
            args,
            *parts[1:],
            folder,
            flow_matching=label.startswith("cnf-fm"),
            label=label,
            test_options=bench.test_options,
        )


def best_model(bench: Bench, label: str, state) -> nn.Module:
    """The recipe's model of ``label`` holding the weights ``state``, in eval mode."""
    data = bench.plain[0] if label.endswith("-uncond") else bench.data
    model = bench.recipe.new_model(data, flow_matching=label.startswith("cnf-fm"))
    model.load_state_dict(state)
    return model.eval()


def check_scores(bench: Bench, model: nn.Module, seed: int, n: int = 32) -> float:
    """|bits/dim by :func:`bits_given` - by ``recipe.score``| of the cnf ``model`` on the first
    ``n`` test images and labels, one dequantization seeded by ``seed``: zuko's evaluator
    scores the same noisy images as cnf's."""
    images, labels = bench.test[0][:n], bench.test[1][:n]
    policy, levels = bench.recipe.evaluation, bench.recipe.levels
    solver = {"trace": policy.trace, "rtol": policy.tol, "atol": policy.tol}

    def log_prob(x, c):
        return model.log_prob(x, context=c, **solver)

    ours = bits_given(log_prob, images, labels, levels, 1, seed)
    return abs(ours - bench.recipe.score(model, (images, labels), draws=1, seed=seed))


# --- the report ----------------------------------------------------------------------------------


def summarize(results: list[dict], truth: dict) -> list[dict]:
    """Per set and model: means over the seeds, and the test score's spread (max - min)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["set"], r["model"]), []).append(r)
    rows = []
    for (name, model), runs in groups.items():
        tests = [r["test"] for r in runs]

        def mean(key, runs=runs):
            values = [r[key] for r in runs if r[key] is not None]
            return sum(values) / len(values) if values else None

        row = {"set": name, "model": model, "seeds": len(runs), "params": runs[0]["params"]}
        row.update({k: mean(k) for k in ("seconds", "eval_seconds", "iterations", "epochs")})
        row.update(best_val=mean("best_val"), test=mean("test"), spread=max(tests) - min(tests))
        row["gap"] = None if truth.get(name) is None else row["test"] - truth[name]
        rows.append(row)
    return rows


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict], name: str) -> list[str]:
    """The set's rows: epochs where there is a training part (digits), else the gap to the
    true NLL (rotating)."""
    unit, last = ("NLL", "gap to truth") if name == "rotating" else ("bits/dim", "epochs")
    head = (
        f"| model | params | trained (s) | eval (s) | iterations | best val {unit} | "
        f"test {unit} | spread | {last} |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if r["set"] == name:
            extra = fmt(r["gap"]) if name == "rotating" else fmt(r["epochs"], ".1f")
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['seconds']:.0f} | "
                f"{r['eval_seconds']:.1f} | {r['iterations']:.0f} | {r['best_val']:.3f} | "
                f"{r['test']:.3f} | {r['spread']:.3f} | {extra} |"
            )
    return lines


def label_gain(rows: list[dict]) -> list[str]:
    """Lines comparing the digits' bits/dim given the label with those without it."""
    test = {r["model"]: r["test"] for r in rows if r["set"] == "digits"}
    lines = []
    for model in ("cnf", "cnf-fm", "nsf"):
        if model in test and f"{model}-uncond" in test:
            given, plain = test[model], test[f"{model}-uncond"]
            verdict = "lower, as it must be" if given < plain else "NOT lower"
            lines.append(
                f"- {model}: {given:.3f} bits/dim given the label against {plain:.3f} without "
                f"it ({given - plain:+.3f}: {verdict})."
            )
    return lines


def report(args, rows, truth, checks, machine) -> list[str]:
    budgets = {"rotating": args.budget_rotating, "digits": args.budget_digits}
    lines = [
        "# Conditional flows: cnf against zuko's conditional NSF (`scripts/bench_conditional.py`)",
        "",
        "`" + " ".join(["python scripts/bench_conditional.py", *sys.argv[1:]]) + "`",
        "",
        f"{machine}; seeds {', '.join(map(str, args.seeds))} (each model once per seed: the "
        "table gives the means over seeds and the test score's spread, max - min); validated "
        f"every budget/{args.evals} s with the clock paused; " + time.strftime("%Y-%m-%d") + ".",
        "Training seconds exclude validation and test. The test score is that of the weights "
        f"with the best validation score. zuko: NSF, {args.transforms} transforms, hidden "
        f"{tuple(args.hidden)}, Adam {args.lr:g}, the recipe's batches; cnf: the recipes' "
        + "settings"
        + (f", {args.cnf_iters} likelihood iterations" if args.cnf_iters else "")
        + (f", {args.fm_iters} flow-matching iterations" if args.fm_iters else "")
        + " (the length of their cosine schedules; unset: unbounded, the rate stays high)."
        + (f" Only the first {args.rows} validation and test points." if args.rows else ""),
    ]
    for name in args.sets:
        lines += ["", f"## {name} ({budgets[name]:g} s of training per model and seed)", ""]
        if name == "rotating":
            lines.append(
                "Test NLL of x given c in nats; 'gap to truth': minus the true conditional NLL "
                f"of the same test pairs, {truth['rotating']:.4f} (E_c H(x | c) = "
                f"{conditional_density('rotating').entropy:.4f})."
            )
        else:
            lines.append(
                "Test bits/dim given the label (cnf-uncond, nsf-uncond: without it), over "
                f"{recipes.get('digits').evaluation.test_draws} dequantizations seeded by "
                f"{args.test_seed}, the same for every model."
            )
        lines += ["", *table(rows, name)]
        if name == "digits":
            lines += ["", *label_gain(rows)]
    if checks:
        lines += ["", "Checks: " + "; ".join(f"{k} {v:.2g}" for k, v in checks.items()) + "."]
    return lines


def pictures(folder, benches, states, quick: bool, picture_model: str = "cnf") -> None:
    """The best ``picture_model`` of each set (lowest validation score over the seeds), drawn."""
    from cnf.plot import plot_class_samples, plot_conditional_densities

    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, bench in benches.items():
        if not states.get(name):
            continue
        best = min(states[name], key=lambda s: s[0])[1]
        model = best_model(bench, picture_model, best)
        if name == "rotating":
            true = conditional_density("rotating")
            fig = plot_conditional_densities(
                model, CONTEXTS, true_density=true, lim=5.0, n=40 if quick else 200
            )
        else:
            tol = bench.recipe.evaluation.tol
            gen = torch.Generator().manual_seed(0)
            fig = plot_class_samples(model, 10, per_class=10, generator=gen, rtol=tol, atol=tol)
        path = Path(folder) / f"conditional_{name}.png"
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=ALL_MODELS)
    parser.add_argument("--budget-rotating", type=float, help="training seconds (90)")
    parser.add_argument("--budget-digits", type=float, help="training seconds (180)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--evals", type=int, help="validations in the budget (20)")
    parser.add_argument(
        "--cnf-iters", type=int, help="cnf's likelihood iterations (its cosine's length)"
    )
    parser.add_argument("--fm-iters", type=int, help="cnf's flow-matching iterations (likewise)")
    parser.add_argument("--transforms", type=int, default=5, help="zuko's NSF")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="zuko's NSF")
    parser.add_argument("--lr", type=float, default=1e-3, help="zuko's NSF (Adam)")
    parser.add_argument("--test-seed", type=int, default=0, help="digits' test dequantization")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, help="use only the first ROWS val and test points")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a few seconds per model, one seed, 3 validations, 100 val/test "
        "points, no files unless --out or --pictures",
    )
    parser.add_argument("--out", help="markdown table (default docs/bench_conditional.md; + .json)")
    parser.add_argument("--pictures", help="folder for conditional_{rotating,digits}.png")
    parser.add_argument(
        "--picture-model", default="cnf", choices=("cnf", "cnf-fm"), help="whose best is drawn"
    )
    args = parser.parse_args()
    args.budget_rotating = args.budget_rotating or (3.0 if args.quick else 90.0)
    args.budget_digits = args.budget_digits or (5.0 if args.quick else 180.0)
    args.evals = args.evals or (3 if args.quick else 20)
    args.rows = args.rows or (100 if args.quick else None)
    args.seeds = args.seeds[:1] if args.quick else args.seeds
    args.out = args.out or (None if args.quick else "docs/bench_conditional.md")
    if zuko is None and {"nsf", "nsf-uncond"} & set(args.models):
        print("zuko is not installed: only cnf runs (pip install -e '.[bench]')")
        args.models = [m for m in args.models if m.startswith("cnf")]
    return args


def run_args(args, name: str, seed: int) -> argparse.Namespace:
    """What bench_tabular's Run and run_cnf read, for one set and seed."""
    budget = args.budget_digits if name == "digits" else args.budget_rotating
    extra = {"budget": budget, "seed": seed, "marks": [], "count_evals": False, "cnf_fit": {}}
    return argparse.Namespace(**vars(args), **extra)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    results, truth, checks, benches, states = [], {}, {}, {}, {}
    for name in args.sets:
        bench = benches[name] = (rotating_bench if name == "rotating" else digits_bench)(args)
        truth[name] = bench.truth
        known = "" if bench.truth is None else f"; true test NLL {bench.truth:.4f}"
        print(f"{name}: {bench.data.describe()}{known}")
        for label in [m for m in args.models if m in MODELS[name]]:
            for seed in args.seeds:
                print(f"{name} {label} seed {seed}")
                a = run_args(args, name, seed)
                run = (run_cnf_model if label.startswith("cnf") else run_zuko)(bench, label, a)
                r = run.result
                r["seed"] = seed
                results.append(r)
                print(
                    f"  {name} {label}: {r['iterations']} it in {r['seconds']:.1f} s, best val "
                    f"{r['best_val']:.4f}, test {r['test']:.4f}"
                    + ("" if r.get("units_check") is None else f", units {r['units_check']:.2g}")
                )
                if label == args.picture_model:
                    states.setdefault(name, []).append((r["best_val"], run.best_state))
                if name == "digits" and label == "cnf" and "score_check" not in checks:
                    model = best_model(bench, label, run.best_state)
                    checks["score_check"] = check_scores(bench, model, args.test_seed)
                    print(f"  bits/dim here vs recipe.score: {checks['score_check']:.2g}")
                    if checks["score_check"] > 1e-5:
                        raise RuntimeError("zuko's evaluator does not score what cnf's does")
    units = [r["units_check"] for r in results if r.get("units_check") is not None]
    if units:
        checks["units_check"] = max(units)
    rows = summarize(results, truth)
    machine = (
        f"{cpu_name()} ({os.cpu_count()} cores), {args.threads} thread(s), torch "
        f"{torch.__version__}" + (f", zuko {zuko.__version__}" if zuko is not None else "")
    )
    lines = report(args, rows, truth, checks, machine)
    print("\n" + "\n".join(lines))
    if args.pictures:
        pictures(args.pictures, benches, states, args.quick, args.picture_model)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        raw = {
            "command": " ".join(["python scripts/bench_conditional.py", *sys.argv[1:]]),
            "machine": machine,
            "settings": vars(args),
            "truth": truth,
            "checks": checks,
            "summary": rows,
            "runs": results,
        }
        Path(args.out).with_suffix(".json").write_text(
            json.dumps(raw, indent=1, default=str) + "\n"
        )
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    print(f"total {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
