r"""Pictures of 2-D flows: densities, samples, trajectories, an animation, training curves;
pair plots of tables; conditional flows: densities at several contexts
(:func:`plot_conditional_densities`), samples per class of image flows
(:func:`plot_class_samples`).

Every function returns a :class:`matplotlib.figure.Figure` (except :func:`animate_flow`, which
writes a GIF and returns its path). The figures are built with the object-oriented API and are
**not registered with pyplot**: nothing global is touched, there is nothing to close, a figure
is freed when it is no longer referenced, and everything works headless (no display, any
backend). Save one with ``fig.savefig("density.png")``; in a notebook, a returned figure is
displayed as usual. (``plt.close(fig)`` is harmless but not needed.)

The model is a :class:`cnf.flow.Flow` on :math:`\mathbb{R}^2` (``event_shape == (2,)``); the
trajectory pictures and the animation need a single :class:`cnf.flow.CNF`, whose time runs from
the base (:math:`t = 0`) to the data (:math:`t = T`). Model evaluations run under
:func:`torch.no_grad` in the model's dtype and on its device; keyword arguments that are not
plotting options are per-call solver settings (``rtol``, ``atol``, ``method``, ...; see
:class:`cnf.flow.Flow`).

Densities are computed with the **exact** trace by default (``trace="exact"`` in the
signatures): the Hutchinson estimator draws its own noise per point, so a heatmap of it is
speckled. Pass ``trace="hutchinson"`` to see what a training loss sees.

Costs, measured on one CPU thread for ``ConcatSquashMLP(2, hidden=(16, 16))``, dopri5 at 1e-5,
untrained (a trained model takes a few times more solver steps): :func:`density_grid` on the
default 200 x 200 grid about 0.4 s (64-64-64 field: 1.5-2.5 s); :func:`animate_flow` with its
defaults about 1 s (64-64-64: about 2 s), most of it drawing the frames.

Example:
    >>> from cnf.fields import ConcatSquashMLP
    >>> from cnf.flow import CNF
    >>> model = CNF(ConcatSquashMLP(2, hidden=(16, 16)), (2,))
    >>> fig = plot_density(model, n=20)
    >>> fig.savefig("/tmp/density.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.animation import PillowWriter
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from .flow import CNF, Flow, StandardNormal
from .ode._problem import positive
from .settings import check_choice
from .training.sampling import place_context

__all__ = [
    "animate_flow",
    "density_grid",
    "plot_class_samples",
    "plot_conditional_densities",
    "plot_curves",
    "plot_density",
    "plot_images",
    "plot_pairs",
    "plot_samples",
    "plot_trajectories",
]

_PANEL = 4.0  # inches per square panel


# ---------------------------------------------------------------------------- validation


def _check_model(model, need_cnf: bool = False) -> Flow:
    kind = CNF if need_cnf else Flow
    if not isinstance(model, kind):
        what = "a single cnf.flow.CNF" if need_cnf else "a cnf.flow.Flow (e.g. a CNF)"
        raise ValueError(f"model must be {what}, got {type(model).__name__}")
    if tuple(model.event_shape) != (2,):
        raise ValueError(
            f"these pictures are of 2-D densities: model.event_shape must be (2,), "
            f"got {tuple(model.event_shape)}"
        )
    return model


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _as_points(x, name: str) -> np.ndarray:
    """``x`` (tensor or array-like) as a float64 numpy array of shape ``(m, 2)``, checked."""
    if isinstance(x, str):
        raise ValueError(
            f"{name} must be points of shape (m, 2), got the string {x!r}; for a toy data set "
            f"pass cnf.data.sample(name, m, seed) (or cnf.data.density(name) to plot_density)"
        )
    return _as_rows(x, name, width=2)


def _dtype_device(model: Flow) -> tuple[torch.dtype, torch.device]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


# ---------------------------------------------------------------------------- computations


def _grid(lim: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nodes ``linspace(-lim, lim, n)`` per axis as ``xx``, ``yy`` and points ``(n * n, 2)``."""
    axis = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(axis, axis)  # xx[i, j] = axis[j], yy[i, j] = axis[i]
    return xx, yy, np.stack([xx.ravel(), yy.ravel()], axis=1)


def _on_model(context: Tensor | None, model: Flow) -> Tensor | None:
    """``context`` on the model's device, real numbers in its dtype (labels stay integers)."""
    if context is None:
        return None
    if not isinstance(context, Tensor):
        raise ValueError(f"context must be a tensor or None, got {type(context).__name__}")
    return place_context(context, *_dtype_device(model))


def _log_prob(
    model: Flow, points: np.ndarray, batch: int, solver_kw: dict, context: Tensor | None = None
) -> np.ndarray:
    """``log p`` of ``points`` ``(m, 2)`` in chunks of ``batch``; one ``context`` for all."""
    dtype, device = _dtype_device(model)
    x = torch.as_tensor(points, dtype=dtype, device=device)
    kw = solver_kw if context is None else {**solver_kw, "context": _on_model(context, model)}
    with torch.no_grad():
        logp = torch.cat([model.log_prob(chunk, **kw) for chunk in x.split(batch)])
    return logp.double().cpu().numpy()


