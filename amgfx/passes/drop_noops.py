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

import torch
import torch.fx as fx

from .pipeline import graph_pass
from ..planning.resolved import Resolved

aten = torch.ops.aten

ASSERTS = {aten._assert_tensor_metadata.default}
# Casts that return their input when nothing changes (``copy`` defaults to False); ``_to_copy`` always copies.
CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.alias.default}


def is_noop(n: fx.Node) -> bool:
    """Whether ``n`` is an assert or a cast that changes nothing about its input."""
    if n.op != "call_function":
        return False
    if n.target in ASSERTS:
        return True
    if n.target not in CASTS or not isinstance(n.args[0], fx.Node) or n.kwargs.get("copy", False):
        return False
    if n.target is aten.to.dtype and len(n.args) > 3 and n.args[3]:            # to(x, dtype, non_blocking, copy)
        return False
    if n.target is aten.to.device and len(n.args) > 4 and n.args[4]:           # to(x, device, dtype, nb, copy)
        return False
    if n.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    a, b = n.args[0].meta.get("val"), n.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.layout == b.layout)


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
