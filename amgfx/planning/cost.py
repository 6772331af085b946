"""Cost model: parameter and FLOP counts, dense and as a plan predicts them.

FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts, on whichever torch is
installed: every node that can cost FLOPs is *run* under that counter, on fake tensors of its
planned shapes (``FakeTensorMode``: no memory, no arithmetic). No counting rule is written
here, so a prediction equals the counter on every release (2.14 does not count CPU SDPA,
2.15 does; both are right by construction). The planned shapes come from the keep masks, so a
prediction needs no rewrite; the tests check it against ``FlopCounterMode`` run on the pruned
GraphModule.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> cg = amgfx.analyze(m, x)
    >>> p = predict(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))}))
    >>> p["flops"]["dense"] == measure_flops(cg.gm, ((x,), {}))
    True
    >>> p["flops"]["pruned"] == measure_flops(amgfx.apply(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))})))
    True
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import torch.fx as fx

from ..errors import InternalError, RewriteError, foreign_errors
from ..graph.branches import remove_branch
from ..graph.fx import copy_module, on_meta
from ..graph.indexprop import shape, val
from ..graph.ops import GROUPED
from ..graph.masks import propagate_masks
from ..graph.meta import EXAMPLE
from ..graph.ops import SDPA, sdpa_args
from ..graph.rows import ROW_EDITS, insert_live_gathers, insert_token_gathers, split_site

aten = torch.ops.aten
__all__ = ["node_flops", "graph_flops", "predict", "measure_flops", "count_params", "row_graph", "costly_nodes",
           "node_specs"]

_FAKE = None
_COUNTS: dict = {}                                   # (op, argument spec) -> FLOPs
_COSTLY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # graph -> nodes that count FLOPs


def _fake_mode():
    global _FAKE
    if _FAKE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        _FAKE = FakeTensorMode(allow_non_fake_inputs=False)
    return _FAKE


def _device(n: fx.Node) -> str:
    """Where the node runs: its inputs' device. Nodes a pass inserted carry meta values; they run
    beside their real inputs (a kernel choice, and so the count, may depend on the device)."""
    devs = [v.device.type for a in n.all_input_nodes if isinstance(v := val(a), torch.Tensor)]
    real = next((d for d in devs if d != "meta"), None)
    if real is not None:
        return real
    gm = n.graph.owning_module          # every input a pass made: meta only where the model itself is
    return "meta" if gm is not None and on_meta(gm) else "cpu"


def _spec(a, shp, override, device):
    """A hashable description of one argument: tensors by (shape, dtype, device), the rest by value."""
    if isinstance(a, fx.Node):
        v = val(a)
        if isinstance(v, torch.Tensor):
            s = override.get(a) or shp(a)
            return ("T", tuple(int(x) for x in s), v.dtype, device)
        return ("V", int(v) if isinstance(v, (int, torch.SymInt)) else v)
    if isinstance(a, (list, tuple)):
        return ("L", type(a).__name__, tuple(_spec(x, shp, override, device) for x in a))
    return ("V", a)


def _build(spec, mode):
    kind = spec[0]
    if kind == "T":
        with mode:
            return torch.empty(spec[1], dtype=spec[2], device=spec[3])
    if kind == "L":
        items = [_build(x, mode) for x in spec[2]]
        return tuple(items) if spec[1] == "tuple" else items
    return spec[1]


def _grouped_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A grouped matmul multiplies every token with one expert's ``[in, out]`` weight: 2 x tokens x in x out."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[-2] * w_shape[-1]


def counter():
    """``FlopCounterMode`` with formulas for the library ops it does not know (MoE grouped matmuls,
    :data:`amgfx.graph.ops.GROUPED`), which it would otherwise count as free."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping={op._overloadpacket: _grouped_flops for op in GROUPED})


def _count(target, args_spec, kwargs_spec) -> int:
    """FLOPs ``FlopCounterMode`` counts for one call of ``target`` on fake tensors of these specs."""
    key = (target, args_spec, kwargs_spec)
    if key not in _COUNTS:
        mode = _fake_mode()
        args = [_build(s, mode) for s in args_spec]
        kwargs = {k: _build(s, mode) for k, s in kwargs_spec}
        with mode, counter() as fc:
            target(*args, **kwargs)
        _COUNTS[key] = int(fc.get_total_flops())
    return _COUNTS[key]


def node_specs(n: fx.Node, shp=shape, override: dict | None = None) -> tuple:
    """``(args, kwargs)`` of ``n`` as hashable specs (:func:`_spec`) at the shapes ``shp(arg)``:
    the key under which an op's FLOPs (here) or its measured time (:mod:`.latency`) is cached."""
    device, override = _device(n), override or {}
    args = tuple(_spec(a, shp, override, device) for a in n.args)
    kwargs = tuple(sorted((k, _spec(v, shp, override, device)) for k, v in n.kwargs.items()))
    return args, kwargs


