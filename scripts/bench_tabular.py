"""Test NLL against training time on tables: cnf against zuko's NSF and MAF, same splits.

    pip install -e '.[bench,images]'
    python scripts/bench_tabular.py [--budget 120] [--sets patches breast-cancer synthetic8] \\
        [--models cnf nsf maf] [--out docs/bench_tabular.md]
    python scripts/bench_tabular.py --quick        # a smoke run: seconds per model, no files

Every model gets the same training budget in seconds per data set (``--budget``) on one thread
(``--threads``), on the same split of the same rows, and the same batches in the same order
(:class:`cnf.training.sampling.Batches` over the training part: one seeded permutation per
epoch, the recipe's batch size). Each is validated every ``budget / --evals`` seconds and at the
end; the weights with the best validation NLL are kept (early stopping, cnf's ``keep_best``) and
scored on the test part at 1/4 and 1/2 of the budget (``--marks``) and at the end. **Training
seconds exclude the validation and test evaluations for every model** (the clock is paused while
they run; their total is reported as "eval (s)"; ``--count-evals`` counts the validations
too); everything else (steps, the weight average, cnf's ``best.pt`` writes) counts. A model
stops at the first validation at or past the budget, so it may overrun it by up to one step
(about 2.5 s for cnf on patches); the table gives the seconds each model actually trained. The
NLL is in nats per row in the data's own units.

* ``cnf``: the recipe of ``cnf train --data SET`` (``cnf.recipes.get(SET)``): ``new_model``
  (a Standardize step fitted on the training part, then ConcatSquash CNF blocks), its
  ``fit_options`` (batch, learning rate, weight decay, EMA, trace, tolerance) and ``validation``
  (exact trace at the training tolerance, ``keep_best``), trained by :class:`cnf.training.
  Trainer` with one extra hook that validates on the clock and ends the run when the budget is
  spent. Its iteration count is ``--cnf-iters`` (default: effectively unbounded), so the
  recipe's cosine schedule, which decays over that count, stays near its initial rate unless
  ``--cnf-iters`` is set to what fits the budget (the run then ends at whichever of the two
  comes first). ``--cnf-fit KEY=VALUE ...`` changes other fit options of cnf's alone (e.g.
  ``ema=None``: the recipe's average, 0.995, lags the weights by ~200 steps, more than cnf
  makes on patches in two minutes). The average, where there is one, is what is validated and
  kept. Tested with ``recipe.score`` (exact trace, rtol = atol = 1e-6) on the model reloaded
  from ``best.pt`` (``cnf.training.load``).
* ``nsf``, ``maf``: ``zuko.flows.NSF`` / ``zuko.flows.MAF`` with ``--transforms`` (5)
  autoregressive transforms of hidden layers ``--hidden`` (128 128), zuko's other defaults
  (NSF: 8 bins on [-5, 5]), Adam at ``--lr`` (1e-3, constant), on the data standardized with the
  training part's mean and standard deviation; their NLL adds back the standardization's
  log-determinant ``sum(log std)``, checked against the same flow wrapped with that affine map
  (zuko's own ``Flow`` with an ``AffineTransform`` first, in float64).

For ``synthetic8`` the true test NLL (the mean of ``-cnf.data.synthetic_log_prob`` over the
test rows) and the entropy (``cnf.data.synthetic_entropy``) are known; the table reports each
model's gap to the true test NLL. Writes the table to ``--out`` and the raw curves (training
seconds, iteration, validation NLL) to the same name with ``.json``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cnf import recipes
from cnf.data import synthetic_entropy, synthetic_log_prob
from cnf.training import Evaluation, FitConfig, Hook, Trainer, TrainingError, load
from cnf.training.sampling import Batches, split_context

try:
    import zuko
    from torch.distributions import AffineTransform
    from zuko.lazy import Flow as ZukoFlow
    from zuko.lazy import UnconditionalTransform
except ImportError:  # pragma: no cover - optional peer
    zuko = None

SETS = ("patches", "breast-cancer", "synthetic8")
MODELS = ("cnf", "cnf-fm", "nsf", "maf")
UNBOUNDED = 10**9  # cnf's iterations when only the budget ends the run


class Clock:
    """Training seconds: wall time since :meth:`restart`, less the time spent in :meth:`pause`."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - tic