def density_grid(
    model: Flow,
    lim: float = 4.0,
    n: int = 200,
    batch: int = 8192,
    *,
    trace: str = "exact",
    context: Tensor | None = None,
    **solver_kw,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The model's log-density on a regular ``n x n`` grid over :math:`[-lim, lim]^2`.

    The grid nodes are ``np.linspace(-lim, lim, n)`` along each axis, so
    ``np.exp(logp).sum() * (2 * lim / (n - 1)) ** 2`` approximates
    :math:`\int p(x)\,dx` over the square (about 1 when the square holds the mass). For a
    conditional flow, ``context`` gives :math:`\log p(x \mid c)` at one context for the whole
    grid.

    Args:
        model: a :class:`cnf.flow.Flow` with ``event_shape == (2,)``.
        lim: half-width of the square, > 0.
        n: nodes per axis, >= 2.
        batch: points per call of ``model.log_prob`` (bounds memory), >= 1.
        trace: the trace estimator; exact by default (see the module docstring).
        context: None (an unconditional flow), or one context broadcast to every grid point,
            as ``model.log_prob(x, context=...)`` takes it: a 0-dim integer tensor (a label) or
            a ``(C,)`` vector tensor (moved to the model's device, real numbers cast to its
            dtype).
        **solver_kw: other per-call solver settings, e.g. ``rtol=1e-5, atol=1e-5``.

    Returns:
        ``(xx, yy, logp)``, float64 numpy arrays of shape ``(n, n)``: ``xx[i, j]`` and
        ``yy[i, j]`` are the coordinates of node ``(i, j)`` (``np.meshgrid`` order, ``y`` along
        rows) and ``logp[i, j]`` is :math:`\log p` there.

    Raises:
        ValueError: for a model that is not a 2-D flow, a bad ``lim``, ``n`` or ``batch``, or
            a context that is not a tensor (the model checks the rest).
    """
    _check_model(model)
    lim = positive("lim", lim)
    n = _check_int("n", n, 2)
    batch = _check_int("batch", batch, 1)
    xx, yy, points = _grid(lim, n)
    logp = _log_prob(model, points, batch, {"trace": trace, **solver_kw}, context)
    return xx, yy, logp.reshape(n, n)


def _base_points(model: Flow, n: int, seed: int) -> Tensor:
    """``n`` base points, reproducible from ``seed`` without touching the global RNG."""
    dtype, device = _dtype_device(model)
    if isinstance(model.base, StandardNormal):
        generator = torch.Generator(device=device).manual_seed(seed)
        return model.base.sample((n,), generator=generator)
    # torch.distributions take no generator: seed a forked global RNG instead.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model.base.sample((n,)).to(dtype=dtype, device=device)


def _times(model: CNF, times) -> Tensor:
    """Frame/plot times: an int ``k`` means ``k`` equal steps' nodes from 0 to T."""
    dtype, device = _dtype_device(model)
    T = float(model.T.detach())
    if isinstance(times, int | np.integer) and not isinstance(times, bool):
        k = _check_int("times", times, 2)
        return torch.linspace(0.0, T, k, dtype=dtype, device=device)
    try:
        t = torch.as_tensor(times, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"times must be an int >= 2 or a 1-D sequence of times: {err}") from None
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            f"times must be an int >= 2 or a 1-D sequence of at least two times, "
            f"got shape {tuple(t.shape)}"
        )
    if abs(float(t[0])) > 1e-12:
        raise ValueError(
            f"times must start at 0 (the base), got times[0] = {float(t[0]):g}; "
            f"e.g. torch.linspace(0, model.T, 50)"
        )
    return t  # the rest (increasing, within [0, T]) is checked by model.trajectory


def _flow_until(model: CNF, t: float) -> CNF:
    """The flow restricted to ``[0, t]``: same field (absolute time), same base and settings.

    The field's time argument is absolute (the CNF integrates it from 0 to T), so a CNF with
    ``T = t`` sharing the field maps the base to the distribution of ``z(t)``.
    """
    _, device = _dtype_device(model)
    flow = CNF(model.field, model.event_shape, T=t, base=model.base, settings=model.settings)
    return flow.to(device=device)


def _log_prob_at(
    model: CNF, t: float, points: np.ndarray, batch: int, solver_kw: dict
) -> np.ndarray:
    r""":math:`\log p_t` of ``points``, the density of :math:`z(t)`, base at t = 0."""
    if t <= 0.0:
        dtype, device = _dtype_device(model)
        x = torch.as_tensor(points, dtype=dtype, device=device)
        with torch.no_grad():
            return model.base.log_prob(x).double().cpu().numpy()
    return _log_prob(_flow_until(model, t), points, batch, solver_kw)


def _paths(
    model: CNF, n: int, times, seed: int, solver_kw: dict, **pinned
) -> tuple[np.ndarray, np.ndarray]:
    """The states ``(k, n, 2)`` of ``n`` seeded base points at the ``k`` times, and the times.

    ``pinned`` holds the caller's own trajectory options; ``model.trajectory`` receives them
    beside ``solver_kw`` and rejects a key given in both.
    """
    t = _times(model, times)
    z0 = _base_points(model, n, seed)
    with torch.no_grad():
        path = model.trajectory(z0, t, **pinned, **solver_kw)
    return path.double().cpu().numpy(), t.double().cpu().numpy()


# ---------------------------------------------------------------------------- drawing


def _new_figure(
    panels: int, height: float = _PANEL, extra_width: float = 0.0, square: bool = True
) -> Figure:
    # "compressed" is the constrained layout made for fixed-aspect axes; plain "constrained"
    # leaves the titles of square panels partly outside the figure.
    layout = "compressed" if square else "constrained"
    return Figure(figsize=(panels * _PANEL + extra_width, height), layout=layout)


def _square(ax, lim: float | None, title: str) -> None:
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)


def _image(ax, values: np.ndarray, lim: float, cmap: str, title: str):
    """``values[i, j]`` at grid node ``(x_j, y_i)``, nodes ``linspace(-lim, lim, n)``."""
    half = lim / (values.shape[0] - 1)  # half a cell: pixels are centred on the nodes
    extent = (-lim - half, lim + half, -lim - half, lim + half)
    image = ax.imshow(
        values, origin="lower", extent=extent, cmap=cmap, interpolation="nearest", aspect="equal"
    )
    _square(ax, lim, title)
    return image


def _histogram(ax, points: np.ndarray, lim: float, bins: int, cmap: str, title: str) -> None:
    counts, _, _ = np.histogram2d(
        points[:, 0], points[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]], density=True
    )
    ax.imshow(
        counts.T,  # histogram2d puts x along rows
        origin="lower",
        extent=(-lim, lim, -lim, lim),
        cmap=cmap,
        interpolation="nearest",
        aspect="equal",
    )
    _square(ax, lim, title)


def _points_panel(
    ax, points: np.ndarray, kind: str, lim: float, bins: int, cmap: str, title: str
) -> None:
    if kind == "hist":
        _histogram(ax, points, lim, bins, cmap, title)
    else:
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, linewidths=0, rasterized=True)
        _square(ax, lim, title)


def _density_inputs(data, bins, true_density) -> tuple[np.ndarray | None, int]:
    """``data`` as checked points (or None) and ``bins``; ``true_density`` must have a method."""
    if data is not None and callable(getattr(data, "log_density", None)):
        raise ValueError("data is for points; pass a closed-form density as true_density=...")
    data = None if data is None else _as_points(data, "data")
    bins = _check_int("bins", bins, 1)
    if true_density is not None and not callable(getattr(true_density, "log_density", None)):
        raise ValueError(
            f"true_density must have a log_density(points) method (e.g. "
            f"cnf.data.density(name)), got {type(true_density).__name__}"
        )
    return data, bins


