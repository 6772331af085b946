"""Pass: static key/value token pruning (AMG), gathered *before* the K and V projections.

For every attention site the plan lists kept key positions for, the input of its K and V
projections is replaced by ``index_select(x, token_dim, kept)``, so only kept rows are
projected (AMG's reference slices K/V after projecting every token). An attention mask (BERT's
padding mask) loses the same key positions on its last axis. Queries keep all tokens,
so attention becomes N x N'. The result equals the original attention with ``-inf`` added to
the logits of the dropped keys.

The gathers are :func:`amgfx.graph.rows.insert_token_gathers`: :mod:`amgfx.graph.masks` seeds a
keep mask at each, and ``fix_shapes`` then rewrites every size downstream (K/V reshapes) as it
does for pruned neurons. ``split_qkv`` runs first, so a fused qkv projection has separate K and V
projections to gather for.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.apply(m, amgfx.Plan(tokens={"blocks.0.attn": [0, 1, 3]}), x)
    >>> [tuple(n.meta["val"].shape) for n in small.graph.nodes if n.name.startswith("tokens")]   # K and V share it
    [(1, 3, 192)]
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.rows import insert_token_gathers
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=("qkv_split",), ensures=("token_rows",))
def token_gather(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    """Gather kept key positions before the K and V projections of every site in ``resolved.tokens``."""
    return insert_token_gathers(gm, resolved.tokens)
