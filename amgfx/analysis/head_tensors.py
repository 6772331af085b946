"""Off-path terms of the attention logits that vary per head: relative-position tables, learned biases.

Removing a head must remove its rows of such a tensor too, so each one is traced, through the
input-independent sub-graph that builds it (tables, data movement, element-wise maths, a small
MLP over fixed coordinates as Swin-v2 has), to the parameter dim whose index is the head. What
cannot be traced is named, so head pruning is disabled with that reason.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=64, num_heads=2)
    >>> amgfx.analyze(m, torch.randn(1, 3, 32, 32)).sites[0].per_head
    [('blocks.0.attn.relative_position_bias_table', 1)]
"""
from __future__ import annotations

import numpy as np
import torch

from ..graph.indexprop import is_layer, propagate, seed, shape
from ..graph.ops import DATA_MOVEMENT, POINTWISE
from .records import make_layer

__all__ = ["per_head_tensors"]


def per_head_tensors(ctx, terms, logit_shape, head_of_lead, num_heads):
    """Off-path tensors added to (or multiplying) the logits that vary per head -> [(FQN, dim)]."""
    found, problems = [], []
    lead = logit_shape[:-2]
    ids = np.asarray(head_of_lead).reshape(lead)
    head_axes = [ax for ax in range(len(lead)) if lead[ax] > 1 and not (ids == ids.take([0], axis=ax)).all()]
    for term in terms:
        tshape = shape(term)
        if tshape is None:
            continue
        pad = (1,) * (len(logit_shape) - len(tshape)) + tshape
        if all(pad[ax] == 1 for ax in head_axes):
            continue                              # the same for every head: a mask, not per-head
        # the input-independent sub-graph feeding the term: tables, data movement, element-wise maths, and
        # small layers computing a bias from fixed coordinates (Swin-v2's MLP), whose output rows are heads
        region, todo, sources, from_inputs = set(), [term], [], False
        while todo:
            n = todo.pop()
            from_inputs |= n in ctx.data
            if n in region or n in ctx.data:
                continue
            region.add(n)
            if n.op == "get_attr" or is_layer(n):
                sources.append(n)
            elif n.op == "call_function" and (n.target in DATA_MOVEMENT or n.target in POINTWISE):
                todo.extend(n.all_input_nodes)
        want = torch.as_tensor(head_of_lead).reshape(lead)
        hit = None
        for p in sources:
            for dim, size in enumerate(shape(p)):
                if size != num_heads or (is_layer(p) and dim != len(shape(p)) - 1):
                    continue
                env, _ = propagate(ctx.gm, {p: seed(p, torch.arange(size), dim)}, region)
                got = env.get(term)
                if not got:
                    continue
                g = got[0].reshape(pad).broadcast_to(logit_shape)
                if torch.equal(g[..., 0, 0], want.broadcast_to(lead)):
                    layer = make_layer(ctx.gm, p) if is_layer(p) else None
                    hit = [(r[0], r[1]) for r in layer.rows([[0]])] if layer else [(p.target, dim)]
                    break
            if hit:
                break
        if hit:
            found += hit
        else:   # slicing a tensor built in forward per head would need a rule for each op that builds it
            problems.append(term.name + (" (computed from the inputs)" if from_inputs else "" if sources
                                         else " (built in forward from constants, e.g. ALiBi slopes)"))
    return found, problems
