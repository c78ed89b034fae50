"""Per-sample steps (``options["steps"] == "sample"``): every sample its own time, step size and
error control. The key property: a sample's solution is the one it gets solved alone, whatever
else is in its batch. Also: accuracy against scipy and exact solutions, fewer evaluations than
shared steps on a batch of mixed stiffness, finished samples leaving the batch, outputs at
several times, tuple states, gradients, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import cnf
from cnf.ode import Backsolve, Checkpoint, SolverError, odeint, odeint_adjoint, solve

F64 = torch.float64
STEPS = {"steps": "sample"}


def vdp(t, y):
    """Van der Pol with each sample's ``mu`` in its third column (constant), so that the
    rows carry their own stiffness wherever compaction moves them."""
    x, v, mu = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(mu)], 1)


def vdp_batch(mus=(0.5, 1.0, 3.0, 6.0, 0.2, 2.0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    xv = 2 * torch.randn(len(mus), 2, generator=g, dtype=F64)
    return torch.cat([xv, torch.tensor(mus, dtype=F64)[:, None]], 1)


def forced(t, y):
    """A field that reads each row's own time: ``y' = -y + sin(3 t)``."""
    assert t.shape == (len(y),) and t.dtype == y.dtype
    return -y + torch.sin(3 * t)[:, None]


def test_each_sample_is_solved_as_it_would_be_alone():
    y0 = vdp_batch()
    t = torch.tensor([0.0, 0.7, 1.5, 2.2, 4.0], dtype=F64)
    batch = solve(vdp, y0, t, rtol=1e-7, atol=1e-7, options=STEPS)
    for i in range(len(y0)):
        alone = solve(vdp, y0[i : i + 1], t, rtol=1e-7, atol=1e-7, options=STEPS)
        torch.testing.assert_close(batch.ys[:, i : i + 1], alone.ys, rtol=0, atol=1e-12)
    hardest = solve(vdp, y0[3:4], t, rtol=1e-7, atol=1e-7, options=STEPS).stats
    assert batch.stats.n_accepted == hardest.n_accepted  # the most any sample took


def test_times_per_row_in_either_direction():
    y0 = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64) * torch.tensor([1.0, 3.0], dtype=F64)
    for t in (torch.tensor([0.0, 1.0, 2.5]), torch.tensor([1.0, 0.2, -1.5])):
        t = t.to(F64)
        batch = solve(forced, y0, t, rtol=1e-9, atol=1e-9, options=STEPS).ys
        for i in range(len(y0)):
            alone = solve(forced, y0[i : i + 1], t, rtol=1e-9, atol=1e-9, options=STEPS).ys
            torch.testing.assert_close(batch[:, i : i + 1], alone, rtol=0, atol=1e-12)
        shared = solve(lambda s, y: -y + torch.sin(3 * s), y0, t, rtol=1e-11, atol=1e-11).ys
        torch.testing.assert_close(batch, shared, rtol=0, atol=1e-7)


def test_agrees_with_scipy_on_van_der_pol():
    y0 = vdp_batch((1.0, 4.0, 0.3))
    t = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    tol = 1e-8
    ys = solve(vdp, y0, t, rtol=tol, atol=tol, options=STEPS).ys
    for i, row in enumerate(y0.numpy()):
        mu = row[2]

        def rhs(s, z, mu=mu):
            return [z[1], mu * (1 - z[0] ** 2) * z[1] - z[0]]

        ref = solve_ivp(rhs, (0, 3), row[:2], "DOP853", t_eval=[1.0, 3.0], rtol=1e-13, atol=1e-13)
        err = np.abs(ys[1:, i, :2].numpy() - ref.y.T).max()
        assert err < 100 * tol, (i, err)


def test_every_sample_is_within_a_small_multiple_of_the_tolerance():
    """Decays at rates from 0.1 to 50: each sample's error against its exact solution."""
    rates = torch.logspace(-1, math.log10(50), 12, dtype=F64)
    y0 = torch.stack([torch.ones_like(rates), rates], 1)  # the rate rides in column 1

    def decay(t, y):
        return torch.stack([-y[:, 1] * y[:, 0], torch.zeros_like(y[:, 1])], 1)

    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    for tol in (1e-4, 1e-7):
        ys = solve(decay, y0, t, rtol=tol, atol=tol, options=STEPS).ys[:, :, 0]
        exact = torch.exp(-rates[None] * t[:, None])
        assert (ys - exact).abs().max() < 10 * tol