def node_flops(n: fx.Node, shp=shape, override: dict | None = None) -> int:
    """FLOPs of one node when its tensor inputs have the shapes ``shp(arg)`` (``override``: node -> shape).

    The node's op is run under ``FlopCounterMode`` on fake tensors of those shapes, so the count is
    the installed torch's own (composite ops such as ``linear`` decompose as they would for real).
    """
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return 0
    args, kwargs = node_specs(n, shp, override)
    try:
        return _count(n.target, args, kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:  # the planned shapes do not fit the op
        raise RewriteError(f"cannot count the FLOPs of {n.name} ({n.target}) at its planned shapes: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e


def costly_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that count FLOPs at their captured shapes (cached per graph).

    An op that counts nothing at one shape counts nothing at another (the counter's formulas
    belong to matmuls, convolutions and attention only), so only these are run again for a plan.
    """
    g = gm.graph
    if g not in _COSTLY:
        _COSTLY[g] = [n for n in g.nodes if n.op == "call_function" and _dense_flops(n) > 0]
    return _COSTLY[g]


def _dense_flops(n: fx.Node) -> int:
    try:
        return node_flops(n)
    except RewriteError:     # an op fake tensors cannot run (a data-dependent scalar): no matmul inside
        return 0


def graph_flops(gm: fx.GraphModule, shp=shape) -> int:
    """FLOPs of one forward of ``gm`` at the shapes ``shp`` gives its nodes (default: the captured ones)."""
    return sum(node_flops(n, shp) for n in costly_nodes(gm))


def count_params(gm) -> int:
    return sum(p.numel() for p in gm.parameters())


def _split_rows(gm, r):
    """What amgfx/passes/split_qkv does where a site's q and k/v rows differ (its other splits cost the same)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in {**r.dead, **r.tokens}.values():
        if site.fused:
            split_site(gm, [nodes[o] for o in site.operands])


def _remove_branches(gm, r):
    """What amgfx/passes/remove_branch does: those nodes cost nothing."""
    for b in r.removed.values():
        remove_branch(gm, b.out, b.chain, b.add)


_ROW_EDIT = {   # each row edit of a plan, as the cost model replays it (the names are ROW_EDITS')
    "remove_branch": _remove_branches,
    "split_qkv": _split_rows,
    "token_gather": lambda gm, r: insert_token_gathers(gm, r.tokens),
    # amgfx/passes/dead_tokens, which runs before any neuron is pruned
    "dead_tokens": lambda gm, r: insert_live_gathers(gm, {}) if r.dead else None,
}


def row_graph(cg, r):
    """The captured graph with the row gathers of ``r`` inserted (token pruning, dead tokens) and
    the branches it removes whole taken out.

    Masks follow channels through any graph, but which rows a fused q/k/v projection computes
    is decided by where the gathers sit, so the prediction runs the row passes themselves on a
    copy of the graph (cached per token plan: the budget asks again and again).
    """
    if not r.tokens and not r.dead and not r.removed:
        return cg.gm
    key = repr((sorted((k, v.kept) for k, v in r.tokens.items()), sorted(r.dead), sorted(r.removed)))
    cache = cg.row_graphs
    if key not in cache:
        cache.clear()                            # one at a time: a graph copy per model is enough
        gm = copy_module(cg.gm)
        for edit in ROW_EDITS:                   # the passes' own order (amgfx.passes.check_order holds them to it)
            _ROW_EDIT[edit](gm, r)
        cache[key] = gm
    return cache[key]


def predict(cg, plan, *, per_node: bool = False) -> dict:
    """Parameters and FLOPs of the model, dense and after ``plan`` (nothing is rewritten).

    ``per_node=True`` adds ``"nodes"``: ``{"dense": {node: FLOPs}, "pruned": {node: FLOPs}}`` with the
    node order of each graph (the pruned one may hold nodes the row passes insert), so a report can
    say where the FLOPs went (see :mod:`amgfx.planning.layers`).
    """
    with foreign_errors(InternalError, "FLOPs prediction"):
        return _predict(cg, plan, per_node)


def planned(cg, plan):
    """``(resolved plan, graph, masks)``: the graph a plan's row passes give (:func:`row_graph`) and the
    keep masks over it, whose ``new_shape(node)`` is each node's planned shape (shared with
    :mod:`amgfx.planning.latency`)."""
    r = plan.resolve(cg)
    gm = row_graph(cg, r)
    try:       # the unsplit graph: a fused qkv that split_qkv will split need not pack here
        ms = propagate_masks(gm, r.params, dense=False)
    except RewriteError:
        if not r.dead:
            raise
        # amgfx/passes/dead_tokens takes its gathers out when the narrowing cannot flow: so do we
        r = dataclasses.replace(r, dead={})
        gm = row_graph(cg, r)
        ms = propagate_masks(gm, r.params, dense=False)
    return r, gm, ms


def attention_override(n: fx.Node, r, ms) -> dict:
    """Planned shapes an SDPA node really runs at: lower_attention pads q/k (or v) to one head dim for
    the CPU flash kernel (``{}`` where it does not apply)."""
    if n.target not in SDPA or n.name not in r.attention or r.options.get("lowering", "auto") == "none":
        return {}
    a = sdpa_args(n)
    q, k, v = (ms.new_shape(x) for x in (a.q, a.k, a.v))
    e = max(q[-1], v[-1])
    return {x: s[:-1] + (e,) for x, s in zip((a.q, a.k, a.v), (q, k, v))}


def _predict(cg, plan, per_node: bool = False) -> dict:
    r, gm, ms = planned(cg, plan)
    pruned = {n.name: node_flops(n, ms.new_shape, attention_override(n, r, ms)) for n in costly_nodes(gm)}
    dense_p = 0
    pruned_p = 0
    for fqn, p in cg.gm.named_parameters():
        dense_p += p.numel()
        dims = r.params.get(fqn, {})
        pruned_p += math.prod(len(dims[d]) if d in dims else s for d, s in enumerate(p.shape))
    dense = {n.name: node_flops(n) for n in costly_nodes(cg.gm)}
    out = {"params": {"dense": dense_p, "pruned": pruned_p},
           "flops": {"dense": sum(dense.values()), "pruned": sum(pruned.values())}}
    if per_node:
        out["nodes"] = {"dense": dense, "pruned": pruned}
    return out


def measure_flops(gm, example=None) -> int:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward (:func:`counter`)."""
    args, kwargs = example if example is not None else gm.meta[EXAMPLE]
    with torch.no_grad(), counter() as fc:
        gm(*args, **kwargs)
    return fc.get_total_flops()
