"""MLPs: ``fc2(act(fc1 x))`` and gated ``down(act(gate x) * up x)``, found from the second layer back.

A layer is an MLP's fc2 when its input traces back, through data movement and element-wise ops
with at least one non-linearity, to linear layers only; hidden neuron *c* is the set of fc1 (and
gate) rows that reach fc2's column *c*, read by index propagation. A norm on the way (a
normformer-style MLP) is allowed and makes the group inexact.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> mlp = amgfx.analyze(m, torch.randn(1, 3, 32, 32)).mlps[0]
    >>> mlp.name, mlp.hidden, mlp.activation, mlp.gated
    ('blocks.0.mlp', 768, 'aten.gelu', False)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..graph.indexprop import layer_input, param_source, propagate, seed, shape, trace_back
from ..graph.ops import LINEAR_LAYERS, NORMS, POINTWISE, POINTWISE_AFFINE, channel_dim, is_pointwise_conv, opname
from .records import MLP, Ctx, columns, common_prefix, depthwise_rows, make_layer, module_path

__all__ = ["mlp_at"]


def mlp_at(ctx: Ctx, node: fx.Node, taken: set) -> MLP | None:
    """The MLP whose fc2 is ``node``, or None (``taken``: layers attention sites already own)."""
    x = layer_input(node)
    if x not in ctx.tainted or node.name in taken:
        return None
    path = trace_back(x, ctx.tainted, allow_norms=True, allow_channelwise=True, budget=80)
    if path.blockers or not path.producers or not path.nonlinear:
        return None
    if any(not (p.target in LINEAR_LAYERS or is_pointwise_conv(p)) or p.name in taken for p in path.producers):
        return None
    offs, seeds, off = [], {}, 0
    for p in path.producers:
        n = shape(p)[channel_dim(p)]
        seeds[p] = seed(p, torch.arange(n) + off, channel_dim(p))
        offs.append((off, n))
        off += n
    env, failed = propagate(ctx.gm, seeds, path.nodes | {x})
    if x not in env:
        return None
    ids = columns(env[x], channel_dim(node))
    if ids is None:
        return None
    starts = np.array([o for o, _ in offs])
    valid = ids >= 0
    li = np.searchsorted(starts, ids, side="right") - 1
    row = ids - starts[li]
    units = [list(zip(li[c][valid[c]].tolist(), row[c][valid[c]].tolist())) for c in range(ids.shape[0])]
    if not units or any(not u for u in units) or len({len(u) for u in units}) != 1:
        return None
    used = [(li, r) for u in units for li, r in u]
    if len(used) != len(set(used)):
        return None
    acts = sorted({opname(n.target) for n in path.nodes if n.target in POINTWISE and n.target not in POINTWISE_AFFINE})
    fc1 = [make_layer(ctx.gm, p) for p in path.producers]
    unit_ids = {int(i) for row in ids for i in row if i >= 0}
    for dw in path.channelwise:                # a depthwise conv inside: its channels go with the fc1 rows
        found = [depthwise_rows(ctx.gm, dw, env.get(dw.args[0]), n, o) for o, n in offs]
        if None in found:
            return None
        carried = {o + int(r) for f, (o, _) in zip(found, offs) for r in np.nonzero(f[0][2] >= 0)[0]}
        # one channel per hidden neuron, each neuron a single fc1 row: else the conv mixes what the MLP keeps apart
        if (ids >= 0).sum(1).max() != 1 or carried != unit_ids or shape(dw)[1] != len(ids):
            return None
        for layer, f in zip(fc1, found):
            layer.channelwise += [e for e in f if (e[2] >= 0).any()]
    names = [module_path(p) for p in path.producers] + [module_path(node)]
    name = common_prefix([n for n in names if n]) or node.name
    norm = []
    for nn_ in path.norms:
        spec = NORMS[nn_.target]
        for pos in spec[1:]:
            if pos is not None and len(nn_.args) > pos and param_source(nn_.args[pos]) is not None:
                norm.append((param_source(nn_.args[pos]).target, 0))
    return MLP(name=name, fc1=fc1, fc2=make_layer(ctx.gm, node), hidden=len(units), activation="+".join(acts),
               gated=len(path.producers) > 1 or len(units[0]) > 1, exact=not path.norms, units=units, norm=norm)
