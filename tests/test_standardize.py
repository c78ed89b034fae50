"""Standardization inside the model: densities in the data's own units (issue 15's first piece)."""

from __future__ import annotations

import math

import pytest
import torch

import cnf
from cnf.fields import ConcatSquashMLP

F64 = torch.float64


def _data(n=200):
    g = torch.Generator().manual_seed(0)
    unit = torch.randn(n, 3, generator=g, dtype=F64)
    return unit * torch.tensor([1e3, 1e-3, 1.0], dtype=F64) + torch.tensor(
        [5e3, 2e-3, -1.0], dtype=F64
    )


def test_fit_gives_zero_mean_unit_variance():
    x = _data()
    z, logdet = cnf.Standardize.fit(x)(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(0), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, -x.std(0).log().sum().expand(len(x)))


def test_log_prob_in_data_units_adds_the_affine_logdet():
    """log p_x(x) = log p_z((x - mu) / sigma) - sum(log sigma), for any model after the step."""
    x = _data(50)
    torch.manual_seed(0)
    block = cnf.CNFTransform(ConcatSquashMLP(3, (8,)), (3,), T=0.5, rtol=1e-9, atol=1e-9)
    step = cnf.Standardize.fit(x)
    inner = cnf.Flow(block).to(F64)
    outer = cnf.SequentialFlow([step, block]).to(F64)
    z = (x - x.mean(0)) / x.std(0)
    expected = inner.log_prob(z) - x.std(0).log().sum()
    torch.testing.assert_close(outer.log_prob(x), expected, rtol=0, atol=1e-9)


def test_a_gaussian_in_data_units_integrates_to_one():
    """Standardize alone is a Gaussian with the data's mean and std: its density integrates
    to one in the data's units (checked on a 1-D column in thousands)."""
    x = _data()[:, :1]
    flow = cnf.Flow(cnf.Standardize.fit(x)).to(F64)
    mu, sigma = x.mean().item(), x.std().item()
    grid = torch.linspace(mu - 10 * sigma, mu + 10 * sigma, 20001, dtype=F64)[:, None]
    density = flow.log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-9)
    assert flow.log_prob(torch.tensor([[mu]], dtype=F64)).item() == pytest.approx(
        -0.5 * math.log(2 * math.pi) - math.log(sigma), abs=1e-12
    )


def test_samples_come_back_in_data_units():
    x = _data(2000)
    flow = cnf.Flow(cnf.Standardize.fit(x)).to(F64)
    s = flow.sample(20000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s.mean(0), x.mean(0), rtol=0.05, atol=0.05 * x.std(0).min().item())
    torch.testing.assert_close(s.std(0), x.std(0), rtol=0.05, atol=0)


def test_the_fitted_values_travel_in_the_state_dict():
    x = _data()
    fitted = cnf.Standardize.fit(x)
    fresh = cnf.Standardize((3,)).to(F64)
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh(x)[0], fitted(x)[0], rtol=0, atol=0)
    assert not list(fitted.parameters())  # fitted once, not trained


@pytest.mark.parametrize(
    ("x", "names", "phrase"),
    [
        (
            torch.tensor([[1.0, 2.0], [1.0, 3.0]], dtype=F64),
            ["a", "b"],
            r"column\(s\) \['a'\] are constant",
        ),
        (
            torch.tensor([[1.0, 5.0], [2.0, 5.0]], dtype=F64),
            None,
            r"column\(s\) \[1\] are constant",
        ),
        (torch.tensor([[1.0, math.nan], [2.0, 3.0]], dtype=F64), None, "NaN or Inf"),
        (torch.ones(1, 2, dtype=F64), None, "at least 2 points"),
        (torch.ones(4, dtype=F64), None, r"shape \(n, \*event_shape\)"),
        (torch.ones(4, 2, dtype=torch.long), None, "floating-point"),
    ],
)
def test_fit_refuses_what_it_cannot_standardize(x, names, phrase):
    with pytest.raises(ValueError, match=phrase):
        cnf.Standardize.fit(x, names=names)


@pytest.mark.parametrize(("mean", "scale", "phrase"), [(0.0, 0.0, "scale"), (0.0, -1.0, "scale"),
                                                       (math.inf, 1.0, "mean")])  # fmt: skip
def test_bad_parameters(mean, scale, phrase):
    with pytest.raises(ValueError, match=phrase):
        cnf.Standardize((2,), mean, scale)
