"""Pass: static key/value token pruning (AMG), gathered *before* the K and V projections.

For every attention site the plan lists kept key positions for, the input of its K and V
projections is replaced by ``index_select(x, token_dim, kept)``, so only kept rows are
projected (AMG's reference slices K/V after projecting every token). An attention mask (BERT's
padding mask) loses the same key positions on its last axis. Queries keep all tokens,
so attention becomes N x N'. The result equals the original attention with ``-inf`` added to
the logits of the dropped keys.

The new node keeps the *original* shape in ``meta["val"]`` and carries its kept rows in
``meta["amgfx_token_rows"]``: :mod:`amgfx.masks` seeds a keep mask there, and ``fix_shapes``
then rewrites every size downstream (K/V reshapes) as it does for pruned neurons. ``split_qkv``
runs first, so a fused qkv projection has separate K and V projections to gather for.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.apply(m, amgfx.Plan(tokens={"blocks.0.attn": [0, 1, 3]}), x)
    >>> [tuple(n.meta["val"].shape) for n in small.graph.nodes if n.name.startswith("tokens")]   # K and V share it
    [(1, 3, 192)]
"""
from __future__ import annotations

import torch
import torch.fx as fx

from amgfx.errors import RewriteError
from amgfx.indexprop import activation_taint, shape
from amgfx.tokens import attention_mask, projection

from ._graph import gather_rows

aten = torch.ops.aten


def token_gather(gm: fx.GraphModule, plan) -> fx.GraphModule:
    """Gather kept key positions before the K and V projections of every site in ``plan.tokens``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    tainted = activation_taint(gm.graph)
    for node, t in plan.tokens.items():
        attn = nodes[node]
        projs = {projection(o, tainted) for o in attn.args[1:3]}
        if None in projs or projection(attn.args[0], tainted) in projs:
            raise RewriteError(f"{t['site']}: cannot find K/V projections separate from the query's")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        done: dict = {}
        for p in sorted(projs, key=order.get):
            x = p.args[0]
            if len(shape(x)) != 3 or shape(x)[1] != t["keys"]:
                raise RewriteError(f"{t['site']}: the K/V projection input {x.name} {list(shape(x))} has no token "
                                   f"axis 1 of size {t['keys']}")
            if x in done:                            # K and V read the same rows: gather them once
                p.replace_input_with(x, done[x])
            else:
                done[x] = gather_rows(gm, x, p, 1, t["kept"], f"tokens_{p.name}")
        mask = attention_mask(attn)
        if isinstance(mask, fx.Node) and shape(mask)[-1] == t["keys"]:     # the same keys leave the mask
            gather_rows(gm, mask, attn, len(shape(mask)) - 1, t["kept"], f"tokens_mask_{attn.name}")
    return gm
