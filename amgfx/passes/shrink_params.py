"""Pass: slice every parameter the plan shrinks (weights, biases, norms, embeddings, tokens, tables).

The plan says, per parameter FQN, which indices survive along each pruned dim. The sliced
tensor replaces the old one under the same name; a Parameter stays a trainable Parameter so
the pruned model can be fine-tuned. Nothing else changes: shapes in the graph are fixed by
``fix_shapes``.

Example:
    >>> import torch, torch.fx as fx
    >>> from amgfx.planning.resolved import Resolved
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    >>> result = shrink_params(gm, Resolved(params={"0.weight": {0: [0, 2]}, "0.bias": {0: [0, 2]}},
    ...                                     attention={}, options={}, exact=True))
    >>> tuple(result.graph_module.get_parameter("0.weight").shape), result.modified
    ((2, 4), True)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.fx import get_attr, replace_attr
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=("qkv_split",), ensures=("params_shrunk",))
def shrink_params(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    for fqn, dims in resolved.params.items():
        old = get_attr(gm, fqn)
        new = old.detach()
        for d, kept in sorted(dims.items(), key=lambda kv: int(kv[0])):
            new = new.index_select(int(d), torch.as_tensor(kept, dtype=torch.long, device=old.device))
        new = new.contiguous()
        replace_attr(gm, fqn, new, old)
    return gm
