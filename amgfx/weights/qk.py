"""Reconstruction for q and k: they have no linear consumer, so each head's logits are rescaled.

Removing q/k pairs shrinks every logit ``q . k`` by what the removed pairs contributed, and softmax
then flattens. :func:`qk_scales` measures, per kv head, the least-squares factor that restores the
dense logits' scale on calibration data; :func:`scale_rows` multiplies the head's q rows by it.
Weights only, never the graph; :func:`amgfx.reconstruct` calls it when ``qk=True``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..graph.fx import get_attr, replace_attr
from ..graph.ranks import all_sum
from .reconstruct import chunks

__all__ = ["qk_scales", "scale_rows"]


class _Operands(fx.Interpreter):
    """Runs ``gm`` and keeps, per site, the q and k operands of its attention (by node name)."""

    def __init__(self, gm, names: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.names, self.got = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.got[n.name] = out.detach()
        return out


def qk_scales(dense: fx.GraphModule, zeroed: fx.GraphModule, sites: list, calib) -> dict:
    """Per site and kv head, the factor that best restores the dense attention logits' scale.

    Removing q/k pairs shrinks every logit ``q . k`` by what the removed pairs contributed; softmax
    then flattens. The logits have no linear layer after them to refit, so the choice here is the
    least-squares rescale of each head: ``s_h = <L_pruned, L_dense> / <L_pruned, L_pruned>`` over the
    calibration tokens (each query's logits centred over its keys, since softmax ignores a shift; padding
    left out), with ``L_pruned`` read from ``zeroed`` (the dense model with the removed q/k
    rows zeroed: what the rewrite computes). One factor per kv head (summed over the q heads that share
    it): multiplying the head's q rows by it is exact under RoPE and GQA, which a fuller bilinear refit
    of the kept q/k weights is not without per-pair constraints, and it costs one pass. Returns
    ``{site name: np.ndarray [kv heads]}`` for the ``sites`` given (attention sites whose qk group prunes).
    """
    names = {}
    for s in sites:
        names[s.operands[0]] = (s, "q")
        names[s.operands[1]] = (s, "k")
    num = {s.name: 0.0 for s in sites}
    den = {s.name: 0.0 for s in sites}
    for flat, mask in chunks(dense, calib):
        got = []
        for gm in (dense, zeroed):
            r = _Operands(gm, names)
            with torch.no_grad():
                r.run(*flat)
            got.append(r.got)
        for s in sites:
            qd, kd = got[0][s.operands[0]], got[0][s.operands[1]]
            qz, kz = got[1][s.operands[0]], got[1][s.operands[1]]
            if qd.dim() != 4 or kd.dim() != 4 or qd.shape[1] % kd.shape[1]:
                continue
            rep = qd.shape[1] // kd.shape[1]
            ld = _centred(qd.double() @ kd.double().repeat_interleave(rep, 1).transpose(-1, -2), mask)
            lz = _centred(qz.double() @ kz.double().repeat_interleave(rep, 1).transpose(-1, -2), mask)
            num[s.name] = num[s.name] + (lz * ld).sum((0, 2, 3)).reshape(-1, rep).sum(1)
            den[s.name] = den[s.name] + (lz * lz).sum((0, 2, 3)).reshape(-1, rep).sum(1)
    for s in sites:        # over the ranks of a process group: every rank saw a chunk, so each has the same tensors
        if isinstance(den[s.name], torch.Tensor):
            all_sum(num[s.name], den[s.name])
    out = {}
    for s in sites:
        if isinstance(den[s.name], torch.Tensor):
            d = den[s.name].numpy()
            out[s.name] = np.where(d > 0, num[s.name].numpy() / np.maximum(d, 1e-300), 1.0)
    return out


def _centred(logits: torch.Tensor, mask) -> torch.Tensor:
    """Logits ``[B, H, Nq, Nk]`` less their mean over each query's keys (softmax ignores that shift),
    with padded queries and keys (``mask [B, N]``) set to zero so they do not count."""
    if mask is None or tuple(mask.shape) != (logits.shape[0], logits.shape[-1]) or logits.shape[-1] != logits.shape[-2]:
        return logits - logits.mean(-1, keepdim=True)
    m = (mask != 0).to(logits.dtype)
    mk, mq = m[:, None, None, :], m[:, None, :, None]
    mean = (logits * mk).sum(-1, keepdim=True) / mk.sum(-1, keepdim=True).clamp_min(1)
    return (logits - mean) * mk * mq


def scale_rows(gm: fx.GraphModule, group, scales: np.ndarray) -> None:
    """Multiply the q rows (weight and bias) of each kv head of ``group`` (a qk group) by its scale, in
    ``gm`` (the tensors are replaced, never written into)."""
    for m in group.members:
        if m.role != "q":
            continue
        old = get_attr(gm, m.param)
        f = torch.ones(old.shape[m.dim], dtype=old.dtype)
        for u, h in enumerate(group.heads):
            f[torch.as_tensor(m.index[u], dtype=torch.long)] = float(scales[h])
        shape = [1] * old.dim()
        shape[m.dim] = -1
        replace_attr(gm, m.param, (old.detach() * f.reshape(shape).to(old.device)).contiguous(), old)
