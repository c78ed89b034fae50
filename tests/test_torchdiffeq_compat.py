"""torchdiffeq's options, dtypes and callbacks, as a torchdiffeq user meets them in cnf.

Each behaviour is checked against a closed form, and against torchdiffeq itself where it is
installed (the ``bench`` extra; those cases skip without it). Methods and events have their own
modules (``test_methods_torchdiffeq.py``, ``test_events.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

import cnf
from cnf.ode import odeint, odeint_adjoint, solve

pytestmark = pytest.mark.deadline(60)

F32, F64 = torch.float32, torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)


def _torchdiffeq():
    return pytest.importorskip("torchdiffeq")


class Decay(torch.nn.Module):
    """``dy/dt = -k y + t`` (uses t, so dtype promotion would show), solution in closed form."""

    def __init__(self, k=0.7):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k))
        self.seen_t_dtypes = set()

    def forward(self, t, y):
        self.seen_t_dtypes.add(t.dtype)
        return -self.k * y + t

    def exact(self, t, y0):
        k = self.k.item()
        # y = (y0 + 1/k^2) e^{-kt} + t/k - 1/k^2
        return (y0 + 1 / k**2) * math.exp(-k * t) + t / k - 1 / k**2


# --- time dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("t_dtype", "y_dtype"), [(F64, F32), (F32, F64), (F64, F64), (F32, F32)])
def test_func_gets_its_time_in_the_states_dtype(t_dtype, y_dtype):
    """torchdiffeq keeps t in its own dtype for the solver and hands func the state's dtype, so
    a float64 t (recommended for accurate times) with a float32 state works."""
    f = Decay().to(y_dtype)
    t = torch.linspace(0, 2, 5, dtype=t_dtype)
    ys = odeint(f, torch.ones(3, dtype=y_dtype), t)
    assert ys.dtype == y_dtype and f.seen_t_dtypes == {y_dtype}
    tol = 1e-5 if y_dtype == F32 else 1e-7
    assert ys[-1, 0].item() == pytest.approx(f.exact(2.0, 1.0), rel=tol)


def test_time_dtypes_match_torchdiffeq():
    td = _torchdiffeq()
    f = Decay().float()
    t = torch.linspace(0, 2, 5, dtype=F64)
    ours = odeint(f, torch.ones(3), t, rtol=1e-6, atol=1e-8)
    theirs = td.odeint(f, torch.ones(3), t, rtol=1e-6, atol=1e-8)
    assert ours.dtype == theirs.dtype == F32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_the_time_dtype_option_is_accepted(dtype):
    ys = odeint(Decay().double(), torch.ones(2, dtype=F64), T01, options={"dtype": dtype})
    assert ys[-1, 0].item() == pytest.approx(Decay().exact(1.0, 1.0), rel=1e-7)
    with pytest.raises(ValueError, match="torch.float32 or torch.float64"):
        odeint(Decay().double(), torch.ones(2, dtype=F64), T01, options={"dtype": torch.int32})


# --- norms ---------------------------------------------------------------------------------------


def test_a_norm_function_sees_the_state_structure():
    seen = []

    def norm(x):
        seen.append(x)
        parts = x if isinstance(x, tuple) else (x,)
        return max(p.abs().max() for p in parts)

    odeint(lambda t, y: y, torch.tensor([[1.0, 2.0]], dtype=F64), T01, options={"norm": norm})
    assert seen and all(isinstance(x, torch.Tensor) and x.shape == (1, 2) for x in seen)
    seen.clear()
    y0 = (torch.tensor(1.0, dtype=F64), torch.ones(2, 2, dtype=F64))
    odeint(lambda t, y: y, y0, T01, options={"norm": norm})
    assert seen and all(isinstance(x, tuple) and [p.shape for p in x] == [(), (2, 2)] for x in seen)


def test_a_larger_norm_takes_more_steps():
    def linf(x):
        return x.abs().max()

    counts = {}
    for name, norm in (("linf", linf), ("10 linf", lambda x: 10 * linf(x))):
        sol = solve(lambda t, y: torch.sin(20 * t) * y, torch.ones(2, dtype=F64), T01,
                    options={"norm": norm})  # fmt: skip
        counts[name] = sol.stats.nfe
    assert counts["linf"] < counts["10 linf"]


def test_an_adjoint_norm_function_gets_torchdiffeqs_tuple():
    params = (
        torch.rand(7, dtype=F64, requires_grad=True),
        torch.rand((), dtype=F64, requires_grad=True),
    )
    seen = []

    def norm(parts):
        seen.append(tuple(p.shape for p in parts))
        return max(p.abs().max() for p in parts)

    y0 = (torch.tensor(1.0, dtype=F64), torch.full((2, 2), 0.5, dtype=F64))

    def f(t, y):
        return (y[0] * params[1], y[1] * params[0][:4].view(2, 2))

    ys = odeint_adjoint(f, y0, T01, adjoint_params=params, adjoint_options={"norm": norm})
    (ys[0].sum() + ys[1].sum()).backward()
    assert seen and set(seen) == {((), (), (2, 2), (), (2, 2), (7,), ())}


def test_the_seminorm_saves_backward_evaluations():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    net = net.double()

    def f(t, y):
        return net(y) * torch.sin(20 * t)

    nfe = {}
    for norm in ("rms", "seminorm"):
        strategy, params = cnf.ode.Backsolve(norm=norm), tuple(net.parameters())
        y0 = torch.tensor([1.0, 2.0], dtype=F64)
        sol = solve(f, y0, T01, rtol=1e-6, atol=1e-6, adjoint=strategy, adjoint_params=params)
        sol.ys.sum().backward()
        nfe[norm] = sol.stats.nfe_backward
    assert nfe["seminorm"] < nfe["rms"]


# --- step_t, jump_t, perturb ---------------------------------------------------------------------


def _switching(t, x):
    """torchdiffeq's own example: -x/2 before t = 0.5, x^2 after (f jumps at 0.5)."""
    return -0.5 * x if t < 0.5 else x**2


