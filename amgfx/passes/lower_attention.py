"""Pass: choose how pruned attention runs when its q/k head dim differs from its v head dim.

PyTorch's CPU flash kernel needs ``q.size(-1) == v.size(-1)``; otherwise SDPA silently falls
back to the math kernel. Measured on 2 cores (benchmarks/results/attention_lowering.md):
DeiT-S shaped attention with q/k 32 and v 64 is about 3x slower than the dense 64/64 it
replaced. Zero-padding the smaller side restores the flash kernel at the cost of a cheap
copy, and is exact: zero q/k columns add nothing to q.k, and zero v columns are sliced off.

``options["lowering"]``: ``"auto"`` and ``"pad"`` pad; ``"none"`` leaves unequal dims.
Explicit matmul attention (no SDPA) is left alone: it has no such kernel constraint.

Example:
    >>> import torch, torch.fx as fx
    >>> from amgfx.planning.resolved import AttentionChange, Resolved
    >>> g = fx.Graph(); q, v = g.placeholder("q"), g.placeholder("v")
    >>> a = g.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, q, v), {"scale": .1})
    >>> _ = g.output(a)
    >>> change = AttentionChange("s", "sdpa", .1, True, heads=1, kv_heads=1, qk_dim=2, v_dim=4, fused=False, operands=())
    >>> gm = lower_attention(fx.GraphModule({}, g), Resolved({}, {a.name: change}, {}, True)).graph_module
    >>> gm(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 4)).shape
    torch.Size([1, 1, 3, 4])
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['constant_pad_nd.default', 'constant_pad_nd.default', 'scaled_dot_product_attention.default']
"""
from __future__ import annotations


import torch
import torch.fx as fx

from ..graph.fx import call, remove_marked
from ..graph.meta import LOWERED
from ..graph.ops import SDPA, sdpa_args, set_sdpa_arg
from .pipeline import graph_pass
from ..planning.resolved import Resolved

aten = torch.ops.aten


@graph_pass(requires=("shapes_fixed", "scale_pinned"), ensures=("lowered",))
def lower_attention(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    if resolved.options.get("lowering", "auto") == "none":
        return gm
    for n in list(gm.graph.nodes):
        site = resolved.attention.get(n.name)
        if site is None or n.target not in SDPA or site.qk_dim == site.v_dim:
            continue
        dq, dv = site.qk_dim, site.v_dim
        a = sdpa_args(n)
        for name in ("q", "k") if dq < dv else ("v",):
            padded = call(gm, n, aten.constant_pad_nd.default, [getattr(a, name), [0, abs(dv - dq)], 0.0])
            padded.meta[LOWERED] = True
            set_sdpa_arg(n, name, padded)
        if dq > dv:
            users = list(n.users)
            with gm.graph.inserting_after(n):
                out = gm.graph.call_function(aten.slice.Tensor, (n, -1, 0, dv))
            out.meta[LOWERED] = True
            for u in users:
                u.replace_input_with(n, out)
    gm.recompile()
    return gm


def is_lowered(gm: fx.GraphModule) -> bool:
    return any(n.meta.get(LOWERED) for n in gm.graph.nodes)


def unlower(gm: fx.GraphModule) -> fx.GraphModule:
    """Undo ``lower_attention`` in place (exact: the padding only served the kernel choice).

    Analysis of an already pruned module runs on the unlowered graph, so its head dims are the
    real ones; the next ``apply`` lowers again for the new dims.
    """
    return remove_marked(gm, LOWERED)
