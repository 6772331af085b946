"""Cost model: parameter and FLOP counts, dense and as a plan predicts them.

FLOPs follow ``torch.utils.flop_counter`` (2 x multiply-accumulates of matmuls, convolutions
and attention; element-wise ops are free), computed per graph node from shapes. The planned
shapes come from the keep masks, so a prediction needs no rewrite; the tests check it
against ``FlopCounterMode`` run on the pruned GraphModule.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> p = predict(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))}))
    >>> p["flops"]["dense"], p["flops"]["pruned"]
    (10449408, 6010368)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from .errors import RewriteError
from .indexprop import shape
from .masks import propagate_masks
from .ops import SDPA

aten = torch.ops.aten
__all__ = ["node_flops", "graph_flops", "predict", "measure_flops", "count_params"]


def _mm(a, b, out):
    return 2 * math.prod(out[:-1]) * a[-1] * out[-1]


def node_flops(n: fx.Node, shp) -> int:
    """FLOPs of one node given a shape function ``shp(node_or_arg)``."""
    t = n.target
    if t is aten.linear.default:
        return _mm(shp(n.args[0]), None, shp(n))
    if t is aten.addmm.default:
        return _mm(shp(n.args[1]), None, shp(n))
    if t in (aten.mm.default, aten.matmul.default, aten.bmm.default):
        return _mm(shp(n.args[0]), None, shp(n))
    if t in (aten.conv2d.default, aten.conv1d.default):
        w, out = shp(n.args[1]), shp(n)
        return 2 * math.prod(out) * math.prod(w[1:])
    if t in SDPA:
        q, k, v = (shp(a) for a in n.args[:3])
        return _sdpa(q, k, q[-1], v[-1])
    return 0


def _sdpa(q, k, e_qk, e_v):
    return 2 * math.prod(q[:-1]) * k[-2] * (e_qk + e_v)


def graph_flops(gm: fx.GraphModule, shp=shape) -> int:
    return sum(node_flops(n, shp) for n in gm.graph.nodes if n.op == "call_function")


def count_params(gm) -> int:
    return sum(p.numel() for p in gm.parameters())


def _row_graph(cg, r):
    """The captured graph with the row gathers of ``r`` inserted (token pruning, dead tokens).

    Masks follow channels through any graph, but which rows a fused q/k/v projection computes
    is decided by where the gathers sit, so the prediction runs the row passes themselves on a
    copy of the graph (cached per token plan: the budget asks again and again).
    """
    if not r.tokens and not r.dead:
        return cg.gm
    from passes import dead_tokens, split_qkv, token_gather
    from passes._graph import copy_module
    key = repr((sorted((k, v["kept"]) for k, v in r.tokens.items()), sorted(r.dead)))
    cache = cg.__dict__.setdefault("_row_graphs", {})
    if key not in cache:
        rows = dataclasses.replace(r, attention={}, options={**r.options, "split_qkv": "never"})
        cache.clear()                            # one at a time: a graph copy per model is enough
        cache[key] = dead_tokens(token_gather(split_qkv(copy_module(cg.gm), rows), rows), rows)
    return cache[key]


def predict(cg, plan) -> dict:
    """Parameters and FLOPs of the model, dense and after ``plan`` (nothing is rewritten)."""
    r = plan.resolve(cg)
    gm = _row_graph(cg, r)
    try:
        ms = propagate_masks(gm, r.params)
    except RewriteError:
        if not r.dead:
            raise
        # passes/dead_tokens takes its gathers out when the narrowing cannot flow: so do we
        r = dataclasses.replace(r, dead={})
        gm = _row_graph(cg, r)
        ms = propagate_masks(gm, r.params)
    lowering = r.options.get("lowering", "auto")

    pruned = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in SDPA and n.name in r.attention and lowering != "none":
            q, k, v = (ms.new_shape(a) for a in n.args[:3])
            e = max(q[-1], v[-1])                # padded to equal dims by lower_attention
            pruned += _sdpa(q, k, e, e)
        else:
            pruned += node_flops(n, ms.new_shape)
    dense_p = 0
    pruned_p = 0
    for fqn, p in cg.gm.named_parameters():
        dense_p += p.numel()
        dims = r.params.get(fqn, {})
        pruned_p += math.prod(len(dims[d]) if d in dims else s for d, s in enumerate(p.shape))
    return {"params": {"dense": dense_p, "pruned": pruned_p},
            "flops": {"dense": graph_flops(cg.gm), "pruned": pruned}}


def measure_flops(gm, example=None) -> int:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward."""
    from torch.utils.flop_counter import FlopCounterMode
    args, kwargs = example if example is not None else gm.meta["amgfx_example"]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        gm(*args, **kwargs)
    return fc.get_total_flops()
