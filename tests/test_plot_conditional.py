"""Pictures of conditional flows: densities at several contexts (beside the true ones), and rows of
samples per class label; density_grid's context."""

# ruff: noqa: E402  (the backend is chosen before pyplot is imported)
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; must come before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import cnf
from cnf import plot
from cnf.context import Conditioned, ContextEmbedding
from cnf.data.conditional import conditional_density
from cnf.dense import DenseImageCNF
from cnf.fields import ConcatSquashMLP

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}

pytestmark = pytest.mark.deadline(60)


def _flow(embedding: ContextEmbedding) -> cnf.CNF:
    """A tiny 2-D conditional CNF, weights scaled up so that the context visibly matters."""
    torch.manual_seed(0)
    field = Conditioned(ConcatSquashMLP(2, (8,), context_features=embedding.features), embedding)
    flow = cnf.CNF(field, (2,), T=0.5, **TIGHT).to(F64)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(2.0)
    return flow


@pytest.fixture
def labelled() -> cnf.CNF:
    return _flow(ContextEmbedding(classes=3, features=4))


@pytest.fixture
def vector() -> cnf.CNF:
    return _flow(ContextEmbedding(inputs=1))


def _images(classes=3, alpha=None, shape=(1, 3, 3)) -> DenseImageCNF:
    """A tiny class-conditional image flow; without the logit its samples leave [0, 1]."""
    torch.manual_seed(0)
    context = {"classes": classes, "features": 4}
    return DenseImageCNF(shape, hidden=(8,), alpha=alpha, context=context, **TIGHT).to(F64)


def _rendered(fig, panels: int, tmp_path) -> None:
    """A Figure with ``panels`` axes that saves to a PNG and is not held by pyplot."""
    assert isinstance(fig, Figure)
    assert len(fig.axes) == panels
    path = tmp_path / "figure.png"
    fig.savefig(path, dpi=20)
    assert path.stat().st_size > 0
    assert plt.get_fignums() == []


def _direct_log_prob(model, lim: float, n: int, context: torch.Tensor) -> np.ndarray:
    axis = torch.linspace(-lim, lim, n, dtype=F64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = model.log_prob(points, context=context, trace="exact", **TIGHT)
    return logp.reshape(n, n).numpy()


# ---------------------------------------------------------------------------- density_grid


@pytest.mark.parametrize(
    ("which", "one", "other"),
    [("labelled", torch.tensor(1), torch.tensor(2)), ("vector", torch.tensor([0.5]), None)],
)
def test_density_grid_at_a_context_is_log_prob_at_it_and_contexts_differ(
    which, one, other, request
):
    model = request.getfixturevalue(which)
    other = torch.tensor([-1.0]) if other is None else other
    _, _, logp = plot.density_grid(model, lim=2.0, n=5, batch=7, context=one, **TIGHT)
    np.testing.assert_allclose(logp, _direct_log_prob(model, 2.0, 5, one), rtol=0, atol=1e-8)
    _, _, elsewhere = plot.density_grid(model, lim=2.0, n=5, context=other, **TIGHT)
    assert np.abs(logp - elsewhere).max() > 1e-3


def test_density_grid_casts_a_vector_context_to_the_model_dtype(vector):
    _, _, f32 = plot.density_grid(vector, n=4, context=torch.tensor([0.5], dtype=torch.float32))
    _, _, f64 = plot.density_grid(vector, n=4, context=torch.tensor([0.5], dtype=F64))
    np.testing.assert_array_equal(f32, f64)
    with pytest.raises(ValueError, match="context must be a tensor"):
        plot.density_grid(vector, n=4, context=0.5)


# ---------------------------------------------------------------------------- conditional densities


def test_conditional_densities_draw_one_panel_per_context(vector, tmp_path):
    contexts = [-1, -0.5, 0, 0.5, 1]  # plain numbers, ints among them: vectors of one feature
    fig = plot.plot_conditional_densities(vector, contexts, lim=2.0, n=6, **TIGHT)
    _rendered(fig, 5, tmp_path)
    titles = ["c = -1", "c = -0.5", "c = 0", "c = 0.5", "c = 1"]
    assert [ax.get_title() for ax in fig.axes] == titles
    for ax, c in zip(fig.axes, contexts):
        expected = np.exp(_direct_log_prob(vector, 2.0, 6, torch.tensor([float(c)])))
        np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    ("contexts", "kw", "titles"),
    [
        ([0, 2], {"labels": True}, ["label 0", "label 2"]),
        ([torch.tensor(1), np.int64(2)], {"labels": True}, ["label 1", "label 2"]),
        (torch.arange(3), {}, ["label 0", "label 1", "label 2"]),
    ],
    ids=["ints-as-labels", "tensor-and-numpy-labels", "integer-tensor-rows"],
)
def test_labels_come_from_integer_tensors_or_labels_true(labelled, contexts, kw, titles, tmp_path):
    fig = plot.plot_conditional_densities(labelled, contexts, lim=2.0, n=4, **kw, **TIGHT)
    _rendered(fig, len(titles), tmp_path)
    assert [ax.get_title() for ax in fig.axes] == titles
    last = np.exp(_direct_log_prob(labelled, 2.0, 4, torch.tensor(int(titles[-1][-1]))))
    np.testing.assert_allclose(fig.axes[-1].images[0].get_array(), last, rtol=1e-7, atol=0)


