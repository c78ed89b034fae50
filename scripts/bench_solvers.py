"""Benchmark cnf's solver core against torchdiffeq and zuko, side by side in one run.

    pip install -e '.[bench]'
    python scripts/bench_solvers.py                # all sections, markdown to stdout
    python scripts/bench_solvers.py --out docs/benchmarks.md
    python scripts/bench_solvers.py --quick        # a smoke run

Sections (float64, one thread):

* forward: Van der Pol (mu = 1, 5; batch 256), a random tanh MLP field (dim 2, width 64,
  batch 512) and a stable 32x32 linear system; dopri5 / bosh3 at rtol = atol in
  {1e-3, 1e-5, 1e-7} and rk4 at matching fixed steps; dopri8 at {1e-5, 1e-7, 1e-9},
  fehlberg2 / adaptive_heun at {1e-2, 1e-3, 1e-4}. Error is the max abs error at the final
  time against scipy's DOP853 at 1e-12 (expm for the linear system); time is the median wall
  time. "at equal error" interpolates each peer's (error, time) and (error, NFE) curves in
  log-log at cnf's error.
* gradients: dopri5 at 1e-6; forward/backward NFE, time of forward + backward, and the
  relative error of the gradient (w.r.t. y0 and parameters) against a fine fixed-step rk4
  reference.
* memory: peak memory of one forward + backward with rk4 at 10/40/160/640 fixed steps, from
  the allocator events of torch.profiler.
* norms: dopri5 on the forward problems with cnf's two error norms (``options["norm"]``:
  ``"rms"``, the default, and ``"sample"``, every sample's RMS) and with per-sample steps
  (``options["steps"] = "sample"``: every sample its own step size, as torchode) against
  torchode (per-sample step sizes) and torchdiffeq, at equal maximum error over the batch
  (each peer swept over rtol = atol in 1e-2 .. 1e-9 and interpolated at cnf's error), with
  the issue's targets;
  and the per-evaluation overhead on Van der Pol: time per NFE minus a bare call of the field
  on the same batch. Times here are the fastest of up to 9 runs (robust to other jobs).

Peers that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import nn

import cnf

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
try:
    import zuko
except ImportError:  # pragma: no cover - optional peer
    zuko = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None

TOLS = (1e-3, 1e-5, 1e-7)
RK4_STEPS = {1e-3: 0.1, 1e-5: 0.02, 1e-7: 0.004}  # fixed steps matched to the tolerances
# Second-order methods would take ~10^5 steps at 1e-7: they run at looser tolerances, dopri8
# at tighter ones, where an eighth-order method is for.
METHOD_TOLS = {
    "adaptive_heun": (1e-2, 1e-3, 1e-4),
    "fehlberg2": (1e-2, 1e-3, 1e-4),
    "dopri8": (1e-5, 1e-7, 1e-9),
}
METHODS = ("dopri5", "bosh3", "rk4", "dopri8", "fehlberg2", "adaptive_heun")


# ---------------------------------------------------------------- problems


class VanDerPol(nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


class TanhMLP(nn.Module):
    def __init__(self, dim: int = 2, width: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, dim)
        with torch.no_grad():
            for layer in (self.l1, self.l2, self.l3):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
                layer.weight.mul_(1.5 / math.sqrt(layer.weight.shape[1]))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))

    def forward(self, t, y):
        h = torch.tanh(self.l1(torch.cat([y, t.expand(*y.shape[:-1], 1)], -1)))
        return self.l3(torch.tanh(self.l2(h)))


class Linear(nn.Module):
    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        skew = m - m.T
        sym = m @ m.T
        self.A = nn.Parameter(skew - sym - 0.1 * torch.eye(dim))  # eigenvalues in the left half

    def forward(self, t, y):
        return y @ self.A.T


@dataclass
class Problem:
    name: str
    make: Callable[[], nn.Module]
    y0: torch.Tensor
    T: float


def problems(quick: bool) -> list[Problem]:
    g = torch.Generator().manual_seed(1)
    out = [
        Problem("vdp mu=1", lambda: VanDerPol(1.0), 2 * torch.randn(256, 2, generator=g), 5.0),
        Problem("vdp mu=5", lambda: VanDerPol(5.0), 2 * torch.randn(256, 2, generator=g), 5.0),
        Problem("tanh MLP", TanhMLP, torch.randn(512, 2, generator=g), 1.0),
        Problem("linear 32", Linear, torch.randn(16, 32, generator=g), 2.0),
    ]
    return out[:1] + out[2:3] if quick else out


def reference(p: Problem) -> torch.Tensor:
    f = p.make()
    if isinstance(f, Linear):
        with torch.no_grad():
            return p.y0 @ torch.linalg.matrix_exp(f.A * p.T).T
    shape = p.y0.shape

    def rhs(t, y):
        with torch.no_grad():
            out = f(torch.tensor(t), torch.from_numpy(y).reshape(shape))
        return out.reshape(-1).numpy()

    sol = solve_ivp(
        rhs, (0.0, p.T), p.y0.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


# ---------------------------------------------------------------- solvers


class Counted(nn.Module):
    """Wraps a field and counts its evaluations (without touching the solver)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.field(t, y)