class Run:
    """One model on one data set: the validation curve, the best weights so far, the test NLL
    of those weights at the marks, and the final numbers.

    Args:
        set_name, model: what is trained.
        args: the command line: ``budget`` (training seconds), ``evals`` (validations in the
            budget: every ``budget / evals`` seconds, and at the end), ``marks`` (fractions of
            the budget, < 1, at which the best weights so far are tested), ``count_evals``
            (validation time counts as training time; testing never does).
        validate: ``validate() -> float``, the validation NLL of the model as it is now.
        snapshot: ``snapshot() -> state``, a copy of the weights that :meth:`validate` scored.
        test: ``test(state) -> float``, the test NLL of those weights.
    """

    def __init__(self, set_name, model, args, validate, snapshot, test):
        self.set_name, self.model, self.budget = set_name, model, args.budget
        self.every = self.next_eval = args.budget / args.evals
        self.marks = [m for m in args.marks if 0 < m < 1]
        self.count_evals = args.count_evals
        self.validate, self.snapshot, self.test = validate, snapshot, test
        self.clock = Clock()
        self.curve: list[tuple[float, int, float]] = []  # (training seconds, iteration, val NLL)
        self.tests: dict[float, float] = {}  # mark -> test NLL of the best weights by then
        self._test_of: dict[int, float] = {}  # curve index of a best point -> its test NLL
        self.best_index, self.best_state = None, None
        self.eval_seconds = 0.0
        self.result: dict = {}

    def due(self) -> bool:
        """Whether a validation is due (or the budget is spent)."""
        return self.clock.elapsed() >= min(self.next_eval, self.budget)

    def spent(self) -> bool:
        return self.curve and self.curve[-1][0] >= self.budget

    def checkpoint(self, iteration: int) -> float:
        """Validate now (the clock paused unless ``count_evals``), keep the weights if they are
        the best so far, test the best weights at the marks passed (the clock paused); returns
        the validation NLL. A NaN validation (weights gone bad) is recorded, never kept."""
        seconds, tic = self.clock.elapsed(), time.perf_counter()
        with contextlib.nullcontext() if self.count_evals else self.clock.pause():
            val = float(self.validate())
        self.curve.append((seconds, iteration, val))
        with self.clock.pause():
            best = self.best_index is None or val < self.curve[self.best_index][2]
            if math.isfinite(val) and best:
                self.best_index, self.best_state = len(self.curve) - 1, self.snapshot()
            for mark in self.marks:
                passed = seconds >= mark * self.budget
                if mark not in self.tests and passed and self.best_index is not None:
                    self.tests[mark] = self.best_test()
        self.eval_seconds += time.perf_counter() - tic
        while self.next_eval <= seconds:
            self.next_eval += self.every
        print(f"  {self.set_name} {self.model}: {seconds:7.1f} s  it {iteration:6d}  val {val:.4f}")
        return val

    def best_test(self) -> float:
        """The test NLL of the best weights so far (computed once per best point)."""
        if self.best_index not in self._test_of:
            self._test_of[self.best_index] = float(self.test(self.best_state))
        return self._test_of[self.best_index]

    @property
    def best(self) -> tuple[float, int, float]:
        return self.curve[self.best_index]


