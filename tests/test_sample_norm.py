"""The per-sample error norm (``options["norm"] == "sample"``): its value against a hand
computation, its plumbing (tuple states, the adjoint's backward solve, the initial step),
what it guarantees (every sample's error within the tolerance, whatever its batch holds),
and agreeing processes combining it by the maximum."""

from __future__ import annotations

import math

import pytest
import torch
from test_agreeing_norms import ThreadSum, in_threads

import cnf
from cnf.ode import Backsolve, Checkpoint, agreeing_norms, solve
from cnf.ode._adjoint import AdjointSolve
from cnf.ode._control import _initial_step, rms_norm, rms_norms
from cnf.ode._problem import Problem

T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def hand_norm(*sections: torch.Tensor) -> float:
    """max over sections and samples of the sample's RMS in that section (batch first)."""
    return max(
        math.sqrt(s[b].double().square().mean().item()) for s in sections for b in range(len(s))
    )


def test_value_matches_a_hand_computation_on_a_tuple_state():
    g = torch.Generator().manual_seed(0)
    z, logp = torch.randn(3, 2, 2, generator=g), torch.randn(3, generator=g)
    problem = Problem(lambda t, y: y, (z, logp), T, 1e-3, 1e-3)
    cfg = problem.config("dopri5", {"norm": "sample"})
    assert cfg.sample_rows == (3, 3) and cfg.norm is None
    x = torch.cat([z.reshape(-1), logp])
    assert rms_norm(cfg, x) == pytest.approx(hand_norm(z, logp), rel=1e-6)
    assert rms_norms(cfg, x, 2 * x) == pytest.approx([hand_norm(z, logp), 2 * hand_norm(z, logp)])
    # the default: the largest section RMS over the whole batch, never above the per-sample one
    default = problem.config("dopri5", None)
    assert rms_norm(default, x) <= rms_norm(cfg, x)


def test_single_tensor_state_and_refusals():
    y = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    cfg = Problem(lambda t, y: y, y, T, 1e-3, 1e-3).config("dopri5", {"norm": "sample"})
    assert rms_norm(cfg, y) == pytest.approx(math.sqrt(12.5))  # sample 0: RMS of (3, 4)
    for bad in ((torch.ones(2, 2), torch.ones(3)), torch.tensor(1.0)):
        problem = Problem(lambda t, y: y, bad, T, 1e-3, 1e-3)
        with pytest.raises(ValueError, match="batch as its first dimension"):
            problem.config("dopri5", {"norm": "sample"})
    with pytest.raises(ValueError, match="'rms', 'sample' or a function"):
        Problem(lambda t, y: y, y, T, 1e-3, 1e-3).config("dopri5", {"norm": "max"})


def test_backsolve_measures_y_and_a_per_sample_and_g_whole():
    lin = torch.nn.Linear(2, 2).double()
    problem = Problem(lambda t, y: lin(y), torch.ones(4, 2, dtype=torch.float64), T, 1e-4, 1e-4)
    params = tuple(lin.parameters())
    cfg = problem.config("dopri5", None)
    for norm, rows in (("rms", (4, 4, 1)), ("seminorm", (4, 4))):
        strategy = Backsolve(norm=norm, options={"norm": "sample"})
        back = AdjointSolve(problem, cfg, strategy, params).backward_config
        assert back.sample_rows == rows and back.norm_sizes[:2] == (8, 8)
    assert AdjointSolve(problem, cfg, Checkpoint(), params).backward_config is None
    with pytest.raises(ValueError, match="options=dict\\(norm='sample'\\)"):
        Backsolve(norm="sample")


def oscillator(t, y):
    return torch.stack([y[:, 1], -y[:, 0]], 1)


def test_every_sample_is_within_tolerance_whatever_its_batch():
    """Sample 0 oscillates; 63 samples rest at 0 with no error at all. The batch's RMS divides
    sample 0's error by 8 and lets it grow; the per-sample norm holds it to what sample 0
    alone gets, bit for bit (the resting samples never set the step)."""
    y0 = torch.zeros(64, 2, dtype=torch.float64)
    y0[0, 0] = 1.0
    t = torch.tensor([0.0, 20.0], dtype=torch.float64)
    exact = torch.tensor([math.cos(20.0), -math.sin(20.0)], dtype=torch.float64)
    tol = dict(rtol=1e-6, atol=1e-6)
    err, ys = {}, {}
    for norm in ("rms", "sample"):
        ys[norm] = solve(oscillator, y0, t, options={"norm": norm}, **tol).ys[-1]
        err[norm] = (ys[norm][0] - exact).abs().max().item()
    alone = solve(oscillator, y0[:1], t, **tol).ys[-1]
    torch.testing.assert_close(ys["sample"][:1], alone, rtol=0, atol=0)
    assert err["rms"] > 3 * err["sample"]