def forward_runners(method: str, tol: float) -> dict[str, Callable]:
    t_opts = {} if method != "rk4" else {"options": {"step_size": RK4_STEPS[tol]}}
    tol_kw = {} if method == "rk4" else {"rtol": tol, "atol": tol}

    # torchdiffeq's adaptive solves have no step limit; cnf's default (10^4) would end the
    # second-order methods' tight runs early
    cnf_opts = t_opts or {"options": {"max_num_steps": 10**6}}

    def run_cnf(f, y0, T):
        return cnf.odeint(f, y0, torch.tensor([0.0, T]), method=method, **tol_kw, **cnf_opts)[-1]

    runners = {"cnf": run_cnf}
    if torchdiffeq is not None:

        def run_tdq(f, y0, T):
            return torchdiffeq.odeint(
                f, y0, torch.tensor([0.0, T]), method=method, **tol_kw, **t_opts
            )[-1]

        runners["torchdiffeq"] = run_tdq
    if zuko is not None and method == "dopri5":

        def run_zuko(f, y0, T):
            return zuko.utils.odeint(f, y0, 0.0, T, atol=tol, rtol=tol)

        runners["zuko"] = run_zuko
    return runners


def run_times(fn: Callable[[], object], budget: float, max_reps: int) -> list[float]:
    """Seconds of each run of ``fn`` after a warm-up: at least 3, more while ``budget`` seconds
    last, at most ``max_reps``."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], budget: float = 1.0, max_reps: int = 15) -> float:
    return statistics.median(run_times(fn, budget, max_reps))


def best_time(fn: Callable[[], object], budget: float = 1.0, max_reps: int = 9) -> float:
    """The fastest of several runs: on a machine shared with other jobs, the run least slowed
    by them (the median moves by 2x with the neighbours' load)."""
    return min(run_times(fn, budget, max_reps))


def loglog_interp(x: float, xs: list[float], ys: list[float]) -> float:
    """y at x on the piecewise-linear log-log curve through (xs, ys); NaN outside its range."""
    pts = sorted(
        (math.log(a), math.log(b))
        for a, b in zip(xs, ys)
        if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)
    )
    if len(pts) < 2 or not pts[0][0] <= math.log(x) <= pts[-1][0]:
        return math.nan
    lx = math.log(x)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        if lx <= x1 or (x1, y1) == pts[-1]:
            if x1 == x0:
                return math.exp(y0)
            return math.exp(y0 + (y1 - y0) * (lx - x0) / (x1 - x0))
    return math.nan


# ---------------------------------------------------------------- sections


