"""Data-parallel training in two processes over gloo on the loopback interface (torchrun),
against one process training on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

import cnf

HERE = Path(__file__).parent
TIMEOUT = 240  # seconds: a hang fails the test instead of stalling the suite


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    loopback = cnf.distributed.loopback_interface()
    if loopback is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    return env


def torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 <args>`` on 127.0.0.1, stopped after :data:`TIMEOUT`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--master-addr=127.0.0.1", f"--master-port={cnf.distributed.free_port()}", *args,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env={**environment(), **env}
    )


def run_worker(mode: str, out: Path, **env: str) -> list[dict]:
    done = torchrun([str(HERE / "distributed_worker.py"), mode, str(out)], **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def gap(a, b) -> float:
    return (
        (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64))
        .abs()
        .max()
        .item()
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_worker("compare", tmp_path_factory.mktemp("compare"))


@pytest.mark.parametrize("mode", worker.MODES)
def test_two_processes_train_as_one_on_the_global_batch(two_processes, mode):
    """Likelihood (checkpointed and backsolve adjoints, exact and Hutchinson traces) and flow
    matching: weights and gradients after 3 steps equal one process's, to 1e-10 (float64)."""
    torch.set_num_threads(1)
    one = worker.train(mode)
    for rank in two_processes:
        mine = rank[mode]
        assert gap(mine["params"], one["params"]) <= 1e-10
        assert gap(mine["grads"], one["grads"]) <= 1e-10
        assert gap(mine["loss"], one["loss"]) <= 1e-10
        assert mine["nfe"] == one["nfe"]
        # sharded evaluation, summed: each half chooses its own steps at rtol 1e-9
        assert abs(mine["eval_nll"][-1] - one["eval_nll"][-1]) <= 1e-6
    assert two_processes[0][mode] == two_processes[1][mode]  # every rank holds the same run


def test_ranks_with_very_different_data_finish_without_hanging(tmp_path):
    ranks = run_worker("different-data", tmp_path, CNF_SHARED_SUMS="0")  # gloo's sums
    independent = [rank["independent"]["local_nfe"] for rank in ranks]
    agreed = [rank["agree"]["local_nfe"] for rank in ranks]
    assert independent[0] != independent[1]  # each chose its own steps, and nothing hung
    assert agreed[0] == agreed[1]  # one set of steps for both
    assert sum(agreed[0]) >= sum(independent[1])  # the stiffer shard's steps, at least
    assert ranks[0]["agree"]["loss"] == ranks[1]["agree"]["loss"]


def test_an_error_on_one_rank_ends_both_and_keeps_the_last_checkpoint(tmp_path):
    tic = time.perf_counter()
    done = torchrun([str(HERE / "distributed_worker.py"), "failing", str(tmp_path)])
    assert done.returncode != 0
    assert "rank 1 cannot read its data" in done.stderr
    assert time.perf_counter() - tic < TIMEOUT  # torchrun stopped rank 0 too
    state = cnf.training.load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 2  # the steps before the failure, written by rank 0
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_resume_under_torchrun_continues_exactly(tmp_path):
    ranks = run_worker("resume", tmp_path)
    for rank in ranks:
        resumed, unbroken = rank["resumed"], rank["unbroken"]
        assert resumed["params"] == unbroken["params"]
        assert resumed["loss"] == unbroken["loss"]
    # a two-process checkpoint resumed by one process: the global batch makes it the same run
    torch.set_num_threads(1)
    flow = worker.model("exact")
    base = worker.settings("exact", checkpoint_every=2)
    history = cnf.training.fit(
        flow, worker.data(), **{**base, "iters": 6}, checkpoint_dir=tmp_path / "b", resume=True
    )
    alone = worker.state(flow, history)
    assert gap(alone["params"], ranks[0]["unbroken"]["params"]) <= 1e-10


def test_cnf_train_nproc_trains_the_one_process_model(tmp_path):
    """``cnf train --nproc 2`` and ``cnf train``, same flags: the same weights (float32, to
    rounding), and rank 0 alone writes and prints."""
    flags = ["--data", "8gaussians", "--iters", "3", "--no-plot", "--quiet", "--eval-n", "100"]
    env = environment()
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        out = tmp_path / name
        command = [sys.executable, "-m", "cnf", "train", *flags, "--out", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("training a CNF") == 1
        runs[name] = cnf.training.load_checkpoint(out / "last.pt")
    for key, value in runs["one"]["model"].items():
        torch.testing.assert_close(runs["two"]["model"][key], value, rtol=1e-5, atol=1e-6)
    assert runs["two"]["iteration"] == 3


def test_cnf_train_nproc_refuses_a_batch_smaller_than_the_processes(tmp_path):
    command = [
        sys.executable, "-m", "cnf", "train", "--data", "8gaussians", "--iters", "2",
        "--batch-size", "1", "--no-plot", "--quiet", "--out", str(tmp_path), "--nproc", "2",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env=environment()
    )
    assert done.returncode != 0
    assert "batch_size=1 is the global batch" in done.stderr