def test_fewer_evaluations_than_shared_steps_on_mixed_stiffness():
    y0 = vdp_batch((0.2, 0.2, 0.2, 8.0, 0.2, 5.0, 0.3, 0.2))
    t = torch.tensor([0.0, 6.0], dtype=F64)
    nfe = {}
    for name, opts in (("steps", STEPS), ("norm", {"norm": "sample"}), ("rms", None)):
        nfe[name] = solve(vdp, y0, t, rtol=1e-7, atol=1e-7, options=opts).stats.nfe
    assert nfe["steps"] < 0.75 * nfe["norm"]
    assert nfe["steps"] < nfe["rms"]


def test_finished_samples_leave_the_batch():
    """Fast samples finish in few steps and the field stops seeing them."""
    y0 = vdp_batch((0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 6.0))
    seen = []

    def counting(t, y):
        seen.append(len(y))
        return vdp(t, y)

    sol = solve(
        counting, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=1e-6, atol=1e-6, options=STEPS
    )
    assert sol.stats.nfe == len(seen)
    assert seen[0] == 7 and seen[-1] == 1 and sorted(seen, reverse=True) == seen
    assert sum(seen) < 0.5 * 7 * len(seen)  # most evaluations cost the stiff sample only


def test_tuple_state_per_tensor_tolerances():
    """``(z, logp)`` with ``logp' = -trace``: each tensor's RMS per sample, the larger counts;
    each sample alone gets the same answer, and the exact solution is met."""
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
    scale = torch.tensor([0.2, 1.0, 4.0], dtype=F64)

    def field(t, state):
        z, logp = state
        return z @ a.T, torch.full_like(logp, 1.0)  # logp' = -trace(A) = 1

    z0 = scale[:, None] * torch.tensor([[1.0, 0.0]], dtype=F64)
    y0 = (z0, torch.zeros(3, dtype=F64))
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    z, logp = solve(field, y0, t, rtol=1e-9, atol=(1e-9, 1e-6), options=STEPS).ys
    assert z.shape == (3, 3, 2) and logp.shape == (3, 3)
    exact = torch.stack([z0 @ torch.linalg.matrix_exp(a * s).T for s in t])
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(logp, t[:, None].expand(3, 3), rtol=0, atol=1e-9)
    for i in range(3):
        zi, li = solve(
            field, (z0[i : i + 1], y0[1][:1]), t, rtol=1e-9, atol=(1e-9, 1e-6), options=STEPS
        ).ys
        torch.testing.assert_close(z[:, i : i + 1], zi, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["tsit5", "bosh3", "adaptive_heun", "dopri8"])
def test_other_methods_and_their_dense_output(method):
    y0 = torch.tensor([[1.0, 0.5], [0.2, 3.0]], dtype=F64)
    t = torch.linspace(0, 2, 6, dtype=F64)
    tol = 1e-6
    ys = solve(forced, y0, t, method=method, rtol=tol, atol=tol, options=STEPS).ys
    exact = solve(lambda s, y: -y + torch.sin(3 * s), y0, t, rtol=1e-12, atol=1e-12).ys
    assert (ys - exact).abs().max() < 50 * tol
    alone = solve(forced, y0[1:], t, method=method, rtol=tol, atol=tol, options=STEPS).ys
    torch.testing.assert_close(ys[:, 1:], alone, rtol=0, atol=1e-12)


def test_float32_state_gets_float32_times():
    y0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    ys = odeint(forced, y0, torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-5, options=STEPS)
    assert ys.dtype == torch.float32 and ys.shape == (2, 2, 2)


def test_gradients_by_backpropagation_match_the_exact_ones():
    """``y' = -k y`` per sample: ``y(T) = y0 exp(-k T)``; gradients in ``y0``, ``k`` (a
    parameter) and the final time ``T``, against their closed forms and central differences."""
    k = torch.tensor([0.5, 2.0, 7.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.3, 1.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.2], dtype=F64, requires_grad=True)

    def decay(s, y):  # the rows keep their rates by a column index that travels with them
        return -k[y[:, 2].long()][:, None] * y[:, :2]

    def field(s, y):
        return torch.cat([decay(s, y), torch.zeros_like(y[:, 2:])], 1)

    def final(y0, t):
        ys = odeint(field, torch.cat([y0, torch.arange(3.0, dtype=F64)[:, None]], 1), t,
                    rtol=1e-10, atol=1e-10, options=STEPS)  # fmt: skip
        return ys[-1, :, :2]

    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, 3.0]], dtype=F64)
    g_y0, g_k, g_t = torch.autograd.grad((final(y0, t) * w).sum(), (y0, k, t))
    decay_t = torch.exp(-k * 1.2).detach()[:, None]
    torch.testing.assert_close(g_y0, w * decay_t, rtol=1e-7, atol=0)
    torch.testing.assert_close(g_k, (-1.2 * w * y0.detach() * decay_t).sum(1), rtol=1e-7, atol=0)
    with torch.no_grad():
        fd = (
            (final(y0, t + torch.tensor([0, 0, 1e-5])) - final(y0, t - torch.tensor([0, 0, 1e-5])))
            * w
        ).sum() / 2e-5
    torch.testing.assert_close(g_t[2], fd, rtol=1e-5, atol=0)
    assert g_t[1] == 0


