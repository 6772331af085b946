"""Step 1 of an attention site: each operand (q, k, v) back to its one projection, neuron ids propagated.

Between a projection and its operand lie data movement, element-wise maths, depthwise convs and
biases whose channels go with the projection's rows, and at most one norm (which disables qk: the
norm over the head dim changes with its width). ``ops`` is the site's
:class:`~amgfx.analysis.attention.AttentionOperands`.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> amgfx.analyze(m, torch.randn(1, 3, 32, 32)).sites[0].operands[:2]
    ('getitem', 'getitem_1')
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ..graph.indexprop import propagate, seed, shape, tensor_args, trace_back
from ..graph.ops import (IDENTITY, LINEAR_LAYERS, MOVE, NORMS, POINTWISE_AFFINE, REDUCTIONS, VECTOR_NORMS,
                         channel_dim, is_pointwise_conv, opname)
from .records import AttentionSite, Ctx, depthwise_rows

__all__ = ["trace_operands"]


def _operand_lanes(ctx, node: fx.Node, what: str):
    """Trace an attention operand back to its single projection and propagate its neuron ids."""
    path = trace_back(node, ctx.tainted, allow_norms=True, allow_channelwise=True)
    if any(p in ctx.data for p in path.producers):   # a position table beside the projection (RoFormer) is no neuron
        path.producers = [p for p in path.producers if p in ctx.data]
    linears = [p for p in path.producers if p.target in LINEAR_LAYERS or is_pointwise_conv(p)]
    if len(path.producers) != 1 or not linears:
        found = ", ".join(sorted({opname(p.target) for p in path.producers})) or "no layer"
        return None, path, f"{what} is not produced by exactly one linear projection (found: {found})"
    prod = linears[0]
    ids = seed(prod, torch.arange(shape(prod)[channel_dim(prod)]), channel_dim(prod))
    env, failed = propagate(ctx.gm, {prod: ids}, path.nodes | {node})
    if node is prod:
        env[node] = ids
    if node not in env:
        bad = ", ".join(opname(f.target) for f in failed[:3]) or "unknown op"
        return None, path, f"cannot follow {what} neurons through {bad}"
    path.row_params = []                  # (FQN, dim, index of each projection row) sliced with the rows
    for dw in path.channelwise:
        found = depthwise_rows(ctx.gm, dw, env.get(dw.args[0]), shape(prod)[channel_dim(prod)])
        if found is None:
            return None, path, f"{what} channels are mixed before {opname(dw.target)} ({dw.name})"
        path.row_params += found
    path.row_params += _added_row_params(ctx, path, env, shape(prod)[channel_dim(prod)])
    return env[node], path, None


def _added_row_params(ctx, path, env, rows: int) -> list:
    """Parameters added to (or multiplying) an operand on its way, one element per projection row (DeBERTa's
    ``q_bias``, reshaped to heads after the projection): they go with the rows, as a bias would."""
    params, out = {n for n, _ in ctx.gm.named_parameters()}, []
    for n in path.nodes:
        on = [a for a in tensor_args(n) if a in env]
        if n.target not in POINTWISE_AFFINE or len(on) != 1 or len(env[on[0]]) != 1:
            continue
        for a in tensor_args(n):
            src, chain = a, set()
            while src.op == "call_function" and (src.target in MOVE or src.target in IDENTITY):
                chain.add(src)
                src = src.args[0]
            if a is on[0] or src.op != "get_attr" or src.target not in params or len(shape(src)) != 1:
                continue
            penv, _ = propagate(ctx.gm, {src: [torch.arange(shape(src)[0])]}, chain)
            lanes = [torch.arange(shape(src)[0])] if a is src else penv.get(a)
            if not lanes:
                continue
            r, p = (t.broadcast_to(shape(n)).reshape(-1) for t in (env[on[0]][0], lanes[0]))
            pairs = torch.unique(torch.stack([r, p], 1)[r >= 0], dim=0)
            if len(pairs) != len(torch.unique(pairs[:, 0])) or len(pairs) != len(torch.unique(pairs[:, 1])):
                continue                     # one element shared by several rows: not a per-row parameter
            chan = np.full(rows, -1)
            chan[pairs[:, 0].numpy()] = pairs[:, 1].numpy()
            out.append((src.target, 0, chan))
    return out


def trace_operands(ctx: Ctx, ops, site: AttentionSite):
    """q, k, v to their projections: ``(lanes, paths)``, or a reason the site is unsupported.

    Norms between a projection and q/k disable qk only (the norm over the head dim changes with
    its width); anything else in the way refuses the site.
    """
    lanes, paths = {}, {}
    for what, t in (("q", ops.q), ("k", ops.k), ("v", ops.v)):
        l, path, err = _operand_lanes(ctx, t, what)
        if err:
            return err
        if (what == "k" and ops.k_transposed) or (what == "v" and ops.v_transposed):
            l = [x.transpose(-1, -2) for x in l]
        lanes[what], paths[what] = l, path
    q0 = lanes["q"][0]
    if not torch.equal(q0, q0[..., :1, :].expand_as(q0)) or torch.equal(q0, q0[..., :1].expand_as(q0)):
        return ("attention contracts over tokens, not channels (cross-covariance attention): "
                "query/key neurons are not paired per head")
    for what in ("q", "k", "v"):
        blockers = paths[what].blockers + paths[what].norms
        if not blockers:
            continue
        names = ", ".join(sorted({opname(b.target) for b in blockers}))
        widths = [_normalised_width(b) for b in blockers]
        if what in ("q", "k") and all(w is not None for w in widths):
            d = shape(getattr(ops, what))[-2 if what == "k" and ops.k_transposed else -1]
            site.disabled["qk"] = f"{what} is normalised over the head dim ({names}); q/k dims cannot shrink exactly"
            if max(widths) > d:              # over all heads' channels at once (OLMo2): a head's removal changes the rest
                site.disabled["head"] = f"{what} is normalised across heads ({names}); removing a head changes the others"
        else:
            return f"{what} passes through {names} between its projection and attention"
    return lanes, paths


def _normalised_width(n: fx.Node) -> int | None:
    """How many channels a normalisation on the q/k path reduces over (a norm op, or the mean/var/norm of
    an RMSNorm or F.normalize written out), or None when ``n`` is not one."""
    if n.target in NORMS:
        return math.prod(n.args[1])
    if n.target in REDUCTIONS or n.target in VECTOR_NORMS:
        x = shape(n.args[0])
        dims = n.args[1] if n.target in REDUCTIONS else (n.args[2] if len(n.args) > 2 else None)
        dims = [dims] if isinstance(dims, int) else dims
        if x and dims is not None and [d % len(x) for d in dims] == [len(x) - 1]:
            return x[-1]
    return None
