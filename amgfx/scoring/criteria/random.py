"""``random``: the baseline every criterion must beat."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ._base import Criterion

__all__ = ["Random"]


@dataclass(frozen=True)
class Random(Criterion):
    """Uniform scores, seeded per (seed, group name), so a plan is reproducible.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> g = cg.group("mlp:blocks.0.mlp")
        >>> bool((Random().score(cg, g, None, seed=1) == Random().score(cg, g, None, seed=1)).all())
        True
    """
    name = "random"
    kinds = ("qk", "v", "head", "mlp", "residual")

    def score(self, cg, group, stats, seed=0) -> np.ndarray:
        return np.random.default_rng([seed, zlib.crc32(group.name.encode())]).random(group.units)
