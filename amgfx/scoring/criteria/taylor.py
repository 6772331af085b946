"""``taylor``: first-order Taylor importance per unit, every kind.

``I(unit) = E_batch[(sum over the unit's weights of w * dL/dw)^2]``, the squared form of
Molchanov et al. (2019). The square matters: under the default loss the gradient has zero
mean at the dense model, and the expected square is the Fisher-weighted importance
(see :mod:`amgfx.scoring.calibrate`). The score is its square root.

How the budget ranks these scores is a knob. By default (``per_layer=False``) they rank across layers and
kinds as they are, since each estimates the loss a removal costs: on SmolLM2 at half the blocks' FLOPs that
gave perplexity 55.6 after refit against 130.7 ranked per layer. ``per_layer=True`` ranks each unit against its
group's mean instead (the layer-wise normalisation of Molchanov et al., 2017), so every layer is pruned alike:
on MiniLM at half its FLOPs, held-out cosine 0.860 after refit against 0.851 raw. ``method="auto"`` tries both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..collectors import TaylorScores
from ._base import Criterion

__all__ = ["Taylor"]


@dataclass(frozen=True)
class Taylor(Criterion):
    """Example:
        >>> import torch, timm, amgfx
        >>> from amgfx.scoring.calibrate import calibrate
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> g = cg.group("mlp:blocks.0.mlp")
        >>> st = calibrate(cg, [torch.randn(2, 3, 32, 32)], needs={"taylor"}, taylor_groups=[g], progress=False)
        >>> bool((Taylor().score(cg, g, st) > 0).any())
        True
        >>> Taylor().loss_scale, Taylor(per_layer=True).loss_scale
        (True, False)
    """
    name = "taylor"
    kinds = ("qk", "v", "head", "mlp", "residual")
    per_layer: bool = False     # rank against the group's mean (the budget's normalize="group"), not raw

    @property
    def loss_scale(self) -> bool:
        return not self.per_layer

    def collectors(self, cg, group):
        return [TaylorScores(group)]

    def score(self, cg, group, stats, seed=0):
        t = stats.mean(TaylorScores.key_for(group)) if stats is not None else None
        if t is None:
            raise ValueError(f"{group.name}: no gradient statistics (no calibration ran)")
        return np.sqrt(t)
