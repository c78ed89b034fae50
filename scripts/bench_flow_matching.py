"""Flow matching against maximum likelihood, and against two flow-matching libraries.

    pip install -e '.[bench]' && pip install --no-deps torchcfm
    python scripts/bench_flow_matching.py [--sets 8gaussians pinwheel checkerboard digits] \\
        [--methods ml fm fm+ml torchcfm meta] [--out docs/bench_flow_matching.md]

One thread, one run, side by side. For each data set, with the recipe of ``cnf train --data
SET`` (``cnf.recipes.get(SET)``):

* ``ml``: cnf's default, maximum likelihood through the ODE (``recipe.fit_options()``).
* ``fm``: cnf's flow matching with the recipe's plan (``recipe.fit_options("flow-matching")``
  on ``recipe.flow_matching_spec()``: the same model with its blocks' T fixed to add up to 1).
* ``fm+ml``: the same, then the recipe's maximum-likelihood finish
  (``recipe.fit_options("finish")``, ``--finish ITERS`` to change its length).
* ``torchcfm``: TorchCFM's ``ExactOptimalTransportConditionalFlowMatcher`` (sigma = 0: exact
  OT on the whole batch with POT, pairs drawn from the plan), and ``meta``: Meta's
  ``flow_matching`` library, ``AffineProbPath(CondOTScheduler())`` (independent pairs). Both
  train the very same field modules as cnf's flow matching (the velocity of the blocks on one
  time axis, ``cnf.training.flow_matching.blockwise_velocity``), on the same data stream and
  batch, with Adam at the same learning rate on a cosine schedule over their time budget: the
  wall time cnf's ``fm+ml`` took (``fm`` if that did not run). They have no weight average
  (their libraries have none); only the loss and its pairs are theirs.

Training time excludes evaluation. Every trained model is scored with cnf's exact
``log_prob``: test NLL in nats on the same fresh test points (2-D data, ``--n`` points at rtol
= atol = ``--tol``) or test bits/dim on the digits' test split with 4 dequantization draws at
1e-5 (the recipe's evaluation); Meta's models also with their own ``ODESolver.compute_likelihood``
(dopri5, exact divergence) on 2-D data (TorchCFM ships no likelihood routine). NFE: function
evaluations of one ``log_prob`` of the test batch and of one ``sample`` of as many points, at
the same tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cnf import recipes
from cnf.continuous import CNFTransform
from cnf.data import sample_tensor
from cnf.models import build
from cnf.settings import Call
from cnf.training import fit
from cnf.training.flow_matching import block_space, blockwise_velocity, split_flow

try:
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
except ImportError:  # pragma: no cover - optional peer
    ExactOptimalTransportConditionalFlowMatcher = None
try:
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper
except ImportError:  # pragma: no cover - optional peer
    AffineProbPath = None

METHODS = ("ml", "fm", "fm+ml", "torchcfm", "meta")
SETS = ("8gaussians", "pinwheel", "checkerboard", "digits")


class Velocity(nn.Module):
    """The blocks' fields as one velocity ``v(t, x)`` on t in [0, 1], for the peers' losses."""

    def __init__(self, blocks: list[CNFTransform]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(x.dtype)
        return blockwise_velocity(list(self.blocks), t, x)


def train_cnf(recipe, stage: str, model, data, args) -> float:
    """Train ``model`` in place for one stage of the recipe; return the training seconds."""
    options = recipe.fit_options(stage, progress=False, seed=args.seed)
    if stage == "finish":
        options["iters"] = args.finish
    if stage == "flow-matching":
        options["iters"] = args.fm_iters or options["iters"]
        if args.coupling is not None:
            coupling = None if args.coupling == "none" else args.coupling
            options["objective"] = dataclasses.replace(options["objective"], coupling=coupling)
    tic = time.perf_counter()
    fit(model, data.sampler(), **options)
    return time.perf_counter() - tic


def train_peer(name: str, recipe, model, data, seconds: float, seed: int) -> int:
    """Train the model's fields with a peer's flow-matching loss for ``seconds``; iterations."""
    _, blocks = split_flow(model)
    velocity = Velocity(blocks).train()
    options = recipe.fit_options("flow-matching")
    opt = torch.optim.Adam(velocity.parameters(), lr=options["lr"])
    sampler, batch = data.sampler(), options["batch_size"]
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    if name == "torchcfm":
        matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    else:
        path = AffineProbPath(scheduler=CondOTScheduler())
    it, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in opt.param_groups:  # cosine over the time budget
            group["lr"] = options["lr"] * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
        _, x1 = block_space(model, sampler(batch, g).to(dtype))
        x0 = torch.randn(x1.shape, generator=g, dtype=dtype)
        if name == "torchcfm":
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        else:
            t = torch.rand(x1.shape[0], generator=g, dtype=dtype)
            sample = path.sample(t=t, x_0=x0, x_1=x1)
            t, xt, ut = sample.t, sample.x_t, sample.dx_t
        loss = (velocity(t, xt) - ut).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
    return it


def score(recipe, model, test: torch.Tensor, tol: float) -> tuple[float, int, int]:
    """Test NLL (bits/dim for images) and the NFE of one log_prob and one sample of the batch."""
    model.eval()
    settings = {"rtol": tol, "atol": tol, "trace": "exact"}
    value = recipe.score(model, test, tol=tol)
    with torch.no_grad():
        x = test[:512].to(next(model.parameters()).dtype)
        if recipe.levels is not None:
            x = (x + 0.5) / recipe.levels
        nfe_lp = model.evaluate(x, **settings).nfe
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        call = Call.make(settings, with_logdet=False)
        nfe_s = model.transform.inverse_and_logdet(z.reshape(-1, *model.base.event_shape), call).nfe
    return value, nfe_lp, nfe_s


def meta_likelihood(model, test: torch.Tensor, tol: float) -> float:
    """Meta's own likelihood routine on the model's field (2-D): mean NLL in nats."""
    x = test.to(next(model.parameters()).dtype)
    blocks, x = block_space(model, x)
    velocity = Velocity(blocks).eval()

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(t, x)

    solver = ODESolver(velocity_model=Wrapped(velocity))

    def log_p0(z):
        return -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    _, logp = solver.compute_likelihood(
        x_1=x, log_p0=log_p0, step_size=None, method="dopri5", atol=tol, rtol=tol,
        exact_divergence=True,
    )  # fmt: skip
    return -logp.mean().item()


def evaluated(row: dict, recipe, model, test: torch.Tensor, tol: float, args) -> dict:
    """``row`` with the model's scores: test value, NFE, and Meta's own likelihood (2-D)."""
    row["value"], row["nfe_log_prob"], row["nfe_sample"] = score(recipe, model, test, tol)
    if row["method"] == "meta" and recipe.levels is None:
        row["own"] = meta_likelihood(model, test[: args.own_n], tol)
    print(row, flush=True)
    return row


def run_set(name: str, methods, args) -> list[dict]:
    recipe = recipes.get(name)
    data = recipe.load()
    image = recipe.levels is not None
    test = data.part("test") if image else sample_tensor(name, args.n, seed=12345)
    tol = recipe.evaluation.tol if image else args.tol
    rows, budget = [], {}
    for method in methods:
        if method == "fm+ml":
            continue  # measured right after "fm", on its model
        torch.manual_seed(args.seed)
        model = build(recipe.flow_matching_spec() if method != "ml" else recipe.spec())
        row = {"set": name, "method": method}
        if method in ("ml", "fm"):
            stage = "likelihood" if method == "ml" else "flow-matching"
            row["seconds"] = budget[method] = train_cnf(recipe, stage, model, data, args)
        else:
            missing = {
                "torchcfm": ExactOptimalTransportConditionalFlowMatcher,
                "meta": AffineProbPath,
            }
            if missing[method] is None:
                print(f"{name} {method}: not installed (pip install -e '.[bench]'), skipped")
                continue
            row["seconds"] = budget.get("fm", args.seconds)
            row["iters"] = train_peer(method, recipe, model, data, row["seconds"], args.seed)
        rows.append(evaluated(row, recipe, model, test, tol, args))
        if method == "fm" and "fm+ml" in methods:
            finish = {"set": name, "method": "fm+ml"}
            finish["seconds"] = row["seconds"] + train_cnf(
                recipe, "finish", model.train(), data, args
            )
            rows.append(evaluated(finish, recipe, model, test, tol, args))
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| data | method | training s | test NLL (bits/dim) | vs ML | NFE log_prob | NFE sample "
        "| notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ml = {r["set"]: r for r in rows if r["method"] == "ml"}
    for r in rows:
        ref = ml.get(r["set"])
        gap = f"{r['value'] - ref['value']:+.3f}" if ref else ""
        notes = []
        if "iters" in r:
            notes.append(f"{r['iters']} iterations")
        if "own" in r:
            notes.append(f"own likelihood {r['own']:.3f}")
        if ref and r is not ref:
            notes.append(f"time {r['seconds'] / ref['seconds']:.2f}x ML")
        lines.append(
            f"| {r['set']} | {r['method']} | {r['seconds']:.1f} | {r['value']:.3f} | {gap} | "
            f"{r['nfe_log_prob']} | {r['nfe_sample']} | {'; '.join(notes)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--finish", type=int, default=50, help="likelihood finish iterations")
    parser.add_argument("--seconds", type=float, default=30.0, help="peers' budget without fm")
    parser.add_argument("--fm-iters", type=int, help="iterations of cnf's flow matching")
    parser.add_argument("--coupling", choices=("none", "ot"), help="cnf's flow-matching coupling")
    parser.add_argument("--n", type=int, default=20000, help="2-D test points")
    parser.add_argument("--own-n", type=int, default=2000, help="points for Meta's likelihood")
    parser.add_argument("--tol", type=float, default=1e-6, help="2-D evaluation tolerance")
    parser.add_argument("--seed", type=int, default=0, help="weights, batches and noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in args.sets for row in run_set(name, args.methods, args)]
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        command = " ".join(["python scripts/bench_flow_matching.py", *sys.argv[1:]])
        Path(args.out).write_text("\n".join([f"`{command}`", "", *lines]) + "\n")


if __name__ == "__main__":
    main()
