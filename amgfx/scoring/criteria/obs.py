"""``obs``: optimal-brain-surgeon scores, the error left after the kept units make up for a removed one.

For the layer that reads a group's units (the attention output projection for ``v`` and ``head``,
fc2/down for ``mlp``), with weights ``W [out, m]`` and the Gram matrix ``H = X^T X`` of its
calibration inputs, removing the input columns ``S`` of one unit and refitting the others by least
squares leaves the output error ``tr(W_S [H^-1]_SS^-1 W_S^T)`` (Hassibi & Stork's OBS, in the
structured form SparseGPT, ZipLM and SlimGPT use). That is the unit's score: the units removed are
the ones :func:`amgfx.reconstruct` can best make up for. ``H`` is damped by ``damp`` times its mean
diagonal, as reconstruction does. q/k pairs have no linear reader, so ``obs`` does not score them;
compose it (``"obs+snp"``: OBS for v, heads and MLPs, SNP for q/k).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...analysis.records import make_layer
from ...graph.indexprop import fetch_attr, is_layer
from ..collectors import InputGram
from ._base import Criterion

__all__ = ["OBS", "obs_scores"]

READER = {"v": "proj", "head": "proj", "mlp": "fc2"}


def reader(cg, group):
    """(layer node name, its member in ``group``) of the layer whose input columns are the group's units."""
    m = next((m for m in group.members if m.role == READER.get(group.kind)), None)
    if m is None:
        raise ValueError(f"{group.name}: no layer reads its units")
    for n in cg.gm.graph.nodes:
        if is_layer(n):
            layer = make_layer(cg.gm, n)
            if layer.weight == m.param and layer.in_dim == m.dim:
                return n.name, m, layer
    raise ValueError(f"{group.name}: the layer reading {m.param} is not in the graph")


def obs_scores(W: np.ndarray, H: np.ndarray, columns: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """``tr(W_S [H^-1]_SS^-1 W_S^T)`` per unit, ``columns [units, k]`` naming each unit's input columns.

    Example (a column that copies another costs nothing to remove, once the copy takes its weight):
        >>> x = np.random.default_rng(0).normal(size=(100, 3)); x[:, 2] = x[:, 0]
        >>> s = obs_scores(np.ones((2, 3)), x.T @ x, np.array([[0], [1], [2]]), damp=1e-9)
        >>> [round(float(v), 3) for v in s / s.max()]
        [0.0, 1.0, 0.0]
    """
    H = torch.as_tensor(H, dtype=torch.float64)
    lam = damp * float(H.diagonal().mean()) + 1e-12
    Hinv = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=torch.float64))
    W = torch.as_tensor(W, dtype=torch.float64)
    out = []
    for cols in np.asarray(columns):
        c = torch.as_tensor(cols, dtype=torch.long)
        ws = W[:, c]
        out.append(float(torch.einsum("ij,jk,ik->", ws, torch.linalg.inv(Hinv[c][:, c]), ws)))
    return np.asarray(out)


@dataclass(frozen=True)
class OBS(Criterion):
    """Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(2, 3, 32, 32))
        >>> s = amgfx.score(cg, "obs", [torch.randn(8, 3, 32, 32)], kinds=("mlp", "v", "head"), progress=False)
        >>> sorted(s.units), s.units["head:blocks.0.attn"].shape
        (['head:blocks.0.attn', 'mlp:blocks.0.mlp', 'v:blocks.0.attn'], (3,))
    """
    damp: float = 0.01
    name = "obs"
    kinds = ("v", "head", "mlp")

    def collectors(self, cg, group):
        return [InputGram(cg, reader(cg, group)[0])]

    def score(self, cg, group, stats, seed=0):
        node, m, layer = reader(cg, group)
        H = stats.sums.get(InputGram.key_for(node)) if stats is not None else None
        if H is None:
            raise ValueError(f"{group.name}: no input statistics (no calibration ran)")
        w = fetch_attr(cg.gm, layer.weight).detach().double()
        w = w.reshape(w.shape[0], -1) if w.dim() > 2 else w.movedim(layer.out_dim, 0)
        return obs_scores(w.numpy(), H.numpy(), m.index, self.damp)
