"""FLOPs of many candidate plans, fast and exact: the graph splits into regions that prune independently.

The budget bisects over prefixes of one global ranking, asking the FLOPs of a plan about twenty times;
each ask used to propagate keep masks through the whole graph (minutes for a 30-layer LLM). But a
group's units only change the shapes of a few nodes (its q/k/v projections, the attention, the output
projection; an MLP's layers), and groups whose nodes do not meet do not interact. So:

* one propagation with *every* group probed at once (one unit of each head removed) marks the nodes
  any plan can change; split into connected pieces, those are the *regions*, each owning the groups
  whose parameters it holds (a site's qk, v and head groups share one region; an MLP has its own);
* a plan's FLOPs are the base FLOPs less, per region, what its own groups save there, each region
  propagated over its own nodes only (from the base masks) and remembered by what its groups keep.

The regions are exact where masks are: a group that changes a node's shape at all changes it for any
removal, and the budget checks the plan it returns against the whole-graph count
(:func:`amgfx.planning.cost.predict`) once, falling back to it if the two ever differ.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> rc = RegionCost.build(cg, [g for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")])
    >>> sorted(len(r.groups) for r in rc.regions)
    [1, 1, 3, 3]
    >>> plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100)), "qk:blocks.1.attn": list(range(0, 192, 2))})
    >>> rc.flops(plan) == amgfx.cost.predict(cg, plan)["flops"]["pruned"]
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from ..errors import RewriteError
from ..graph.bools import equal
from ..graph.masks import propagate_masks
from .cost import attention_override, costly_nodes, node_flops, row_graph
from .plan import Plan

__all__ = ["RegionCost", "Region", "block_flops"]


@dataclass
class Region:
    """Nodes one set of groups can change, in graph order, and what they cost with nothing removed."""
    groups: list                     # group names
    nodes: list                      # fx nodes, graph order
    costly: list                     # the FLOP-counting nodes among them
    base: int                        # their FLOPs under the base plan
    memo: dict = field(default_factory=dict)


def _probe(groups) -> dict:
    """One removal in every group (one unit per head for qk/v): keep lists, for the region search."""
    keep = {}
    for g in groups:
        if g.kind in ("qk", "v") and g.heads is not None:
            drop = {int(np.nonzero(g.heads == h)[0][0]) for h in np.unique(g.heads)}
            if len(drop) * 2 > g.units:
                continue
        elif g.units < 2:
            continue
        else:
            drop = {0}
        keep[g.name] = [u for u in range(g.units) if u not in drop]
    return keep


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return equal(a, b) if a.dtype == b.dtype == torch.bool else a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _touched(cg, groups, base_params: dict, gm) -> tuple:
    """(base masks, the nodes whose masks or inputs a removal in any of ``groups`` changes) over ``gm``;
    raises RewriteError where the probe cannot propagate."""
    probe = Plan(keep=_probe(groups))
    ms0 = propagate_masks(gm, base_params, dense=False)
    ms1 = propagate_masks(gm, {**base_params, **probe.resolve(cg).params}, dense=False)
    changed = {n for n in gm.graph.nodes if n.op != "output" and not _same(ms0.get(n), ms1.get(n))}
    # and the nodes reading them: a layer whose input columns shrink costs less, its output unchanged
    return ms0, changed, changed | {u for n in changed for u in n.users if u.op != "output"}, probe


def block_flops(cg) -> int:
    """FLOPs of the ops some attention or MLP unit can shrink: the blocks, without the embedding, the
    output head or anything else no ``qk``/``v``/``head``/``mlp`` group reaches (what LLM papers count
    as the prunable part; :func:`amgfx.planning.budget.allocate` takes ``scope="blocks"``)."""
    groups = [g for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")]
    if not groups:
        return 0
    _, _, touched, _ = _touched(cg, groups, {}, cg.gm)
    return sum(node_flops(n) for n in costly_nodes(cg.gm) if n in touched)


@dataclass
class RegionCost:
    """Exact FLOPs of plans that add to ``base``'s removals only in ``groups`` (see the module docstring)."""
    cg: object
    base: Plan
    gm: fx.GraphModule
    masks: object                    # keep masks under the base plan
    regions: list
    total: int                       # FLOPs of the whole graph under the base plan
    dense: int                       # FLOPs of the dense graph

    @classmethod
    def build(cls, cg, groups, base: Plan | None = None) -> "RegionCost | None":
        """The regions of ``groups`` over ``base`` (default: nothing removed); None where the fast path does not
        apply (token plans, branches removed whole, or a probe the masks refuse): then count the whole graph."""
        base = base or Plan()
        r = base.resolve(cg)
        if r.tokens or r.removed or base.keep:
            return None
        gm = row_graph(cg, r)
        try:
            ms0, changed, touched, probe = _touched(cg, groups, r.params, gm)
        except RewriteError:
            return None
        g = nx.Graph()
        g.add_nodes_from(touched)
        for n in touched:
            g.add_edges_from((n, a) for a in n.all_input_nodes if a in changed)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        costly = set(costly_nodes(gm))
        regions = []
        by_param = {}
        for comp in nx.connected_components(g):
            nodes = sorted(comp, key=order.__getitem__)
            reg = Region(groups=[], nodes=nodes, costly=[n for n in nodes if n in costly], base=0)
            reg.base = sum(node_flops(n, ms0.new_shape, attention_override(n, r, ms0)) for n in reg.costly)
            regions.append(reg)
            for n in nodes:
                if n.op == "get_attr":
                    by_param[n.target] = reg
        for grp in groups:
            if grp.name not in probe.keep or any(m.param not in by_param for m in grp.members):
                return None                  # a group the probe could not mark: count the whole graph
            regs = {id(by_param[m.param]): by_param[m.param] for m in grp.members}
            if len(regs) != 1:
                return None                  # (connected through its own nodes, so this does not happen)
            next(iter(regs.values())).groups.append(grp.name)
        regions = [reg for reg in regions if reg.groups]
        total = sum(node_flops(n, ms0.new_shape, attention_override(n, r, ms0)) for n in costly_nodes(gm))
        dense = sum(node_flops(n) for n in costly_nodes(cg.gm))
        return cls(cg, base, gm, ms0, regions, total, dense)

    def flops(self, plan: Plan) -> int:
        """FLOPs of ``plan`` (whose removals beyond the base lie in this cost's groups)."""
        out = self.total
        for reg in self.regions:
            keep = {n: plan.keep[n] for n in reg.groups if n in plan.keep}
            if not keep:
                continue
            key = tuple((n, tuple(keep[n])) for n in sorted(keep))
            if key not in reg.memo:
                reg.memo[key] = self._region(reg, keep)
            out -= reg.base - reg.memo[key]
        return out

    def _region(self, reg: Region, keep: dict) -> int:
        sub = Plan(keep=keep)
        r = sub.resolve(self.cg)
        ms = propagate_masks(self.gm, r.params, dense=False, nodes=reg.nodes, base=self.masks)
        return sum(node_flops(n, ms.new_shape, attention_override(n, r, ms)) for n in reg.costly)