def test_gradients_match_shared_steps_on_a_network():
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    net = net.double()
    y0 = torch.randn(5, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    grads = []
    for opts in (STEPS, None):
        ys = odeint(lambda s, y: net(y), y0, t, rtol=1e-9, atol=1e-9, options=opts)
        grads.append(torch.autograd.grad(ys[-1].square().sum(), (y0, *net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cnf_blocks_refuse_per_sample_steps():
    """A CNF's joint ODE holds per-batch probes and the analytic divergence one time: its
    blocks keep shared steps and say so."""
    field = cnf.fields.ConcatSquashMLP(2, hidden=(8,)).double()
    with pytest.raises(ValueError, match="CNF blocks solve with shared steps"):
        cnf.CNF(field, (2,), options=STEPS)


def test_concat_squash_field_takes_one_time_per_sample():
    field = cnf.fields.ConcatSquashMLP(2, hidden=(8,)).double()
    y0 = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint(field, y0, t, rtol=1e-8, atol=1e-8, options=STEPS)
    shared = odeint(field, y0, t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ys, shared, rtol=0, atol=1e-6)


def test_refusals_name_what_to_use_instead():
    y0, t = torch.ones(3, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)

    def field(s, y):
        return -y

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2).double()

        def forward(self, s, y):
            return self.layer(y)

    lin = Linear()
    cases = [
        (dict(adjoint=True), "backpropagation"),
        (dict(adjoint=Checkpoint()), "backpropagation"),
        (dict(adjoint=Backsolve()), "backpropagation"),
        (dict(options={"steps": "sample", "jump_t": [0.5]}), "jump_t"),
        (dict(options={"steps": "sample", "step_t": [0.5]}), "step_t"),
        (dict(options={"steps": "sample", "step_size": 0.1}), "step_size"),
        (dict(options={"steps": "sample", "norm": "rms"}), "no other norm"),
        (dict(options={"steps": "sample", "norm": lambda x: x.abs().max()}), "no other norm"),
        (dict(options={"steps": "per-sample"}), "'shared' .* or 'sample'"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("options", STEPS)
        with pytest.raises(ValueError, match=message):
            if "adjoint" in kwargs:  # refused where gradients are wanted through it
                kwargs["adjoint_params"] = ()
            solve(field, y0.requires_grad_(), t, **kwargs)
    with pytest.raises(ValueError, match="only apply to adaptive"):
        solve(field, y0, t, method="rk4", options=STEPS)
    with pytest.raises(ValueError, match="backpropagation"):
        odeint_adjoint(lin, y0, t, options=STEPS)
    with torch.no_grad():  # an adjoint without gradients to take is a plain solve
        odeint_adjoint(lin, y0, t, options=STEPS)
    with pytest.raises(ValueError, match="event_fn"):
        odeint(field, y0, t, event_fn=lambda s, y: y[0, 0] - 0.5, options=STEPS)
    with pytest.raises(ValueError, match=r"unknown option.*'steps'.*adaptive methods"):
        odeint(field, y0, t, method="scipy_solver", options=STEPS)
    with pytest.raises(ValueError, match="per-sample steps"):
        Backsolve(options=STEPS)
    for bad in ((torch.ones(2, 2), torch.ones(3)), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="batch as its first dimension"):
            solve(lambda s, y: y, bad, t, options=STEPS)


def test_a_func_must_return_the_rows_it_is_given():
    y0, t = torch.ones(3, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*returned shape \(3,\)"):
        solve(lambda s, y: y.sum(1), y0, t, options=STEPS)
    rates = torch.tensor([[1.0], [50.0]], dtype=F64)  # per sample, but not carried by the rows
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\).*the 1 samples still running"):
        solve(lambda s, y: -rates * y, torch.ones(2, 2, dtype=F64), t, options=STEPS)


@pytest.mark.deadline(20)
def test_solver_errors_name_the_sample():
    y0, t = vdp_batch((0.5, 0.5, 0.5)), torch.tensor([0.0, 2.0], dtype=F64)

    def nan_for_sample_2(s, y):
        out = vdp(s, y)
        return torch.where((y[:, 2:] == 0.7) & (s[:, None] > 0.5), math.nan, out)

    y0[2, 2] = 0.7
    with pytest.raises(SolverError, match="sample 2"):
        solve(nan_for_sample_2, y0, t, options=STEPS)
    y0[2, 2], y0[:2, :2] = 5.0, 0.0  # samples 0 and 1 rest at the origin: a few steps
    with pytest.raises(SolverError, match="sample 2 took more than max_num_steps=20"):
        solve(vdp, y0, t * 3, rtol=1e-9, atol=1e-9, options={**STEPS, "max_num_steps": 20})
    with pytest.raises(SolverError, match="sample 2 at the initial state"):
        solve(lambda s, y: y / (y[:, 2:] - 5.0), y0, t, options=STEPS)


def test_statistics_and_a_trivial_span():
    y0 = vdp_batch((0.5, 3.0))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    stats = solve(vdp, y0, t, options=STEPS).stats
    alone = [solve(vdp, y0[i : i + 1], t, options=STEPS).stats for i in range(2)]
    assert stats.n_accepted == max(s.n_accepted for s in alone)
    assert stats.n_rejected == max(s.n_rejected for s in alone)
    assert stats.nfe == max(s.nfe for s in alone)  # the slow sample's, the fast one rode along
    ys = solve(vdp, y0, t[:1], options=STEPS).ys
    torch.testing.assert_close(ys, y0[None])
    shared = solve(vdp, y0, t, options={"steps": "shared"})  # the default, named
    torch.testing.assert_close(shared.ys, solve(vdp, y0, t).ys, rtol=0, atol=0)


def test_per_entry_tolerances_one_dimensional_and_image_states():
    """A tolerance per entry (rows differ: carried with their rows through compaction), a
    state of one number per sample, and a batch of 2x3x3 'images': each sample as alone."""
    rates = torch.tensor([0.5, 4.0, 30.0], dtype=F64)

    def decay(t, y):  # each row's rate is in its first entry, constant
        rate = y.reshape(len(y), -1)[:, :1].view(-1, *(1,) * (y.ndim - 1))
        return torch.where(torch.arange(y[0].numel()).view(y[0].shape) == 0, 0.0, -rate * y)

    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    atol = torch.tensor([1e-3, 1e-6, 1e-9], dtype=F64)[:, None].expand(3, 4).contiguous()
    y0 = torch.cat([rates[:, None], torch.ones(3, 3, dtype=F64)], 1)
    ys = solve(decay, y0, t, rtol=1e-6, atol=atol, options=STEPS).ys
    for i in range(3):
        alone = solve(decay, y0[i : i + 1], t, rtol=1e-6, atol=atol[i, 0].item(), options=STEPS)
        torch.testing.assert_close(ys[:, i : i + 1], alone.ys, rtol=0, atol=1e-12)
    images = rates.view(3, 1, 1, 1) * torch.ones(3, 2, 3, 3, dtype=F64)
    ys = solve(decay, images, t, rtol=1e-8, atol=1e-8, options=STEPS).ys
    exact = images * torch.exp(-rates.view(3, 1, 1, 1) * t.view(3, 1, 1, 1, 1))
    exact[:, :, 0, 0, 0] = images[:, 0, 0, 0]
    torch.testing.assert_close(ys, exact, rtol=0, atol=1e-7)

    y1 = torch.linspace(0.5, 30.0, 5, dtype=F64)  # y' = -y^2: y = y0 / (1 + y0 t)
    ys = solve(lambda t, y: -(y**2), y1, t, rtol=1e-9, atol=1e-9, options=STEPS).ys
    torch.testing.assert_close(ys, y1 / (1 + y1 * t[:, None]), rtol=0, atol=1e-8)


@pytest.mark.deadline(20)
def test_step_bounds_first_step_and_an_empty_batch():
    y0, t = vdp_batch((0.5, 3.0)), torch.tensor([0.0, 2.0], dtype=F64)
    stats = solve(vdp, y0, t, options={**STEPS, "max_step": 0.05, "first_step": 1e-3}).stats
    assert stats.n_accepted >= 40
    tight = dict(rtol=1e-9, atol=1e-9)
    with pytest.warns(UserWarning, match="min_step=0.2 accepted above the tolerance"):
        coarse = solve(vdp, y0[:1], t, **tight, options={**STEPS, "min_step": 0.2})
    assert coarse.stats.n_accepted == 10
    with pytest.raises(SolverError, match=r"sample 1 near .*\(a step of min_step=0.5\)"):
        solve(vdp, y0, t, **tight, options={**STEPS, "min_step": 0.5})
    empty = solve(vdp, torch.zeros(0, 3, dtype=F64), t, options=STEPS)
    assert empty.ys.shape == (2, 0, 3) and empty.stats.nfe == 0
