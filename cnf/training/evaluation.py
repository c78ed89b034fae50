r"""Held-out scores of a trained flow: NLL in nats and bits per dimension of images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cnf.distributed import share_rows, sum_over
from cnf.transforms import bits_per_dim, dequantize

from .sampling import split_context

if TYPE_CHECKING:
    from cnf.flow import Flow

__all__ = ["evaluate_bits_per_dim", "evaluate_nll"]


@torch.no_grad()
def evaluate_nll(
    model: Flow,
    data: Tensor,
    *,
    context: Tensor | None = None,
    batch_size: int = 1000,
    **solver,
) -> float:
    r"""Mean negative log-likelihood of ``data``, :math:`-\frac1N \sum_n \log p(x_n)`, in nats
    (:math:`\log p(x_n \mid c_n)` with contexts).

    Computed in batches without gradients, with the exact trace unless ``solver`` says
    otherwise. In the sharded evaluation of a data-parallel run (:mod:`cnf.distributed`) each
    process scores its rows and the sums are added over the processes.

    Args:
        model: the flow.
        data: points ``(N, *event_shape)``.
        context: the points' contexts ``(N, ...)`` for a conditional model; None otherwise.
        batch_size: points per solve (memory, not the result).
        **solver: overrides of the model's solver settings, e.g. ``rtol=1e-6``.

    Returns:
        The mean NLL (nats per sample).

    Raises:
        ValueError: no points, or a batch size below 1.
    """
    _check_sizes(data.shape[0], batch_size, "data")
    if context is not None:
        split_context((data, context), "data")  # one context per point
    solver.setdefault("trace", "exact")
    mine, world = share_rows(data.shape[0])  # in a sharded evaluation: this process's rows
    data = data[mine]
    context = None if context is None else context[mine]
    total = 0.0
    for start in range(0, data.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        given = {} if context is None else {"context": context[rows]}
        total += -model.log_prob(data[rows], **given, **solver).sum().item()
    total, count = sum_over(world, total, data.shape[0])
    return total / count


@torch.no_grad()
def evaluate_bits_per_dim(
    model: Flow,
    images: Tensor,
    levels: int,
    *,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    context: Tensor | None = None,
    **solver,
) -> float:
    r"""Mean bits/dim of integer ``images``, averaged over dequantization draws.

    Each draw dequantizes every image once, :math:`y = (x + u)/k` with :math:`u \sim U[0,1)^D`
    drawn from a generator seeded with ``seed`` (so repeated calls compare like with like), and
    scores :math:`-(\log p(y) - D \log k) / (D \log 2)` (:func:`cnf.transforms.bits_per_dim`).

    Args:
        model: the flow over ``(C, H, W)`` images scaled to ``[0, 1)``.
        images: integers ``(N, C, H, W)`` in ``[0, levels)``.
        levels: grey levels :math:`k`.
        draws: dequantizations per image.
        seed: seed of the dequantization noise.
        batch_size: images per solve.
        context: the images' contexts ``(N, ...)`` (e.g. class labels ``(N,)``) for a
            conditional model: bits/dim given the context.
        **solver: overrides of the model's solver settings (default here: the exact trace).

    Returns:
        Bits per dimension, averaged over images and draws.

    Raises:
        ValueError: no images, no draws, or a batch size below 1.
    """
    _check_sizes(len(images), batch_size, "images")
    if context is not None:
        split_context((images, context), "images")  # one context per image
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    solver.setdefault("trace", "exact")
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    mine, world = share_rows(len(images))  # in a sharded evaluation: this process's rows
    context = None if context is None else context[mine]
    total, count = 0.0, 0
    for _ in range(draws):
        # every process draws the noise of all images, as one process does, and keeps its rows
        x = dequantize(images, levels, generator=gen)[mine].to(device=ref.device, dtype=ref.dtype)
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            chunk = x[rows]
            given = {} if context is None else {"context": context[rows]}
            lp = model.log_prob(chunk, **given, **solver)
            total += bits_per_dim(lp, chunk.shape[1:], levels).sum().item()
            count += len(chunk)
    total, count = sum_over(world, total, count)
    return total / count


def _check_sizes(n: int, batch_size: int, what: str) -> None:
    """An average over no points is undefined, and a batch of none never ends the loop."""
    if n < 1:
        raise ValueError(f"{what} is empty: nothing to evaluate")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
