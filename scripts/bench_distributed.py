"""Data-parallel training on the CPU: samples per second with 1 and 2 processes, and the share
of the time spent in the all-reduces.

    python scripts/bench_distributed.py [--recipes 8gaussians digits] [--repeats 3] \\
        [--agree both] [--iters N] [--warmup N] [--out docs/bench_distributed.md]
    python scripts/bench_distributed.py --quick     # a smoke run: 8gaussians, a few steps, no files

Every run trains a recipe's model (``cnf.recipes.get(NAME)``: ``new_model`` after
``torch.manual_seed(--seed)``, ``fit_options``, the recipe's global batch) with
:func:`cnf.training.fit`, in processes of one thread each (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``): one plain process, and two processes started by
``python -m torch.distributed.run --nproc-per-node 2`` over gloo on the loopback interface,
where ``fit`` trains data-parallel by itself (:mod:`cnf.distributed`). Two processes run with
the solvers' error norms agreed over the processes (``agree_steps=True``, the default: the
targets are judged on this) and, with ``--agree both`` (the default), also without
(``agree_steps=False``, ``cnf train --independent-steps``). The runs alternate between one and
two processes, in reversed order every other round, so that a drift of the machine's speed
affects both; the table gives the median over ``--repeats`` rounds.

Each run trains ``--warmup`` + ``--iters`` iterations and times the last ``--iters``
(``History.seconds``: the step's wall time on rank 0, which includes waiting for the other
process). samples/s = global batch / mean seconds per iteration; the speed-up is the median
samples/s of two processes over that of one. Inside the worker processes the collectives are
timed (``time.perf_counter``) without changing what they do:

* control all-reduces: :meth:`cnf.distributed.World.reduce`, the small host-side all-reduce
  that agrees the error norms (one per adaptive solver step) and sums the loss and metrics (one
  per iteration, :func:`cnf.distributed.sum_over`);
* the gradient all-reduce: the package's DDP hook (``cnf.distributed._sum_gradients``) is
  replaced before ``fit`` builds the model's DDP wrapper by one that does the same all-reduce
  but waits for it and returns a completed future, so the time it takes is measured exactly.
  DDP can then no longer overlap it with the rest of the backward pass; on CPU gloo that
  overlap is negligible (the adjoint pass yields the parameter gradients at its end).

Both include the time a process waits for the other to reach the collective. Writes the
table to ``--out`` and the raw numbers of every process of every run to the same name with
``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cnf
from cnf import distributed
from cnf.training import FitConfig, Hook, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tabular import cpu_name  # noqa: E402

TARGETS = {"8gaussians": 1.6, "digits": 1.8}  # the speed-ups at 2 processes
# (warmup, timed) iterations per recipe: about 15-40 s per one-process run on this VM
ITERATIONS = {"8gaussians": (20, 200), "digits": (5, 60)}
DEFAULT_ITERATIONS = (5, 50)
DISTRIBUTED_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


# --- the worker: one process of a run ------------------------------------------------------------


class Collectives:
    """Seconds and calls of the collectives since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.in_metrics = False  # inside sum_over: the loss and metrics, not an error norm
        self.reset()

    def reset(self) -> None:
        self.norm_seconds = self.metric_seconds = self.gradient_seconds = 0.0
        self.norm_calls = self.metric_calls = self.gradient_calls = 0

    def per_iteration(self, iters: int) -> dict[str, float]:
        n = max(iters, 1)
        return {
            "norm_s": self.norm_seconds / n,
            "norm_calls": self.norm_calls / n,
            "metric_s": self.metric_seconds / n,
            "metric_calls": self.metric_calls / n,
            "control_s": (self.norm_seconds + self.metric_seconds) / n,
            "control_calls": (self.norm_calls + self.metric_calls) / n,
            "gradient_s": self.gradient_seconds / n,
            "gradient_calls": self.gradient_calls / n,
        }


def instrument(stats: Collectives) -> None:
    """Time the collectives of :mod:`cnf.distributed` into ``stats``; must run before ``fit``
    builds its DDP model (``parallel_model`` looks the hook up by name then)."""
    reduce, sum_over = distributed.World.reduce, distributed.sum_over

    def timed_reduce(self, values, op="sum"):
        tic = time.perf_counter()
        reduce(self, values, op)
        seconds = time.perf_counter() - tic
        if stats.in_metrics:
            stats.metric_seconds += seconds
            stats.metric_calls += 1
        else:
            stats.norm_seconds += seconds
            stats.norm_calls += 1

    def marked_sum_over(world, *values):
        stats.in_metrics = True
        try:
            return sum_over(world, *values)
        finally:
            stats.in_metrics = False

    def timed_sum_gradients(process_group, bucket):  # unannotated: DDP checks annotations
        # the package hook's all-reduce (a sum), waited for here so that its time is its own
        tic = time.perf_counter()
        dist.all_reduce(bucket.buffer(), group=process_group)
        stats.gradient_seconds += time.perf_counter() - tic
        stats.gradient_calls += 1
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    distributed.World.reduce = timed_reduce
    distributed.sum_over = marked_sum_over
    distributed._sum_gradients = timed_sum_gradients


