"""The pictures of a trained model: density, samples and trajectories (2-D data), samples
beside test images (images), pair plots of samples and test rows (tables), and the training
curves; written by ``cnf train`` and ``cnf plot``."""

from __future__ import annotations

from pathlib import Path

import torch

from .common import open_checkpoint


def _toy_pictures(model, record, n: int, device, gif: bool, out: Path) -> tuple[dict, list]:
    from .. import plot
    from ..data import DENSITY_NAMES, density

    if _conditional(model):
        return _conditional_toy_pictures(model, record, n, device)
    data = record.load().part("test", seed=0, n=n).numpy()
    true = density(record.name) if record.name in DENSITY_NAMES else None
    gen = torch.Generator(device=device).manual_seed(0)
    figures = {
        "density.png": plot.plot_density(model, data=data, true_density=true),
        "samples.png": plot.plot_samples(model.sample(n, generator=gen).detach(), data=data),
        "trajectories.png": plot.plot_trajectories(model),
    }
    if not gif:
        return figures, []
    plot.animate_flow(model, out / "flow.gif")
    return figures, ["flow.gif"]


def _conditional(model) -> bool:
    """Whether the model reads a context (its spec says so)."""
    from ..models import settings_of

    return settings_of(getattr(model, "spec", {}) or {}).get("context") is not None


def _conditional_toy_pictures(model, record, n: int, device) -> tuple[dict, list]:
    """A row of densities at five contexts over the true ones; samples drawn with the test
    points' contexts beside those points; trajectories at context 0."""
    from .. import plot
    from ..data import CONDITIONAL_NAMES, conditional_density

    x, c = record.load().part("test", seed=0, n=n)
    true = conditional_density(record.name) if record.name in CONDITIONAL_NAMES else None
    gen = torch.Generator(device=device).manual_seed(0)
    ref = next(model.parameters())
    with torch.no_grad():
        samples = model.sample(len(c), context=c.to(device=device, dtype=ref.dtype), generator=gen)
    contexts = [-1.0, -0.5, 0.0, 0.5, 1.0]
    zero = torch.zeros(1, dtype=ref.dtype, device=device)
    figures = {
        "densities.png": plot.plot_conditional_densities(model, contexts, true_density=true),
        "samples.png": plot.plot_samples(samples.detach(), data=x.numpy()),
        "trajectories.png": plot.plot_trajectories(model, context=zero),
    }
    return figures, []  # no animation: one would be needed per context


def _image_pictures(model, record, n: int, device, gif: bool, out: Path) -> tuple[dict, list]:
    from .. import plot

    if _conditional(model):
        classes = model.spec["options"]["context"]["classes"]
        gen = torch.Generator(device=device).manual_seed(0)
        grid = plot.plot_class_samples(
            model, classes, per_class=max(1, n // classes), generator=gen
        )
        return {"classes.png": grid}, []
    test = record.load().part("test", n=n).float() / record.recipe.levels
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        samples = model.sample(n, generator=gen).clamp(0.0, 1.0)
    figures = {"samples.png": plot.plot_images(samples, test, titles=("model samples", "test"))}
    return figures, []  # no animation of images


def _table_pictures(model, record, n: int, device, gif: bool, out: Path) -> tuple[dict, list]:
    from .. import plot

    data = record.load()
    gen = torch.Generator(device=device).manual_seed(0)
    test, given = data.part("test"), {}
    if data.contexts is not None:  # one sample per test row, given that row's context
        test, contexts = test
        ref = next(model.parameters())
        given["context"] = contexts.to(device=device, dtype=ref.dtype)
        n = len(test)
    with torch.no_grad():  # the model's Standardize step puts the samples in the data's units
        samples = model.sample(n, generator=gen, **given)
    pairs = plot.plot_pairs(samples, test, columns=data.columns)
    return {"pairs.png": pairs}, []  # no animation of tables


PICTURES = {
    "toy2d": (_toy_pictures, 20000),
    "tabular": (_table_pictures, 5000),
    "image": (_image_pictures, 64),
}
"""Per kind of model: the function that draws its pictures (figures, and the names of files it
wrote itself) and their default number of samples."""


def write_pictures(checkpoint, out: Path, device, *, n: int | None, gif: bool) -> None:
    """Draw the model of ``checkpoint`` into the folder ``out`` (``n`` samples, None: the
    default of its kind; ``gif``: also animate the flow of 2-D data)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from .. import plot

    state, record, model = open_checkpoint(checkpoint, device)
    out.mkdir(parents=True, exist_ok=True)
    draw, default_n = PICTURES[record.recipe.kind]
    figures, files = draw(model, record, n or default_n, device, gif, out)
    figures["curves.png"] = plot.plot_curves(state["history"])
    for fname, fig in figures.items():
        fig.savefig(out / fname, dpi=120, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote {', '.join([*figures, *files])} to {out}/", flush=True)