def cpu_name() -> str:
    """The processor's model name where Linux says it, else the architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- cnf -----------------------------------------------------------------------------------------


class WallBudget(Hook):
    """Validate ``run`` on its clock and end training once its budget is spent.

    :func:`cnf.training.fit` stops after a number of iterations only, so the run is given a
    large ``iters`` and this hook sets ``trainer.iters`` to the iterations done when the budget
    is over: the loop then ends as if that length had been asked for, and the finish hooks run
    as usual (the last ``last.pt`` write; :class:`Evaluation` sees the final evaluation already
    recorded at that iteration and adds none). Raising from a hook would also stop the loop, but
    would skip the finish hooks; training in chunks with ``resume=True`` would restart the
    cosine schedule's decay at every chunk. The validation is the trainer's own
    :class:`Evaluation` hook (``eval_every=0``: it validates only when called), called from
    here so that its score lands in the history before :class:`Checkpointing` looks at it and
    writes ``best.pt``: this hook must come before that one (and after the EMA's).
    """

    def __init__(self, run: Run, evaluation: Evaluation):
        self.run, self.evaluation = run, evaluation

    def start(self, trainer: Trainer) -> None:
        self.run.clock.restart()

    def after_step(self, trainer: Trainer) -> None:
        last = trainer.iteration >= trainer.iters
        if not (self.run.due() or last):
            return
        self.run.checkpoint(trainer.iteration)
        if self.run.spent():
            trainer.iters = trainer.iteration


def run_cnf(
    name, recipe, data, args, val, test, folder, flow_matching=False, label=None, test_options=None
) -> Run:
    """cnf's recipe trained by maximum likelihood, or (``flow_matching``) the same model with
    fixed T trained by the recipe's flow-matching plan: a regression of the field, no solve
    per step; both validated and tested by exact likelihood. ``label`` names the model in the
    results (default ``cnf`` / ``cnf-fm``); ``test_options``: keywords of ``recipe.score`` for
    the test scores (e.g. images' ``draws`` and ``seed``)."""
    torch.manual_seed(args.seed)
    model = recipe.new_model(data, flow_matching=flow_matching)
    spare = recipe.new_model(data, flow_matching=flow_matching)  # scores the best at the marks
    label = label or ("cnf-fm" if flow_matching else "cnf")
    test_options = test_options or {}
    options = {
        **recipe.fit_options(
            "flow-matching" if flow_matching else "likelihood",
            iters=args.cnf_iters or UNBOUNDED,
            eval_every=0,  # WallBudget validates, on the clock
            progress=False,
            seed=args.seed,
        ),
        **args.cnf_fit,  # after fit_options, which drops None overrides (ema=None)
        **recipe.validation(val),
        "keep_best": True,  # best.pt is what is tested, whatever the recipe's policy
        "checkpoint_dir": folder,
        "checkpoint_every": UNBOUNDED,  # last.pt only at the end: best.pt is what counts here
    }
    trainer = Trainer(model, data.sampler(), FitConfig.from_keywords(options))
    evaluation = next(h for h in trainer.hooks if isinstance(h, Evaluation))

    def validate() -> float:
        evaluation.evaluate(trainer)
        return trainer.history.eval_nll[-1]

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.evaluation_model.state_dict().items()}

    def score(state) -> float:
        spare.load_state_dict(state)
        return recipe.score(spare.eval(), test, **test_options)

    run = Run(name, label, args, validate, snapshot, score)
    trainer.hooks.insert(trainer.hooks.index(trainer.checkpoints), WallBudget(run, evaluation))
    error = None
    try:
        trainer.run()
    except TrainingError as exc:  # report what was reached before the failure
        error = str(exc)
        print(f"  {name} {label}: training stopped: {error}")
    seconds = run.clock.elapsed()
    if run.best_state is None:
        raise RuntimeError(f"{name} {label}: no finite validation NLL in the budget ({error})")
    best = load(Path(folder) / "best.pt", model=spare)
    kept = best.state_dict()
    same = all(torch.equal(kept[k], v) for k, v in run.best_state.items())
    if not same:
        raise RuntimeError("best.pt does not hold the best-validation weights this script saw")
    with run.clock.pause():
        final = recipe.score(best, test, **test_options)
    run.result = finish(run, trainer.iteration, seconds, final, parameters(model), data, options)
    run.result["options"] = {
        k: v
        for k, v in options.items()
        if isinstance(v, (int, float, str, type(None))) and k != "checkpoint_dir"
    }
    if flow_matching:
        run.result["options"]["objective"] = repr(options["objective"])
    run.result["error"] = error
    return run


# --- zuko ----------------------------------------------------------------------------------------


def zuko_flow(kind: str, dim: int, args) -> nn.Module:
    make = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
    return make(dim, transforms=args.transforms, hidden_features=tuple(args.hidden))


def zuko_nll(flow, rows, mean, std, batch: int = 5000) -> float:
    """Mean NLL in the data's units: zuko's NLL of the standardized rows plus sum(log std)."""
    log_det = -std.log().sum()  # of x -> (x - mean) / std
    total = 0.0
    with torch.no_grad():
        dist = flow()
        for chunk in rows.split(batch):
            z = ((chunk - mean) / std).float()
            total += -(dist.log_prob(z).double() + log_det).sum().item()
    return total / len(rows)


def check_units(flow, rows, mean, std) -> float:
    """The largest difference, in float64, between the NLL per row computed as
    :func:`zuko_nll` does and that of the same flow with the affine map ``(x - mean) / std``
    put in front of its transforms (zuko's own log-determinant bookkeeping)."""
    flow = copy.deepcopy(flow).double()
    affine = UnconditionalTransform(AffineTransform, -mean / std, 1 / std, buffer=True, event_dim=1)
    wrapped = ZukoFlow([affine, *flow.transform.transforms], flow.base)
    with torch.no_grad():
        ours = -(flow().log_prob((rows - mean) / std) - std.log().sum())
        theirs = -wrapped().log_prob(rows)
    return (ours - theirs).abs().max().item()


def train_on_clock(run: Run, step) -> int:
    """Call ``step(i)`` for ``i = 0, 1, ...`` on ``run``'s clock, validating whenever one is due,
    until its budget is spent; returns the steps taken (a peer's training loop)."""
    it = 0
    run.clock.restart()
    while True:
        if run.due():
            run.checkpoint(it)
            if run.spent():
                return it
        step(it)
        it += 1


def train_peer(run: Run, optimizer, loss_of, batches, what: str) -> tuple[int, float]:
    """Train a peer with Adam-style ``optimizer`` on ``loss_of(batches(i))`` on ``run``'s clock
    (:func:`train_on_clock`); returns the steps taken and the training seconds.

    Raises:
        RuntimeError: no validation score was finite within the budget (``what`` says whose).
    """

    def step(i: int) -> None:
        loss = loss_of(batches(i))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    it = train_on_clock(run, step)
    seconds = run.clock.elapsed()
    if run.best_state is None:
        raise RuntimeError(f"{what}: no finite validation score in the budget")
    return it, seconds


def run_zuko(name, kind, recipe, data, args, val, test) -> Run:
    train = data.part("train")
    mean, std = train.mean(0), train.std(0)  # what cnf's Standardize step fits
    torch.manual_seed(args.seed)
    flow = zuko_flow(kind, data.dim, args)
    batch_size = recipe.fit_options()["batch_size"]
    batches = Batches(((train - mean) / std).float(), batch_size, args.seed)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)

    def snapshot():
        return {k: v.detach().clone() for k, v in flow.state_dict().items()}

    spare = copy.deepcopy(flow)

    def score(state) -> float:
        spare.load_state_dict(state)
        return zuko_nll(spare, test, mean, std)

    def validate() -> float:
        return zuko_nll(flow, val, mean, std)

    run = Run(name, kind, args, validate, snapshot, score)
    what = f"{name} {kind}"
    it, seconds = train_peer(run, optimizer, lambda x: -flow().log_prob(x).mean(), batches, what)
    with run.clock.pause():
        spare.load_state_dict(run.best_state)
        final = zuko_nll(spare, test, mean, std)
        check = check_units(spare, test, mean, std)
    if check > 1e-8:
        raise RuntimeError(f"{kind}: the NLL in the data's units is off by {check:.3g} nats")
    options = {
        "transforms": args.transforms,
        "hidden": list(args.hidden),
        "lr": args.lr,
        "batch_size": batch_size,
    }
    run.result = finish(run, it, seconds, final, parameters(flow), data, options)
    run.result["units_check"] = check
    return run


