"""Pass: split a fused q/k/v projection into one projection per operand, when it must.

timm computes ``qkv = linear(x)`` and reshapes it to ``(B, N, 3, H, d)``. Once q/k keep
fewer dims than v, no single ``d`` fits, so that reshape cannot be rewritten. This pass
gives each operand its own projection, ``linear(x, W[rows_q])``, followed by the view and
permute that put its rows where the old chain put them. The layout is read from index
propagation (which rows and which tokens land where), not from the op sequence, so the
same code serves any fused layout. The row slices of ``W`` are folded into new parameters
(``qkv.q_weight``, ...) by ``cleanup``; the fused weight is then freed.

``options["split_qkv"]``: ``"auto"`` splits only where the fused chain would not pack
densely; ``"always"`` splits every fused site; ``"never"`` raises instead.

Example (q/k keep half of each head, v all of it: timm's one qkv no longer fits one reshape):
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.apply(m, amgfx.Plan(keep={"qk:blocks.0.attn": list(range(0, 192, 2))}), x)
    >>> sorted(n for n, _ in small.named_parameters() if "attn.qkv" in n)
    ['blocks.0.attn.qkv.k_bias', 'blocks.0.attn.qkv.k_weight', 'blocks.0.attn.qkv.q_bias', 'blocks.0.attn.qkv.q_weight', 'blocks.0.attn.qkv.v_bias', 'blocks.0.attn.qkv.v_weight']
    >>> tuple(small.get_parameter("blocks.0.attn.qkv.q_weight").shape), bool((small(x) - m(x)).abs().max() > 0)
    ((96, 192), True)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import RewriteError
from ..graph.fx import eliminate_dead_code
from ..graph.indexprop import activation_taint, trace_back
from ..graph.masks import compact_shape, propagate_masks
from ..graph.ops import opname
from ..graph.rows import fused_producers, split_operand
from .pipeline import graph_pass
from ..planning.resolved import Resolved

aten = torch.ops.aten


def _irregular(gm, ms, prod, operands) -> bool:
    region = set()
    tainted = activation_taint(gm.graph)
    for o in operands:
        region |= trace_back(o, tainted).nodes
    return any(isinstance(ms.get(n), torch.Tensor) and compact_shape(ms.get(n)) is None for n in region)


@graph_pass(requires=("branches_removed",), ensures=("qkv_split",))
def split_qkv(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    mode = resolved.options.get("split_qkv", "auto")
    nodes = {n.name: n for n in gm.graph.nodes}
    # masks of the graph as captured: a split only adds nodes, so other sites' masks stay valid
    ms = propagate_masks(gm, resolved.params, dense=False) if mode == "auto" and any(a.fused for a in resolved.attention.values()) else None
    rows = {**resolved.dead, **resolved.tokens}              # sites whose queries and keys keep different positions
    sites = dict(resolved.attention)
    sites.update({k: v for k, v in rows.items() if k not in sites})
    for node, site in sites.items():
        gather = node in rows                            # q must stand alone
        if not site.fused or not gather and mode == "never" and site.qk_dim == site.v_dim:
            continue
        ops = [nodes[o] for o in site.operands]
        for prod, parts in fused_producers(gm, ops).items():
            if not gather and mode == "auto" and not _irregular(gm, ms, prod, [o for _, o in parts]):
                continue
            if mode == "never" and not gather:
                raise RewriteError(f"{site.site}: q/k and v keep different head dims in the fused projection "
                                   f"{prod.name} ({opname(prod.target)}); allow options['split_qkv']='auto'")
            for part, o in parts:
                split_operand(gm, prod, o, part, activation_taint(gm.graph))
    return eliminate_dead_code(gm)
