"""Pass: drop the nodes that do nothing at run time.

``torch.export`` leaves ``_assert_tensor_metadata`` checks and casts to the dtype a tensor already has
(LLaMA's RMSNorm casts to float32 and back, every k/v is cast before it is written to the cache). In
eager PyTorch each still costs a dispatch, and a decode step at batch 1 is made of little else: in the
pruned ``amgfx-lm`` decode graph they were 54 of 343 nodes. A cast to the dtype, device and layout its
input already has returns the input itself in eager mode, so using the input is exact.

Example:
    >>> import torch, torch.fx as fx
    >>> from amgfx.planning.resolved import Resolved
    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> x.meta["val"] = torch.empty(2)
    >>> a = g.call_function(torch.ops.aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
    >>> y = g.call_function(torch.ops.aten.to.dtype, (x, torch.float32))
    >>> y.meta["val"] = torch.empty(2)
    >>> _ = g.output(g.call_function(torch.ops.aten.relu.default, (y,)))
    >>> gm = drop_noops(fx.GraphModule({}, g), Resolved({}, {}, {}, True)).graph_module
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['relu.default']
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.ops import ASSERTS, is_noop
from .pipeline import graph_pass
from ..planning.resolved import Resolved


@graph_pass(requires=("shapes_fixed",), ensures=("noops_dropped",))
def drop_noops(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    for n in list(gm.graph.nodes):
        if not is_noop(n):
            continue
        if n.target not in ASSERTS:
            n.replace_all_uses_with(n.args[0])
        if not n.users:
            gm.graph.erase_node(n)
    gm.recompile()
    return gm
