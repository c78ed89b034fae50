"""Tests of the flow-matching objective: the closed-form Gaussian velocity, OT pairing, training.

The Gaussian case has a closed form. With base z ~ N(0, I), data x ~ N(mu, s^2 I) and the
straight path x_t = (1 - t) z + t x (sigma_min = 0), x_t ~ N(t mu, var_t I) with
var_t = (1 - t)^2 + t^2 s^2, and the velocity u = x - z has Cov(u, x_t) = (t s^2 - (1 - t)) I, so
the marginal velocity (the minimiser of the loss) is

    v*(t, y) = E[u | x_t = y] = mu + (t s^2 - (1 - t)) / var_t * (y - t mu).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

from cnf import CNF, CNFTransform, Flow, SequentialFlow
from cnf.data import toy_sampler
from cnf.fields import ConcatSquashConvNet, ConcatSquashMLP
from cnf.training import FlowMatching, fit, load_checkpoint, ot_pairing
from cnf.training.flow_matching import blockwise_velocity, field_velocity
from cnf.transforms import Compose, LogitTransform, Reshape

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = 0.5


def v_star(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The marginal velocity of the module docstring; t of shape () or (n,), y (n, 2)."""
    t = t.reshape(-1, 1)
    var = (1 - t) ** 2 + t**2 * S**2
    return MU + (t * S**2 - (1 - t)) / var * (y - t * MU)


class Analytic(nn.Module):
    """A field computing ``scale * v* + shift`` (the exact minimiser when scale=1, shift=0)."""

    def __init__(self, scale: float = 1.0, shift=(0.0, 0.0)):
        super().__init__()
        self.scale = scale
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float64))

    def forward(self, t, z):
        return self.scale * v_star(t, z) + self.shift


