"""The training sampler for images: dequantization and one-pixel translations."""

import math

import pytest
import torch

from cnf.training import image_sampler
from cnf.transforms import dequantize


def _images(n=6, c=2, h=5, w=4, levels=17):
    g = torch.Generator().manual_seed(1)
    # no zeros inside, so that a moved image is told apart by its zero border
    return torch.randint(1, levels, (n, c, h, w), generator=g, dtype=torch.uint8)


def _shift(x, dy, dx):
    """``x`` moved by ``(dy, dx)`` pixels, zero filled (the reference, by slicing)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_without_translation_draws_as_before():
    images = _images()
    got = image_sampler(images, 17)(32, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(images), (32,), generator=g)
    assert torch.equal(got, dequantize(images[idx], 17, generator=g))


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_translations_are_one_pixel_moves_at_the_given_rate(p):
    images = _images()
    n = 4000
    x = image_sampler(images, 17, translate=p)(n, torch.Generator().manual_seed(0))
    levels = torch.floor(x * 17).to(torch.uint8)  # undo the dequantization exactly
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    counts = dict.fromkeys(moves, 0)
    for img in levels:
        found = [m for m in moves if any(torch.equal(img, _shift(ref, *m)) for ref in images)]
        assert len(found) == 1, "every drawn image is one training image moved by one pixel"
        counts[found[0]] += 1
    # each of the 8 moves has probability p / 9, staying put 1 - p + p / 9
    for move, count in counts.items():
        expected = n * (1 - p + p / 9 if move == (0, 0) else p / 9)
        assert abs(count - expected) < 4 * math.sqrt(expected), (move, count, expected)


def test_translate_rejects_bad_settings():
    with pytest.raises(ValueError, match="probability"):
        image_sampler(_images(), 17, translate=1.5)
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        image_sampler(torch.zeros(4, 8, dtype=torch.uint8), 17, translate=0.5)
