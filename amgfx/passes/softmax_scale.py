"""Pass: keep the original softmax scale when the q/k head dim shrinks.

``scaled_dot_product_attention`` without ``scale=`` uses 1/sqrt(q.size(-1)), which after
pruning would silently become 1/sqrt(new dim) and change every attention map (timm calls it
this way). Sites whose q/k dim changes get their original scale passed explicitly; explicit
matmul attention already multiplies by a constant and needs nothing.

Example:
    >>> import torch, torch.fx as fx
    >>> from amgfx.planning.resolved import AttentionChange, Resolved
    >>> g = fx.Graph(); q = g.placeholder("q")
    >>> a = g.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, q, q)); _ = g.output(a)
    >>> change = AttentionChange("s", "sdpa", 0.125, False, heads=1, kv_heads=1, qk_dim=4, v_dim=8, fused=False, operands=())
    >>> gm = softmax_scale(fx.GraphModule({}, g), Resolved({}, {a.name: change}, {}, True)).graph_module
    >>> a.kwargs
    {'scale': 0.125}
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.ops import SDPA, set_sdpa_arg
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=(), ensures=("scale_pinned",))
def softmax_scale(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    for n in gm.graph.nodes:
        site = resolved.attention.get(n.name)
        if site is None or n.target not in SDPA:
            continue
        set_sdpa_arg(n, "scale", float(site.scale))
    return gm