def _switching_exact(x0, t):
    x_half = x0 * math.exp(-0.25)
    return 1 / (1 / x_half - (t - 0.5))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5"])
def test_jump_t_steps_onto_a_jump_and_saves_work(method):
    x0 = torch.tensor([1.0, 0.5], dtype=F64)
    plain = solve(_switching, x0, T01, method=method)
    jumped = solve(_switching, x0, T01, method=method, options={"jump_t": torch.tensor([0.5])})
    assert jumped.stats.nfe < plain.stats.nfe
    exact = [_switching_exact(v, 1.0) for v in (1.0, 0.5)]
    assert jumped.ys[-1].tolist() == pytest.approx(exact, rel=1e-6)


def test_jump_t_reads_f_on_each_side():
    """A step ending at the jump reads f just before it, the next just after it."""
    seen = []

    def f(t, x):
        seen.append(t.item())
        return _switching(t, x)

    solve(f, torch.ones(1, dtype=F64), T01, options={"jump_t": [0.5]})
    below, above = math.nextafter(0.5, 0), math.nextafter(0.5, 1)
    assert below in seen and above in seen and 0.5 not in seen


@pytest.mark.parametrize("name", ["step_t", "jump_t"])
def test_steps_land_on_the_given_times(name):
    ends = []

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_accept_step(self, t0, y0, dt):
            ends.append((t0 + dt).item())

    times = [0.123, 0.456]
    solve(F(), torch.ones(1, dtype=F64), T01, options={name: torch.tensor(times, dtype=F64)})
    for t in times:
        assert min(abs(e - t) for e in ends) < 1e-15


def test_step_t_and_jump_t_match_torchdiffeq():
    td = _torchdiffeq()
    x0 = torch.tensor([1.0, 0.5], dtype=F64)
    options = {"jump_t": torch.tensor([0.5], dtype=F64), "step_t": torch.tensor([0.25], dtype=F64)}
    ours = odeint(_switching, x0, T01, rtol=1e-8, atol=1e-10, options=options)
    theirs = td.odeint(_switching, x0, T01, rtol=1e-8, atol=1e-10, options=options)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


def _step_function(t, y):
    return torch.ones_like(y) if t < 0.5 else -torch.ones_like(y)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_perturb_integrates_each_side_of_a_jump_on_the_grid(method):
    """y' = 1 before 0.5 and -1 after: exact with perturb (y(1) = 0), one side wrong without."""
    y0, options = torch.zeros(1, dtype=F64), {"step_size": 0.25}
    plain = odeint(_step_function, y0, T01, method=method, options=options)
    fixed = odeint(_step_function, y0, T01, method=method, options={**options, "perturb": True})
    assert fixed[-1].item() == pytest.approx(0.0, abs=1e-12)
    if method == "rk4":
        assert abs(plain[-1].item()) > 1e-3