class TimedWindow(Hook):
    """Starts the collectives' accounts after the warmup and stops them after the last step."""

    def __init__(self, stats: Collectives, warmup: int, iters: int):
        self.stats, self.warmup, self.last = stats, warmup, warmup + iters
        self.wall = 0.0
        self.frozen: dict[str, float] = {}

    def start(self, trainer: Trainer) -> None:
        self.stats.reset()  # DDP's construction and anything before the first step
        self.tic = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration == self.warmup:
            self.stats.reset()
            self.tic = time.perf_counter()
        if trainer.iteration == self.last:
            self.wall = time.perf_counter() - self.tic
            self.frozen = self.stats.per_iteration(self.last - self.warmup)


def run_worker(args: argparse.Namespace) -> None:
    """One process of a run: train, then write this process's numbers to ``--result``."""
    torch.set_num_threads(1)
    world = distributed.init(backend="gloo")  # the CPU cores, also where there is a GPU
    stats = Collectives()
    instrument(stats)
    recipe = cnf.recipes.get(args.recipe)
    data = recipe.load()
    torch.manual_seed(args.seed)
    model = recipe.new_model(data)
    total = args.warmup + args.iters
    options = recipe.fit_options(
        iters=total, progress=False, agree_steps=args.agree == "on", seed=args.seed
    )
    if args.batch is not None:
        options["batch_size"] = args.batch
    trainer = Trainer(model, data.sampler(), FitConfig.from_keywords(options))
    window = TimedWindow(stats, args.warmup, args.iters)
    trainer.hooks.append(window)
    history = trainer.run()
    seconds = history.seconds[args.warmup :]
    mean = statistics.fmean(seconds)
    batch = options["batch_size"]
    result = {
        "recipe": args.recipe,
        "processes": 1 if world is None else world.size,
        "rank": 0 if world is None else world.rank,
        "agree": args.agree,
        "batch": batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "seconds_per_iter": mean,
        "median_seconds_per_iter": statistics.median(seconds),
        "samples_per_s": batch / mean,
        "wall_s_per_iter": window.wall / args.iters,
        "nfe_forward": statistics.fmean(history.nfe_forward[args.warmup :]),
        "nfe_backward": statistics.fmean(history.nfe_backward[args.warmup :]),
        **window.frozen,
    }
    name = f"rank{result['rank']}.json"
    Path(args.result, name).write_text(json.dumps(result) + "\n")
    distributed.finish()


# --- the driver: runs the workers ---------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """A clean environment: no torchrun variables of our own, one thread, gloo on loopback."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    loopback = distributed.loopback_interface()
    if loopback is not None:
        env["GLOO_SOCKET_IFNAME"] = loopback
    return env


def run_once(args, recipe: str, processes: int, agree: str) -> list[dict]:
    """One run of ``processes`` workers; returns every process's numbers, rank 0 first."""
    warmup, iters = iterations(args, recipe)
    with tempfile.TemporaryDirectory() as folder:
        worker = [str(Path(__file__).resolve()), "--worker", "--recipe", recipe]
        worker += ["--agree", agree, "--warmup", str(warmup), "--iters", str(iters)]
        worker += ["--seed", str(args.seed), "--result", folder]
        if args.batch is not None:
            worker += ["--batch", str(args.batch)]
        command = [sys.executable]
        if processes > 1:
            command += ["-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
            command += ["--master-addr=127.0.0.1", f"--master-port={distributed.free_port()}"]
        run_command(command + worker, args.timeout)
        results = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(processes)]
    return results


