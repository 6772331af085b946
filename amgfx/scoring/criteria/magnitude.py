"""``magnitude``: the L2 norm of everything a unit owns (weights only, every kind)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Criterion, unit_norms

__all__ = ["Magnitude"]


@dataclass(frozen=True)
class Magnitude(Criterion):
    """Score a unit by the L2 norm of its rows/columns across every member weight.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> Magnitude().score(cg, cg.group("head:blocks.0.attn"), None).shape
        (3,)
    """
    name = "magnitude"
    kinds = ("qk", "v", "head", "mlp", "residual")

    def score(self, cg, group, stats, seed=0) -> np.ndarray:
        return np.sqrt(sum(unit_norms(cg, m) ** 2 for m in group.members))
