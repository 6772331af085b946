"""Liveness along the token axis: which elements of every tensor reach the graph outputs.

A classifier that reads only the class token of its last block (``x[:, 0]``) needs the other
positions of that block only as keys and values. Everything that turns those positions into
outputs nobody reads (the last query projection, attention rows, proj, norm, MLP) is dead
work. This module finds it; ``amgfx/passes/dead_tokens.py`` removes it. No scores: it is exact.

Every node gets a *demand mask* of its original shape (``None``: every element is needed),
computed backward from the outputs. Data-movement ops are run on element ids, so any
select/slice/reshape is handled without a rule per op; compute ops follow the rules below,
and an op without a rule demands all of its inputs (always safe).

Example (a two-block ViT that classifies from the class token):
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> live_queries(cg)               # attention node -> query positions that reach the output
    {'scaled_dot_product_attention_1': [0]}
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .indexprop import _concrete, _const, is_layer, shape, val
from .meta import TOKEN_ROWS
from ..errors import noted
from .ops import (CONCAT, FUSED_ATTENTION, GETITEM, IDENTITY, LAYERS, MOVE, NORMS, POINTWISE, REDUCTIONS, SDPA,
                  SOFTMAX, VECTOR_NORMS, reduced_dims, sdpa_args, where)

aten = torch.ops.aten
__all__ = ["demand", "live_queries", "frontier", "live_rows"]



def _unbroadcast(d: torch.Tensor, shp) -> torch.Tensor:
    """Demand on an operand broadcast to ``d``'s shape: an element is needed if any copy of it is."""
    extra = d.ndim - len(shp)
    if extra:
        d = d.flatten(0, extra).any(0) if extra > 0 else d
    dims = [i for i, s in enumerate(shp) if s == 1 and d.shape[i] != 1]
    return d.any(dim=dims, keepdim=True) if dims else d


def _move(n, d, gm, cache):
    """Run the op on element ids of its input: the ids it outputs at demanded places are demanded."""
    x = n.args[0]
    ids = torch.arange(torch.Size(shape(x)).numel()).reshape(shape(x))
    if n.target is aten.index.Tensor:
        rest = [[_const(a, gm, cache) if isinstance(a, fx.Node) else a for a in n.args[1]]]
    else:
        rest = [_const(a, gm, cache) if isinstance(a, fx.Node) else _concrete(a) for a in n.args[1:]]
    if any(r is None for r in rest):
        return {x: None}
    try:
        out = ids.expand(*rest[0]) if n.target is aten.expand.default else n.target(ids, *rest, **n.kwargs)
    except (RuntimeError, TypeError, IndexError):
        return {x: None}                             # cannot follow the ids: everything is needed (safe)
    outs, ds = (out, d) if isinstance(out, (list, tuple)) else ([out], [d])
    need = torch.zeros(ids.numel(), dtype=torch.bool)
    for o, dd in zip(outs, ds):
        if dd is None:
            need[o.reshape(-1)] = True
        elif dd is not False:
            need[o[dd.broadcast_to(o.shape)]] = True
    return {x: need.reshape(ids.shape)}


def _concat(n, d, gm, cache):
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out, pos = {}, 0
    for a in n.args[0]:
        if n.target is aten.stack.default:
            piece = d.select(dim, pos).reshape(shape(a))
            pos += 1
        else:
            w = shape(a)[dim]
            piece = d.narrow(dim, pos, w)
            pos += w
        out[a] = _merge(out[a], piece) if a in out else piece
    return out


def _pointwise(n, d, gm, cache):
    return {a: _unbroadcast(d, shape(a)) for a in n.all_input_nodes if shape(a) is not None}


def _layer(n, d, gm, cache):
    spec = LAYERS[n.target]
    x = n.args[spec[0]]
    if n.target not in (aten.linear.default, aten.matmul.default, aten.mm.default) or len(shape(x)) < 2:
        return {x: None}
    return {x: d.any(-1, keepdim=True).expand(shape(x))}     # a row of the output reads its input row


def _norm(n, d, gm, cache):
    x = n.args[NORMS[n.target][0]]
    k = len(n.args[1])
    return {x: d.flatten(-k).any(-1).reshape(d.shape[:-k] + (1,) * k).expand(shape(x))}


def _softmax(n, d, gm, cache):
    dim = n.args[1]
    return {n.args[0]: d.any(dim, keepdim=True).expand(shape(n.args[0]))}


