"""The checkpoint adjoint keeping its first steps' graph within ``graph_memory``.

Kept, partly kept or replayed, the gradients must be the same (those of the discrete
solution); the kept graph must be freed with the caller's graph; and a field that refuses
saved-tensor hooks (``torch.func``) must fall back to replaying.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import cnf
from cnf.ode import Checkpoint
from cnf.ode._keep import GraphKeep

F64 = torch.float64


class _Weakly(nn.Module):
    """A field that keeps weak references to the activations it computes (which the autograd
    graph saves), to see when the graph is freed."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field, self.refs = field, []

    def forward(self, t, y):
        h = torch.tanh(y @ self.field.w1 + t * self.field.b1)
        self.refs.append(weakref.ref(h))
        return h @ self.field.w2


class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(2, 16, generator=g, dtype=F64))
        self.b1 = nn.Parameter(torch.randn(16, generator=g, dtype=F64))
        self.w2 = nn.Parameter(torch.randn(16, 2, generator=g, dtype=F64) * 0.8)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + t * self.b1) @ self.w2


def _per_eval_bytes(field, y0, t0) -> int:
    keep = GraphKeep(10**12)
    with torch.enable_grad():
        y = y0.clone().requires_grad_(True)  # as the solve's state
        keep.measured(lambda t, y: field(torch.tensor(t, dtype=F64), y))(t0, y)
    return keep.per_eval


def _gradients(field, y0, t, adjoint):
    y0 = y0.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    sol = cnf.solve(field, y0, t, rtol=1e-7, atol=1e-7, adjoint=adjoint)
    w = torch.linspace(-1, 1, sol.ys.numel(), dtype=F64).reshape(sol.ys.shape)
    grads = torch.autograd.grad((sol.ys * w).sum(), (y0, t, *field.parameters()))
    return grads, sol


@pytest.mark.parametrize("times", [[0.0, 1.5], [0.0, 0.3, 0.71, 1.5], [1.5, 0.2, -0.4]])
def test_kept_partly_kept_and_replayed_gradients_agree(times):
    # interior outputs (dense output inside kept and replayed steps) and a decreasing grid
    field, y0 = _Field(), torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor(times, dtype=F64)
    want, replayed = _gradients(field, y0, t, Checkpoint(graph_memory=0))
    n = replayed.stats.n_accepted
    assert n >= 6 and replayed.stats.n_accepted_backward == n  # every step replayed
    per_eval = _per_eval_bytes(field, y0, times[0])
    # the first evaluation, then 3 steps of dopri5's 7 stages fit; the 4th does not
    partly = Checkpoint(graph_memory=per_eval * (1 + 7 * 3) + per_eval // 2)
    for adjoint, replays in ((partly, n - 3), (Checkpoint(), 0)):
        got, sol = _gradients(field, y0, t, adjoint)
        assert sol.stats.n_accepted == n
        assert sol.stats.n_accepted_backward == replays
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


def test_kept_gradients_match_finite_differences():
    field = _Field()
    y0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)

    def fn(y0, t, *params):  # gradcheck perturbs the parameters in place; the field reads them
        return cnf.odeint_adjoint(field, y0, t, rtol=1e-10, atol=1e-10)

    args = (y0.requires_grad_(), t.requires_grad_(), *field.parameters())
    assert torch.autograd.gradcheck(fn, args)  # also calls the backward pass repeatedly


def test_the_kept_graph_is_freed_with_the_callers_graph():
    field = _Weakly(_Field())
    y0 = torch.randn(4, 2, dtype=F64)
    sol = cnf.solve(field, y0, torch.tensor([0.0, 1.0], dtype=F64), adjoint=Checkpoint())
    assert sol.stats.n_accepted > 2
    alive = sum(r() is not None for r in field.refs)
    # the accepted steps' stages, held by the graph (not the last step's FSAL stage, unused)
    assert alive >= 6 * sol.stats.n_accepted - 1
    sol.ys.sum().backward(retain_graph=True)  # a caller that keeps its graph keeps ours
    assert sum(r() is not None for r in field.refs) == alive
    sol.ys.sum().backward()
    assert sol.stats.nfe_backward == 0  # nothing was replayed
    # freed with the caller's graph, although the solution is still alive
    assert all(r() is None for r in field.refs)
    assert sol.ys.shape == (2, 4, 2)


class _Plain(nn.Module):
    """A field without an analytic trace: its exact trace goes through torch.func."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 8), nn.Tanh(), nn.Linear(8, dim)).to(F64)

    def forward(self, t, z):
        return self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))


@pytest.mark.parametrize(
    "field, settings, keeps",
    [
        ("concat", dict(trace="exact"), True),
        ("concat", dict(trace="hutchinson"), True),  # one probe: plain autograd
        ("concat", dict(trace="hutchinson", probes=2), False),  # vmapped probes
        (2, dict(trace="exact"), True),  # D <= LOOP_DIMS: a loop of plain products
        (9, dict(trace="exact"), False),  # D > LOOP_DIMS: the basis, vmapped
    ],
)
def test_fields_under_torch_func_replay_and_all_agree(field, settings, keeps):
    # torch.func refuses saved-tensor hooks: a field evaluated through its transforms cannot
    # be measured and replays every step; the gradients are the same either way
    torch.manual_seed(0)
    dim = 2 if field == "concat" else field
    base = cnf.ConcatSquashMLP(2, (8,)).to(F64) if field == "concat" else _Plain(dim)
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    flow = cnf.CNF(base, (dim,), rtol=1e-8, atol=1e-8, **settings)
    grads = {}
    for name, adjoint in (("default", Checkpoint()), ("replayed", Checkpoint(graph_memory=0))):
        out = flow.evaluate(x, adjoint=adjoint, generator=torch.Generator().manual_seed(0))
        out.log_prob.sum().backward()
        grads[name] = [p.grad.clone() for p in base.parameters()]
        base.zero_grad()
        assert (out.nfe_backward == 0) == (keeps and name == "default")
    for g, w in zip(grads["default"], grads["replayed"]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_caller_that_disables_saved_tensor_hooks_gets_replayed_steps():
    field = _Field()
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    want = torch.autograd.grad(cnf.odeint_adjoint(field, y0, t).sum(), y0)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks in this region"):
        sol = cnf.solve(field, y0, t, adjoint=Checkpoint())
        (got,) = torch.autograd.grad(sol.ys.sum(), y0)
    assert sol.stats.n_accepted_backward == sol.stats.n_accepted  # measured nothing: replayed
    torch.testing.assert_close(got, want[0], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64MB"])
def test_graph_memory_must_be_a_byte_count(bad):
    with pytest.raises(ValueError, match="graph_memory must be an int >= 0"):
        Checkpoint(graph_memory=bad)