def gaussian(n: int, generator: torch.Generator) -> torch.Tensor:
    return MU + S * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def fm_loss(field: nn.Module, data: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    flow = CNF(field, (2,), T=1.0)
    return FlowMatching(**options)(flow, data, torch.Generator().manual_seed(seed))[0]


# --- the loss and its minimiser ----------------------------------------------------------------


def test_the_marginal_velocity_has_the_lowest_loss():
    data = gaussian(200_000, torch.Generator().manual_seed(1))
    best = fm_loss(Analytic(), data)
    # Same draws for every field: L(v* + e) - L(v*) = |e|^2 + 2 mean(e . (v* - u)), and the
    # cross term has mean 0 and standard deviation ~ 2 |e| sqrt(Var(u | x_t)) / sqrt(n) < 1e-3.
    shifted = fm_loss(Analytic(shift=(0.1, -0.1)), data)
    assert shifted > best
    assert (shifted - best).item() == pytest.approx(0.02, abs=3e-3)
    for scale in (0.9, 1.1):
        assert fm_loss(Analytic(scale=scale), data) > best
    # the irreducible loss E|u - v*|^2 = 2 E[Var(u_i | x_t)] = 2 E[s^2 / var_t] (per entry,
    # Var(u_i) - Cov^2 / var_t = 1 + s^2 - (t s^2 - 1 + t)^2 / var_t = s^2 / var_t)
    t = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    expected = (2 * S**2 / ((1 - t) ** 2 + t**2 * S**2)).mean()
    assert best.item() == pytest.approx(expected.item(), rel=0.02)


def test_a_field_trained_by_flow_matching_approaches_the_marginal_velocity():
    torch.manual_seed(0)
    flow = CNF(ConcatSquashMLP(2, (32, 32)), (2,), T=1.0).double()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    g = torch.linspace(-2, 2, 21, dtype=torch.float64)
    tt, a, b = (m.reshape(-1) for m in torch.meshgrid(t, g, g, indexing="ij"))
    # the grid covers +-2 standard deviations of x_t at each t: where the loss sees points
    sd = ((1 - tt) ** 2 + tt**2 * S**2).sqrt().unsqueeze(1)
    y = tt.unsqueeze(1) * MU + sd * torch.stack([a, b], 1)
    exact = v_star(tt, y)

    def error() -> float:
        with torch.no_grad():
            return (field_velocity(flow.field, tt, y) - exact).square().sum(1).mean().item()

    before = error()
    fit(flow, gaussian, iters=600, batch_size=256, lr=5e-3, schedule="cosine",
        objective=FlowMatching(), progress=False, seed=0)  # fmt: skip
    after = error()
    # Measured 0.098 after 600 steps (0.028 after 1500), against a mean |v*|^2 of 2.59 on the
    # grid: the rest is the noise of 256-point Monte Carlo gradients, not a bias.
    assert after < 0.15 < before
    assert after < 0.06 * exact.square().sum(1).mean().item()


# --- the minibatch OT coupling -----------------------------------------------------------------


def brute_force_cost(z: torch.Tensor, x: torch.Tensor) -> float:
    n = z.shape[0]
    zf, xf = z.reshape(n, -1), x.reshape(n, -1)
    return min((xf - zf[list(p)]).square().sum().item() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("shape", [(2,), (1, 2, 2)])
def test_ot_pairing_is_the_optimal_permutation(n, shape):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64) + 1.0
    paired = ot_pairing(z, x)
    assert paired.shape == z.shape
    # the same multiset of base points
    assert torch.equal(torch.sort(paired.reshape(n, -1), 0).values,
                       torch.sort(z.reshape(n, -1), 0).values)  # fmt: skip
    assert any(torch.equal(paired, z[list(p)]) for p in itertools.permutations(range(n)))
    # paired[i] goes with x[i], at the least total cost
    cost = (x - paired).reshape(n, -1).square().sum().item()
    assert cost == pytest.approx(brute_force_cost(z, x), rel=1e-12, abs=1e-12)


def test_ot_pairing_matches_the_right_sides():
    z = torch.tensor([[10.0, 0.0], [0.0, 0.0], [-10.0, 0.0]])
    x = torch.tensor([[-9.0, 1.0], [11.0, 0.0], [0.5, -1.0]])
    assert torch.equal(ot_pairing(z, x), z[[2, 0, 1]])


def test_ot_pairing_works_within_blocks():
    g = torch.Generator().manual_seed(3)
    z, x = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)
    paired = ot_pairing(z, x, block=3)
    for part in (slice(0, 3), slice(3, 6), slice(6, 7)):
        cost = (x[part] - paired[part]).square().sum().item()
        assert cost == pytest.approx(brute_force_cost(z[part], x[part]), rel=1e-6)
        assert torch.equal(torch.sort(paired[part], 0).values, torch.sort(z[part], 0).values)
    assert torch.equal(ot_pairing(z, x, block=1), z)


def test_ot_coupling_lowers_the_loss_of_the_straight_field():
    # pairs closer together make straighter, less crossing paths: a smaller conditional variance
    data = gaussian(4096, torch.Generator().manual_seed(2))
    plain = fm_loss(Analytic(), data)
    coupled = fm_loss(Analytic(), data, coupling="ot", ot_block=512)
    assert coupled < plain


# --- an FM-trained CNF -------------------------------------------------------------------------


def test_flow_matching_trains_a_normalized_density():
    torch.manual_seed(0)
    flow = CNF(ConcatSquashMLP(2, (64, 64)), (2,), T=1.0)
    history = fit(flow, toy_sampler("8gaussians"), iters=300, batch_size=256, lr=5e-3,
                  objective=FlowMatching(coupling="ot"), progress=False, seed=0)  # fmt: skip
    first, last = history.fm_loss[:20], history.fm_loss[-20:]
    assert sum(last) < 0.5 * sum(first)  # measured 1.27 -> 0.18 per step on average
    h = 0.14
    g = torch.arange(-7 + h / 2, 7, h)
    a, b = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        density = flow.log_prob(torch.stack([a.reshape(-1), b.reshape(-1)], 1)).exp()
    # Measured |integral - 1| = 2e-6. The midpoint rule on a smooth density of width >= 0.35 at
    # step 0.14 errs far below 1e-6, the mass outside [-7, 7]^2 is negligible, and the solver
    # (tolerance 1e-5) and float32 leave ~1e-5: 1e-3 is a wide but still telling bound.
    assert abs(density.sum().item() * h**2 - 1) < 1e-3


