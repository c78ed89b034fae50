"""Train the same FFJORD-style 2-D model with torchdiffeq and with cnf, side by side.

    pip install -e '.[bench]'
    python scripts/bench_toy.py [--iters 500] [--data 8gaussians pinwheel checkerboard]

Model (FFJORD's toy setting): ConcatSquash MLP 64-64-64, tanh, T = 0.5 (fixed), dopri5 at
rtol = atol = 1e-5, adjoint gradients, batch 100, Adam 1e-3, exact trace. The torchdiffeq run is
FFJORD's recipe: the joint ODE (z, log p) through ``torchdiffeq.odeint_adjoint`` with FFJORD's
exact trace (one ``autograd.grad`` per dimension), and FFJORD's field evaluation: every
ConcatSquash layer computes ``linear(x) * sigmoid(gate(t)) + shift(t)`` on the batch
(:meth:`cnf.fields.ConcatSquashLinear.forward`, the same parameters). The row "torchdiffeq,
cnf's field" gives torchdiffeq cnf's faster field evaluation (gates folded into the weights,
:meth:`cnf.fields.ConcatSquashMLP.forward`), to separate the two sources of cnf's speed. The cnf
runs use :class:`cnf.CNF` with the same field (same initial weights), and also show what the
Hutchinson trace and the RNODE regularizers (weights 0.01) do. Every model is evaluated the same
way: exact NLL (nats) with cnf at 1e-6 on 5000 fresh samples, at iterations 0, 100, 250 and the
end. The runs train in lockstep (iteration i of every run, then i + 1), so that a machine
whose speed drifts during the benchmark slows every run alike.

cnf's runs use its default adjoint, :class:`cnf.ode.Checkpoint`, which keeps these small graphs
(``graph_memory``) and replays no step: their backward NFE is 0.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import cnf
from cnf.data import density, sample_tensor, toy_sampler
from cnf.training import MaximumLikelihood, evaluate_nll

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None


PEER = "torchdiffeq (FFJORD)"
FOLDED_PEER = "torchdiffeq, cnf's field"


class FFJORDNet(nn.Module):
    """FFJORD's ODEnet evaluation of a :class:`cnf.ConcatSquashMLP`: layer by layer, each gating
    and shifting its batch output (the same parameters, the same function)."""

    def __init__(self, field: cnf.ConcatSquashMLP):
        super().__init__()
        self.field = field

    def forward(self, t, z):
        x = z
        for layer, act in zip(self.field.layers, self.field.activations):
            x = act(layer(t, x))
        return self.field.layers[-1](t, x)


class FFJORDFunc(nn.Module):
    """FFJORD's ODE function: state (z, log p), exact trace by a loop over dimensions."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t, state):
        self.nfe += 1
        z = state[0]
        with torch.enable_grad():
            z = z.requires_grad_(True)
            f = self.field(t, z)
            div = 0.0
            for i in range(z.shape[1]):
                div = div + torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i]
        return f, -div


class Run:
    """One training run, advanced an iteration at a time so that all runs go in lockstep.

    Timings on a shared machine drift (other processes, clock changes); interleaving the runs'
    iterations spreads any drift over all of them, so their ratios stay fair.
    ``step(x, i) -> (loss, forward NFE, backward-NFE getter)``.
    """

    def __init__(self, field, step, evals, test) -> None:
        self.flow = cnf.CNF(field, (2,), T=0.5)  # the evaluator, the same for every run
        self.opt = torch.optim.Adam(field.parameters(), lr=1e-3)
        self.step, self.evals, self.test = step, evals, test
        self.record = {"nll": {}, "nfe_f": [], "nfe_b": [], "sec": []}

    def iteration(self, i: int, x: torch.Tensor | None) -> None:
        """Evaluate if ``i`` is an evaluation point, then train on ``x`` (None: the end)."""
        record = self.record
        if i in self.evals:
            record["nll"][i] = evaluate_nll(self.flow, self.test, rtol=1e-6, atol=1e-6)
        if x is None:
            return
        tic = time.perf_counter()
        loss, nfe_f, nfe_b = self.step(x, i)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        record["sec"].append(time.perf_counter() - tic)
        record["nfe_f"].append(nfe_f)
        record["nfe_b"].append(nfe_b())