def test_agreeing_processes_take_the_whole_batchs_steps():
    def field(t, y):
        return -(y**3) + torch.sin(3 * t) * y

    g = torch.Generator().manual_seed(0)
    halves = [0.1 * torch.randn(8, 2, generator=g), 2.5 * torch.randn(8, 2, generator=g)]
    halves = [h.double() for h in halves]
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opts = {"norm": "sample"}
    whole = solve(field, torch.cat(halves), t, rtol=1e-6, atol=1e-6, options=opts)
    alone = solve(field, halves[0], t, rtol=1e-6, atol=1e-6, options=opts)
    reduce = ThreadSum(2)

    def work(half):
        return solve(field, half, t, rtol=1e-6, atol=1e-6, options=opts)

    with agreeing_norms(reduce):  # process-wide: entered once, as each process would
        sols = in_threads(work, halves, reduce)
    for sol in sols:
        assert sol.stats.n_accepted == whole.stats.n_accepted
        assert sol.stats.n_rejected == whole.stats.n_rejected
    assert alone.stats.n_accepted < whole.stats.n_accepted  # the large half sets the steps
    torch.testing.assert_close(torch.cat([s.ys for s in sols], 1), whole.ys, rtol=0, atol=1e-12)
    assert reduce.calls > 0


def test_backsolve_gradients_with_the_sample_norm():
    lin = torch.nn.Linear(2, 2).double()
    y0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    grads = {}
    for opts in (None, {"norm": "sample"}):
        adj = Backsolve(options=opts, rtol=1e-8, atol=1e-8)
        sol = solve(
            lambda t, y: torch.tanh(lin(y)), y0, T, rtol=1e-8, atol=1e-8, adjoint=adj,
            adjoint_params=tuple(lin.parameters()),
        )  # fmt: skip
        grads[opts is None] = torch.autograd.grad(sol.ys[-1].square().sum(), y0)[0]
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


class SaturatingField(torch.nn.Module):
    """``W2 tanh(W1 z + b)``: far from the origin every unit saturates, the field is constant
    and its divergence vanishes, so far samples have (nearly) no error to control."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(16, 2, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(16, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(2, 16, generator=g, dtype=torch.float64) / 4)

    def forward(self, t, z):
        return torch.tanh(z @ self.w1.T + self.b) @ self.w2.T


def near_and_far_batch(field: SaturatingField) -> torch.Tensor:
    """One sample near the origin, then 63 far ones where every unit is saturated."""
    g = torch.Generator().manual_seed(1)
    far = 40 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        far = far[(far @ field.w1.T + field.b).abs().min(1).values > 12][:63]
    near = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    return torch.cat([near, far])


def test_cnf_log_prob_of_a_sample_does_not_depend_on_its_batch():
    """At rtol = atol = 1e-5, the near sample's log_prob is within the tolerance of the
    reference with the per-sample norm, and equals its log_prob alone to well inside it; the
    batch's RMS lets its error grow several times (the far samples dilute it)."""
    field = SaturatingField()
    x = near_and_far_batch(field)
    assert len(x) == 64
    tol = 1e-5
    flow = cnf.CNF(field, (2,), T=1.0, rtol=tol, atol=tol)
    per_sample = cnf.CNF(field, (2,), T=1.0, rtol=tol, atol=tol, options={"norm": "sample"})
    with torch.no_grad():
        ref = flow.log_prob(x[:1], rtol=1e-12, atol=1e-12)[0]
        alone = flow.log_prob(x[:1])[0]
        err_rms = (flow.log_prob(x)[0] - ref).abs().item()
        in_batch = flow.log_prob(x, options={"norm": "sample"})[0]  # a per-call override
        torch.testing.assert_close(per_sample.log_prob(x)[0], in_batch, rtol=0, atol=0)
    err_sample = (in_batch - ref).abs().item()
    assert err_sample <= tol
    assert (in_batch - alone).abs().item() <= 0.1 * tol
    assert err_rms > 2 * err_sample


def test_the_first_step_is_the_hardest_samples():
    """Two samples at the same state, one 100 times faster: with the per-sample norm every
    norm of the first-step estimate is the fast sample's, so the batch starts with the step
    the fast sample takes alone; the batch's RMS halves its derivative's share and starts
    with a longer step."""
    rates = torch.tensor([[1.0], [100.0]], dtype=torch.float64)

    def field(t, y):
        return -rates[: len(y)] * y if len(y) == 2 else -100.0 * y

    y0 = torch.ones(2, 3, dtype=torch.float64)

    def first_step(y, options):
        problem = Problem(field, y, T, 1e-6, 1e-6)
        cfg = problem.config("dopri5", options)
        f0 = problem.rhs(0.0, problem.y0)
        return _initial_step(problem.rhs, cfg, 0.0, problem.y0, f0, 1.0, 1.0)

    alone = first_step(y0[1:], None)
    assert first_step(y0, {"norm": "sample"}) == alone
    assert first_step(y0, None) > alone