class Killer:
    """Wraps an objective and raises KeyboardInterrupt at one call (= iteration)."""

    def __init__(self, objective, at=None):
        self.objective, self.at, self.calls = objective, at, 0

    def __call__(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.objective(model, batch, generator)


def small_cnf(seed: int) -> CNF:
    torch.manual_seed(seed)
    return CNF(ConcatSquashMLP(2, (16, 16)), (2,), T=1.0)


RESUMABLE = [FlowMatching(), FlowMatching(time="logit-normal", coupling="ot", ot_block=16)]


@pytest.mark.parametrize("objective", RESUMABLE)
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, objective):
    common = dict(iters=10, batch_size=64, lr=5e-3, schedule="cosine", ema=0.9,
                  checkpoint_every=4, seed=7, progress=False)  # fmt: skip
    data = toy_sampler("8gaussians")
    model_a = small_cnf(0)
    history_a = fit(model_a, data, objective=objective, checkpoint_dir=tmp_path / "a", **common)
    with pytest.raises(KeyboardInterrupt):
        fit(small_cnf(0), data, objective=Killer(objective, at=7),
            checkpoint_dir=tmp_path / "b", **common)  # fmt: skip
    assert os.listdir(tmp_path / "b") == ["last.pt"]
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 4

    torch.manual_seed(1234)  # a new process: other weights, another global RNG state
    model_b, resumed = small_cnf(99), Killer(objective)
    history_b = fit(model_b, data, objective=resumed, checkpoint_dir=tmp_path / "b",
                    resume=True, **common)  # fmt: skip
    assert resumed.calls == 6
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert history_b.fm_loss == history_a.fm_loss
    assert history_b.loss == history_a.loss


# --- which field, at which time, in which space ------------------------------------------------


class Marker(nn.Module):
    """A field returning ``(mark, t)`` at every point: which block ran, at what local time."""

    def __init__(self, mark: float):
        super().__init__()
        self.mark = mark

    def forward(self, t, z):
        return torch.stack([torch.full_like(z[:, 0], self.mark), t.expand(z.shape[0])], 1)


def test_blocks_share_one_time_axis_in_the_generative_order():
    first, second = CNFTransform(Marker(1.0), (2,), T=0.5), CNFTransform(Marker(2.0), (2,), T=0.5)
    t = torch.tensor([0.0, 0.1, 0.49, 0.5, 0.75, 0.999], dtype=torch.float64)
    v = blockwise_velocity([first, second], t, torch.zeros(6, 2, dtype=torch.float64))
    # the last block of the data-to-base order acts first on base points: [0, 0.5)
    expected = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(v[:, 0], expected)
    local = torch.where(t < 0.5, t, t - 0.5)
    torch.testing.assert_close(v[:, 1], local, rtol=0, atol=1e-15)


class Halves(nn.Module):
    """v* on one half of the time axis, in local time: ``v*(offset + t, z)``."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, t, z):
        return v_star(t + self.offset, z)


def test_the_loss_of_two_blocks_is_that_of_one():
    data = gaussian(512, torch.Generator().manual_seed(5))
    one = fm_loss(Analytic(), data, seed=3)
    # data-to-base order: the block acting on [0.5, 1] comes first
    two = SequentialFlow([CNF(Halves(0.5), (2,), T=0.5), CNF(Halves(0.0), (2,), T=0.5)])
    loss, metrics = FlowMatching()(two, data, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, one, rtol=1e-12, atol=0)
    assert set(metrics) == {"fm_loss"}


def test_data_side_steps_map_the_batch_first():
    data = gaussian(256, torch.Generator().manual_seed(6))
    flat = fm_loss(Analytic(), data, seed=4)
    flow = Flow(Compose([Reshape((1, 2), (2,)), CNFTransform(Analytic(), (2,), T=1.0)]))
    loss, _ = FlowMatching()(flow, data.reshape(-1, 1, 2), torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss, flat, rtol=1e-12, atol=0)


def test_field_velocity_evaluates_each_point_at_its_own_time():
    torch.manual_seed(0)
    for field, shape in ((ConcatSquashMLP(2, (8, 8)), (2,)),
                         (ConcatSquashConvNet(1, (4, 4)), (1, 4, 4))):  # fmt: skip
        t, x = torch.rand(5), torch.randn(5, *shape)
        v = field_velocity(field, t, x)
        one_by_one = torch.cat([field(t[i], x[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(v, one_by_one, rtol=1e-5, atol=1e-6)


class ScalarOnly(nn.Module):
    """A field taking one scalar time only (no ``per_sample_time``): the vmap fallback."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, t, z):
        assert t.dim() == 0, "the fallback must hand over one scalar time"
        return self.field(t, z)