def bench_forward(probs: list[Problem], methods: tuple[str, ...]) -> str:
    lines = [
        "| problem | method | tol / step | solver | error | NFE | time (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = [
        "",
        "At equal error (peer's error-cost curve interpolated in log-log at cnf's error; < 1 "
        "means cnf is cheaper; (outside): cnf's error is outside the peer's measured range):",
        "",
        "| problem | method | tol / step | cnf error | time / torchdiffeq | time / zuko "
        "| NFE / torchdiffeq | NFE / zuko |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in probs:
        ref = reference(p)
        for method in methods:
            curves: dict[str, list[tuple[float, float, int, str]]] = {}
            for tol in METHOD_TOLS.get(method, TOLS):
                label = f"h={RK4_STEPS[tol]:g}" if method == "rk4" else f"{tol:g}"
                for solver, run in forward_runners(method, tol).items():
                    f = Counted(p.make())
                    with torch.no_grad():
                        try:
                            out = run(f, p.y0, p.T)
                        except Exception as exc:  # a solver failing is a result, not a crash
                            lines.append(
                                f"| {p.name} | {method} | {label} | {solver} | failed: "
                                f"{type(exc).__name__} | | |"
                            )
                            continue
                        nfe = f.nfe
                        err = (out - ref).abs().max().item()
                        field = f.field
                        dt = median_time(lambda run=run, field=field, p=p: run(field, p.y0, p.T))
                    curves.setdefault(solver, []).append((err, dt, nfe, label))
                    lines.append(
                        f"| {p.name} | {method} | {label} | {solver} | {err:.2e} | {nfe} "
                        f"| {dt * 1e3:.2f} |"
                    )
            for err, dt, nfe, label in curves.get("cnf", []):
                ratios = []
                for peer in ("torchdiffeq", "zuko"):
                    pts = curves.get(peer, [])
                    if len(pts) < 2:
                        ratios.append(("-", "-"))
                        continue
                    errs = [q[0] for q in pts]
                    t_peer = loglog_interp(err, errs, [q[1] for q in pts])
                    n_peer = loglog_interp(err, errs, [q[2] for q in pts])
                    if math.isnan(t_peer):
                        ratios.append(("(outside)", "(outside)"))
                    else:
                        ratios.append((f"{dt / t_peer:.2f}", f"{nfe / n_peer:.2f}"))
                summary.append(
                    f"| {p.name} | {method} | {label} | {err:.2e} | {ratios[0][0]} | "
                    f"{ratios[1][0]} | {ratios[0][1]} | {ratios[1][1]} |"
                )
        print(f"forward: {p.name} done", file=sys.stderr)
    return "\n".join(lines + summary)


def grad_reference(p: Problem, w: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the fine fixed-step rk4 solution (checkpointed: exact discrete gradient)."""
    f = p.make()
    y0 = p.y0.clone().requires_grad_(True)
    yT = cnf.odeint_adjoint(
        f,
        y0,
        torch.tensor([0.0, p.T]),
        method="rk4",
        options={"step_size": 1e-3, "max_num_steps": 10**6},
    )[-1]
    return torch.autograd.grad((w * yT).sum(), [y0, *f.parameters()])


def grad_runners(tol: float) -> dict[str, Callable]:
    def span(T):
        return torch.tensor([0.0, T])

    runners = {
        "cnf backprop": lambda f, y0, T: (cnf.odeint(f, y0, span(T), rtol=tol, atol=tol), None),
    }
    for label, opts in [
        ("cnf checkpoint", {"mode": "checkpoint"}),
        ("cnf backsolve", {"mode": "backsolve"}),
        ("cnf backsolve seminorm", {"mode": "backsolve", "norm": "seminorm"}),
    ]:

        def run(f, y0, T, opts=opts):
            sol = cnf.solve(f, y0, span(T), rtol=tol, atol=tol, adjoint=True, adjoint_options=opts)
            return sol.ys, sol.stats

        runners[label] = run
    if torchdiffeq is not None:
        runners["torchdiffeq backprop"] = lambda f, y0, T: (
            torchdiffeq.odeint(f, y0, span(T), rtol=tol, atol=tol),
            None,
        )
        runners["torchdiffeq adjoint"] = lambda f, y0, T: (
            torchdiffeq.odeint_adjoint(f, y0, span(T), rtol=tol, atol=tol),
            None,
        )
        runners["torchdiffeq adjoint seminorm"] = lambda f, y0, T: (
            torchdiffeq.odeint_adjoint(
                f, y0, span(T), rtol=tol, atol=tol, adjoint_options={"norm": "seminorm"}
            ),
            None,
        )
    if zuko is not None:
        runners["zuko (checkpoint)"] = lambda f, y0, T: (
            zuko.utils.odeint(f, y0, 0.0, T, tuple(f.parameters()), atol=tol, rtol=tol)[None],
            None,
        )
    return runners


def bench_gradients(probs: list[Problem], tol: float = 1e-6) -> str:
    lines = [
        f"dopri5, rtol = atol = {tol:g}; gradient error = |g - g_ref| / |g_ref| over y0 and "
        "parameters, g_ref from rk4 with h = 1e-3.",
        "",
        "| problem | variant | forward NFE | backward NFE | time fwd+bwd (ms) | gradient error |",
        "|---|---|---|---|---|---|",
    ]
    for p in probs:
        w = torch.randn(p.y0.shape, generator=torch.Generator().manual_seed(2))
        g_ref = grad_reference(p, w)
        ref_norm = torch.sqrt(sum((g**2).sum() for g in g_ref))
        for label, run in grad_runners(tol).items():
            f = Counted(p.make())

            def step(f=f, run=run, p=p, w=w):
                y0 = p.y0.clone().requires_grad_(True)
                ys, _ = run(f, y0, p.T)
                params = list(f.parameters())
                return torch.autograd.grad((w * ys[-1]).sum(), [y0, *params])

            try:
                f.nfe = 0
                y0 = p.y0.clone().requires_grad_(True)
                ys, _ = run(f, y0, p.T)
                nfe_fwd = f.nfe
                grads = torch.autograd.grad((w * ys[-1]).sum(), [y0, *f.parameters()])
                nfe_bwd = f.nfe - nfe_fwd
                if not all(torch.isfinite(g).all() for g in grads):
                    raise FloatingPointError("non-finite gradient")
                err = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads, g_ref)))
                err = (err / ref_norm).item()
                dt = median_time(step, budget=2.0, max_reps=7)
            except Exception as exc:
                msg = str(exc).splitlines()[0][:60] if str(exc) else ""
                lines.append(f"| {p.name} | {label} | | | | failed: {type(exc).__name__} {msg} |")
                continue
            lines.append(
                f"| {p.name} | {label} | {nfe_fwd} | {nfe_bwd} | {dt * 1e3:.1f} | {err:.2e} |"
            )
        print(f"gradients: {p.name} done", file=sys.stderr)
    return "\n".join(lines)


# ---------------------------------------------------------------- error norms vs torchode

NORM_TOLS = (1e-3, 1e-5, 1e-7)  # where cnf's rows are
PEER_TOLS = tuple(10.0**-k for k in range(2, 10))  # the peers' error-cost curves
# the targets at equal maximum error: time and NFE over torchode's, time over
# torchdiffeq's
TARGETS = {"torchode time": 0.8, "torchode NFE": 1.0, "torchdiffeq time": 0.35}


def run_torchode(f, y0, T, tol):
    """torchode's dopri5 with its PI(D) controller (per-sample steps), final state.

    torchode hands ``f`` one time per sample, shape ``(B,)``: the fields here read ``t``
    broadcast against ``(B, 1)``.
    """
    term = torchode.ODETerm(lambda t, y: f(t[:, None], y))
    control = torchode.PIDController(
        atol=tol, rtol=tol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term
    )
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), control, max_steps=10**6)
    t_eval = torch.tensor([0.0, T]).expand(y0.shape[0], 2)
    return solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval)).ys[:, -1]


def norm_runners(tol: float) -> dict[str, Callable]:
    """cnf with each norm, torchode and torchdiffeq at rtol = atol = ``tol`` (dopri5)."""
    span = lambda T: torch.tensor([0.0, T])  # noqa: E731

    def cnf_with(norm):
        opts = {"norm": norm, "max_num_steps": 10**6}
        return lambda f, y0, T: cnf.odeint(f, y0, span(T), rtol=tol, atol=tol, options=opts)[-1]

    def cnf_sample_steps(f, y0, T):
        # per-sample steps hand f one time per running sample, shape (m,), as torchode does
        opts = {"steps": "sample", "max_num_steps": 10**6}
        g = lambda t, y: f(t[:, None], y)  # noqa: E731
        return cnf.odeint(g, y0, span(T), rtol=tol, atol=tol, options=opts)[-1]

    runners = {
        "cnf rms": cnf_with("rms"),
        "cnf sample": cnf_with("sample"),
        "cnf sample steps": cnf_sample_steps,
    }
    if torchode is not None:
        runners["torchode"] = lambda f, y0, T: run_torchode(f, y0, T, tol)
    if torchdiffeq is not None:
        runners["torchdiffeq"] = lambda f, y0, T: torchdiffeq.odeint(
            f, y0, span(T), rtol=tol, atol=tol
        )[-1]
    return runners


def measure(p: Problem, run: Callable, ref: torch.Tensor) -> tuple[float, float, int]:
    """(max error over the batch at the final time, median time, NFE) of one solve."""
    f = Counted(p.make())
    with torch.no_grad():
        out = run(f, p.y0, p.T)
        nfe, field = f.nfe, f.field
        err = (out - ref).abs().max().item()
        dt = best_time(lambda: run(field, p.y0, p.T))
    return err, dt, nfe


def norm_curves(p: Problem, lines: list[str]) -> dict[str, list[tuple[float, float, int, float]]]:
    """Every solver's (error, time, NFE, tol) points on ``p``, each also a row of ``lines``."""
    ref = reference(p)
    curves: dict[str, list[tuple[float, float, int, float]]] = {}
    for tol in sorted(set(NORM_TOLS) | set(PEER_TOLS), reverse=True):
        for solver, run in norm_runners(tol).items():
            if solver.startswith("cnf") and tol not in NORM_TOLS:
                continue
            try:
                err, dt, nfe = measure(p, run, ref)
            except Exception as exc:  # a solver failing is a result, not a crash
                lines.append(
                    f"| {p.name} | {tol:g} | {solver} | failed: {type(exc).__name__} | | |"
                )
                continue
            curves.setdefault(solver, []).append((err, dt, nfe, tol))
            lines.append(f"| {p.name} | {tol:g} | {solver} | {err:.2e} | {nfe} | {dt * 1e3:.2f} |")
    return curves


def at_equal_error(point, pts) -> tuple[float, float]:
    """(time ratio, NFE ratio) of ``point`` over the peer's curve ``pts`` at its error."""
    err, dt, nfe, _ = point
    if len(pts) < 2:
        return math.nan, math.nan
    errs = [q[0] for q in pts]
    t_peer = loglog_interp(err, errs, [q[1] for q in pts])
    n_peer = loglog_interp(err, errs, [q[2] for q in pts])
    return dt / t_peer, nfe / n_peer


def norm_summary_row(name: str, solver: str, point, curves) -> tuple[str, bool]:
    """One row of the equal-error table and whether it meets every target it can be read on."""
    t_ode, n_ode = at_equal_error(point, curves.get("torchode", []))
    t_tdq, _ = at_equal_error(point, curves.get("torchdiffeq", []))
    checks = [t_ode <= TARGETS["torchode time"], n_ode <= TARGETS["torchode NFE"]]
    checks.append(t_tdq <= TARGETS["torchdiffeq time"])
    readable = [not math.isnan(v) for v in (t_ode, n_ode, t_tdq)]
    met = all(c for c, ok in zip(checks, readable) if ok) and all(readable)

    def fmt(v):
        return "(outside)" if math.isnan(v) else f"{v:.2f}"

    verdict = "yes" if met else ("no" if all(readable) else "n/a (outside)")
    row = (
        f"| {name} | {point[3]:g} | {solver} | {point[0]:.2e} | {fmt(t_ode)} | {fmt(n_ode)} "
        f"| {fmt(t_tdq)} | {verdict} |"
    )
    return row, met


def vdp_overhead(probs: list[Problem], curves_of: dict, tol: float = 1e-5) -> list[str]:
    """Time per NFE minus the field's own time, per solver, on the Van der Pol problems."""
    lines = [
        "",
        f"Per-evaluation overhead on Van der Pol (dopri5, rtol = atol = {tol:g}): the solve's "
        "time per NFE minus the field's own time (a bare call on the same batch).",
        "",
        "| problem | solver | NFE | time (ms) | time / NFE (us) | field (us) "
        "| overhead / NFE (us) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in probs:
        if not p.name.startswith("vdp"):
            continue
        field, t0 = p.make(), torch.tensor(0.0)
        with torch.no_grad():
            calls = lambda f=field, t=t0, y=p.y0: [f(t, y) for _ in range(100)]  # noqa: E731
            own = best_time(calls, budget=0.3) / 100
        for solver, pts in curves_of[p.name].items():
            for _err, dt, nfe, t in pts:
                if t == tol:
                    per = dt / nfe
                    lines.append(
                        f"| {p.name} | {solver} | {nfe} | {dt * 1e3:.2f} | {per * 1e6:.1f} "
                        f"| {own * 1e6:.1f} | {(per - own) * 1e6:.1f} |"
                    )
    return lines


def bench_norms(probs: list[Problem]) -> str:
    lines = [
        "dopri5; error = max abs error over the batch at the final time; time = the fastest "
        "of up to 9 runs.",
        "",
        "| problem | rtol = atol | solver | max error | NFE | time (ms) |",
        "|---|---|---|---|---|---|",
    ]
    summary = [
        "",
        "At equal maximum error (each peer's curve interpolated in log-log at cnf's error; "
        "targets: time <= 0.8x and NFE <= 1.0x torchode's, time <= 0.35x torchdiffeq's):",
        "",
        "| problem | tol | cnf variant | max error | time / torchode | NFE / torchode "
        "| time / torchdiffeq | targets met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    curves_of, met = {}, {"cnf rms": [], "cnf sample": [], "cnf sample steps": []}
    for p in probs:
        curves_of[p.name] = curves = norm_curves(p, lines)
        for solver in met:
            for point in curves.get(solver, []):
                row, ok = norm_summary_row(p.name, solver, point, curves)
                summary.append(row)
                met[solver].append(ok)
        print(f"norms: {p.name} done", file=sys.stderr)
    verdict = [
        "",
        *(
            f"- {solver}: targets met on {sum(oks)} of {len(oks)} problem/tolerance cases."
            for solver, oks in met.items()
        ),
    ]
    return "\n".join(lines + summary + verdict + vdp_overhead(probs, curves_of))


def peak_memory(fn: Callable[[], object]) -> float:
    """Peak bytes allocated above the starting point while ``fn`` runs (CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        current += delta
        peak = max(peak, current)
    return peak


def bench_memory(steps=(10, 40, 160, 640)) -> str:
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(512, 2, generator=g)
    lines = [
        "tanh MLP field (dim 2, width 64, batch 512), rk4 with a fixed number of steps on [0, 1]; "
        "peak memory (MB) of one forward + backward.",
        "",
        "| variant | " + " | ".join(f"{n} steps" for n in steps) + " | growth 10 -> 640 |",
        "|---|" + "---|" * (len(steps) + 1),
    ]

    def variants(n):
        opts = {"step_size": 1.0 / n}
        t = torch.tensor([0.0, 1.0])
        out = {
            "cnf backprop": lambda f, y: cnf.odeint(f, y, t, method="rk4", options=opts),
            # by default the checkpoint keeps up to 256 MiB of the forward's graph (the first
            # steps') instead of replaying them; graph_memory=0 replays every step
            "cnf checkpoint": lambda f, y: cnf.odeint_adjoint(f, y, t, method="rk4", options=opts),
            "cnf checkpoint, graph_memory=0": lambda f, y: (
                cnf.solve(
                    f, y, t, method="rk4", options=opts, adjoint=cnf.ode.Checkpoint(graph_memory=0)
                ).ys
            ),
            "cnf backsolve": lambda f, y: cnf.odeint_adjoint(
                f,
                y,
                t,
                method="rk4",
                options=opts,
                adjoint_options={"mode": "backsolve", "step_size": 1.0 / n},
            ),
        }
        if torchdiffeq is not None:
            out["torchdiffeq backprop"] = lambda f, y: torchdiffeq.odeint(
                f, y, t, method="rk4", options=opts
            )
            out["torchdiffeq adjoint"] = lambda f, y: torchdiffeq.odeint_adjoint(
                f, y, t, method="rk4", options=opts, adjoint_options=opts
            )
        return out

    names = list(variants(10))
    table = {name: [] for name in names}
    for n in steps:
        for name, run in variants(n).items():
            f = TanhMLP()

            def fwd_bwd(f=f, run=run):
                y = y0.clone().requires_grad_(True)
                ys = run(f, y)
                ys[-1].square().sum().backward()

            table[name].append(peak_memory(fwd_bwd) / 2**20)
    for name in names:
        vals = table[name]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.2f}" for v in vals)
            + f" | {vals[-1] - vals[0]:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two problems, dopri5 only (unless --methods)"
    )
    parser.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument(
        "--sections", default="forward,gradients,memory,norms", help="comma-separated sections"
    )
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    probs = problems(args.quick)
    methods = ("dopri5",) if args.quick else METHODS
    if args.methods:
        methods = tuple(args.methods.split(","))
        if not set(methods) <= set(METHODS):
            parser.error(f"--methods: choose from {', '.join(METHODS)}")
    sections = args.sections.split(",")
    peers = ", ".join(
        f"{m.__name__} {getattr(m, '__version__', '?')}" for m in (torchdiffeq, zuko, torchode) if m
    )
    parts = [
        "# Solver benchmarks",
        "",
        f"`python scripts/bench_solvers.py`: torch {torch.__version__}, float64, one thread; "
        f"peers: {peers or 'none installed'}.",
    ]
    if "forward" in sections:
        parts += ["", "## Forward solves", "", bench_forward(probs, methods)]
    if "gradients" in sections:
        parts += ["", "## Gradients", "", bench_gradients(probs)]
    if "memory" in sections:
        parts += [
            "",
            "## Peak memory",
            "",
            bench_memory((10, 40) if args.quick else (10, 40, 160, 640)),
        ]
    if "norms" in sections:
        parts += ["", "## Error norms against torchode", "", bench_norms(probs)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
