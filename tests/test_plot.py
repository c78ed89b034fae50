"""Tests of cnf.plot: every picture is a Figure, densities are densities, the GIF has its frames."""

# ruff: noqa: E402  (the backend is chosen before pyplot is imported)
from __future__ import annotations

import ast
import inspect
import io
import math

import matplotlib

matplotlib.use("Agg")  # headless; must come before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from cnf import data, plot
from cnf.fields import ConcatSquashMLP
from cnf.flow import CNF, SequentialFlow


@pytest.fixture
def model() -> CNF:
    """A small untrained CNF whose weights are scaled up so that its density is not Gaussian."""
    torch.manual_seed(0)
    flow = CNF(ConcatSquashMLP(2, hidden=(16, 16)), (2,))
    with torch.no_grad():
        for p in flow.field.parameters():
            p.mul_(3.0)
    return flow


def _check_figure(fig, panels: int) -> None:
    """A Figure with ``panels`` data axes (colorbars aside), drawable, not held by pyplot."""
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == panels
    fig.savefig(io.BytesIO(), format="png", dpi=20)  # renders every artist
    assert plt.get_fignums() == []  # nothing registered with pyplot: nothing leaks
    plt.close(fig)


# ---------------------------------------------------------------------------- density_grid


def test_density_grid_shapes_order_and_values(model):
    model.double()  # float64 and tight tolerances: batch-size effects on the steps vanish
    tight = {"rtol": 1e-9, "atol": 1e-9}
    xx, yy, logp = plot.density_grid(model, lim=3.0, n=7, **tight)
    assert xx.shape == yy.shape == logp.shape == (7, 7)
    assert np.all(np.isfinite(logp))
    axis = np.linspace(-3.0, 3.0, 7)
    np.testing.assert_allclose(xx[2], axis)  # x along columns
    np.testing.assert_allclose(yy[:, 2], axis)  # y along rows
    # node (i, j) holds log p at (x_j, y_i)
    point = torch.tensor([[xx[1, 4], yy[1, 4]]], dtype=torch.float64)
    with torch.no_grad():
        expected = model.log_prob(point, trace="exact", **tight).item()
    assert logp[1, 4] == pytest.approx(expected, abs=1e-7)


def test_density_grid_integrates_to_one(model):
    lim, n = 6.0, 60
    _, _, logp = plot.density_grid(model, lim, n, batch=1000)  # several batches
    mass = np.exp(logp).sum() * (2 * lim / (n - 1)) ** 2
    assert mass == pytest.approx(1.0, abs=0.03)


