"""Pass: dead-token elimination. Compute only the token positions that reach an output.

A classifier that reads ``x[:, 0]`` of its last block needs that block's other positions only
as keys and values. :mod:`amgfx.graph.liveness` finds the linears whose input is needed everywhere
but whose output only at some positions (the last query projection); this pass feeds them
``index_select(x, 1, live)``, and the existing machinery does the rest: :mod:`amgfx.graph.masks`
carries the narrowed rows through attention, proj, residual adds, norms and the MLP, and
``fix_shapes`` rewrites their reshapes and the final ``select``. Keys and values still see
every position, so the result is exact; no score is involved.

It runs unless ``options["dead_tokens"] == "off"``. Where the narrowing cannot flow through
the graph, the gathers are taken out again and ``gm.meta["amgfx_dead_tokens"]`` says why.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.apply(m, amgfx.Plan(), x)
    >>> small.meta["amgfx_dead_tokens"]     # the query positions of blocks.1.attn that reach the output
    {'applied': True, 'live': {'blocks.1.attn': [0]}, 'gathered_before': ['linear_default']}
    >>> bool((small(x) - m(x)).abs().max() < 1e-5)
    True
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.meta import DEAD_TOKENS
from ..graph.rows import insert_live_gathers
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=("qkv_split", "token_rows"), ensures=("live_rows",))
def dead_tokens(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    """Gather the live positions before every linear whose output is read only there."""
    if resolved.options.get("dead_tokens", "auto") == "off" or not resolved.dead:
        return gm
    done = insert_live_gathers(gm, resolved.params)
    if "reason" not in done:                         # key order as users see it in meta
        done = {"applied": done["applied"], "live": {d.site: list(d.live) for d in resolved.dead.values()},
                "gathered_before": done["gathered_before"]}
    gm.meta[DEAD_TOKENS] = done
    return gm