def _sdpa(n, d, gm, cache):
    a = sdpa_args(n)
    q, k, v = a.q, a.k, a.v
    rows = d.any(-1, keepdim=True)                           # [B, H, Nq, 1]: queries whose output is read
    out = {q: rows.expand(shape(q))}
    if bool(rows.any()):
        out.update({k: None, v: None})                      # every live query reads every key
    return out


def _reduce(n, d, gm, cache):
    x = n.args[0]
    dims, keep = reduced_dims(n)
    if not keep:
        for i in sorted(dims):
            d = d.unsqueeze(i)
    return {x: d.expand(shape(x))}


RULES = {}
RULES.update({t: _move for t in MOVE})
RULES.update({t: _pointwise for t in POINTWISE | IDENTITY})
RULES.update({t: _concat for t in CONCAT})
RULES.update({t: _norm for t in NORMS})
RULES.update({t: _softmax for t in SOFTMAX})
RULES.update({t: _sdpa for t in SDPA})
RULES.update({t: _reduce for t in set(REDUCTIONS) | VECTOR_NORMS})


def _merge(a, b):
    if a is None or b is None:
        return None
    return a | b


def demand(gm: fx.GraphModule) -> dict:
    """node -> demand mask (``None``: all of it is needed; absent: nothing of it is)."""
    env: dict = {}
    cache: dict = {}
    pieces: dict = {}                                # multi-output node -> {index: demand}
    for n in reversed(gm.graph.nodes):
        if n.op == "output":
            for a in n.all_input_nodes:
                env[a] = None
            continue
        if n.op != "call_function":
            continue
        if n in pieces:                              # unbind/split: only the pieces read are needed
            outs = val(n)
            env[n] = [pieces[n].get(i, False) for i in range(len(outs))]
        if n not in env:
            continue
        d = env[n]
        if n.target is GETITEM and isinstance(n.args[1], int):
            p = pieces.setdefault(n.args[0], {})
            p[n.args[1]] = d if n.args[1] not in p else _merge(p[n.args[1]], d)
            continue
        rule = RULES.get(n.target) or (_sdpa if n.target in FUSED_ATTENTION else None)
        if is_layer(n) or n.target in LAYERS:
            rule = _layer
        if TOKEN_ROWS in n.meta:             # a token gather: its input is read at the kept rows
            rule = None
        if rule is None or (d is None and rule is not _move):
            got = {a: None for a in n.all_input_nodes}
        else:
            with noted(lambda: where(n)):
                got = rule(n, d, gm, cache)
            got.update({a: None for a in n.all_input_nodes if a not in got and shape(a) is not None
                        and rule not in (_pointwise, _move, _concat)})
        for a, da in got.items():
            if not isinstance(a, fx.Node) or shape(a) is None and not isinstance(val(a), (list, tuple)):
                continue
            if da is not None and bool(da.all()):
                da = None
            env[a] = _merge(env[a], da) if a in env else da
    return env


def live_rows(d, axis: int) -> list[int] | None:
    """The positions along ``axis`` a demand mask needs, when within them every element is needed
    (and the same in every other index); None when all are needed or the pattern is not by rows."""
    if d is None or d is False:
        return None
    rows = d.movedim(axis, -1).flatten(0, -2)                  # [everything else, positions]
    live = rows.any(0)
    full = rows.any(1)
    if bool(live.all()) or not bool((rows[full] == live).all()):
        return None
    return torch.nonzero(live).flatten().tolist()


def frontier(gm: fx.GraphModule, env: dict | None = None) -> list[tuple[fx.Node, list[int]]]:
    """Linears whose input is needed at every position but whose output only at some: (layer, live rows).

    Gathering the live rows before each of them narrows everything downstream.
    """
    env = demand(gm) if env is None else env
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.linear.default or n not in env:
            continue
        x = n.args[0]
        if len(shape(x) or ()) != 3 or env.get(x, None) is not None:
            continue
        live = live_rows(env[n], 1)
        if live:
            out.append((n, live))
    return out


def live_queries(cg) -> dict:
    """attention node -> the query positions that reach an output, where not all do (cached on ``cg``)."""
    if cg.live_queries is None:
        env = demand(cg.gm)
        nodes = {n.name: n for n in cg.gm.graph.nodes}
        out = {}
        for s in cg.sites:
            if s.kind == "sdpa" and s.operands and nodes[s.operands[0]] in env:
                live = live_rows(env[nodes[s.operands[0]]], -2)
                if live:
                    out[s.node] = live
        cg.live_queries = out
    return cg.live_queries
