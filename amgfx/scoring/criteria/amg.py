"""``amg``: Attention Map Guided pruning (arXiv 2304.01452), heads and key tokens.

* **head**: the entropy of a head's attention map averaged over the calibration data,
  ``E_h = mean_q sum_k -A[q,k] log A[q,k]``, divided by ``log N_k`` so windows and sequences
  of different lengths compare, times the reference code's depth factor
  ``alpha = 1 + depth_factor * layer``. High-entropy (near-uniform) heads go first. The score
  (higher = keep) is ``exp(-alpha * E_h / log N_k)``: positive and monotone, so groups can be
  normalised and ranked globally. With grouped-query attention, a key/value group's score is
  the mean over its query heads.
* **tokens**: ``s_j = |sum_{batch, head, query} A[..., j] * dL/dA[..., j]|`` per key position,
  summed over calibration batches, normalised per layer (to sum 1) for global ranking.
  Scores only: the static token gather is a separate pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..collectors import AttentionMaps, TokenScores
from ._base import Criterion, site_of

__all__ = ["AMG", "head_entropy", "token_scores"]


def head_entropy(site, stats) -> np.ndarray | None:
    """Normalised entropy per query head of the data-averaged attention map ([H], in [0, 1])."""
    a = stats.mean(AttentionMaps.key_for(site)) if stats is not None else None
    if a is None:
        return None
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-300)
    ent = -(np.where(a > 0, a * np.log(np.maximum(a, 1e-300)), 0.0)).sum(-1).mean(-1)   # [Lq]
    ent = ent / max(np.log(a.shape[-1]), 1e-12)
    out = np.zeros(site.num_heads)
    cnt = np.zeros(site.num_heads)
    np.add.at(out, site.lead_heads, ent)
    np.add.at(cnt, site.lead_heads, 1)
    return out / np.maximum(cnt, 1)


def token_scores(cg, stats) -> dict:
    """``{site name: [N_k] scores}``, each normalised to sum 1 (AMG's per-layer normalisation)."""
    out = {}
    for s in cg.sites:
        t = stats.mean(TokenScores.key_for(s)) if stats is not None else None
        if t is not None:
            out[s.name] = t / max(t.sum(), 1e-300)
    return out


@dataclass(frozen=True)
class AMG(Criterion):
    """AMG head scores (and key-token scores through :func:`token_scores`).

    Args:
        depth_factor: the 0.02 in ``alpha = 1 + 0.02 * layer`` (reference code): deeper heads go first.

    Example:
        >>> import torch, timm, amgfx
        >>> from amgfx.scoring.calibrate import calibrate
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> st = calibrate(cg, [torch.randn(2, 3, 32, 32)], needs={"attn"}, progress=False)
        >>> s = AMG().score(cg, cg.group("head:blocks.0.attn"), st)
        >>> s.shape, bool(((s > 0) & (s <= 1)).all())
        ((3,), True)
    """
    depth_factor: float = 0.02
    name = "amg"
    kinds = ("head",)

    def collectors(self, cg, group):
        return [AttentionMaps(site_of(cg, group))]

    def token_collectors(self, cg) -> list:
        """Key-position scores at every site (static token pruning), a backward pass."""
        return [TokenScores(s) for s in cg.sites if s.supported and s.operands]

    def score(self, cg, group, stats, seed=0):
        sites = [s for s in cg.sites if s.supported]
        layer = next(i for i, s in enumerate(sites) if s.name == group.where)
        site = sites[layer]
        ent = head_entropy(site, stats)
        if ent is None:
            raise ValueError(f"{group.name}: no attention statistics (no calibration ran)")
        per_group = np.array([ent[site.kv_group == g].mean() for g in range(group.units)])
        alpha = 1.0 + self.depth_factor * layer
        return np.exp(-alpha * per_group)

    def explain(self, cg, group, stats) -> dict:
        """The normalised entropy of every query head (the score falls as it rises)."""
        ent = head_entropy(site_of(cg, group), stats)
        return {} if ent is None else {"entropy": ent}