def torchdiffeq_step(field, ffjord_net=True):
    func = FFJORDFunc(FFJORDNet(field) if ffjord_net else field)
    base = cnf.StandardNormal((2,))
    t = torch.tensor([0.5, 0.0])

    def step(x, i):
        func.nfe = 0
        zero = torch.zeros(x.shape[0])
        z, dlogp = torchdiffeq.odeint_adjoint(func, (x, zero), t, rtol=1e-5, atol=1e-5)
        # integrated from T to 0 with d(-log p)/dt = tr: log p(x) = log N(z0) - dlogp(0)
        logp = base.log_prob(z[-1]) - dlogp[-1]
        nfe_f = func.nfe
        return -logp.mean(), nfe_f, lambda: func.nfe - nfe_f

    return step


def cnf_step(field, trace="exact", reg=0.0):
    flow = cnf.CNF(field, (2,), T=0.5, trace=trace, rtol=1e-5, atol=1e-5)
    objective = MaximumLikelihood(kinetic=reg, jacobian=reg)

    def step(x, i):
        loss, metrics = objective(flow, x, torch.Generator().manual_seed(10_000 + i))
        return loss, metrics["nfe_forward"], metrics["nfe_backward"]

    return step


def train_all(runs, field0, data, iters, evals, test, batch) -> dict[str, dict]:
    """Train every run from ``field0``'s weights on the same batches, in lockstep."""
    live = {}
    for label, make, kw in runs:
        field = copy.deepcopy(field0)
        live[label] = Run(field, make(field, **kw), evals, test)
    for i in range(iters + 1):
        x = data(batch, torch.Generator().manual_seed(i)).float() if i < iters else None
        for run in live.values():
            run.iteration(i, x)
    return {label: run.record for label, run in live.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--data", nargs="+", default=["8gaussians", "pinwheel", "checkerboard"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evals = sorted({0, min(100, args.iters), min(250, args.iters), args.iters})

    print(
        f"FFJORD-style model, {args.iters} iterations, batch {args.batch}, {args.threads} "
        f"thread(s), torch {torch.__version__}"
        + (f", torchdiffeq {torchdiffeq.__version__}" if torchdiffeq else "")
        + ".\n"
    )
    header = (
        "| data | run | s / iteration | fwd NFE | bwd NFE | "
        + " | ".join(f"NLL @{i}" for i in evals)
        + " |"
    )
    print(header)
    print("|---" * (5 + len(evals)) + "|")
    ratios = []
    for name in args.data:
        torch.manual_seed(0)
        field0 = cnf.ConcatSquashMLP(2, hidden=(64, 64, 64), activation="tanh")
        data = toy_sampler(name)
        test = sample_tensor(name, 5000, seed=12345, dtype=torch.float32)
        runs = [
            ("cnf exact", cnf_step, {}),
            ("cnf hutchinson", cnf_step, {"trace": "hutchinson"}),
            ("cnf exact + RNODE", cnf_step, {"reg": 0.01}),
        ]
        if torchdiffeq is not None:
            runs[:0] = [
                (PEER, torchdiffeq_step, {}),
                (FOLDED_PEER, torchdiffeq_step, {"ffjord_net": False}),
            ]
        entropy = density(name).entropy if name in ("8gaussians", "checkerboard") else None
        seconds = {}
        records = train_all(runs, field0, data, args.iters, evals, test, args.batch)
        for label, r in records.items():
            n = len(r["sec"])
            seconds[label] = sum(r["sec"]) / n
            nlls = " | ".join(f"{r['nll'][i]:.3f}" for i in evals)
            print(
                f"| {name} | {label} | {seconds[label]:.4f} | {sum(r['nfe_f']) / n:.1f} | "
                f"{sum(r['nfe_b']) / n:.1f} | {nlls} |",
                flush=True,
            )
        if entropy is not None:
            print(
                f"| {name} | (entropy) | | | | "
                + " | ".join("" for _ in evals[:-1])
                + f" | {entropy:.3f} |",
                flush=True,
            )
        if torchdiffeq is not None:
            ratios.append(
                f"{name} {seconds['cnf exact'] / seconds[PEER]:.3f} "
                f"({seconds['cnf exact'] / seconds[FOLDED_PEER]:.3f})"
            )
    if ratios:
        print(
            "\ncnf exact's time per iteration relative to torchdiffeq (FFJORD), and in brackets "
            "to torchdiffeq with cnf's field: " + ", ".join(ratios)
        )


if __name__ == "__main__":
    main()
