"""``snp``: Structured Neuron-level Pruning (arXiv 2404.11630), qk / v / mlp / residual.

* **qk**: a query/key pair scores how well its rank-1 term ``Q_i K_i^T`` aligns with the top
  ``gamma`` singular components of the head's score matrix ``Q K^T`` (summed |cosine|,
  averaged over calibration samples). Computed in :func:`amgfx.scoring.calibrate.qk_scores`.
  ``gamma`` is not published: we default to the fewest components holding 90% of
  ``|Q K^T|_F^2``; an int fixes the count.
* **v**: redundancy across heads, weights only: ``sum_l (1 - |cos(W_i, W_l)|)`` over every
  value neuron ``l`` of the site (a value neuron that resembles the others scores low).
* **mlp**: activation-aware: ``sqrt(E[h_c^2]) * |W_fc2[:, c]|``, the RMS size of hidden
  neuron ``c``'s contribution to the MLP output. The paper leaves MLPs to "redundancy or
  magnitude"; calibration data is at hand, and a weight-only score cannot tell a neuron
  that never fires from a busy one.
* **residual**: every member's per-channel magnitudes are normalised by their sum, then
  averaged over the group's members (the paper's normalise-then-average); all-zero members
  (biases at init) carry no information and are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...graph.indexprop import fetch_attr
from ..collectors import MlpActivations, QKScores
from ._base import Criterion, mlp_of, site_of, unit_norms, unit_slices

__all__ = ["SNP"]


@dataclass(frozen=True)
class SNP(Criterion):
    """SNP scores for qk, v, mlp and residual groups.

    Args:
        gamma: singular components kept per head for the qk score: a float in (0, 1) is an
            energy fraction, an int a fixed count.

    Example:
        >>> import torch, timm, amgfx
        >>> from amgfx.scoring.calibrate import calibrate
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> st = calibrate(cg, [torch.randn(2, 3, 32, 32)], needs={"qk"}, progress=False)
        >>> SNP().score(cg, cg.group("qk:blocks.0.attn"), st).shape
        (192,)
    """
    gamma: float = 0.9
    name = "snp"
    kinds = ("qk", "v", "mlp", "residual")

    def collectors(self, cg, group):
        if group.kind == "qk":
            return [QKScores(site_of(cg, group), self.gamma)]
        if group.kind == "mlp":
            return [MlpActivations(cg, mlp_of(cg, group))]
        return []

    def score(self, cg, group, stats, seed=0):
        return getattr(self, "_" + group.kind)(cg, group, stats)

    def _qk(self, cg, group, stats):
        got = stats.mean(QKScores.key_for(site_of(cg, group))) if stats is not None else None
        if got is None:
            raise ValueError(f"{group.name}: no qk statistics (the site's heads are not on the operands' "
                             "last axis, or no calibration ran)")
        return got

    def _v(self, cg, group, stats):
        rows = [unit_slices(cg, m) for m in group.members if m.role == "v"
                and fetch_attr(cg.gm, m.param).dim() == 2]
        w = np.concatenate([r.reshape(r.shape[0], -1) for r in rows], 1)
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        return (1.0 - np.abs(w @ w.T)).sum(1)

    def _mlp(self, cg, group, stats):
        fc2 = next(m for m in group.members if m.role == "fc2")
        act = stats.mean(MlpActivations.key_for(mlp_of(cg, group))) if stats is not None else None
        if act is None:
            raise ValueError(f"{group.name}: no activation statistics (no calibration ran)")
        return np.sqrt(act) * unit_norms(cg, fc2)

    def _residual(self, cg, group, stats):
        per = [p for p in (unit_norms(cg, m) for m in group.members) if p.sum() > 0]   # all-zero biases say nothing
        return np.mean([p / p.sum() for p in per], 0)
