"""Pass: fold parameter-only data movement, drop dead nodes and attributes, lint, recompile.

After the rewrite some weights are computed from other weights (a fused qkv weight sliced
into q, k and v by ``index_select``). Those are folded into new Parameters once, so no
slicing runs at inference time and the unsliced weight is freed. Then dead code goes, the
graph is linted, ``meta['val']`` is refreshed with fake tensors (later passes and
re-analysis read shapes from it) and the module is recompiled.

Example (a weight sliced in the graph becomes a parameter of its own):
    >>> import torch, torch.fx as fx
    >>> from amgfx.graph.meta import FOLD, FOLD_NAME
    >>> gm = fx.symbolic_trace(torch.nn.Linear(4, 3))
    >>> w = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "weight")
    >>> with gm.graph.inserting_after(w):
    ...     s = gm.graph.call_function(torch.ops.aten.slice.Tensor, (w, 0, 0, 2))
    >>> lin = next(n for n in gm.graph.nodes if n.op == "call_function" and n is not s)
    >>> s.meta.update({FOLD: True, FOLD_NAME: "w2"})
    >>> lin.args = (lin.args[0], s, None)
    >>> gm = cleanup(gm).graph_module
    >>> sorted(n for n, _ in gm.named_parameters()), tuple(gm(torch.randn(1, 4)).shape)
    (['w2'], (1, 2))
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.fx import del_attr, eliminate_dead_code, get_attr, refresh_meta, set_attr
from ..graph.meta import FOLD, FOLD_NAME, TOKEN_ROWS
from ..graph.ops import DATA_MOVEMENT
from .pipeline import graph_pass
from ..planning.resolved import Resolved


def _const(gm, n, memo):
    """Value of a node computed from attributes only by data movement, else None."""
    if n in memo:
        return memo[n]
    v = None
    if n.op == "get_attr":
        v = get_attr(gm, n.target)
    elif n.op == "call_function" and n.target in DATA_MOVEMENT and n.all_input_nodes:
        ins = {a: _const(gm, a, memo) for a in n.all_input_nodes}
        if all(x is not None for x in ins.values()):
            with torch.no_grad():
                v = n.target(*fx.node.map_arg(n.args, ins.get), **fx.node.map_arg(n.kwargs, ins.get))
    memo[n] = v
    return v


def _trainable(gm, n) -> bool:
    todo, seen = [n], set()
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        if a.op == "get_attr":
            t = get_attr(gm, a.target)
            if isinstance(t, nn.Parameter) and t.requires_grad:
                return True
        todo.extend(a.all_input_nodes)
    return False


def _fold(gm: fx.GraphModule) -> None:
    """Fold the weight slices passes marked with ``meta['amgfx_fold']`` into new attributes."""
    memo: dict = {}
    for n in list(gm.graph.nodes):
        if not n.meta.get(FOLD):
            continue
        v = _const(gm, n, memo)
        if not isinstance(v, torch.Tensor):
            continue
        trainable = _trainable(gm, n)
        name = n.meta.get(FOLD_NAME) or f"_amgfx_folded_{n.name}"
        set_attr(gm, name, nn.Parameter(v.detach().clone().contiguous(), trainable) if trainable else v.clone())
        with gm.graph.inserting_before(n):
            new = gm.graph.get_attr(name)
        new.meta["val"] = n.meta.get("val")
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if fqn not in used:
            del_attr(gm, fqn)


@graph_pass(requires=("shapes_fixed",), ensures=("folded",))
def cleanup(gm: fx.GraphModule, resolved: Resolved | None = None) -> fx.GraphModule:
    _fold(gm)
    eliminate_dead_code(gm)
    _drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    for n in gm.graph.nodes:                     # a token gather is a plain index_select from now on
        n.meta.pop(TOKEN_ROWS, None)
    return gm
