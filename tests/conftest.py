"""Shared set-up for the solver-core tests: one thread, fixed seeds, small reference problems."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from torch import nn

# The suite runs beside other jobs on a couple of cores; a single intra-op thread keeps the
# many tiny tensor operations of an ODE solve from fighting over them (10-100x slower otherwise).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _deadline(request):
    """``@pytest.mark.deadline(seconds)``: the test fails with a TimeoutError past ``seconds``.

    For the bad-input tests, which must end in an answer or an error, never hang. A SIGALRM
    interrupts Python code (a solver's step loop) between bytecodes; it is main-thread only.
    """
    mark = request.node.get_closest_marker("deadline")
    if mark is None or not hasattr(signal, "SIGALRM"):
        yield
        return
    seconds = mark.args[0]

    def expire(signum, frame):
        raise TimeoutError(f"the test ran past its {seconds} s deadline: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def kill_at(monkeypatch):
    """``kill_at(objective_class, n)``: the ``n``-th call of that objective's ``__call__``
    raises ``KeyboardInterrupt``, as a run killed mid-iteration; ``monkeypatch.undo()`` ends it."""

    def arm(objective: type, n: int) -> None:
        calls, original = {"n": 0}, objective.__call__

        def dies(self, model, batch, generator):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return original(self, model, batch, generator)

        monkeypatch.setattr(objective, "__call__", dies)

    return arm


class TimeMLP(nn.Module):
    """A small tanh MLP vector field with time as an input.

    ``f(t, y) = W_L tanh(... tanh(W_1 [y, t] + b_1) ...) + b_L``.

    ``y`` has shape ``(*batch, dim)``; ``scale`` multiplies the initial weights (larger scale:
    stiffer, more steps).
    """

    def __init__(self, dim: int = 2, width: int = 8, depth: int = 1, scale: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 1, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers).double()
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, t.to(y.dtype).expand(*y.shape[:-1], 1)], dim=-1))


class VanDerPol(nn.Module):
    """``x' = v``, ``v' = mu (1 - x^2) v - x`` with a learnable ``mu``; state ``(*batch, 2)``."""

    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x**2) * v - x], dim=-1)


@pytest.fixture
def time_mlp() -> type[TimeMLP]:
    return TimeMLP


@pytest.fixture
def van_der_pol() -> type[VanDerPol]:
    return VanDerPol


def _stable_matrix(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random matrix with eigenvalues in the left half plane, real parts in about [-1, -0.1]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    rot = torch.randn(dim, dim, dtype=torch.float64)
    skew = 0.8 * (rot - rot.T) / 2
    decay = torch.diag(torch.linspace(-1.0, -0.1, dim, dtype=torch.float64))
    return (q @ decay @ q.T + skew).to(dtype)


@pytest.fixture
def stable_matrix():
    """``stable_matrix(dim, dtype)``: see :func:`_stable_matrix`."""
    return _stable_matrix


class CallLog:
    """Wraps ``func`` and records the time of every evaluation (to recover the steps taken)."""

    def __init__(self, func) -> None:
        self.func = func
        self.times: list[float] = []

    def __call__(self, t, y):
        self.times.append(float(t))
        return self.func(t, y)

    def dopri5_steps(self, t_end: float, n_setup: int) -> list[float]:
        """Accepted step sizes of a dopri5 solve, read off the evaluation times.

        After ``n_setup`` evaluations (``f(t0)``, plus the initial-step probe unless
        ``first_step`` is given), every attempted step from ``t`` with size ``h`` evaluates at
        ``t + c_i h`` for ``c = (1/5, 3/10, 4/5, 8/9, 1, 1)``. A rejected attempt is followed
        by one from the same ``t``; the accepted steps are the gaps between distinct starts.
        """
        times = np.asarray(self.times[n_setup:])
        assert len(times) % 6 == 0, "dopri5 attempts take 6 evaluations each"
        attempts = times.reshape(-1, 6)
        h = (attempts[:, 4] - attempts[:, 0]) / 0.8
        starts = attempts[:, 0] - 0.2 * h
        distinct = [starts[0]]
        for s in starts[1:]:
            if abs(s - distinct[-1]) > 1e-12 * max(1.0, abs(s)):
                distinct.append(s)
        return list(np.diff([*distinct, t_end]))


@pytest.fixture
def call_log() -> type[CallLog]:
    return CallLog
