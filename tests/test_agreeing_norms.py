"""Agreeing error norms (cnf.ode.agreeing_norms) and per-sample noise shards (cnf.shards), in
one process: two threads stand in for two data-parallel processes, each solving its half of a
batch, and a barrier adds up what they hand to ``reduce``."""

from __future__ import annotations

import threading

import pytest
import torch

from cnf import sample_noise
from cnf.distributed import World
from cnf.ode import Backsolve, agreeing_norms, solve
from cnf.shards import batch_shard, current_shard, draw_rows
from cnf.training import FlowMatching


class ThreadSum:
    """``reduce`` for threads: each thread hands in its values and gets the sum (or max)."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n
        self.local = threading.local()
        self.calls = 0

    def __call__(self, values: torch.Tensor, op: str) -> None:
        rank = self.local.rank
        self.slots[rank] = values.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        total = stacked.sum(0) if op == "sum" else stacked.max(0).values
        self.barrier.wait()  # every thread has read the slots before any refills them
        values.copy_(total)
        if rank == 0:
            self.calls += 1


def in_threads(work, halves, reduce: ThreadSum | None):
    """``work(half)`` for each half in its own thread (inside ``agreeing_norms(reduce)``)."""
    results: list = [None] * len(halves)
    errors: list = []

    def run(rank):
        try:
            if reduce is not None:
                reduce.local.rank = rank
            results[rank] = work(halves[rank])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            if reduce is not None:
                reduce.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(halves))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def field(t, y):
    """A nonlinear field whose stiffness grows with |y|: a spread batch needs many steps."""
    return -(y**3) + torch.sin(3 * t) * y


def split_batch():
    """A batch whose two halves differ a lot (small and large states)."""
    g = torch.Generator().manual_seed(0)
    small = 0.1 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    large = 2.5 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    return torch.cat([small, large]), [small, large]


T = torch.tensor([0.0, 2.0], dtype=torch.float64)


def forward(y0, **kw):
    return solve(field, y0, T, rtol=1e-7, atol=1e-7, **kw)


def test_agreeing_halves_take_the_whole_batchs_steps():
    whole, halves = split_batch()
    one = forward(whole)
    alone = in_threads(forward, halves, None)
    # without agreement the halves choose differently: the test below can fail
    assert alone[0].stats.nfe != alone[1].stats.nfe
    reduce = ThreadSum(2)
    with agreeing_norms(reduce):
        agreed = in_threads(forward, halves, reduce)
    assert [s.stats.nfe for s in agreed] == [one.stats.nfe] * 2
    assert [s.stats.n_accepted for s in agreed] == [one.stats.n_accepted] * 2
    joined = torch.cat([s.ys[-1] for s in agreed])
    torch.testing.assert_close(joined, one.ys[-1], rtol=0, atol=1e-13)
    # one collective per step, and two for the first step's estimate (d0 with d1, then d2)
    assert reduce.calls == one.stats.n_accepted + one.stats.n_rejected + 2


class Cubic(torch.nn.Module):
    """``field`` with trainable weights, for the adjoint's gradient section."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 0.7], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, t, y):
        return -self.a * y**3 + self.b * torch.sin(3 * t) * y


@pytest.mark.parametrize("norm", ["rms", "seminorm"])
def test_agreeing_backsolves_give_the_whole_batchs_gradient(norm):
    """The backward solve's norm reads the gradient section, which each half holds a part of:
    summed first, the halves step as the whole batch does and their gradients add up to it."""
    module = Cubic()
    whole, halves = split_batch()
    params = tuple(module.parameters())
    n_total = whole.shape[0]

    def gradient(y0):
        sol = solve(
            module, y0, T, rtol=1e-7, atol=1e-7, adjoint=Backsolve(norm=norm),
            adjoint_params=params,
        )  # fmt: skip
        loss = sol.ys[-1].square().sum() / n_total  # the whole batch's mean, as DDP ranks do
        grads = torch.autograd.grad(loss, params)
        return grads, sol.stats.nfe_backward

    grads, nfe = gradient(whole)
    reduce = ThreadSum(2)
    with agreeing_norms(reduce):
        parts = in_threads(gradient, halves, reduce)
    assert [p[1] for p in parts] == [nfe, nfe]
    for k, g in enumerate(grads):
        torch.testing.assert_close(parts[0][0][k] + parts[1][0][k], g, rtol=0, atol=1e-12)