def _loss_and_grads(flow, data, **options):
    loss, _ = FlowMatching(**options)(flow, data, torch.Generator().manual_seed(2))
    return loss, torch.autograd.grad(loss, [p for p in flow.parameters()])


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_batched_call_equals_the_vmap_fallback(kind, blocks):
    torch.manual_seed(1)
    shape = (2,) if kind == "mlp" else (1, 3, 3)
    if kind == "mlp":
        fields = [ConcatSquashMLP(2, (8, 8), "swish").double() for _ in range(blocks)]
    else:
        fields = [ConcatSquashConvNet(1, (4,), "softplus").double() for _ in range(blocks)]
    assert all(f.per_sample_time is True for f in fields)

    def flow(wrap):
        cnfs = [CNF(wrap(f), shape, T=1.0 / blocks, train_T=False) for f in fields]
        return cnfs[0] if blocks == 1 else SequentialFlow(cnfs)

    data = torch.randn(64, *shape, dtype=torch.float64)
    fast, fast_grads = _loss_and_grads(flow(lambda f: f), data, time="logit-normal")
    slow, slow_grads = _loss_and_grads(flow(ScalarOnly), data, time="logit-normal")
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_gradients_reach_the_field():
    flow = small_cnf(0)
    loss, _ = FlowMatching()(flow, torch.randn(32, 2), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(sigma_min=1.0), "sigma_min"),
        (dict(sigma_min=-0.1), "sigma_min"),
        (dict(time="beta"), "time distribution"),
        (dict(coupling="sinkhorn"), "coupling"),
        (dict(ot_block=0), "ot_block"),
        (dict(ot_block=2.5), "ot_block"),
    ],
)
def test_bad_settings_are_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        FlowMatching(**options)


@pytest.mark.parametrize(
    ("flow", "match"),
    [
        (CNF(ConcatSquashMLP(2, (4,)), (2,), T=0.5), r"T=1\.0.*train_T=False"),
        (CNF(ConcatSquashMLP(2, (4,)), (2,), T=1.0, train_T=True), "train_T=False"),
        (
            SequentialFlow([CNF(ConcatSquashMLP(2, (4,)), (2,), T=0.5) for _ in range(3)]),
            "add up to 1.5",
        ),  # fmt: skip
        (
            # a step with a log-determinant after the blocks (a reshape there is fine)
            Flow(Compose([CNFTransform(ConcatSquashMLP(2, (4,)), (2,)), LogitTransform((2,))])),
            "CNF blocks after data-side steps",
        ),  # fmt: skip
        (Flow(LogitTransform((2,))), "CNF blocks after data-side steps"),
    ],
)
def test_unsupported_models_are_value_errors(flow, match):
    with pytest.raises(ValueError, match=match):
        FlowMatching()(flow, torch.rand(4, *flow.event_shape), None)


def test_other_bases_and_modules_are_value_errors():
    with pytest.raises(ValueError, match="cnf.Flow"):
        FlowMatching()(ConcatSquashMLP(2, (4,)), torch.rand(4, 2), None)
    base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), 1.0), 1)
    with pytest.raises(ValueError, match="N\\(0, I\\)"):
        FlowMatching()(CNF(ConcatSquashMLP(2, (4,)), (2,), base=base), torch.rand(4, 2), None)
    with pytest.raises(ValueError, match="block"):
        ot_pairing(torch.zeros(3, 2), torch.zeros(3, 2), block=0)
    with pytest.raises(ValueError, match="shape"):
        ot_pairing(torch.zeros(3, 2), torch.zeros(4, 2))
