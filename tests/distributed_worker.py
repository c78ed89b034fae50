"""The training runs of tests/test_distributed.py, for one process or one of several.

``python -m torch.distributed.run --nproc-per-node 2 ... tests/distributed_worker.py MODE OUT``
runs ``MODE`` in every process and writes rank ``r``'s results to ``OUT/rank{r}.json``; the
tests call the same functions in their own process (no group: one process) for the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import cnf
from cnf import CNF
from cnf.fields import ConcatSquashMLP
from cnf.ode import Backsolve

MODES = ("exact", "backsolve", "hutchinson", "flow-matching")
"""The training set-ups compared between one and two processes."""


def data() -> torch.Tensor:
    """256 points of a 2-D mixture, float64."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    which = torch.randint(2, (256,), generator=g)
    return centres[which] + 0.5 * torch.randn(256, 2, generator=g, dtype=torch.float64)


def model(mode: str) -> CNF:
    torch.manual_seed(0)
    fixed = mode == "flow-matching"
    adjoint = Backsolve() if mode == "backsolve" else True
    field = ConcatSquashMLP(2, hidden=(16, 16))
    return CNF(
        field, (2,), T=1.0, train_T=not fixed, rtol=1e-6, atol=1e-6, adjoint=adjoint
    ).double()


def settings(mode: str, **extra) -> dict:
    """fit's keywords of ``mode``: 3 steps of a 64-point global batch, held-out NLL at the end."""
    kw = dict(iters=3, batch_size=64, lr=1e-2, progress=False, seed=3, eval_data=data()[:50])
    kw["eval_solver"] = {"rtol": 1e-9, "atol": 1e-9}
    if mode == "flow-matching":
        kw["objective"] = cnf.training.FlowMatching()
    if mode == "hutchinson":
        kw["solver"] = {"trace": "hutchinson"}
    return {**kw, **extra}


def state(flow: CNF, history) -> dict:
    """What the tests compare: weights, the last step's gradients, the history."""
    params = list(flow.parameters())
    return {
        "params": torch.cat([p.detach().flatten() for p in params]).tolist(),
        "grads": torch.cat([p.grad.flatten() for p in params]).tolist(),
        "loss": history.loss,
        "nfe": getattr(history, "nfe_forward", None),
        "eval_nll": history.eval_nll,
    }


def train(mode: str) -> dict:
    flow = model(mode)
    return state(flow, cnf.training.fit(flow, data(), **settings(mode)))


def compare() -> dict:
    return {mode: train(mode) for mode in MODES}


def local_nfe(agree: bool) -> dict:
    """Ranks with very different data: rank 1's points are 40 times as spread, so alone it
    needs many more solver steps. Returns this process's own function evaluations per step."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    spread = 40.0 if rank == 1 else 1.0
    counts: list[int] = []
    likelihood = cnf.training.MaximumLikelihood()

    def objective(flow, batch, generator):
        loss, metrics = likelihood(flow, batch, generator)
        counts.append(metrics["nfe_forward"])
        return loss, metrics

    def sampler(n, generator):
        return spread * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    flow = model("exact")
    history = cnf.training.fit(
        flow, sampler, iters=3, batch_size=32, progress=False, objective=objective,
        agree_steps=agree,
    )  # fmt: skip
    return {"local_nfe": counts, "loss": history.loss}


def different_data() -> dict:
    """(The test runs this one with gloo's sums instead of shared memory: CNF_SHARED_SUMS=0.)"""
    return {"agree": local_nfe(True), "independent": local_nfe(False)}


def failing(out: str) -> dict:
    """Rank 1's sampler raises at the third batch; rank 0 writes a checkpoint every step."""
    rank = torch.distributed.get_rank()

    def sampler(n, generator):
        draw = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("rank 1 cannot read its data")
        calls.append(n)
        return draw

    calls: list[int] = []
    cnf.training.fit(
        model("exact"), sampler, iters=5, batch_size=16, progress=False,
        checkpoint_dir=Path(out) / "run", checkpoint_every=1,
    )  # fmt: skip
    return {}


def resume(out: str) -> dict:
    """4 steps, then a resumed run to 6 (both with checkpoints), and an unbroken run of 6."""
    base = settings("exact", checkpoint_every=2)
    flow = model("exact")
    cnf.training.fit(flow, data(), **{**base, "iters": 4}, checkpoint_dir=Path(out) / "a")
    again = model("exact")
    resumed = cnf.training.fit(
        again, data(), **{**base, "iters": 6}, checkpoint_dir=Path(out) / "a", resume=True
    )
    whole = model("exact")
    unbroken = cnf.training.fit(whole, data(), **{**base, "iters": 6})
    # 4 steps more, left for the test to resume in one process
    cnf.training.fit(model("exact"), data(), **{**base, "iters": 4}, checkpoint_dir=Path(out) / "b")
    return {"resumed": state(again, resumed), "unbroken": state(whole, unbroken)}


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    world = cnf.distributed.init()
    runs = {"compare": compare, "different-data": different_data}
    result = runs[mode]() if mode in runs else {"failing": failing, "resume": resume}[mode](out)
    rank = 0 if world is None else world.rank
    result["rank"] = rank
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    cnf.distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:3])
