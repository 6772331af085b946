"""Pass: fold parameter-only data movement, drop dead nodes and attributes, lint, recompile.

After the rewrite some weights are computed from other weights (a fused qkv weight sliced
into q, k and v by ``index_select``). Those are folded into new Parameters once, so no
slicing runs at inference time and the unsliced weight is freed. Then dead code goes, the
graph is linted, ``meta['val']`` is refreshed with fake tensors (later passes and
re-analysis read shapes from it) and the module is recompiled.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from amgfx.ops import DATA_MOVEMENT

from ._graph import del_attr, get_attr, set_attr
from .split_qkv import _keep


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
        if not n.meta.get("amgfx_fold"):
            continue
        v = _const(gm, n, memo)
        if not isinstance(v, torch.Tensor):
            continue
        trainable = _trainable(gm, n)
        name = n.meta.get("amgfx_name") or f"_amgfx_folded_{n.name}"
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


def refresh_meta(gm: fx.GraphModule) -> None:
    """Re-run shape propagation with fake tensors so ``meta['val']`` describes the pruned graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    example = gm.meta.get("amgfx_example")
    if example is None:
        return
    flat = pytree.tree_leaves(example)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat])


def cleanup(gm: fx.GraphModule, plan=None) -> fx.GraphModule:
    _fold(gm)
    gm.graph.eliminate_dead_code(is_impure_node=_keep)
    _drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    for n in gm.graph.nodes:                     # a token gather is a plain index_select from now on
        n.meta.pop("amgfx_token_rows", None)
    return gm