def test_vector_contexts_as_tensor_rows_and_custom_titles(tmp_path):
    model = _flow(ContextEmbedding(inputs=2))
    contexts = torch.tensor([[0.5, 1.0], [-1.0, 0.0]])
    fig = plot.plot_conditional_densities(model, contexts, lim=2.0, n=4, **TIGHT)
    assert [ax.get_title() for ax in fig.axes] == ["c = (0.5, 1)", "c = (-1, 0)"]
    expected = np.exp(_direct_log_prob(model, 2.0, 4, contexts[1].double()))
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), expected, rtol=1e-7, atol=0)
    fig = plot.plot_conditional_densities(
        model, contexts, lim=2.0, n=4, titles=["first", "second"], **TIGHT
    )
    _rendered(fig, 2, tmp_path)
    assert [ax.get_title() for ax in fig.axes] == ["first", "second"]


def test_the_true_row_is_the_closed_form_density_on_each_columns_scale(vector, tmp_path):
    truth = conditional_density("rotating")
    contexts, lim, n = [-0.5, 0.5], 3.0, 7
    fig = plot.plot_conditional_densities(
        vector, contexts, true_density=truth, lim=lim, n=n, **TIGHT
    )
    _rendered(fig, 4, tmp_path)
    top, bottom = fig.axes[:2], fig.axes[2:]  # subplots are added row by row
    axis = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(axis, axis)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    for j, c in enumerate(contexts):
        expected = np.exp(truth.log_density(points, c)).reshape(n, n)
        np.testing.assert_allclose(bottom[j].images[0].get_array(), expected, rtol=1e-12)
        model = np.exp(_direct_log_prob(vector, lim, n, torch.tensor([c])))
        np.testing.assert_allclose(top[j].images[0].get_array(), model, rtol=1e-7, atol=0)
        vmax = max(expected.max(), model.max())
        assert top[j].images[0].get_clim() == pytest.approx((0.0, vmax))
        assert bottom[j].images[0].get_clim() == pytest.approx((0.0, vmax))
        assert bottom[j].get_title() == top[j].get_title() == f"c = {c:g}"
    assert top[0].get_ylabel() == "model density" and bottom[0].get_ylabel() == "true density"


def test_the_true_density_receives_a_context_per_point(labelled):
    seen = []

    class Recorder:
        def log_density(self, x, c):
            seen.append((x.shape, np.asarray(c).shape, np.unique(c).tolist()))
            return np.zeros(len(x))

    plot.plot_conditional_densities(labelled, [2], labels=True, true_density=Recorder(), n=3)
    assert seen == [((9, 2), (9,), [2])]


@pytest.mark.parametrize(
    ("contexts", "kw", "match"),
    [
        ([], {}, "contexts is empty"),
        (torch.empty(0), {}, "contexts is empty"),
        (0.5, {}, "sequence of contexts"),
        ("c", {}, "sequence of contexts"),
        (torch.zeros(2, 1, 1), {}, r"shape \(k,\) or \(k, C\)"),
        ([0.5], {"labels": True}, "must be an int label"),
        ([True], {}, "not the bool"),
        (["a"], {}, "number, a tensor or an array"),
        ([torch.tensor([1, 2])], {}, "one integer"),
        ([torch.zeros(2, 1)], {}, r"vector context has shape \(C,\)"),
        ([torch.tensor(True)], {}, "integers .a label. or real numbers"),
        ([0.5, 1.0], {"titles": ["one"]}, "2 strings"),
        ([0.5], {"true_density": object()}, "log_density"),
        ([0.5], {"n": 1}, "n must be"),
        ([0.5], {"lim": -1.0}, "lim"),
    ],
)
def test_bad_contexts_and_options_are_refused(vector, contexts, kw, match):
    with pytest.raises(ValueError, match=match):
        plot.plot_conditional_densities(vector, contexts, **kw)