def test_a_users_norm_agrees_by_its_maximum():
    whole, halves = split_batch()

    def run(y0):
        return forward(y0, options={"norm": lambda e: e.abs().max()})

    reduce = ThreadSum(2)
    with agreeing_norms(reduce):
        agreed = in_threads(run, halves, reduce)
    assert agreed[0].stats.nfe == agreed[1].stats.nfe
    assert agreed[0].stats.nfe == run(whole).stats.nfe  # the max of maxima is the max


def test_outside_the_block_nothing_reduces():
    reduce = ThreadSum(1)
    with agreeing_norms(reduce):
        pass
    whole, _ = split_batch()
    forward(whole)
    assert reduce.calls == 0


def test_draw_rows_cuts_the_whole_batchs_draw():
    def noise(n):
        return torch.randn(n, 3, generator=torch.Generator().manual_seed(5))

    assert torch.equal(draw_rows(noise, 4), noise(4))
    with batch_shard(3, 7, 10):
        assert current_shard() == (3, 7, 10)
        assert torch.equal(draw_rows(noise, 4), noise(10)[3:7])
        assert torch.equal(draw_rows(noise, 5), noise(5))  # not a batch of the shard's rows
    assert current_shard() is None


@pytest.mark.parametrize("bad", [(2, 2, 4), (-1, 2, 4), (1, 5, 4)])
def test_a_bad_shard_is_refused(bad):
    with pytest.raises(ValueError, match="0 <= start < stop <= total"):
        with batch_shard(*bad):
            pass


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probes_of_a_shard_are_the_whole_batchs_rows(kind):
    def probes(rows):
        g = torch.Generator().manual_seed(1)
        return sample_noise((rows, 3), kind, probes=2, generator=g, dtype=torch.float64)

    with batch_shard(4, 10, 16):
        mine = probes(6)
    assert torch.equal(mine, probes(16)[:, 4:10])


def test_flow_matching_draws_of_a_shard_are_the_whole_batchs_rows():
    objective = FlowMatching(time="logit-normal")
    x = torch.zeros(12, 2, dtype=torch.float64)
    t_all, z_all = objective.draw(x, torch.Generator().manual_seed(2))
    with batch_shard(8, 12, 12):
        t, z = objective.draw(x[8:], torch.Generator().manual_seed(2))
    assert torch.equal(t, t_all[8:]) and torch.equal(z, z_all[8:])


@pytest.mark.parametrize("total,size", [(10, 3), (2, 2), (512, 2), (7, 7), (5, 4)])
def test_the_ranks_rows_cover_the_batch_once(total, size):
    rows = [World(r, size, r, torch.device("cpu"), None).rows(total) for r in range(size)]
    assert rows[0][0] == 0 and rows[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    lengths = [stop - start for start, stop in rows]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_shared_sums_add_up_every_processs_numbers(tmp_path):
    """Two processes' shared-memory sums, played by two threads on one mapping: many sums in a
    row (the slots alternate), sums and maxima, the same bits for both."""
    from cnf.shared_sums import SharedSums

    path = SharedSums.create(2)
    ranks = [SharedSums(path, r, 2, timeout=60) for r in range(2)]
    SharedSums.forget(ranks[0])
    results: list = [[], []]

    def run(rank):
        for k in range(200):
            values = torch.tensor([rank + k, -rank * k, 0.5 * rank], dtype=torch.float64)
            ranks[rank].reduce(values, "sum" if k % 3 else "max")
            results[rank].append(values.tolist())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[0] == results[1]
    for k, got in enumerate(results[0]):
        a, b = [k, 0.0, 0.0], [1 + k, -k, 0.5]
        want = [max(x, y) for x, y in zip(a, b)] if k % 3 == 0 else [x + y for x, y in zip(a, b)]
        assert got == want


def test_a_shared_sum_without_its_peer_times_out():
    from cnf.shared_sums import SharedSums

    path = SharedSums.create(2)
    alone = SharedSums(path, 0, 2, timeout=0.2)
    alone.forget()
    with pytest.raises(RuntimeError, match="did not reach sum 1 within"):
        alone.reduce(torch.zeros(2, dtype=torch.float64))
