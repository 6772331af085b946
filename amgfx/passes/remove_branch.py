"""Pass: remove residual branches whole (block removal): every head of a site, every neuron of an MLP.

For each branch in ``resolved.removed`` the attention or MLP is deleted from the graph and what it
still contributed, its output layer's bias through the element-wise ops up to the residual add
(LayerScale), is added in its place: exactly what the original computes with every unit of the
branch zeroed, so the zeroing oracle holds. With no bias, the residual add itself goes. It runs
first, so the passes after it never see the removed site (the plan resolves no attention change,
token or dead-token gather there). The edit is :func:`amgfx.graph.branches.remove_branch`.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> cg = amgfx.analyze(m, x)
    >>> small = amgfx.apply(cg, amgfx.Plan(keep={"head:blocks.1.attn": [], "mlp:blocks.0.mlp": []}))   # fc2's bias stays
    >>> sdpa = torch.ops.aten.scaled_dot_product_attention.default
    >>> sum(n.target is sdpa for n in small.graph.nodes), [k for k, _ in small.named_parameters() if ".0.mlp" in k]
    (1, ['blocks.0.mlp.fc2.bias'])
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.branches import remove_branch as _remove
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=(), ensures=("branches_removed",))
def remove_branch(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    """Delete every branch of ``resolved.removed``, adding its constant contribution at the residual add."""
    for b in resolved.removed.values():
        _remove(gm, b.out, b.chain, b.add)
    return gm