def _true_log_density(true_density, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """The closed-form log-density at the grid nodes, shape ``xx.shape``, checked."""
    truth = np.asarray(true_density.log_density(np.stack([xx, yy], axis=-1)), np.float64)
    if truth.shape != xx.shape:
        raise ValueError(
            f"true_density.log_density must map points of shape (..., 2) to (...), "
            f"got shape {truth.shape} for a grid of shape {(*xx.shape, 2)}"
        )
    return truth


def _density_figure(data, truth, logp, lim: float, bins: int, cmap: str) -> Figure:
    """Left to right: the data histogram and the true density (when given), the model density."""
    panels = 1 + (data is not None) + (truth is not None)
    fig = _new_figure(panels)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if data is not None:
        _histogram(axes.pop(0), data, lim, bins, cmap, f"data ({len(data)} samples)")
    if truth is not None:
        _image(axes.pop(0), np.exp(truth), lim, cmap, "true density")
    _image(axes.pop(0), np.exp(logp), lim, cmap, "model density")
    return fig


def plot_density(
    model: Flow,
    data=None,
    *,
    true_density=None,
    lim: float = 4.0,
    n: int = 200,
    batch: int = 8192,
    bins: int = 100,
    cmap: str = "viridis",
    trace: str = "exact",
    **solver_kw,
) -> Figure:
    r"""The data next to the model density :math:`p(x)`, as heatmaps side by side.

    Panels, left to right, each drawn when its input is given: a normalised 2-D histogram of
    ``data``, the closed-form ``true_density``, the model density (always).

    Args:
        model: a :class:`cnf.flow.Flow` with ``event_shape == (2,)``.
        data: None, or data points of shape ``(m, 2)`` (tensor or array), drawn as a histogram
            with ``bins`` bins per axis.
        true_density: None, or an object with a closed-form ``log_density(points) -> log p``
            mapping ``(..., 2)`` to ``(...)``, e.g. ``cnf.data.density("8gaussians")``; drawn
            on the model's grid.
        lim: the square :math:`[-lim, lim]^2` shown.
        n: grid nodes per axis for the densities (cost grows as ``n**2``).
        batch: points per call of ``model.log_prob``.
        bins: histogram bins per axis.
        cmap: a matplotlib colormap name.
        trace: the trace estimator; exact by default.
        **solver_kw: other per-call solver settings.

    Returns:
        A figure with one to three square panels (not managed by pyplot; nothing to close).

    Raises:
        ValueError: for a model that is not a 2-D flow, ``data`` not of shape ``(m, 2)``, a
            ``true_density`` without a working ``log_density``, or bad sizes.
    """
    data, bins = _density_inputs(data, bins, true_density)
    xx, yy, logp = density_grid(model, lim, n, batch, trace=trace, **solver_kw)
    truth = None if true_density is None else _true_log_density(true_density, xx, yy)
    return _density_figure(data, truth, logp, lim, bins, cmap)


def plot_samples(
    samples,
    data=None,
    *,
    lim: float = 4.0,
    kind: str = "hist",
    bins: int = 100,
    cmap: str = "viridis",
) -> Figure:
    """Model samples (right), next to data points (left) if given.

    Args:
        samples: model samples of shape ``(m, 2)`` (tensor or array), e.g. ``model.sample(m)``.
        data: None, or data points of shape ``(k, 2)``.
        lim: the square :math:`[-lim, lim]^2` shown (points outside are not drawn).
        kind: ``"hist"`` (a normalised 2-D histogram, ``bins`` per axis; good for many points)
            or ``"scatter"``.
        bins: histogram bins per axis.
        cmap: colormap of the histograms.

    Returns:
        A figure with one or two square panels (not managed by pyplot; nothing to close).

    Raises:
        ValueError: for points not of shape ``(m, 2)`` or not finite, or a bad option.
    """
    samples = _as_points(samples, "samples")
    data = None if data is None else _as_points(data, "data")
    lim = positive("lim", lim)
    check_choice("kind", kind, ("hist", "scatter"))
    bins = _check_int("bins", bins, 1)

    fig = _new_figure(1 if data is None else 2)
    axes = fig.subplots(1, 1 if data is None else 2, squeeze=False)[0]
    if data is not None:
        _points_panel(axes[0], data, kind, lim, bins, cmap, f"data ({len(data)} points)")
    _points_panel(axes[-1], samples, kind, lim, bins, cmap, f"model ({len(samples)} samples)")
    return fig


# ---------------------------------------------------------------------------- conditional densities


def _one_context(item, labels: bool, model: Flow) -> Tensor:
    """One entry of ``contexts`` as the tensor ``log_prob`` broadcasts: a 0-dim long label or a
    ``(C,)`` vector in the model's dtype (the rule is in :func:`plot_conditional_densities`)."""
    if isinstance(item, bool | np.bool_):
        raise ValueError(f"a context must be a number or a tensor, not the bool {item!r}")
    if isinstance(item, int | np.integer | float | np.floating):
        if labels and not isinstance(item, int | np.integer):
            raise ValueError(f"labels=True: every context must be an int label, got {item!r}")
        item = torch.tensor(int(item)) if labels else torch.tensor([float(item)])
    elif not isinstance(item, Tensor | np.ndarray):
        raise ValueError(
            f"a context must be a number, a tensor or an array, got {type(item).__name__}"
        )
    c = torch.as_tensor(item)
    if c.dtype == torch.bool or c.is_complex():
        raise ValueError(f"a context must be integers (a label) or real numbers, got {c.dtype}")
    if not c.is_floating_point():
        if c.dim() != 0:
            raise ValueError(f"a label context is one integer (0-dim), got shape {tuple(c.shape)}")
        return _on_model(c.long(), model)
    if c.dim() > 1:
        raise ValueError(f"a vector context has shape (C,), got shape {tuple(c.shape)}")
    return _on_model(c.reshape(-1), model)


def _contexts(contexts, labels: bool, model: Flow) -> list[Tensor]:
    """``contexts`` as a non-empty list of single contexts (tensor rows, or list entries)."""
    if isinstance(contexts, str) or not isinstance(contexts, Sequence | Tensor | np.ndarray):
        raise ValueError(
            f"contexts must be a sequence of contexts or a tensor of shape (k,) or (k, C), got "
            f"{type(contexts).__name__}; for one context pass a list of one"
        )
    if isinstance(contexts, Tensor | np.ndarray) and np.ndim(contexts) not in (1, 2):
        raise ValueError(
            f"a tensor of contexts must have shape (k,) or (k, C), got {tuple(contexts.shape)}"
        )
    if len(contexts) == 0:
        raise ValueError("contexts is empty: give at least one context to draw")
    return [_one_context(item, labels, model) for item in contexts]


def _context_title(c: Tensor) -> str:
    """``"label 3"``, ``"c = 0.5"`` or ``"c = (0.5, 1)"``."""
    if not c.is_floating_point():
        return f"label {int(c)}"
    values = [f"{v:g}" for v in c.tolist()]
    return f"c = {values[0]}" if len(values) == 1 else f"c = ({', '.join(values)})"


def _titles(titles, k: int, default: list[str]) -> list[str]:
    """``titles`` as ``k`` strings (one per panel or row); None: ``default``."""
    if titles is None:
        return default
    if isinstance(titles, str) or not isinstance(titles, Sequence) or len(titles) != k:
        raise ValueError(f"titles must be a sequence of {k} strings, one each, got {titles!r}")
    return [str(title) for title in titles]


def _true_conditional_log_density(true_density, points: np.ndarray, c: Tensor) -> np.ndarray:
    """``true_density.log_density(points, contexts)`` at one context given to every point:
    labels as ``(m,)`` integers, vectors as ``(m, C)`` rows; checked to be ``(m,)``."""
    m, value = len(points), c.detach().cpu().numpy()
    rows = np.full(m, int(value)) if value.ndim == 0 else np.tile(value.astype(np.float64), (m, 1))
    truth = np.asarray(true_density.log_density(points, rows), np.float64)
    if truth.shape != (m,):
        raise ValueError(
            f"true_density.log_density must map points (m, 2) and contexts to (m,), got shape "
            f"{truth.shape} for m = {m}"
        )
    return truth


def _check_conditional_truth(true_density) -> None:
    if true_density is not None and not callable(getattr(true_density, "log_density", None)):
        raise ValueError(
            f"true_density must have a log_density(points, contexts) method (e.g. "
            f"cnf.data.conditional_density(name)), got {type(true_density).__name__}"
        )


def _true_densities(true_density, cs: list[Tensor], lim: float, n: int) -> list[np.ndarray]:
    """The closed-form density on the ``n x n`` grid at each context, ``(n, n)`` each."""
    points = _grid(lim, n)[2]
    logs = [_true_conditional_log_density(true_density, points, c) for c in cs]
    return [np.exp(log_density).reshape(n, n) for log_density in logs]


def _conditional_figure(models: list, truths: list | None, lim: float, titles: list[str]):
    """A row of model densities, above a row of true densities sharing each column's scale."""
    k, rows = len(models), 1 if truths is None else 2
    fig = _new_figure(k, height=_PANEL * rows)
    axes = fig.subplots(rows, k, squeeze=False)
    for j in range(k):
        image = _image(axes[0, j], models[j], lim, "viridis", titles[j])
        if truths is not None:
            truth = _image(axes[1, j], truths[j], lim, "viridis", titles[j])
            vmax = max(float(models[j].max()), float(truths[j].max()), 1e-300)
            image.set_clim(0.0, vmax)
            truth.set_clim(0.0, vmax)
    if truths is not None:
        axes[0, 0].set_ylabel("model density")
        axes[1, 0].set_ylabel("true density")
    return fig


def plot_conditional_densities(
    model: Flow,
    contexts,
    *,
    true_density=None,
    labels: bool = False,
    lim: float = 4.0,
    n: int = 200,
    batch: int = 8192,
    trace: str = "exact",
    titles: Sequence[str] | None = None,
    **solver_kw,
) -> Figure:
    r"""The conditional density :math:`p(x \mid c)` of a 2-D flow at several contexts, in a row.

    Panel ``j`` is ``exp`` of :func:`density_grid` with ``context=contexts[j]``, one context for
    the whole grid; with ``true_density`` a second row draws the closed-form density at the same
    contexts, each column's two panels on one colour scale from 0 (the model row alone: each
    panel on its own scale).

    Args:
        model: a conditional :class:`cnf.flow.Flow` with ``event_shape == (2,)``.
        contexts: ``k >= 1`` contexts, each one turned into a tensor by one rule:

            * a tensor or array is taken by its dtype: integers are a label (0-dim only), real
              numbers a vector ``(C,)`` (a 0-dim one is a vector of one feature);
            * a plain number is a vector of one feature (``0.5`` gives ``tensor([0.5])``) ...
            * ... unless ``labels=True``: then it is a label (an int; a float is refused).

            Given as a list (e.g. ``[-1, -0.5, 0, 0.5, 1]``, ``[torch.tensor(3)]``), or as a
            tensor whose rows are the contexts: ``(k,)`` (e.g. ``torch.arange(3)``: labels;
            ``torch.linspace(-1, 1, 5)``: vectors of one feature) or ``(k, C)``.
        true_density: None, or an object with ``log_density(points, contexts)`` taking points
            ``(m, 2)`` and a context per point (labels ``(m,)``, vectors ``(m, C)``) and
            returning ``(m,)``, e.g. ``cnf.data.conditional_density("rotating")``.
        labels: read plain numbers in ``contexts`` as class labels.
        lim, n, batch, trace: the square, grid nodes per axis, points per solve and trace
            estimator of :func:`density_grid`.
        titles: a title per context; default ``"label 3"``, ``"c = 0.5"``, ``"c = (0.5, 1)"``.
        **solver_kw: other per-call solver settings.

    Returns:
        A figure of ``k`` (or ``2 k`` with ``true_density``) square panels.

    Raises:
        ValueError: for a model that is not a 2-D flow, empty or malformed ``contexts``, a
            ``true_density`` without ``log_density``, wrong titles or bad sizes.
    """
    _check_model(model)
    lim, n = positive("lim", lim), _check_int("n", n, 2)
    cs = _contexts(contexts, labels, model)
    titles = _titles(titles, len(cs), [_context_title(c) for c in cs])
    _check_conditional_truth(true_density)
    kw = {"trace": trace, **solver_kw}
    models = [np.exp(density_grid(model, lim, n, batch, context=c, **kw)[2]) for c in cs]
    truths = None if true_density is None else _true_densities(true_density, cs, lim, n)
    return _conditional_figure(models, truths, lim, titles)


def _time_segments(path: np.ndarray, t: np.ndarray, cmap: str) -> LineCollection:
    """The paths ``(k, n, 2)`` as line segments, each valued at its midpoint time."""
    # segment s of path i joins path[s, i] and path[s + 1, i]
    segments = np.stack([path[:-1], path[1:]], axis=2).transpose(1, 0, 2, 3).reshape(-1, 2, 2)
    lines = LineCollection(
        segments, cmap=cmap, norm=Normalize(t[0], t[-1]), linewidths=0.8, alpha=0.8
    )
    lines.set_array(np.tile(0.5 * (t[:-1] + t[1:]), path.shape[1]))
    return lines


def _trajectory_figure(path: np.ndarray, t: np.ndarray, lim: float | None, cmap: str) -> Figure:
    """One panel of the paths ``(k, n, 2)`` coloured by time, their ends marked, a colorbar."""
    fig = _new_figure(1, extra_width=0.8)
    ax = fig.subplots()
    lines = _time_segments(path, t, cmap)
    ax.add_collection(lines)
    colors = lines.get_cmap()([0.0, 1.0])
    marker = {"edgecolors": "k", "linewidths": 0.4, "zorder": 3}
    ax.scatter(*path[0].T, s=12, color=colors[0], label="t = 0 (base)", **marker)
    ax.scatter(*path[-1].T, s=18, color=colors[1], marker="X", label=f"t = {t[-1]:.3g}", **marker)
    if lim is None:
        ax.autoscale_view()
    _square(ax, lim, f"trajectories of {path.shape[1]} points")
    ax.legend(loc="upper right", fontsize="small")
    fig.colorbar(lines, ax=ax, label="t")
    return fig


def plot_trajectories(
    model: CNF,
    *,
    n: int = 100,
    times: int | Sequence[float] | Tensor = 50,
    seed: int = 0,
    lim: float | None = 4.0,
    cmap: str = "viridis",
    **solver_kw,
) -> Figure:
    r"""Paths :math:`t \mapsto z(t)` carrying base points to samples, coloured by time.

    ``n`` base points :math:`z(0)` (drawn from ``model.base`` with ``seed``) are integrated
    through ``times`` with :meth:`cnf.flow.CNF.trajectory`; each path is drawn as line segments
    coloured by their time, with the base points (circles) and the end points (crosses).

    Args:
        model: a :class:`cnf.flow.CNF` with ``event_shape == (2,)``.
        n: number of paths.
        times: an int ``k >= 2`` for ``k`` equally spaced times from 0 to ``T``, or increasing
            times in ``[0, T]`` starting at 0.
        seed: seed of the base points (the global RNG is left alone).
        lim: the square :math:`[-lim, lim]^2` shown, or None to fit the paths.
        cmap: colormap of time.
        **solver_kw: per-call solver settings.

    Returns:
        A figure with one panel and a time colorbar (not managed by pyplot; nothing to close).

    Raises:
        ValueError: for a model that is not a 2-D CNF, bad ``n``, ``times``, ``seed`` or ``lim``.
    """
    _check_model(model, need_cnf=True)
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    if lim is not None:
        lim = positive("lim", lim)
    path, t = _paths(model, n, times, seed, solver_kw, direction="generative")
    return _trajectory_figure(path, t, lim, cmap)


def _gif_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, checked: a ``.gif`` name in a folder that exists."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif (the animation is a GIF), got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"the folder {str(path.parent)!r} does not exist; create it first")
    return path


def _frame_densities(model: CNF, t: np.ndarray, lim: float, grid: int, batch: int, kw: dict):
    """Yield the density of :math:`z(t_k)` on the ``grid x grid`` nodes, one frame at a time."""
    _, _, points = _grid(lim, grid)
    for t_k in t:
        yield np.exp(_log_prob_at(model, float(t_k), points, batch, kw)).reshape(grid, grid)


def _animation_figure(first: np.ndarray, lim: float, grid: int, cmap: str):
    """The samples and density panels, laid out once: ``(fig, scatter, image, title)``."""
    fig = _new_figure(2)
    ax_samples, ax_density = fig.subplots(1, 2)
    scatter = ax_samples.scatter(*first.T, s=3, alpha=0.6, linewidths=0)
    _square(ax_samples, lim, "samples")
    image = _image(ax_density, np.zeros((grid, grid)), lim, cmap, "density")
    title = fig.suptitle("t")
    # Drawing is most of the cost: dropping the tick labels (the title gives the square) and
    # fixing the layout after one draw each halve it.
    for ax in (ax_samples, ax_density):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig, scatter, image, title


def _write_gif(path: Path, samples, densities, t, lim, grid, fps, dpi, cmap) -> None:
    """One frame per time: the samples ``samples[k]`` beside the density ``densities[k]``."""
    fig, scatter, image, title = _animation_figure(samples[0], lim, grid, cmap)
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi):
        for k, density in enumerate(densities):
            image.set_data(density)
            image.set_norm(Normalize(0.0, max(float(density.max()), 1e-12)))
            scatter.set_offsets(samples[k])
            title.set_text(f"t = {t[k]:.3f} of T = {t[-1]:.3g}   (square [-{lim:g}, {lim:g}]²)")
            writer.grab_frame()


