"""Scoring criteria: one function per criterion, ``(coupling graph, group) -> score per unit``.

Higher scores are kept. Criteria read weights (and, later, calibration statistics); they
never edit the graph.
"""
from __future__ import annotations

import zlib

import numpy as np

from .indexprop import fetch_attr

__all__ = ["magnitude", "random", "CRITERIA"]



def magnitude(cg, group, **_) -> np.ndarray:
    """L2 norm of everything a unit owns: the unit's rows/columns of every member weight.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> magnitude(cg, cg.group("head:blocks.0.attn")).shape
        (3,)
    """
    total = np.zeros(group.units)
    for m in group.members:
        t = fetch_attr(cg.gm, m.param).detach().float()
        sq = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).pow(2).sum(1).numpy()
        total += sq[m.index].sum(1)
    return np.sqrt(total)


def random(cg, group, *, seed: int = 0, **_) -> np.ndarray:
    """Uniform random scores, seeded per (seed, group name): the baseline every criterion must beat."""
    rng = np.random.default_rng([seed, zlib.crc32(group.name.encode())])
    return rng.random(group.units)


CRITERIA = {"magnitude": magnitude, "random": random}