def test_conditional_densities_need_a_2d_flow():
    with pytest.raises(ValueError, match=r"event_shape must be \(2,\)"):
        plot.plot_conditional_densities(_images(), [0], labels=True)
    with pytest.raises(ValueError, match="cnf.flow.Flow"):
        plot.plot_conditional_densities(torch.nn.Linear(2, 2), [0.5])


def test_a_true_density_of_the_wrong_shape_is_refused(vector):
    class Flat:
        def log_density(self, x, c):
            return np.zeros(3)

    with pytest.raises(ValueError, match=r"to \(m,\)"):
        plot.plot_conditional_densities(vector, [0.5], true_density=Flat(), n=3)


# ---------------------------------------------------------------------------- class samples


def _tiled(images: np.ndarray) -> np.ndarray:
    """One row of ``(k, C, H, W)`` images with 1-pixel white gaps: ``(H, k (W + 1) - 1[, C])``."""
    k, c, h, w = images.shape
    canvas = np.ones((h, k * (w + 1) - 1, c))
    for i in range(k):
        canvas[:, i * (w + 1) : i * (w + 1) + w] = images[i].transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas


def test_class_rows_are_the_seeded_samples_per_label_clipped(tmp_path):
    model = _images()  # no logit: the samples leave [0, 1], so the clipping shows
    labels, per_class = [2, 0], 4
    fig = plot.plot_class_samples(
        model, labels, per_class=per_class, generator=torch.Generator().manual_seed(3)
    )
    _rendered(fig, 2, tmp_path)
    generator = torch.Generator().manual_seed(3)  # the rows draw from it in turn
    clipped = False
    for ax, label in zip(fig.axes, labels):
        with torch.no_grad():
            x = model.sample(per_class, context=torch.tensor(label), generator=generator)
        x = x.numpy()
        clipped |= bool((x < 0).any() or (x > 1).any())
        expected = _tiled(np.clip(x, 0.0, 1.0))
        np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=0, atol=1e-8)
        assert ax.get_ylabel() == f"label {label}"
    assert clipped


def test_class_samples_of_k_classes_in_colour_with_titles(tmp_path):
    model = _images(classes=3, alpha=0.05, shape=(3, 2, 2))
    fig = plot.plot_class_samples(model, 3, per_class=2, titles=["cat", "dog", "owl"])
    _rendered(fig, 3, tmp_path)
    assert [ax.get_ylabel() for ax in fig.axes] == ["cat", "dog", "owl"]
    assert fig.axes[0].images[0].get_array().shape == (2, 5, 3)
    fig = plot.plot_class_samples(model, torch.tensor([1]), per_class=1)
    _rendered(fig, 1, tmp_path)
    assert fig.axes[0].get_ylabel() == "label 1"


@pytest.mark.parametrize(
    ("classes", "kw", "match"),
    [
        (0, {}, "classes must be an int >= 1"),
        ([], {}, "classes is empty"),
        ("abc", {}, "int K or a sequence"),
        ([1.5], {}, "ints >= 0"),
        ([True], {}, "ints >= 0"),
        ([-1], {}, "ints >= 0"),
        (torch.tensor(2), {}, "1-D labels"),
        (2, {"per_class": 0}, "per_class must be an int >= 1"),
        (2, {"per_class": 2.0}, "per_class must be an int >= 1"),
        (2, {"titles": ["one"]}, "2 strings"),
        ([5], {}, "outside"),  # the model's own check of the label range
    ],
)
def test_bad_classes_and_options_are_refused(classes, kw, match):
    with pytest.raises(ValueError, match=match):
        plot.plot_class_samples(_images(), classes, **kw)


def test_class_samples_need_a_flow_of_images(labelled):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        plot.plot_class_samples(labelled, 3)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        plot.plot_class_samples(_images(shape=(2, 2, 2)), 3)
    with pytest.raises(ValueError, match="Flow of images"):
        plot.plot_class_samples(torch.nn.Linear(2, 2), 3)
