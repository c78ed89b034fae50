"""Helpers of the trace tests: random O(1) weights and brute-force per-sample Jacobians."""

from __future__ import annotations

import torch


def randomize(module, scale=0.8):
    """O(1) weights instead of the default init, so Jacobians are far from zero and from each
    other; returns ``module``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    return module


def jacobians(field, t, z):
    """Per-sample Jacobians of the flattened event from torch.autograd.functional.jacobian,
    ``(batch, D, D)``."""
    d = z[0].numel()
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda x: field(t, x[None])[0], zi).reshape(d, d)
            for zi in z
        ]
    )