def run_command(command: list[str], timeout: float) -> None:
    """Run ``command`` to its end; a failure or a hang (past ``timeout`` seconds, when the
    command's whole process group is killed) raises with the end of its output."""
    proc = subprocess.Popen(
        command,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: torchrun's workers die with it
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        what = f"timed out after {timeout:g} s"
        raise RuntimeError(f"{what}: {' '.join(command)}\n{output[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(command)}\n{output[-3000:]}")


def iterations(args, recipe: str) -> tuple[int, int]:
    """(warmup, timed) iterations of ``recipe``: the flags', else the recipe's defaults."""
    warmup, iters = ITERATIONS.get(recipe, DEFAULT_ITERATIONS)
    return (
        warmup if args.warmup is None else args.warmup,
        iters if args.iters is None else args.iters,
    )


def configurations(args) -> list[tuple[int, str]]:
    """(processes, agree) of every run of a round: one process first, then two."""
    agrees = ["on", "off"] if args.agree == "both" else [args.agree]
    return [(1, "on")] + [(2, agree) for agree in agrees]


def measure(args) -> list[dict]:
    """Every run of every round, each process's numbers; the order reverses every other round."""
    runs = []
    for recipe in args.recipes:
        for repeat in range(args.repeats):
            order = configurations(args)
            for processes, agree in order[::-1] if repeat % 2 else order:
                results = run_once(args, recipe, processes, agree)
                for r in results:
                    r["repeat"] = repeat
                runs.extend(results)
                r0 = results[0]
                print(
                    f"  {recipe} round {repeat + 1}: {processes} process(es), agree {agree}: "
                    f"{r0['samples_per_s']:.0f} samples/s, "
                    f"{1000 * r0['seconds_per_iter']:.1f} ms/it, "
                    f"control {1000 * r0.get('control_s', 0.0):.2f} ms/it, "
                    f"gradients {1000 * r0.get('gradient_s', 0.0):.2f} ms/it",
                    flush=True,
                )
    return runs


# --- the report ----------------------------------------------------------------------------------


MEDIANS = (
    "samples_per_s",
    "seconds_per_iter",
    "nfe_forward",
    "nfe_backward",
    "norm_calls",
    "metric_calls",
    "control_calls",
    "gradient_calls",
)


def summary_row(mine: list[dict]) -> dict:
    """The medians over the rounds of one configuration's runs (rank 0's numbers)."""
    first = mine[0]
    row = {k: first[k] for k in ("recipe", "processes", "agree", "batch")}
    row["repeats"] = len(mine)
    for name in MEDIANS:
        row[name] = statistics.median(r.get(name, 0.0) for r in mine)
    # shares per run, then their median: a run's collectives against its own iteration time
    for what in ("control", "gradient"):
        shares = (r.get(f"{what}_s", 0.0) / r["seconds_per_iter"] for r in mine)
        row[f"{what}_share"] = statistics.median(shares)
    return row


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (recipe, processes, agree), in the order the runs came, with the speed-up
    over one process and the target where there is one."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["rank"] == 0:
            groups.setdefault((r["recipe"], r["processes"], r["agree"]), []).append(r)
    recipes = list(dict.fromkeys(key[0] for key in groups))
    keys = sorted(groups, key=lambda k: (recipes.index(k[0]), k[1], k[2] != "on"))
    rows = [summary_row(groups[key]) for key in keys]
    for row in rows:
        one = next((o for o in rows if o["recipe"] == row["recipe"] and o["processes"] == 1), None)
        row["speedup"] = row["samples_per_s"] / one["samples_per_s"] if one else None
        target = TARGETS.get(row["recipe"])
        judged = row["processes"] == 2 and row["agree"] == "on" and target is not None
        row["target"] = target if judged else None
        row["met"] = row["speedup"] >= target if judged and row["speedup"] else None
    return rows


def table(rows: list[dict]) -> list[str]:
    """The markdown table of :func:`summarize`'s rows."""
    lines = [
        "| recipe | batch | processes | solver steps | samples/s | ms / iteration | speed-up "
        "| target | met | control all-reduces / it (norms + loss) | control share "
        "| gradient all-reduce share | fwd NFE | bwd NFE |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        one = r["processes"] == 1
        steps = "-" if one else ("agreed" if r["agree"] == "on" else "independent")
        calls = "-" if one else f"{r['norm_calls']:.1f} + {r['metric_calls']:.0f}"
        share = "-" if one else f"{100 * r['control_share']:.1f}%"
        gshare = "-" if one else f"{100 * r['gradient_share']:.1f}%"
        speedup = "1.00x" if one else f"{r['speedup']:.2f}x"
        target = f"{r['target']:.1f}x" if r["target"] else ""
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['recipe']} | {r['batch']} | {r['processes']} | {steps} "
            f"| {r['samples_per_s']:.0f} | {1000 * r['seconds_per_iter']:.1f} | {speedup} "
            f"| {target} | {met} | {calls} | {share} | {gshare} "
            f"| {r['nfe_forward']:.1f} | {r['nfe_backward']:.1f} |"
        )
    return lines


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target: the speed-up reached against the one asked for."""
    lines = []
    for r in rows:
        if r["target"] is not None:
            word = "met" if r["met"] else "NOT met"
            lines.append(
                f"- {r['recipe']}: {r['speedup']:.2f}x at 2 processes (target "
                f"{r['target']:.1f}x): {word}."
            )
    return lines


def gpu_section() -> list[str]:
    return [
        "## GPU users",
        "",
        "**Not measured: this machine has no GPU.** What follows is how the code behaves, and "
        "what to expect from it.",
        "",
        "- Run one process per GPU: `cnf train --data digits --nproc <gpus>` (which starts "
        "torchrun on this machine), or `torchrun --nproc-per-node <gpus> -m cnf train --data "
        "digits ...`; from Python, `cnf.distributed.init()` then `cnf.training.fit(...)` under "
        "torchrun. NCCL is chosen automatically when CUDA is available, and each process "
        "trains on `cuda:LOCAL_RANK`. `--batch-size` stays the global batch, split over the "
        "GPUs.",
        "- The gradient all-reduce (a sum, once per iteration, in DDP's buckets) goes over "
        "NCCL, on the GPUs.",
        "- The agreed error norms are a small host-side all-reduce per adaptive solver step, "
        "on a gloo group of the same processes (a few numbers per step). Each step already "
        "synchronises the host with the GPU once, for the accept/reject decision, so the "
        "agreement adds about one small all-reduce's latency per step: tens of microseconds "
        "between processes of one machine, against the milliseconds a step of a batch that "
        "fills a GPU takes. Expect near-linear scaling as long as the per-GPU batch (global "
        "batch / GPUs) keeps each GPU busy; with small per-GPU batches the per-step latencies "
        "(kernel launches, the host sync, the agreement) dominate and the gain shrinks.",
        "- `--independent-steps` (`agree_steps=False`) removes that collective: each process "
        "then chooses its own steps, so the run is no longer exactly the one-process run "
        "(slightly different steps and gradients), and the processes wait for the slowest at "
        "the gradient all-reduce instead.",
        "",
    ]


def report(args, runs: list[dict], command: str) -> None:
    """Print the table; write it with the method and the GPU notes to ``--out`` (+ .json)."""
    rows = summarize(runs)
    lines = table(rows)
    print("\n" + "\n".join(lines + [""] + verdicts(rows)))
    if not args.out:
        return
    machine = (
        f"{cpu_name()} ({os.cpu_count()} cores), one thread per process, "
        f"torch {torch.__version__}, gloo over the loopback interface"
    )
    counts = ", ".join(
        f"{n}: {w} + {i}" for n, (w, i) in ((n, iterations(args, n)) for n in args.recipes)
    )
    head = [
        "# Data-parallel training on CPU cores (`scripts/bench_distributed.py`)",
        "",
        f"`{command}`",
        "",
        f"{machine}; median of {args.repeats} round{'s' * (args.repeats > 1)}; "
        + time.strftime("%Y-%m-%d")
        + ".",
        "",
        "Each run trains the recipe's model at its global batch with `cnf.training.fit` "
        f"(warmup + timed iterations: {counts}); one plain process against two processes "
        "under torchrun (DDP, gloo), alternating. samples/s: global batch / mean seconds of "
        "a timed iteration on rank 0 (which includes waiting for the other process). "
        "'agreed': the solvers' error norms summed over the processes at every step (the "
        "default: the run is the one-process run, to rounding); 'independent': "
        "`agree_steps=False`. Control all-reduces: `World.reduce`, per iteration, the "
        "agreed error norms (one per adaptive step, forward and adjoint) + the loss and "
        "metrics; their share, and the gradient all-reduce's (DDP's hook made synchronous "
        "to time it), are of rank 0's iteration time, waiting for the other process "
        "included. NFE: function evaluations per iteration, forward and backward.",
        "",
        *verdicts(rows),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + lines + [""] + gpu_section()))
    raw = {
        "command": command,
        "machine": machine,
        "settings": vars(args),
        "summary": rows,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.json')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["8gaussians", "digits"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--agree",
        choices=("on", "off", "both"),
        default="both",
        help="two processes with agreed solver steps, independent ones, or both (default)",
    )
    parser.add_argument("--iters", type=int, help="timed iterations (default: per recipe)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default: per recipe)")
    parser.add_argument("--batch", type=int, help="global batch (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", help="markdown table (default docs/bench_distributed.md; + .json)")
    parser.add_argument("--quick", action="store_true", help="smoke run; no files unless --out")
    # the worker's flags (the driver passes them)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    command = " ".join(["python scripts/bench_distributed.py", *sys.argv[1:]])
    if args.quick:
        args.recipes, args.repeats = ["8gaussians"], 1
        args.warmup = 2 if args.warmup is None else args.warmup
        args.iters = 3 if args.iters is None else args.iters
    elif args.out is None:
        args.out = "docs/bench_distributed.md"
    print(
        f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}; recipes "
        f"{' '.join(args.recipes)}, {args.repeats} round(s), agree {args.agree}",
        flush=True,
    )
    runs = measure(args)
    report(args, runs, command)


if __name__ == "__main__":
    main()