def test_perturb_matches_torchdiffeq():
    td = _torchdiffeq()
    y0, options = torch.zeros(1, dtype=F64), {"step_size": 0.25, "perturb": True}
    for method in ("euler", "midpoint", "rk4"):
        ours = odeint(_step_function, y0, T01, method=method, options=options)
        theirs = td.odeint(_step_function, y0, T01, method=method, options=options)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# --- fixed grids ---------------------------------------------------------------------------------


def test_grid_constructor_sets_the_steps():
    starts = []

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            starts.append(t0.item())

    grid = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=F64)
    odeint(F(), torch.ones(1, dtype=F64), T01, method="rk4",
           options={"grid_constructor": lambda f, y0, t: grid})  # fmt: skip
    assert starts == pytest.approx(grid[:-1].tolist(), abs=0)


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"grid_constructor": lambda f, y0, t: torch.tensor([0.0, 0.5])}, "ends at t"),
        ({"grid_constructor": lambda f, y0, t: torch.tensor([0.0, 0.7, 0.5, 1.0])}, "strictly"),
        ({"grid_constructor": lambda f, y0, t: t, "step_size": 0.1}, "exclude each other"),
        ({"grid_constructor": "uniform"}, "must be a function"),
        ({"interp": "quadratic"}, "'linear' or 'cubic'"),
        ({"perturb": 1}, "True or False"),
    ],
)
def test_bad_fixed_grid_options(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        odeint(lambda t, y: -y, torch.ones(1, dtype=F64), T01, method="rk4", options=options)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_interp_between_fixed_steps_matches_torchdiffeq(interp):
    td = _torchdiffeq()
    t = torch.tensor([0.0, 0.33, 0.71, 1.0], dtype=F64)
    options = {"step_size": 0.25, "interp": interp}
    ours = odeint(lambda t, y: -y, torch.ones(2, dtype=F64), t, method="euler", options=options)
    theirs = td.odeint(
        lambda t, y: -y, torch.ones(2, dtype=F64), t, method="euler", options=options
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# --- callbacks -----------------------------------------------------------------------------------


class Logged(torch.nn.Module):
    """``dy/dt = -y`` that logs every callback call as ``(name, t0, dt)``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=F64))
        self.log = []

    def forward(self, t, y):
        return -self.w * y

    def _note(self, name, t0, y0, dt):
        assert t0.dtype == dt.dtype == F64 and dt.item() > 0
        self.log.append((name, t0.item(), dt.item(), y0))

    def callback_step(self, t0, y0, dt):
        self._note("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._note("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self._note("reject", t0, y0, dt)

    def callback_step_adjoint(self, t0, y0, dt):
        self._note("step_adjoint", t0, y0, dt)

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self._note("accept_adjoint", t0, y0, dt)

    def names(self, name):
        return [entry for entry in self.log if entry[0] == name]


@pytest.mark.parametrize("t", [T01, T01.flip(0)], ids=["forward", "reversed"])
def test_callbacks_are_called_for_every_step(t):
    f = Logged()
    sol = solve(f, torch.ones(3, dtype=F64), t, options={"first_step": 0.9})  # forces rejects
    assert len(f.names("accept")) == sol.stats.n_accepted
    assert len(f.names("reject")) == sol.stats.n_rejected > 0
    assert len(f.names("step")) == sol.stats.n_accepted + sol.stats.n_rejected
    starts = [t0 for _, t0, _, _ in f.names("accept")]
    assert starts[0] == t[0].item() and starts == sorted(starts, reverse=bool(t[0] > t[1]))


def test_callbacks_get_a_tuple_state():
    f = Logged()

    def g(t, y):
        return (-y[0], -y[1])

    g.callback_step = f.callback_step  # any callable func with callback attributes works
    odeint(g, (torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)), T01)
    assert f.log and all(isinstance(y0, tuple) and len(y0) == 2 for *_, y0 in f.log)


def test_fixed_steps_call_only_callback_step():
    f = Logged()
    with pytest.warns(UserWarning, match="not called by fixed-step methods"):
        odeint(f, torch.ones(1, dtype=F64), T01, method="rk4", options={"step_size": 0.25})
    assert len(f.names("step")) == 4 and not f.names("accept")


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_adjoint_callbacks_are_called_by_the_backward_pass(adjoint):
    f = Logged()
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(f, y0, T01, adjoint_options={"mode": adjoint})
    before = len(f.log)
    ys[-1].sum().backward()
    backward = f.log[before:]
    assert backward and {name for name, *_ in backward} <= {"step_adjoint", "accept_adjoint"}
    if adjoint == "backsolve":  # (y, adj_y, adj_params)
        assert all(isinstance(y, tuple) and len(y) == 3 for *_, y in backward)


def test_callbacks_match_torchdiffeq_counts():
    td = _torchdiffeq()
    ours, theirs = Logged(), Logged()
    odeint(ours, torch.ones(3, dtype=F64), T01, rtol=1e-6, atol=1e-8)
    td.odeint(theirs, torch.ones(3, dtype=F64), T01, rtol=1e-6, atol=1e-8)
    for name in ("step", "accept", "reject"):
        assert abs(len(ours.names(name)) - len(theirs.names(name))) <= 2


# --- min_step, max_step --------------------------------------------------------------------------


def test_max_step_bounds_every_step():
    f = Logged()
    odeint(f, torch.ones(1, dtype=F64), T01, rtol=1e-3, atol=1e-3, options={"max_step": 0.07})
    assert max(dt for _, _, dt, _ in f.names("accept")) <= 0.07 + 1e-15


def test_min_step_is_torchdiffeqs_floor():
    f = Logged()
    with pytest.warns(UserWarning, match="min_step"):
        odeint(f, torch.ones(1, dtype=F64), T01, rtol=1e-12, atol=1e-12, options={"min_step": 0.2})
    steps = [dt for _, _, dt, _ in f.names("accept")]
    assert min(steps) >= 0.2 - 1e-12 and not f.names("reject")


def test_unknown_options_are_still_refused():
    """cnf keeps its strictness where torchdiffeq only warns: a typo fails at the call."""
    with pytest.raises(ValueError, match="unknown option.*'jump_locations' is now 'jump_t'"):
        odeint(lambda t, y: -y, torch.ones(1), T01.float(), options={"jump_locations": [0.5]})
    with pytest.raises(ValueError, match="only apply to fixed-step methods"):
        odeint(lambda t, y: -y, torch.ones(1), T01.float(), options={"perturb": True})


def test_method_none_is_dopri5_and_tolerances_may_be_per_entry():
    """torchdiffeq's signature: method=None means its default; rtol/atol tensors hold one
    tolerance per entry of the state."""
    f = Decay().double()
    y0 = torch.ones(3, dtype=F64)
    default = odeint(f, y0, T01)
    torch.testing.assert_close(odeint(f, y0, T01, method=None), default, rtol=0, atol=0)
    torch.testing.assert_close(odeint_adjoint(f, y0, T01, method=None), default, rtol=0, atol=0)
    loose = torch.tensor([1e-3, 1e-3, 1e-9], dtype=F64)
    ys = odeint(f, y0, T01, rtol=loose, atol=loose)
    assert ys[-1, 2].item() == pytest.approx(f.exact(1.0, 1.0), rel=1e-8)
    with pytest.raises(ValueError, match="one tolerance per state entry"):
        odeint(f, y0, T01, rtol=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="positive and finite in every entry"):
        odeint(f, y0, T01, rtol=torch.tensor([1e-3, 0.0, 1e-3], dtype=F64))


def test_event_searches_call_the_callbacks_and_refuse_jump_options():
    f = Logged()
    event_t, _ = odeint(f, torch.ones(1, dtype=F64), T01, event_fn=lambda t, y: y - 0.5)
    assert event_t.item() == pytest.approx(math.log(2), abs=1e-6)
    assert f.names("accept") and len(f.names("step")) == len(f.names("accept")) + len(
        f.names("reject")
    )
    for options in ({"jump_t": [0.3]}, {"step_t": [0.3]}):
        with pytest.raises(ValueError, match="not supported with event_fn"):
            odeint(f, torch.ones(1, dtype=F64), T01, event_fn=lambda t, y: y - 0.5, options=options)
