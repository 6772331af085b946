"""Pass: static key/value token pruning (AMG), gathered *before* the K and V projections.

For every attention site the plan lists kept key positions for, the input of its K and V
projections is replaced by ``index_select(x, token_dim, kept)``, so only kept rows are
projected (AMG's reference slices K/V after projecting every token). Queries keep all tokens,
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
    >>> [tuple(n.meta["val"].shape) for n in small.graph.nodes if n.name.startswith("tokens")]
    [(1, 3, 192), (1, 3, 192)]
"""
from __future__ import annotations

import torch
import torch.fx as fx

from amgfx.errors import RewriteError
from amgfx.indexprop import shape
from amgfx.ops import LAYERS, MOVE, IDENTITY

from ._graph import constant

aten = torch.ops.aten


def _projection(operand: fx.Node) -> fx.Node | None:
    """The linear that produced an attention operand, through views, permutes and copies."""
    n = operand
    for _ in range(16):
        if n.op != "call_function":
            return None
        if n.target in LAYERS:
            return n
        if n.target not in MOVE and n.target not in IDENTITY:
            return None
        n = n.args[0]
    return None


def _gather(gm, proj: fx.Node, kept: list, keys: int, site: str) -> None:
    x = proj.args[0]
    xs = shape(x)
    dims = [d for d, s in enumerate(xs) if s == keys and d > 0]
    if len(xs) != 3 or dims != [1]:
        raise RewriteError(f"{site}: the K/V projection input {x.name} {list(xs)} has no single token axis of "
                           f"size {keys}")
    idx = constant(gm, proj, torch.tensor(kept, dtype=torch.long), "tokens")
    with gm.graph.inserting_before(proj):
        g = gm.graph.call_function(aten.index_select.default, (x, 1, idx))
    g.name = gm.graph._graph_namespace.create_name(f"tokens_{proj.name}", None)
    g.meta["val"] = x.meta["val"]                    # the original shape: masks say what survives
    g.meta["amgfx_token_rows"] = (1, list(kept))
    if "amgfx_dims" in x.meta:
        g.meta["amgfx_dims"] = x.meta["amgfx_dims"]
    proj.replace_input_with(x, g)


def token_gather(gm: fx.GraphModule, plan) -> fx.GraphModule:
    """Gather kept key positions before the K and V projections of every site in ``plan.tokens``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for node, t in plan.tokens.items():
        attn = nodes[node]
        mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("attn_mask")
        if mask is not None or attn.kwargs.get("is_causal") or (len(attn.args) > 5 and attn.args[5]):
            raise RewriteError(f"{t['site']}: static key pruning with an attention mask or causal attention is not "
                               "supported yet")
        projs = {_projection(o) for o in attn.args[1:3]}
        if None in projs or _projection(attn.args[0]) in projs:
            raise RewriteError(f"{t['site']}: cannot find K/V projections separate from the query's")
        for p in projs:
            _gather(gm, p, t["kept"], t["keys"], t["site"])
    return gm