def animate_flow(
    model: CNF,
    path: str | os.PathLike,
    *,
    frames: int = 16,
    n: int = 500,
    lim: float = 4.0,
    grid: int = 48,
    fps: float = 8.0,
    seed: int = 0,
    dpi: int = 72,
    batch: int = 8192,
    cmap: str = "viridis",
    trace: str = "exact",
    **solver_kw,
) -> Path:
    r"""Write an animated GIF of samples and density morphing from the base to the data.

    Frame ``k``, at :math:`t_k = k T / (frames - 1)`, shows the samples :math:`z(t_k)` of ``n``
    base points (one :meth:`~cnf.flow.CNF.trajectory` solve through all frame times) beside the
    density :math:`p_{t_k}` of :math:`z(t_k)` on a ``grid x grid`` grid, each on its own colour
    scale: :math:`p_0` is the base density, and for :math:`t > 0` :math:`p_t` is ``log_prob`` of
    a CNF with ``T = t`` sharing the model's field (its time is absolute), base and settings,
    :math:`\log p_t(y) = \log p_{base}(z(0)) - \int_0^t \operatorname{tr}\,\partial_z f(s, z(s))
    \,ds` with :math:`z(t) = y`. Cost: one density solve of ``grid**2`` points on
    :math:`[0, t_k]` per frame (about ``frames / 2`` full solves), plus the drawing, most of the
    time for small models (timings in the module docstring); the GIF is about 200 KB.

    Args:
        model: a :class:`cnf.flow.CNF` with ``event_shape == (2,)``.
        path: where to write the GIF; must end in ``.gif`` and its folder must exist.
        frames: number of frames, >= 2 (the first at the base, the last at the data).
        n, lim: samples drawn in every frame; the square :math:`[-lim, lim]^2` shown.
        grid, batch: density grid nodes per axis (>= 2); points per density solve.
        fps, dpi: frames per second; resolution (each frame is 8 x 4 inches).
        seed: seed of the base points.
        cmap, trace: colormap of the densities; their trace estimator (exact by default).
        **solver_kw: per-call solver settings for all solves.

    Returns:
        The path written, as a :class:`pathlib.Path`.

    Raises:
        ValueError: for a model that is not a 2-D CNF, a path that does not end in ``.gif`` or
            whose folder does not exist, or bad sizes.
    """
    _check_model(model, need_cnf=True)
    path = _gif_path(path)
    frames = _check_int("frames", frames, 2)
    n = _check_int("n", n, 1)
    lim = positive("lim", lim)
    grid = _check_int("grid", grid, 2)
    fps = positive("fps", fps)
    seed = _check_int("seed", seed, 0)
    dpi = _check_int("dpi", dpi, 1)
    batch = _check_int("batch", batch, 1)
    samples, t = _paths(model, n, frames, seed, solver_kw)
    densities = _frame_densities(model, t, lim, grid, batch, {"trace": trace, **solver_kw})
    _write_gif(path, samples, densities, t, lim, grid, fps, dpi, cmap)
    return path


