"""``flap`` and ``wanda``: the retraining-free LLM criteria, on the layer that reads each unit.

Both look at the layer whose input columns are a group's units (the attention output projection for
``v`` and ``head``, fc2/down for ``mlp``; :func:`amgfx.scoring.criteria.obs.reader`), with weights
``W [out, in]`` and its calibration inputs ``X`` (per channel, over every token):

* **flap** (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning"): channel ``j``
  scores ``Var(X_j) * ||W[:, j]||^2``, the output energy that moves with the input. What a channel
  contributes on average (``W[:, j] * mean(X_j)``) is not lost by removing it: FLAP folds it into the
  bias, and :func:`amgfx.reconstruct` (the default after pruning with calibration data) fits the bias
  with the rest, so a channel that is large but constant ranks low.
* **wanda** (Sun et al., ICLR 2024, structured "Wanda-sp"): ``||W[:, j]||_1 * ||X_j||_2``, weight
  magnitude times input norm, column-wise.

A unit spanning several columns (a head, a value neuron under RoPE) sums its columns. Neither defines
a q/k score (q/k have no linear reader): compose, e.g. ``"flap+snp"`` (FLAP for v, heads and MLPs,
SNP for q/k pairs). Statistics are two vectors per layer (:class:`InputMoments`), not Gram matrices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...graph.indexprop import fetch_attr
from ..collectors import InputMoments
from ._base import Criterion
from .obs import reader

__all__ = ["FLAP", "Wanda", "reader_columns"]


def reader_columns(cg, group, stats, found=None):
    """(W as [out, in] float64, per-column mean and mean square of the input, the unit -> columns index);
    ``found``: the group's :func:`reader` where the caller has it already (each lookup walks the graph)."""
    node, member, layer = found or reader(cg, group)
    key = InputMoments.key_for(node)
    mean, sq = (stats.mean(f"{key}:{p}") if stats is not None else None for p in ("sum", "sq"))
    if mean is None or sq is None:
        raise ValueError(f"{group.name}: no input statistics of {node} (no calibration ran)")
    w = fetch_attr(cg.gm, layer.weight).detach().double()
    w = w.reshape(w.shape[0], -1) if w.dim() > 2 else w.movedim(layer.out_dim, 0)
    return w.numpy(), mean, sq, np.asarray(member.index)


@dataclass(frozen=True)
class _OnReader(Criterion):
    kinds = ("v", "head", "mlp")

    def collectors(self, cg, group):
        return [InputMoments(cg, reader(cg, group)[0])]

    def score(self, cg, group, stats, seed=0):
        w, mean, sq, cols = reader_columns(cg, group, stats)
        per = self.column_scores(w, mean, sq)
        return per[cols].sum(1)

    def column_scores(self, w, mean, sq) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class FLAP(_OnReader):
    """Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(2, 3, 32, 32))
        >>> s = amgfx.score(cg, "flap", [torch.randn(8, 3, 32, 32)], kinds=("mlp", "v", "head"), progress=False)
        >>> {k: v.shape for k, v in sorted(s.units.items())}
        {'head:blocks.0.attn': (3,), 'mlp:blocks.0.mlp': (768,), 'v:blocks.0.attn': (192,)}
    """
    name = "flap"

    def column_scores(self, w, mean, sq):
        var = np.maximum(sq - mean ** 2, 0.0)
        return var * (w ** 2).sum(0)


@dataclass(frozen=True)
class Wanda(_OnReader):
    """Example:
        >>> import numpy as np
        >>> w = np.array([[1.0, -2.0], [1.0, 0.0]])          # column 1 has the larger weights ...
        >>> Wanda().column_scores(w, np.zeros(2), np.array([9.0, 1.0]))   # ... column 0 the larger inputs
        array([6., 2.])
    """
    name = "wanda"

    def column_scores(self, w, mean, sq):
        return np.abs(w).sum(0) * np.sqrt(sq)
