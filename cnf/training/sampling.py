"""Where the batches come from: seeded per-iteration randomness, epochs, image samplers.

Training data is points ``(n, *event_shape)``, or for a conditional model a pair ``(points,
contexts)`` with one context per point (``(n, C)`` vectors or ``(n,)`` labels); a sampler returns
the one or the other. A batch is what the data gives: a tensor, or a pair cut from the same rows.

Every random draw of iteration ``i`` comes from a generator seeded with a hash of
``(seed, stream, i)``, never from the global RNG. A resumed run therefore draws exactly what the
uninterrupted run would have drawn, whatever happened in the process before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cnf.ode._problem import number
from cnf.transforms import dequantize

__all__ = [
    "Batches",
    "Sampler",
    "derived_seed",
    "image_sampler",
    "place_context",
    "seeded_generator",
    "split_context",
]

Sampler = Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]]
"""``sampler(n, generator) -> (n, *event_shape)``: fresh training points; for a conditional model
the pair ``(points, contexts)``."""


def split_context(data, what: str = "data") -> tuple[Tensor | Sampler, Tensor | None]:
    """``(points, contexts)`` of conditional data, ``(data, None)`` of anything else.

    Raises:
        ValueError: a pair whose parts are not tensors with the same number of rows.
    """
    if not isinstance(data, (tuple, list)):
        return data, None
    if len(data) != 2 or not all(isinstance(part, Tensor) for part in data):
        raise ValueError(
            f"{what} must be a tensor of points (n, *event_shape), a sampler(n, generator), or "
            "for a conditional model a pair of tensors (points, contexts)"
        )
    x, c = data
    if c.dim() == 0 or c.shape[0] != len(x):
        raise ValueError(
            f"{what}: the contexts must have one row per point, got {tuple(c.shape)} contexts "
            f"for {tuple(x.shape)} points"
        )
    return x, c


_MASK = 0xFFFFFFFFFFFFFFFF


def derived_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed that depends on ``seed`` and ``keys`` only (splitmix64).

    Args:
        seed: the run's seed.
        *keys: e.g. ``(stream, iteration)``; different keys give unrelated seeds.

    Returns:
        A non-negative int below :math:`2^{63}`, fit for ``torch.Generator.manual_seed``.
    """
    x = seed & _MASK
    for k in keys:
        x = (x ^ (k + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & _MASK
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def place_context(context: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Contexts on ``device``; real ones in the model's ``dtype``, labels as they are (an
    embedding table is indexed by integers)."""
    return context.to(device=device, dtype=dtype if context.is_floating_point() else None)


class Batches:
    """Batch ``i`` of a run, as a pure function of ``(data, batch_size, seed, i)``.

    Tensor data is shuffled once per epoch (a permutation seeded by the epoch) and cut into
    ``n // batch_size`` full batches; the incomplete rest of each permutation is dropped. A
    sampler is called with a generator seeded by the iteration.

    Args:
        data: ``(n, *event_shape)``, a pair ``(points, contexts)`` (the same rows of both are
            drawn), or a :data:`Sampler`.
        batch_size: points per batch.
        seed: the run's seed.

    Raises:
        ValueError: ``data`` is empty or neither a tensor nor callable.
    """

    SAMPLER_STREAM, EPOCH_STREAM = 0, 1
    """The ``derived_seed`` streams of sampler batches and of epoch permutations."""

    def __init__(self, data: Tensor | Sampler, batch_size: int, seed: int):
        data, self.context = split_context(data)
        if isinstance(data, Tensor):
            if data.shape[0] < 1:
                raise ValueError("data is empty")
        elif not callable(data):
            raise ValueError(
                "data must be a tensor (n, *event_shape) or a sampler(n, generator) -> tensor"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed

    @property
    def per_epoch(self) -> int:
        """Batches per epoch of tensor data (at least one)."""
        return max(1, self.data.shape[0] // self.batch_size)

    def __call__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        """Batch ``i`` (0-based), ``(batch_size, *event_shape)``; a pair with the contexts of
        those rows for conditional data."""
        cpu = torch.device("cpu")
        if not isinstance(self.data, Tensor):
            seed = derived_seed(self.seed, self.SAMPLER_STREAM, i)
            return self.data(self.batch_size, seeded_generator(cpu, seed))
        epoch, j = divmod(i, self.per_epoch)
        g = seeded_generator(cpu, derived_seed(self.seed, self.EPOCH_STREAM, epoch))
        perm = torch.randperm(self.data.shape[0], generator=g)
        idx = perm[j * self.batch_size : (j + 1) * self.batch_size]
        x = self.data[idx.to(self.data.device)]
        return x if self.context is None else (x, self.context[idx.to(self.context.device)])


def image_sampler(
    images: Tensor, levels: int, *, translate: float = 0.0, labels: Tensor | None = None
) -> Sampler:
    """A sampler for :func:`cnf.training.fit` that draws training images and dequantizes them.

    Args:
        images: integer images ``(n, C, H, W)`` with values in ``[0, levels)``.
        levels: number of grey levels ``k``.
        translate: probability that a drawn image is moved by one pixel, with the vertical and
            horizontal offsets drawn from ``{-1, 0, 1}`` (data augmentation against the
            overfitting of small data sets such as the digits). The vacated border is filled
            with level 0, the background of the digits and of MNIST. 0 draws exactly as
            without augmentation.
        labels: ``(n,)`` class labels of the images, for a class-conditional model: the
            sampler then returns ``(images, labels)`` of the drawn rows.

    Returns:
        ``sampler(batch, generator) -> (batch, C, H, W)``: random images (with replacement),
        ``(x + u) / k`` with ``u ~ U[0, 1)`` (:func:`cnf.transforms.dequantize`); with
        ``labels``, the pair ``(images, labels)``.

    Raises:
        ValueError: ``translate`` is not a probability, or it is set for non-image data.
    """
    if not 0.0 <= number("translate", translate) <= 1.0:
        raise ValueError(f"translate must be a probability in [0, 1], got {translate!r}")
    if translate and images.dim() != 4:
        raise ValueError(f"translate needs images of shape (n, C, H, W), got {tuple(images.shape)}")
    if labels is not None:
        split_context((images, labels), "images and labels")

    def sampler(n: int, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        rows = torch.randint(len(images), (n,), generator=generator)
        x = images[rows]
        if translate:
            x = _translate(x, translate, generator)
        x = dequantize(x, levels, generator=generator)
        return x if labels is None else (x, labels[rows])

    return sampler


def _translate(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Move each image of ``x`` ``(n, C, H, W)`` by one pixel with probability ``p``."""
    n, c, h, w = x.shape
    offsets = torch.randint(3, (2, n), generator=generator)  # 0, 1, 2: up/left, none, down/right
    moved = torch.rand(n, generator=generator) < p
    offsets = torch.where(moved, offsets, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # zeros: level 0 enters at the border
    rows = (offsets[0, :, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
