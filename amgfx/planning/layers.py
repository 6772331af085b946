"""Where a plan's budget went, layer by layer: kept units of every kind and the FLOPs kept.

A *layer* is one attention site and the MLPs that follow it in the graph, before the next site.
Nothing here reads module names or classes: layers come from node order, FLOPs from the cost
model (:func:`amgfx.planning.cost.predict`, per node), kept counts from the plan. Costly nodes
outside every layer's span (patch embedding, classifier, pooler) are the ``other`` row.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> r = layers(cg, amgfx.Plan(keep={"mlp:blocks.1.mlp": list(range(192))}))
    >>> [(l.name, l.kept["mlp"]) for l in r.layers]
    [('blocks.0.attn', (768, 768)), ('blocks.1.attn', (192, 768))]
    >>> r.layers[1].flops["pruned"] < r.layers[1].flops["dense"], r.layers[0].flops["pruned"] == r.layers[0].flops["dense"]
    (True, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..analysis.coupling import GroupId
from ..analysis.tokens import token_sites
from .cost import predict, row_graph

__all__ = ["Layer", "PlanLayers", "KINDS", "by_layer", "layers"]

KINDS = ("qk", "v", "head", "mlp", "tokens")   # the rows of the per-layer picture, in the papers' order


@dataclass
class Layer:
    """One attention site and the MLPs after it: ``kept[kind] = (kept, dense)`` units, FLOPs dense/pruned."""
    name: str
    mlps: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)
    flops: dict = field(default_factory=lambda: {"dense": 0, "pruned": 0})


@dataclass
class PlanLayers:
    layers: list
    other: dict                   # FLOPs outside every layer: {"dense": .., "pruned": ..}
    total: dict                   # the whole model's FLOPs
    target: float | None = None   # the plan's target_flops, when it had one
    residual: dict = field(default_factory=dict)   # stream name -> (kept, dense) channels

    def to_dict(self) -> dict:
        return {"layers": [{"name": lay.name, "mlps": lay.mlps, "kept": {k: list(v) for k, v in lay.kept.items()},
                            "flops": lay.flops} for lay in self.layers],
                "other": self.other, "total": self.total, "target": self.target,
                "residual": {k: list(v) for k, v in self.residual.items()}}


def _kept(plan, g, heads_kept=None) -> int:
    """Units of ``g`` that survive: listed in ``keep`` and, for q/k and v, in a kept head."""
    keep = np.asarray(plan.keep.get(g.name, range(g.units)), dtype=int)
    if heads_kept is not None and g.heads is not None:
        keep = keep[np.isin(g.heads[keep], heads_kept)]
    return int(keep.size)


def _spans(cg, sites, order) -> list[tuple[int, int]]:
    """(first, last) graph position of each layer's own nodes: q/k/v/proj, the attention op, MLP layers."""
    spans = []
    for s, mlps in sites:
        names = [s.node] + [lay.node for lay in (s.q, s.k, s.v, s.proj) if lay is not None]
        names += [lay.node for m in mlps for lay in (*m.fc1, m.fc2)]
        pos = [order[n] for n in names if n in order]
        spans.append((min(pos), max(pos)))
    return spans


def _assign(flops: dict, order: dict, spans) -> tuple[list[int], int]:
    """FLOPs per layer (a node counts where its position falls inside a span) and outside all."""
    per = [0] * len(spans)
    other = 0
    for name, f in flops.items():
        p = order.get(name)
        i = next((i for i, (a, b) in enumerate(spans) if p is not None and a <= p <= b), None)
        if i is None:
            other += f
        else:
            per[i] += f
    return per, other


def by_layer(cg) -> list[tuple]:
    """``[(site, [MLP, ...])]`` in graph order: each MLP joins the last supported site before it."""
    order = {n.name: i for i, n in enumerate(cg.gm.graph.nodes)}
    sites = sorted((s for s in cg.sites if s.supported), key=lambda s: order[s.node])
    owned: list = [[] for _ in sites]
    for m in cg.mlps:
        before = [i for i, s in enumerate(sites) if order[s.node] < order[m.fc2.node]]
        if before:
            owned[before[-1]].append(m)
    return list(zip(sites, owned))


def layers(cg, plan) -> PlanLayers:
    """The plan of ``cg`` per layer: what every kind keeps and the FLOPs kept (see the module docstring)."""
    groups = {g.name: g for g in cg.groups}
    order = {n.name: i for i, n in enumerate(cg.gm.graph.nodes)}
    pairs = by_layer(cg)
    sites, owned = [p[0] for p in pairs], [p[1] for p in pairs]
    ts = token_sites(cg)
    out = []
    for s, mlps in zip(sites, owned):
        lay = Layer(s.name, [m.name for m in mlps])
        head = groups.get(GroupId("head", s.name))
        heads = np.asarray(plan.keep.get(head.name, range(head.units)) if head else range(s.num_kv_heads))
        if head is not None:
            lay.kept["head"] = (int(heads.size), head.units)
        for kind in ("qk", "v"):
            g = groups.get(GroupId(kind, s.name))
            if g is not None:
                lay.kept[kind] = (_kept(plan, g, heads), g.units)
        ms = [groups[GroupId("mlp", m.name)] for m in mlps if GroupId("mlp", m.name) in groups]
        if ms:
            lay.kept["mlp"] = (sum(_kept(plan, g) for g in ms), sum(g.units for g in ms))
        t = ts.get(s.name)
        if t is not None and t.prunable:
            lay.kept["tokens"] = (len(plan.tokens.get(s.name, range(t.keys))), t.keys)
        out.append(lay)
    p = predict(cg, plan, per_node=True)
    spans = _spans(cg, list(zip(sites, owned)), order)
    dense, other_d = _assign(p["nodes"]["dense"], order, spans)
    porder = _pruned_order(cg, plan, order)
    pruned, other_p = _assign(p["nodes"]["pruned"], porder, spans)
    for lay, d, q in zip(out, dense, pruned):
        lay.flops = {"dense": d, "pruned": q}
    residual = {g.where: (_kept(plan, g), g.units) for g in cg.groups if g.kind == "residual"}
    target = plan.meta.get("target_flops")
    return PlanLayers(out, {"dense": other_d, "pruned": other_p}, dict(p["flops"]),
                      float(target) if target is not None else None, residual)


def _pruned_order(cg, plan, order: dict) -> dict:
    """Graph position, in the captured graph's numbering, of every node of the graph FLOPs were
    predicted on: an inserted node takes the position of the next original node (a split projection
    stands where the fused one stood, before its users)."""
    gm = row_graph(cg, plan.resolve(cg))
    out, nxt = {}, len(order)
    for n in reversed(list(gm.graph.nodes)):
        nxt = order.get(n.name, nxt)
        out[n.name] = nxt
    return out