# --- the report ----------------------------------------------------------------------------------


def train_rows(data) -> int | None:
    """Points in the training part; None where every batch is a fresh draw (2-D toy data)."""
    try:
        train = data.part("train")
    except ValueError:  # no training part to count: batches are fresh draws
        return None
    return len(split_context(train)[0])


def finish(run: Run, iterations, seconds, test_nll, params, data, options) -> dict:
    rows = train_rows(data)
    per_epoch = None if rows is None else max(1, rows // options["batch_size"])
    seconds_at_best, iteration_at_best, best_val = run.best
    return {
        "set": run.set_name,
        "model": run.model,
        "params": params,
        "seconds": seconds,
        "eval_seconds": run.eval_seconds,
        "iterations": iterations,
        "epochs": None if per_epoch is None else iterations / per_epoch,
        "best_val": best_val,
        "best_at_seconds": seconds_at_best,
        "best_at_iteration": iteration_at_best,
        "test": test_nll,
        "tests_at_marks": {str(m): t for m, t in run.tests.items()},
        "curve": [list(point) for point in run.curve],
        "options": options,
    }


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def table(results: list[dict], truth: dict[str, float], marks) -> list[str]:
    marks = [m for m in marks if 0 < m < 1]
    head = (
        "| set | model | params | trained (s) | eval (s) | iterations | epochs | best val NLL "
        "| at (s) | " + "".join(f"test @{m:g} | " for m in marks) + "test NLL | gap to truth |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        gap = r["test"] - truth[r["set"]] if r["set"] in truth else None
        at_marks = "".join(f"{fmt(r['tests_at_marks'].get(str(m)))} | " for m in marks)
        lines.append(
            f"| {r['set']} | {r['model']} | {r['params']:,} | {r['seconds']:.0f} | "
            f"{r['eval_seconds']:.1f} | {r['iterations']} | {r['epochs']:.1f} | "
            f"{r['best_val']:.3f} | {r['best_at_seconds']:.0f} | {at_marks}"
            f"{r['test']:.3f} | {fmt(gap)} |"
        )
    return lines


OWN_SETTINGS = (
    "iters", "eval_every", "eval_fn", "eval_data", "keep_best", "checkpoint_dir",
    "checkpoint_every", "resume", "progress", "seed",
)  # fmt: skip


def fit_changes(parser, items: list[str]) -> dict:
    """``KEY=VALUE`` items as keywords of ``fit`` (values read as Python literals)."""
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--cnf-fit takes KEY=VALUE items, got {item!r}")
        if key in OWN_SETTINGS:
            parser.error(f"--cnf-fit: the script sets {key} (see --cnf-iters, --seed, --evals)")
        try:
            changes[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[key] = text  # a bare word: a string (schedule=constant)
    try:
        FitConfig.from_keywords({"iters": 1, **changes})
    except (ValueError, TypeError) as exc:
        parser.error(f"--cnf-fit: {exc}")
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budget", type=float, help="training seconds per model and set (120)")
    parser.add_argument("--evals", type=int, help="validations in the budget (20)")
    parser.add_argument("--marks", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--cnf-iters", type=int, help="cnf's iterations (its cosine's length)")
    parser.add_argument(
        "--cnf-fit",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="change cnf's fit options, e.g. ema=None lr=5e-3 schedule='constant'",
    )
    parser.add_argument("--transforms", type=int, default=5, help="zuko flows")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="zuko flows")
    parser.add_argument("--lr", type=float, default=1e-3, help="zuko flows (Adam)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--count-evals", action="store_true", help="validation time counts as training time"
    )
    parser.add_argument("--rows", type=int, help="use only the first ROWS val and test rows")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 s per model, 3 validations, 300 val/test rows, no files unless --out",
    )
    parser.add_argument("--out", help="markdown table (default docs/bench_tabular.md; + .json)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other models' rows of --out's JSON (an earlier run, same settings)",
    )
    args = parser.parse_args()
    args.cnf_fit = fit_changes(parser, args.cnf_fit)
    args.budget = args.budget or (3.0 if args.quick else 120.0)
    args.evals = args.evals or (3 if args.quick else 20)
    args.rows = args.rows or (300 if args.quick else None)
    out = args.out or (None if args.quick else "docs/bench_tabular.md")
    torch.set_num_threads(args.threads)
    if zuko is None and set(args.models) - {"cnf", "cnf-fm"}:
        print("zuko is not installed: only cnf runs (pip install -e '.[bench]')")
        args.models = [m for m in args.models if m.startswith("cnf")]

    results, truth, notes = [], {}, []
    for name in args.sets:
        recipe = recipes.get(name)
        data = recipe.load()
        val, test = data.part("val", n=args.rows), data.part("test", n=args.rows)
        notes.append(f"- {name}: {data.describe()}")
        if name.startswith("synthetic"):
            truth[name] = -synthetic_log_prob(test).mean().item()
            notes[-1] += (
                f"; true test NLL {truth[name]:.3f} (entropy {synthetic_entropy(data.dim):.3f})"
            )
        print(notes[-1][2:])
        for model in args.models:
            if model in ("cnf", "cnf-fm"):
                with tempfile.TemporaryDirectory() as folder:
                    fm = model == "cnf-fm"
                    run = run_cnf(name, recipe, data, args, val, test, folder, flow_matching=fm)
            else:
                run = run_zuko(name, model, recipe, data, args, val, test)
            results.append(run.result)
            r = run.result
            print(
                f"  {name} {model}: {r['iterations']} it in {r['seconds']:.1f} s, best val "
                f"{r['best_val']:.4f}, test {r['test']:.4f}"
            )

    machine = (
        f"{cpu_name()} ({os.cpu_count()} cores), {args.threads} thread(s), "
        f"torch {torch.__version__}" + (f", zuko {zuko.__version__}" if zuko is not None else "")
    )
    evals = (
        "Training seconds include the validations and exclude the test evaluations"
        if args.count_evals
        else "Training seconds exclude the validation and test evaluations"
    )
    head = [
        "# Tables: cnf against zuko's NSF and MAF (`scripts/bench_tabular.py`)",
        "",
        "`" + " ".join(["python scripts/bench_tabular.py", *sys.argv[1:]]) + "`",
        "",
        f"{args.budget:g} s of training per model and set, validated every "
        f"{args.budget / args.evals:g} s; {machine}; " + time.strftime("%Y-%m-%d") + ".",
        "",
        f"{evals} for every model (their total is 'eval (s)'). Test NLL in nats per row, in "
        "the data's units, of the weights "
        "with the best validation NLL (reached at 'at (s)'); 'test @f': the same at a fraction "
        "f of the budget. 'gap to truth': test NLL minus the true test NLL (synthetic8). "
        f"zuko: {args.transforms} transforms, hidden {tuple(args.hidden)}, Adam {args.lr:g}; "
        "cnf: the recipe's settings"
        + (f", {args.cnf_iters} iterations" if args.cnf_iters else ", iterations unbounded")
        + "".join(f", {k}={v!r}" for k, v in args.cnf_fit.items())
        + "."
        + (f" Only the first {args.rows} validation and test rows." if args.rows else ""),
        "",
        *notes,
        "",
    ]
    if args.append and out and Path(out).with_suffix(".json").is_file():
        # runs of other models kept from the earlier run of this script (same settings)
        earlier = json.loads(Path(out).with_suffix(".json").read_text())
        ran = {(r["set"], r["model"]) for r in results}
        kept = [r for r in earlier["runs"] if (r["set"], r["model"]) not in ran]
        results = sorted(
            kept + results, key=lambda r: (SETS.index(r["set"]), MODELS.index(r["model"]))
        )
        truth = {**earlier["truth"], **truth}
        head[2] += " (rows of other models from `" + earlier.get("command", "an earlier run") + "`)"
    lines = table(results, truth, args.marks)
    print("\n" + "\n".join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(head + lines) + "\n")
        raw = {
            "command": " ".join(["python scripts/bench_tabular.py", *sys.argv[1:]]),
            "machine": machine,
            "settings": {k: v for k, v in vars(args).items()},
            "truth": truth,
            "runs": results,
        }
        Path(out).with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
        print(f"\nwrote {out} and {Path(out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