def _series(history: Mapping, key: str) -> np.ndarray:
    """``history[key]`` as a 1-D float64 array, checked."""
    try:
        values = np.asarray(history[key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"history[{key!r}] must be a sequence of numbers: {err}") from None
    if values.ndim != 1:
        raise ValueError(f"history[{key!r}] must be 1-D, got shape {values.shape}")
    return values


def _check_history_keys(history) -> None:
    """A mapping with ``iteration`` and ``loss``, and both or neither of the evaluation keys."""
    if not isinstance(history, Mapping):
        raise ValueError(f"history must be a mapping of name -> values, got {type(history)}")
    missing = [key for key in ("iteration", "loss") if key not in history]
    if missing:
        raise ValueError(
            f"history is missing {missing}; it needs 'iteration' and 'loss' (and optionally "
            f"'nfe_forward', 'nfe_backward', 'eval_iteration', 'eval_nll')"
        )
    if ("eval_iteration" in history) != ("eval_nll" in history):
        raise ValueError("'eval_iteration' and 'eval_nll' go together: give both or neither")


def _per_iteration(history: Mapping, iterations: int) -> dict[str, np.ndarray]:
    """The loss and the NFE series present, each checked to hold one value per iteration."""
    keys = [key for key in ("loss", "nfe_forward", "nfe_backward") if key in history]
    series = {key: _series(history, key) for key in keys}
    for key, values in series.items():
        if len(values) != iterations:
            raise ValueError(
                f"history[{key!r}] has {len(values)} values but history['iteration'] has "
                f"{iterations}; record one value per iteration"
            )
    return series


def _evaluations(history: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """``(eval_iteration, eval_nll)`` of equal lengths, or None when the history has neither."""
    if "eval_iteration" not in history:
        return None
    evals = _series(history, "eval_iteration"), _series(history, "eval_nll")
    if len(evals[0]) != len(evals[1]):
        raise ValueError(
            f"history['eval_nll'] has {len(evals[1])} values but history['eval_iteration'] "
            f"has {len(evals[0])}; record one test NLL per evaluation"
        )
    return evals


def _draw_loss(ax, iteration: np.ndarray, loss: np.ndarray, evals) -> None:
    ax.plot(iteration, loss, lw=1, label="training loss")
    if evals is not None:
        ax.plot(*evals, "o-", ms=3, lw=1, label="test NLL")
    ax.set_xlabel("iteration")
    ax.set_ylabel("nats")
    ax.set_title("loss")
    ax.legend()


def _draw_nfe(ax, iteration: np.ndarray, nfe: Mapping[str, np.ndarray]) -> None:
    for key, values in nfe.items():
        ax.plot(iteration, values, lw=1, label=key.split("_")[1])
    ax.set_xlabel("iteration")
    ax.set_ylabel("function evaluations")
    ax.set_title("NFE per iteration")
    ax.legend()


def plot_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Training curves: loss (and test NLL) and function evaluations against iterations.

    Args:
        history: a mapping of equal-length sequences, e.g. from :func:`cnf.training.fit`:

            * ``"iteration"``, ``"loss"`` (required);
            * ``"nfe_forward"``, ``"nfe_backward"``: function evaluations per iteration of the
              forward solve and of the backward (adjoint) solve, drawn in a second panel
              (either may be missing: it is skipped);
            * ``"eval_iteration"`` and ``"eval_nll"``: the test NLL at the evaluation
              iterations, drawn with the loss; both or neither, of equal length (their own
              length, not the iterations').

            Other keys are ignored.

    Returns:
        A figure with the loss panel and, if any NFE key is present, an NFE panel (not managed
        by pyplot; nothing to close).

    Raises:
        ValueError: for a missing required key, values that are not 1-D sequences of numbers,
            mismatched lengths, or only one of ``eval_iteration`` / ``eval_nll``.
    """
    _check_history_keys(history)
    iteration = _series(history, "iteration")
    per_iteration = _per_iteration(history, len(iteration))
    evals = _evaluations(history)
    nfe = {key: per_iteration[key] for key in ("nfe_forward", "nfe_backward") if key in history}
    panels = 2 if nfe else 1
    fig = _new_figure(panels, height=3.5, extra_width=0.5 * panels, square=False)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _draw_loss(axes[0], iteration, per_iteration["loss"], evals)
    if nfe:
        _draw_nfe(axes[1], iteration, nfe)
    return fig


def _tile(images: np.ndarray, ncol: int) -> np.ndarray:
    """Tile ``(n, C, H, W)`` images in [0, 1] into one array with 1-pixel white gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / ncol)
    canvas = np.ones((rows * (h + 1) - 1, ncol * (w + 1) - 1, c))
    for k in range(n):
        r, q = divmod(k, ncol)
        canvas[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = images[k].transpose(
            1, 2, 0
        )
    return canvas


def _show_tiles(ax, images: np.ndarray, ncol: int) -> None:
    """Images ``(n, C, H, W)`` in [0, 1] tiled ``ncol`` to a row (:func:`_tile`), on ``ax``."""
    grid = _tile(images, ncol)
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")


def plot_images(samples, reference=None, *, ncol: int = 8, titles=("samples", "data")) -> Figure:
    """A grid of image samples, beside a grid of reference images (e.g. test images) if given.

    Args:
        samples: images of shape ``(n, C, H, W)`` with values in ``[0, 1]`` (``C`` is 1 or 3),
            a tensor or an array; values outside are clipped.
        reference: optional images of the same ``(C, H, W)``, drawn on the right.
        ncol: images per row.
        titles: panel titles.

    Returns:
        the Figure.
    """
    ncol = _check_int("ncol", ncol, 1)
    panels = [samples] if reference is None else [samples, reference]
    arrays = []
    for name, imgs in zip(("samples", "reference"), panels):
        a = imgs.detach().cpu().numpy() if isinstance(imgs, Tensor) else np.asarray(imgs)
        if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[0] < 1:
            raise ValueError(f"{name} must have shape (n, C, H, W) with C = 1 or 3, got {a.shape}")
        arrays.append(np.clip(a.astype(np.float64), 0.0, 1.0))
    if len(arrays) == 2 and arrays[0].shape[1:] != arrays[1].shape[1:]:
        raise ValueError(
            f"samples {arrays[0].shape[1:]} and reference {arrays[1].shape[1:]} differ"
        )
    fig = Figure(figsize=(_PANEL * len(arrays), _PANEL), layout="compressed")
    for k, a in enumerate(arrays):
        ax = fig.add_subplot(1, len(arrays), k + 1)
        _show_tiles(ax, a, min(ncol, a.shape[0]))
        ax.set_axis_off()
        ax.set_title(f"{titles[k]} ({a.shape[0]})")
    return fig


def _check_image_model(model) -> tuple[int, ...]:
    """The ``(C, H, W)`` event shape of a flow of images, ``C`` 1 or 3; else a ValueError."""
    if not isinstance(model, Flow):
        raise ValueError(f"model must be a cnf.flow.Flow of images, got {type(model).__name__}")
    shape = tuple(model.event_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(
            f"class samples are images: model.event_shape must be (C, H, W) with C = 1 or 3, "
            f"got {shape}"
        )
    return shape


def _class_labels(classes) -> list[int]:
    """``classes``: an int ``K`` (labels ``0..K-1``) or a non-empty 1-D sequence of labels."""
    if isinstance(classes, int | np.integer) and not isinstance(classes, bool):
        return list(range(_check_int("classes", classes, 1)))
    array = isinstance(classes, Tensor | np.ndarray)
    if isinstance(classes, str) or not (array or isinstance(classes, Sequence)):
        raise ValueError(f"classes must be an int K or a sequence of labels, got {classes!r}")
    if array and np.ndim(classes) != 1:
        raise ValueError(f"classes must be 1-D labels, got shape {tuple(classes.shape)}")
    labels = classes.tolist() if array else list(classes)
    if not labels:
        raise ValueError("classes is empty: give at least one label (or an int K >= 1)")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
            raise ValueError(f"class labels must be ints >= 0, got {label!r}")
    return [int(label) for label in labels]


def _class_rows(model: Flow, labels: list[int], per_class: int, generator, kw: dict) -> list:
    """``per_class`` samples ``(per_class, C, H, W)`` per label, clipped to [0, 1], in order
    (one ``generator`` drawn from row after row)."""
    _, device = _dtype_device(model)
    rows = []
    with torch.no_grad():
        for label in labels:
            context = torch.full((per_class,), label, dtype=torch.long, device=device)
            x = model.sample(per_class, context=context, generator=generator, **kw)
            rows.append(np.clip(x.double().cpu().numpy(), 0.0, 1.0))
    return rows


def _class_figure(rows: list, titles: list[str]) -> Figure:
    """One axes per row of images, its title at the left."""
    per_class, _, h, w = rows[0].shape
    size = (0.6 * per_class + 1.0, 0.6 * len(rows) * h / w + 0.3)
    fig = Figure(figsize=size, layout="compressed")
    for ax, images, title in zip(fig.subplots(len(rows), 1, squeeze=False)[:, 0], rows, titles):
        _show_tiles(ax, images, per_class)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center")
        for spine in ax.spines.values():
            spine.set_visible(False)
    return fig


def plot_class_samples(
    model: Flow,
    classes,
    *,
    per_class: int = 8,
    generator: torch.Generator | None = None,
    titles: Sequence[str] | None = None,
    **solver_kw,
) -> Figure:
    """Samples of a class-conditional image flow: one row of ``per_class`` images per label.

    Row ``k`` is ``model.sample(per_class, context=torch.full((per_class,), labels[k]),
    generator=generator)`` (under :func:`torch.no_grad`, rows drawn in order from the one
    generator), clipped to ``[0, 1]`` and tiled like :func:`plot_images`, its title at its left.

    Args:
        model: a class-conditional :class:`cnf.flow.Flow` of images, ``event_shape == (C, H, W)``
            with ``C`` 1 or 3 and values in ``[0, 1]``, e.g. a ``DenseImageCNF`` built with
            ``context={"classes": 10}``.
        classes: an int ``K`` (labels ``0..K-1``) or a sequence (or 1-D tensor) of labels.
        per_class: samples per label, >= 1.
        generator: the random generator of the base points (and Hutchinson probes); None: the
            global one.
        titles: a title per row; default ``"label 3"``.
        **solver_kw: per-call solver settings, e.g. ``rtol=1e-5, atol=1e-5``.

    Returns:
        A figure of one axes per label, each holding one tiled image ``(H, per_class (W + 1) - 1)``
        (grayscale) or ``(H, per_class (W + 1) - 1, 3)``.

    Raises:
        ValueError: for a model that is not a flow of images, empty or non-integer ``classes``,
            a bad ``per_class`` or wrong titles (the model checks the labels' range).
    """
    _check_image_model(model)
    labels = _class_labels(classes)
    per_class = _check_int("per_class", per_class, 1)
    titles = _titles(titles, len(labels), [f"label {label}" for label in labels])
    rows = _class_rows(model, labels, per_class, generator, solver_kw)
    return _class_figure(rows, titles)


# ---------------------------------------------------------------------------- pair plots

_QUANTILES = (0.005, 0.995)  # a column's range: robust to a few far outliers
_WIDEN = 0.05  # of the range's width, added at each end so the extreme bins are not cut off
_SCATTER_BELOW = 2000  # kind="auto": fewer points than this are scattered, more binned
_COLORS = {"data": ("C0", "Blues"), "model": ("C1", "Oranges")}  # line colour, colormap


def _as_rows(x, name: str, width: int | None = None) -> np.ndarray:
    """``x`` (tensor or array-like) as a float64 numpy array of shape ``(m, D)``, checked
    (``D == width`` where given)."""
    shape = "(m, D)" if width is None else f"(m, {width})"
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        what = "rows" if width is None else "points"
        raise ValueError(f"{name} must be an array of {what} of shape {shape}: {err}") from None
    wrong_width = width is not None and x.ndim == 2 and x.shape[1] != width
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1 or wrong_width:
        rows = "one row per point with m >= 1 and D >= 1"
        if width is not None:
            rows = f"one {width}-D point per row with m >= 1"
        raise ValueError(f"{name} must have shape {shape}, {rows}, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} contains NaN or Inf (first at row {row}, column {col}); drop those rows "
            f"before plotting"
        )
    return x


def _column_names(columns, dim: int) -> list[str]:
    """``columns`` as ``dim`` strings; None: ``x0, x1, ...``."""
    if columns is None:
        return [f"x{i}" for i in range(dim)]
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise ValueError(f"columns must be a sequence of {dim} names, got {columns!r}")
    if len(columns) != dim:
        raise ValueError(f"columns has {len(columns)} names for {dim} columns; give one each")
    return [str(name) for name in columns]


def _column_ranges(points: np.ndarray) -> np.ndarray:
    """The range shown per column of ``points`` ``(m, D)``: shape ``(D, 2)``, low then high.

    The 0.5% and 99.5% quantiles, widened by 5% of their distance at each end (a constant
    column gets a unit-wide range around its value), so that a few outliers do not squash the
    picture of everything else.
    """
    low, high = np.quantile(points, _QUANTILES, axis=0)
    width = high - low
    pad = np.where(width > 0, _WIDEN * width, 0.5 * np.maximum(1.0, np.abs(low)))
    return np.stack([low - pad, high + pad], axis=1)


def _marginal_histogram(values: np.ndarray, lim, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """A density histogram of ``values`` ``(m,)`` over ``lim = (low, high)`` in ``bins`` bins.

    Returns ``(density, edges)`` of shapes ``(bins,)`` and ``(bins + 1,)``, normalised over the
    values inside the range (``(density * np.diff(edges)).sum() == 1``), all zeros when none
    are: the histogram compares shapes, which the values outside would not change.
    """
    counts, edges = np.histogram(values, bins=bins, range=tuple(lim))
    total = counts.sum()
    return counts / (max(total, 1) * np.diff(edges)), edges


def _pair_panel(ax, x: np.ndarray, y: np.ndarray, xlim, ylim, bins: int, kind: str, who: str):
    """The points ``(x, y)`` of ``who`` ("data" or "model") over ``xlim`` by ``ylim``."""
    color, cmap = _COLORS[who]
    if kind == "scatter" or (kind == "auto" and len(x) < _SCATTER_BELOW):
        size = float(np.clip(2000 / len(x), 3.0, 16.0))  # a few points must still be seen
        ax.scatter(x, y, s=size, alpha=0.6, color=color, linewidths=0, rasterized=True)
    else:
        counts, _, _ = np.histogram2d(x, y, bins=bins, range=[xlim, ylim])
        # a square root scale: the tails of a density stay visible beside its modes
        norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(counts.max()), 1.0))
        empty = np.ma.masked_equal(counts.T, 0)  # empty bins stay white, not the palest colour
        extent = (*xlim, *ylim)
        ax.imshow(empty, origin="lower", extent=extent, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)


def _diagonal_panel(ax, column: int, tables: dict, lim, bins: int) -> None:
    """The marginal histograms of ``column`` of each table, as steps; no density ticks."""
    # the same bins for both, so that they compare; fewer than asked for a few points (the
    # Rice rule, 2 m^(1/3)): 50 bins over 20 rows draw noise, not a shape
    fewest = min(len(rows) for rows in tables.values())
    bins = min(bins, max(5, math.ceil(2 * fewest ** (1 / 3))))
    for who, rows in tables.items():
        density, edges = _marginal_histogram(rows[:, column], lim, bins)
        ax.stairs(density, edges, color=_COLORS[who][0], lw=1.2, label=who)
    ax.set_xlim(*lim)
    ax.set_ylim(bottom=0.0)
    ax.set_yticks([])  # the density scale says little; the shapes are the point


def _label_outer(axes: np.ndarray, names: list[str]) -> None:
    """Column names and tick labels on the bottom row and the left column only."""
    k = len(names)
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if i == k - 1:
                ax.set_xlabel(names[j])
                # narrow panels: slanted tick labels do not run into their neighbours'
                ax.tick_params(axis="x", labelrotation=45 if k > 3 else 0, labelsize="small")
            else:
                ax.tick_params(axis="x", labelbottom=False)
            if j == 0:
                # the top-left panel is a histogram: its y is a density, unlabelled unless alone
                ax.set_ylabel(names[i] if k > 1 else "density")
                ax.tick_params(axis="y", labelsize="small")
            elif i != j:
                ax.tick_params(axis="y", labelleft=False)


def _pairs_title(tables: dict, k: int, dim: int) -> str:
    """Which table is where, and which columns are shown when not all are."""
    data = f"{len(tables['data'])} rows" if "data" in tables else None
    model = f"{len(tables['model'])} samples"
    if k == 1:
        title = f"data ({data}) and model ({model})" if data else f"model ({model})"
    elif data:
        title = f"data ({data}) below the diagonal, model ({model}) above"
    else:
        title = f"model ({model}) on both sides of the diagonal"
    return title + (f"; the first {k} of {dim} columns" if dim > k else "")


def _pairs_figure(tables: dict, names: list[str], k: int, bins: int, kind: str) -> Figure:
    """The ``k x k`` grid: marginals on the diagonal, data below it, model above it."""
    ranges = _column_ranges(tables.get("data", tables["model"])[:, :k])
    size = min(_PANEL, 12.0 / k)  # a figure about 12 inches wide at most
    fig = Figure(figsize=(k * size, k * size), layout="constrained")
    axes = fig.subplots(k, k, squeeze=False)
    below = "data" if "data" in tables else "model"  # no data: the model on both sides
    for i in range(k):
        for j in range(k):
            if i == j:
                _diagonal_panel(axes[i, i], i, tables, ranges[i], bins)
                continue
            who = below if i > j else "model"
            rows = tables[who]
            _pair_panel(axes[i, j], rows[:, j], rows[:, i], ranges[j], ranges[i], bins, kind, who)
    _label_outer(axes, names[:k])
    fig.suptitle(_pairs_title(tables, k, len(names)))
    # once for the figure, below the panels: no histogram is hidden under it, and constrained
    # layout does not stack an outside legend under the suptitle (they would overlap)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(tables), frameon=False)
    return fig


def plot_pairs(
    samples,
    data=None,
    *,
    columns: Sequence[str] | None = None,
    max_columns: int = 6,
    bins: int = 50,
    kind: str = "auto",
) -> Figure:
    """Pair plots of tabular data beside model samples, any number of columns ``D >= 1``.

    A ``k x k`` grid for the first ``k = min(D, max_columns)`` columns: on the diagonal the
    marginal density histogram of each column (data and model as overlaid steps); below the
    diagonal, panel ``(i, j)`` shows the data's column ``j`` (x) against column ``i`` (y);
    above it the model's samples, so that data and model face each other across the diagonal.
    Each column's range is the data's 0.5% to 99.5% quantiles, widened by 5% at each end (the
    samples' when there are no data), the same for data and samples so that they compare;
    points outside are not drawn. With ``D = 1``, a single panel: the histograms.

    Args:
        samples: model samples of shape ``(m, D)`` (tensor or array), e.g. ``model.sample(m)``.
        data: None (the samples then fill both triangles), or data rows of shape ``(n, D)``.
        columns: a name per column, ``D`` of them (default ``x0, x1, ...``), on the outer axes.
        max_columns: at most this many columns are shown (the title says when some are not).
        bins: histogram bins per axis of the 2-D histograms, and at most this many for the
            marginals (fewer for a few rows: ``2 m^(1/3)`` for the smaller table's ``m``).
        kind: off the diagonal, ``"hist"`` (2-D histograms, square-root colour scale),
            ``"scatter"``, or ``"auto"`` (a scatter for fewer than 2000 points, else binned).

    Returns:
        A figure of ``k * k`` axes (not managed by pyplot; nothing to close).

    Raises:
        ValueError: for points not of shape ``(m, D)``, data and samples of different ``D``,
            NaN or Inf, a wrong number of column names, or a bad option.
    """
    tables = {"model": _as_rows(samples, "samples")}
    if data is not None:
        tables = {"data": _as_rows(data, "data"), **tables}
        if tables["data"].shape[1] != tables["model"].shape[1]:
            raise ValueError(
                f"data and samples must have the same number of columns D, got "
                f"{tables['data'].shape[1]} and {tables['model'].shape[1]}"
            )
    dim = tables["model"].shape[1]
    names = _column_names(columns, dim)
    k = min(dim, _check_int("max_columns", max_columns, 1))
    bins = _check_int("bins", bins, 1)
    check_choice("kind", kind, ("auto", "hist", "scatter"))
    return _pairs_figure(tables, names, k, bins, kind)