def test_density_grid_follows_the_model_dtype():
    torch.manual_seed(0)
    flow = CNF(ConcatSquashMLP(2, hidden=(8,)), (2,)).double()
    _, _, logp = plot.density_grid(flow, n=5, rtol=1e-7, atol=1e-7)
    assert logp.dtype == np.float64 and np.all(np.isfinite(logp))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lim": -1.0}, "lim"),
        ({"lim": float("inf")}, "lim"),
        ({"n": 1}, "n must be"),
        ({"n": 3.5}, "n must be"),
        ({"batch": 0}, "batch"),
    ],
)
def test_density_grid_rejects_bad_sizes(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot.density_grid(model, **kwargs)


def test_density_grid_rejects_models_that_are_not_2d():
    flow3 = CNF(ConcatSquashMLP(3, hidden=(8,)), (3,))
    with pytest.raises(ValueError, match=r"event_shape must be \(2,\)"):
        plot.density_grid(flow3, n=4)
    with pytest.raises(ValueError, match="cnf.flow.Flow"):
        plot.density_grid(lambda x: x, n=4)


# ---------------------------------------------------------------------------- plot_density


def test_plot_density_model_only(model):
    _check_figure(plot.plot_density(model, n=10), panels=1)


def test_plot_density_with_samples(model):
    points = data.sample("8gaussians", 500, seed=0)
    _check_figure(plot.plot_density(model, points, n=10, bins=20), panels=2)
    _check_figure(plot.plot_density(model, torch.as_tensor(points), n=10), panels=2)


def test_plot_density_with_closed_form_density(model):
    fig = plot.plot_density(model, true_density=data.density("checkerboard"), n=10)
    assert [ax.get_title() for ax in fig.axes] == ["true density", "model density"]
    _check_figure(fig, panels=2)
    points = data.sample("checkerboard", 100, seed=0)
    fig = plot.plot_density(model, points, true_density=data.density("checkerboard"), n=10)
    assert [ax.get_title() for ax in fig.axes][1:] == ["true density", "model density"]
    _check_figure(fig, panels=3)


def test_plot_density_rejects_bad_data(model):
    with pytest.raises(ValueError, match=r"shape \(m, 2\)"):
        plot.plot_density(model, np.zeros((10, 3)), n=5)
    with pytest.raises(ValueError, match=r"shape \(m, 2\)"):
        plot.plot_density(model, np.zeros(10), n=5)
    with pytest.raises(ValueError, match="cnf.data.sample"):
        plot.plot_density(model, "8gaussians", n=5)
    with pytest.raises(ValueError, match="true_density="):
        plot.plot_density(model, data.density("8gaussians"), n=5)
    with pytest.raises(ValueError, match="log_density"):
        plot.plot_density(model, true_density=np.zeros((5, 2)), n=5)


# ---------------------------------------------------------------------------- plot_samples


@pytest.mark.parametrize("kind", ["hist", "scatter"])
def test_plot_samples(model, kind):
    with torch.no_grad():
        samples = model.sample(200)
    _check_figure(plot.plot_samples(samples, kind=kind, bins=20), panels=1)
    points = data.sample("moons", 300, seed=1)
    _check_figure(plot.plot_samples(samples, points, kind=kind, bins=20), panels=2)


def test_plot_samples_rejects_bad_input():
    good = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"samples must have shape \(m, 2\)"):
        plot.plot_samples(np.zeros((5, 2, 1)))
    with pytest.raises(ValueError, match=r"samples must have shape \(m, 2\)"):
        plot.plot_samples(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"data must have shape \(m, 2\)"):
        plot.plot_samples(good, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        plot.plot_samples(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="kind"):
        plot.plot_samples(good, kind="contour")


# ---------------------------------------------------------------------------- plot_trajectories


def test_plot_trajectories(model):
    n, k = 12, 9
    fig = plot.plot_trajectories(model, n=n, times=k, seed=3)
    lines = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert len(lines) == 1 and len(lines[0].get_segments()) == n * (k - 1)
    # the colours follow time: the segments' values run over (0, T)
    values = lines[0].get_array()
    assert 0.0 < values.min() < values.max() < float(model.T)
    _check_figure(fig, panels=1)


def test_plot_trajectories_with_explicit_times(model):
    fig = plot.plot_trajectories(model, n=5, times=[0.0, 0.3, 0.5], lim=None)
    _check_figure(fig, panels=1)


def test_plot_trajectories_rejects_bad_input(model):
    with pytest.raises(ValueError, match="start at 0"):
        plot.plot_trajectories(model, n=3, times=[0.1, 0.5])
    with pytest.raises(ValueError, match="times"):
        plot.plot_trajectories(model, n=3, times=1)
    with pytest.raises(ValueError, match="increasing"):
        plot.plot_trajectories(model, n=3, times=[0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="n must be"):
        plot.plot_trajectories(model, n=0)
    with pytest.raises(ValueError, match="single cnf.flow.CNF"):
        plot.plot_trajectories(SequentialFlow([model]), n=3)


# ---------------------------------------------------------------------------- animate_flow


def test_animate_flow_writes_a_gif_with_the_frames(model, tmp_path):
    path = plot.animate_flow(model, tmp_path / "flow.gif", frames=4, n=50, grid=8, dpi=30)
    assert path == tmp_path / "flow.gif" and path.is_file()
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 4
    assert plt.get_fignums() == []


def test_animate_flow_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match=r"\.gif"):
        plot.animate_flow(model, tmp_path / "flow.png", frames=2)
    with pytest.raises(ValueError, match="does not exist"):
        plot.animate_flow(model, tmp_path / "missing" / "flow.gif", frames=2)
    with pytest.raises(ValueError, match="frames"):
        plot.animate_flow(model, tmp_path / "flow.gif", frames=1)
    with pytest.raises(ValueError, match="single cnf.flow.CNF"):
        plot.animate_flow(SequentialFlow([model]), tmp_path / "flow.gif")


class _LinearField(nn.Module):
    r""":math:`f(t, z) = a t z`: :math:`z(t) = z(0) e^{a t^2 / 2}`, so :math:`z(t) \sim
    \mathcal{N}(0, e^{a t^2} I)` for a standard normal base. Depends on absolute time."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, t, z):
        return self.a * t * z


def test_intermediate_densities_are_the_flow_restricted_to_0_t():
    a, T = 0.8, 1.5
    flow = CNF(_LinearField(a), (2,), T=T, rtol=1e-8, atol=1e-8)
    points = np.array([[0.0, 0.0], [1.0, -0.5], [2.0, 1.5]])
    for t in (0.0, 0.5, 1.2, T):
        var = math.exp(a * t * t)
        expected = -0.5 * (points**2).sum(1) / var - math.log(2 * math.pi * var)
        got = plot._log_prob_at(flow, t, points, batch=2, solver_kw={})
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_last_frame_density_is_the_model_density(model):
    model.double()
    tight = {"rtol": 1e-9, "atol": 1e-9}
    points = data.sample("8gaussians", 6, seed=0)
    got = plot._log_prob_at(model, float(model.T), points, batch=4, solver_kw=tight)
    with torch.no_grad():
        expected = model.log_prob(torch.as_tensor(points), **tight).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_intermediate_flows_share_the_field_and_the_settings(model):
    # _flow_until rebuilds the model with T = t through public constructor arguments only
    flow = plot._flow_until(model, 0.3)
    assert flow.field is model.field and flow.base is model.base
    assert flow.settings == model.settings and float(flow.T) == pytest.approx(0.3)


def test_plot_imports_no_private_names():
    tree = ast.parse(inspect.getsource(plot))
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom | ast.Import)
        for alias in node.names
    ]
    assert [name for name in imported if name.split(".")[-1].startswith("_")] == []


# ---------------------------------------------------------------------------- plot_curves


def _history(n: int = 10) -> dict:
    return {
        "iteration": list(range(1, n + 1)),
        "loss": list(np.linspace(3.0, 2.0, n)),
        "nfe_forward": [20] * n,
        "nfe_backward": [26] * n,
        "eval_iteration": [1, n],
        "eval_nll": [3.1, 2.1],
        "seconds": [0.1] * n,  # extra keys are ignored
    }


def test_plot_curves():
    _check_figure(plot.plot_curves(_history()), panels=2)


def test_plot_curves_skips_missing_optional_keys():
    history = _history()
    del history["eval_iteration"], history["eval_nll"], history["nfe_backward"]
    _check_figure(plot.plot_curves(history), panels=2)
    del history["nfe_forward"]
    _check_figure(plot.plot_curves(history), panels=1)


@pytest.mark.parametrize("key", ["loss", "nfe_forward", "nfe_backward"])
def test_plot_curves_rejects_mismatched_lengths(key):
    history = _history()
    history[key] = history[key][:-1]
    with pytest.raises(ValueError, match=key):
        plot.plot_curves(history)


def test_plot_curves_rejects_bad_histories():
    history = _history()
    history["eval_nll"] = [3.0]
    with pytest.raises(ValueError, match="eval_nll"):
        plot.plot_curves(history)
    history = _history()
    del history["eval_nll"]
    with pytest.raises(ValueError, match="both or neither"):
        plot.plot_curves(history)
    with pytest.raises(ValueError, match="missing"):
        plot.plot_curves({"iteration": [1, 2]})
    with pytest.raises(ValueError, match="1-D"):
        plot.plot_curves({"iteration": [[1, 2]], "loss": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="numbers"):
        plot.plot_curves({"iteration": [1, 2], "loss": ["a", "b"]})
    with pytest.raises(ValueError, match="mapping"):
        plot.plot_curves([1, 2, 3])


def test_plot_images_grids_samples_beside_reference():
    rng = np.random.default_rng(0)
    fig = plot.plot_images(rng.random((10, 1, 8, 8)), rng.random((12, 1, 8, 8)), ncol=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    # the left panel is a 3 x 4 grid of 8x8 tiles with 1-pixel gaps: 3*9-1 by 4*9-1 pixels
    assert fig.axes[0].images[0].get_array().shape == (26, 35)
    fig.canvas.draw()
    assert isinstance(plot.plot_images(torch.rand(3, 3, 4, 4)), Figure)
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        plot.plot_images(rng.random((3, 8, 8)))
    with pytest.raises(ValueError, match="differ"):
        plot.plot_images(rng.random((3, 1, 8, 8)), rng.random((3, 1, 4, 4)))


# ---------------------------------------------------------------------------- plot_pairs


def _tables(dim: int, m: int = 3000, n: int = 2500) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, data)``: two Gaussian tables of ``dim`` columns with different scales."""
    rng = np.random.default_rng(0)
    scales = np.arange(1, dim + 1, dtype=np.float64)
    return rng.normal(size=(m, dim)) * scales, rng.normal(size=(n, dim)) * scales


@pytest.mark.deadline(60)
@pytest.mark.parametrize(("dim", "shown"), [(1, 1), (2, 2), (5, 5), (9, 6)])
def test_plot_pairs_grids_the_first_columns(dim, shown):
    samples, rows = _tables(dim)
    names = [f"col{i}" for i in range(dim)]
    fig = plot.plot_pairs(samples, rows, columns=names)
    axes = np.array(fig.axes).reshape(shown, shown)
    assert [ax.get_xlabel() for ax in axes[-1]] == names[:shown]  # the bottom row
    title = fig.get_suptitle()
    assert "2500 rows" in title and "3000 samples" in title
    assert (f"the first {shown} of {dim} columns" in title) == (dim > shown)
    if shown == 1:
        assert axes[0, 0].get_ylabel() == "density"
    else:
        assert [ax.get_ylabel() for ax in axes[:, 0]] == names[:shown]  # the left column
        assert "below the diagonal" in title
        # inner panels carry no tick labels: the outer ones say the ranges
        assert not axes[0, 1].xaxis.get_tick_params()["labelbottom"]
        assert not axes[0, 1].yaxis.get_tick_params()["labelleft"]
        assert len(axes[1, 1].get_yticks()) == 0  # a density scale: not shown
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["data", "model"]
    _check_figure(fig, panels=shown * shown)


@pytest.mark.deadline(60)
def test_plot_pairs_marginals_are_densities_on_the_data_ranges():
    samples, rows = _tables(3)
    rows[0, 0] = 1e6  # one far outlier: the quantile ranges ignore it
    fig = plot.plot_pairs(torch.as_tensor(samples), rows, bins=20)  # Rice: 28 for 2500
    axes = np.array(fig.axes).reshape(3, 3)
    for i in range(3):
        steps = axes[i, i].patches
        assert [step.get_label() for step in steps] == ["data", "model"]
        for step in steps:
            values, edges, _ = step.get_data()
            assert len(values) == 20
            assert float((values * np.diff(edges)).sum()) == pytest.approx(1.0)
        # the same range for a column in every panel, data and model alike
        low, high = axes[i, i].get_xlim()
        assert axes[0 if i else 1, i].get_xlim() == (low, high)  # a model panel
        assert axes[2 if i < 2 else 1, i].get_xlim() == (low, high)  # a data panel
        assert -4.0 * (i + 1) < low < -2.0 * (i + 1) and 2.0 * (i + 1) < high < 4.0 * (i + 1)


def test_marginal_histogram_of_values_out_of_range_is_zero():
    density, edges = plot._marginal_histogram(np.array([5.0, 6.0]), (-1.0, 1.0), 4)
    assert density.tolist() == [0.0] * 4 and edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    ranges = plot._column_ranges(np.array([[2.0, 0.0], [2.0, 1.0]]))  # a constant column
    assert ranges[0, 0] < 2.0 < ranges[0, 1] and ranges[1, 0] < 0.0 and ranges[1, 1] > 1.0


@pytest.mark.deadline(60)
def test_plot_pairs_few_points_samples_only_and_scatter():
    samples, _ = _tables(2, m=40)
    fig = plot.plot_pairs(samples)  # no data: the model on both sides
    assert "both sides" in fig.get_suptitle()
    values, _, _ = fig.axes[0].patches[0].get_data()
    assert len(values) == 7  # 40 rows: the Rice rule's ceil(2 * 40^(1/3)) bins, not 50
    assert len(fig.axes[1].collections) == 1 and len(fig.axes[1].images) == 0  # a scatter
    _check_figure(fig, panels=4)
    samples, rows = _tables(2)
    fig = plot.plot_pairs(samples, rows, kind="scatter")
    assert all(len(ax.collections) == 1 for ax in (fig.axes[1], fig.axes[2]))
    fig = plot.plot_pairs(samples, rows, kind="hist")
    assert all(len(ax.images) == 1 for ax in (fig.axes[1], fig.axes[2]))


@pytest.mark.deadline(60)
def test_plot_pairs_rejects_bad_input():
    samples, rows = _tables(3, m=10, n=10)
    bad = {
        "same number of columns": lambda: plot.plot_pairs(samples, rows[:, :2]),
        r"shape \(m, D\)": lambda: plot.plot_pairs(samples[:, 0]),
        "rows of shape": lambda: plot.plot_pairs([["a", "b"]]),
        "NaN or Inf .first at row 2, column 1": lambda: plot.plot_pairs(
            samples, np.where(np.arange(30).reshape(10, 3) == 7, np.nan, rows)
        ),
        "max_columns must be an int >= 1": lambda: plot.plot_pairs(samples, max_columns=0),
        "bins must be an int": lambda: plot.plot_pairs(samples, bins=2.5),
        "2 names for 3 columns": lambda: plot.plot_pairs(samples, columns=["a", "b"]),
        "unknown kind": lambda: plot.plot_pairs(samples, kind="hexbin"),
    }
    for match, call in bad.items():
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="max_columns"):
        plot.plot_pairs(samples, max_columns=True)


@pytest.mark.deadline(60)
def test_cnf_train_on_a_table_draws_pair_plots(tmp_path):
    from cnf.cli import main

    rng = np.random.default_rng(0)
    table = rng.normal(size=(200, 3))
    table[:, 1] += table[:, 0] ** 2
    csv = tmp_path / "table.csv"
    np.savetxt(csv, table, delimiter=",", header="a,b,c", comments="")
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--iters", "2", "--eval-every", "1", "--quiet"]
    assert main([*argv, "--hidden", "8", "--out", str(out)]) == 0
    assert (out / "pairs.png").is_file() and (out / "curves.png").is_file()
    assert not (out / "flow.gif").exists()  # no animation of tables
    with Image.open(out / "pairs.png") as image:
        assert min(image.size) > 500
