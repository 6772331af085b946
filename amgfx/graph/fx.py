"""Small graph-editing helpers shared by the passes and the analyses (attributes, constants, new
nodes, shape refresh), in the manner of ``torch.fx.passes``' own utilities."""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
import torch.nn as nn

import torch.utils._pytree as pytree

from ..errors import RewriteError
from .indexprop import fetch_attr as get_attr
from .meta import DIMS, EXAMPLE, STATE
from .ops import ASSERTS, FUSED_ATTENTION, sdpa_args

aten = torch.ops.aten

__all__ = ["get_attr", "set_attr", "replace_attr", "has_attr", "unshare", "tie_tensors", "state_inputs", "copy_module", "del_attr", "constant", "call", "size_args",
           "keep_symbolic", "dims_of", "refresh_meta", "remove_marked"]


def set_attr(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    """Replace (or add) the parameter/buffer ``fqn``; a Parameter stays a Parameter."""
    path, _, name = fqn.rpartition(".")
    owner = gm
    for p in path.split(".") if path else []:
        if not hasattr(owner, p):
            owner.add_module(p, nn.Module())
        owner = getattr(owner, p)
    if isinstance(value, nn.Parameter):
        owner._buffers.pop(name, None)
        owner._parameters[name] = value
    else:
        owner._parameters.pop(name, None)
        owner._buffers[name] = value


def replace_attr(gm: fx.GraphModule, fqn: str, value: torch.Tensor, old: torch.Tensor) -> None:
    """Put ``value`` at ``fqn`` as the same kind of attribute ``old`` was (trainable Parameter or buffer)."""
    set_attr(gm, fqn, nn.Parameter(value, old.requires_grad) if isinstance(old, nn.Parameter) else value)


def has_attr(gm: nn.Module, fqn: str) -> bool:
    try:
        get_attr(gm, fqn)
    except AttributeError:
        return False
    return True


def unshare(out: fx.GraphModule, original: nn.Module) -> None:
    """Clone every tensor of ``out`` still shared with ``original`` (the user's model), so training or
    refitting the result cannot touch it."""
    theirs = {t.data_ptr() for t in list(original.parameters()) + list(original.buffers()) if t.numel()}
    for fqn, t in list(out.named_parameters()) + list(out.named_buffers()):
        if t.numel() and t.data_ptr() in theirs:
            replace_attr(out, fqn, t.detach().clone(), t)


def tie_tensors(src: nn.Module, dst: nn.Module) -> int:
    """Make ``dst`` hold ``src``'s tensors wherever a parameter or buffer has the same name, shape and dtype
    (two graphs of one model, e.g. a decoder's prefill and decode step); returns how many were tied."""
    tied = 0
    for fqn, t in list(src.named_parameters()) + list(src.named_buffers()):
        try:
            old = get_attr(dst, fqn)
        except AttributeError:
            continue
        if isinstance(old, torch.Tensor) and old.shape == t.shape and old.dtype == t.dtype:
            replace_attr(dst, fqn, t.data if isinstance(t, nn.Parameter) else t, old)
            tied += 1
    return tied


def state_inputs(gm: fx.GraphModule, flat: list) -> list:
    """Flat inputs at the dense model's shapes, with every state input (a KV cache) the pruned ``gm``
    reads smaller (``gm.meta[STATE]``) cut to its kept elements: how data made for the dense model (a
    reconstruction's calibration, a recovery's batches) feeds the pruned one. Other inputs pass as they are."""
    masks = (gm.meta.get(STATE) or {}).get("inputs")
    if not masks:
        return list(flat)
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = list(flat)
    for i, mask in masks.items():
        if isinstance(out[i], torch.Tensor) and out[i].shape == mask.shape:
            out[i] = out[i][mask].reshape(places[i].meta["val"].shape)
    return out


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and meta; attributes stay shared until a pass replaces them."""
    import copy
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    out.meta = dict(gm.meta)
    return out


def del_attr(gm: fx.GraphModule, fqn: str) -> None:
    path, _, name = fqn.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


def constant(gm: fx.GraphModule, before: fx.Node, value: torch.Tensor, hint: str = "idx") -> fx.Node:
    """A ``get_attr`` node for a new constant buffer (an index table the rewrite needs)."""
    i = 0
    while hasattr(gm, f"_amgfx_{hint}_{i}"):
        i += 1
    name = f"_amgfx_{hint}_{i}"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return node


def _meta(a):
    v = a.meta.get("val") if isinstance(a, fx.Node) else a
    if isinstance(a, fx.Node) and isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        return type(a)(_meta(x) for x in a)
    return v


def call(gm: fx.GraphModule, before: fx.Node, target, args, kwargs=None) -> fx.Node:
    """Insert ``target(*args)`` before ``before`` and record its output shape in ``meta['val']``."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, tuple(args), kwargs or {})
    try:
        node.meta["val"] = target(*[_meta(a) for a in args], **(kwargs or {}))
    except (RuntimeError, TypeError, ValueError, IndexError):   # a symbolic size; cleanup refreshes shapes anyway
        pass
    return node


def dims_of(node: fx.Node) -> tuple:
    """Per dim of ``node``'s output: the name of its symbol where the capture left it dynamic, else None.

    Recorded by :func:`amgfx.capture` before analysis reads sizes with ``int()``, which guards
    (and so specialises) the symbols in the shared shape environment.
    """
    return node.meta.get(DIMS, ())


def size_args(gm: fx.GraphModule, before: fx.Node, sizes, dims, inputs) -> list:
    """``sizes`` as a view/reshape argument: ints, except where ``dims`` names a symbol (a dynamic
    batch): there a ``sym_size`` node reads it off one of ``inputs``, so the new view stays dynamic."""
    where = {}
    for x in inputs:
        for i, sym in enumerate(dims_of(x)):
            if sym is not None:
                where.setdefault(sym, (x, i))
    out = []
    for s, sym in zip(sizes, list(dims) + [None] * (len(sizes) - len(dims))):
        if sym is None:
            out.append(int(s))
        elif sym in where:
            out.append(call(gm, before, torch.ops.aten.sym_size.int, list(where[sym])))
        else:
            raise RewriteError(f"{before.name}: the dynamic size {sym} cannot be read off {[x.name for x in inputs]}; "
                               "capture with dynamic_batch=False")
    return out


def keep_symbolic(old_args, old_sizes, new_sizes) -> list:
    """New size arguments that keep each old entry (a ``sym_size`` node, a -1) whose size did not change."""
    return [o if c == s else c for o, s, c in zip(old_args, old_sizes, new_sizes)]


def drop_export_guards(gm: fx.GraphModule) -> None:
    """Remove torch.export's check of the captured input sizes (``_guards_fn``), for a graph that no longer
    takes inputs of those sizes, or whose caller checks them itself."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


def off_meta(g: fx.Graph, device="cpu") -> fx.Graph:
    """A graph captured on the meta device made to run on ``device`` (in place): every op that makes or moves
    a tensor onto meta makes it on ``device``, and export's checks of the captured device are taken out."""
    real = lambda a: torch.device(device) if isinstance(a, torch.device) and a.type == "meta" else a
    for n in list(g.nodes):
        if n.target in ASSERTS and not n.users:
            g.erase_node(n)
            continue
        n.args, n.kwargs = fx.node.map_aggregate(n.args, real), fx.node.map_aggregate(n.kwargs, real)
    return g


def read_as(gm: fx.GraphModule, names: set, dtype=torch.float32) -> int:
    """Cast the attributes ``names`` to ``dtype`` where the graph reads them (in place): weights kept in the
    precision they were stored in (bf16: half the memory) while the graph computes as captured. The values
    read are exactly the stored ones, so outputs are the same as with the weights converted up front.

    Each reader gets its own cast, placed just before it, so one weight at a time is held converted (export
    puts every ``get_attr`` first: a cast there would convert the whole model at once); an embedding lookup
    gathers its rows first and casts those; a linear layer whose converted weight would be over
    :data:`READ_CHUNK_BYTES` (a tied LM head: 1 GB for a 128k vocabulary) reads it in blocks of output rows,
    each cast and multiplied in turn (a dot product is the same whichever rows are computed beside it).
    Returns how many casts were added.
    """
    n_cast = 0
    for n in list(gm.graph.nodes):
        if n.op != "get_attr" or n.target not in names:
            continue
        v = n.meta.get("val")
        for u in list(n.users):
            if _blocked_linear(gm, n, u, v, dtype):
                pass
            elif u.target is aten.embedding.default and u.args[0] is n:      # gather rows, then cast them
                with gm.graph.inserting_after(u):
                    c = gm.graph.call_function(aten._to_copy.default, (u,), {"dtype": dtype})
                u.replace_all_uses_with(c, delete_user_cb=lambda x: x is not c)
                uv = u.meta.get("val")
                if isinstance(uv, torch.Tensor):
                    c.meta["val"] = torch.empty(uv.shape, dtype=dtype, device="meta")
            else:
                with gm.graph.inserting_before(u):
                    c = gm.graph.call_function(aten._to_copy.default, (n,), {"dtype": dtype})
                if isinstance(v, torch.Tensor):
                    c.meta["val"] = torch.empty(v.shape, dtype=dtype, device="meta")
                u.replace_input_with(n, c)
            n_cast += 1
    gm.recompile()
    return n_cast


READ_CHUNK_BYTES = 64 * 2**20


def _blocked_linear(gm: fx.GraphModule, w: fx.Node, u: fx.Node, v, dtype) -> bool:
    """``linear(x, w, b)`` as ``cat([linear(x, cast(w[i:j]), b[i:j]) ...], -1)`` where ``w`` converted is over
    :data:`READ_CHUNK_BYTES`; False (nothing done) for any other reader."""
    if u.target is not aten.linear.default or len(u.args) < 2 or u.args[1] is not w or w in u.args[:1]:
        return False
    if not isinstance(v, torch.Tensor) or v.dim() != 2:
        return False
    rows = max(1, READ_CHUNK_BYTES // (v.shape[1] * torch.empty((), dtype=dtype).element_size()))
    if rows >= v.shape[0]:
        return False
    x, bias = u.args[0], (u.args[2] if len(u.args) > 2 else u.kwargs.get("bias"))
    parts, g = [], gm.graph

    def node(op, args, kwargs=None):         # with its value on meta, as capture left every node
        out = g.call_function(op, args, kwargs or {})
        vals = fx.node.map_arg((args, kwargs or {}), lambda a: a.meta.get("val"))
        if all(isinstance(a.meta.get("val"), torch.Tensor) for a in out.all_input_nodes):
            out.meta["val"] = op(*pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t,
                                                  vals[0]), **vals[1])
        return out
    with g.inserting_before(u):
        for i in range(0, v.shape[0], rows):
            j = min(i + rows, v.shape[0])
            c = node(aten._to_copy.default, (node(aten.slice.Tensor, (w, 0, i, j)),), {"dtype": dtype})
            b = node(aten.slice.Tensor, (bias, 0, i, j)) if isinstance(bias, fx.Node) else None
            parts.append(node(aten.linear.default, (x, c, b)))
        out = g.call_function(aten.cat.default, (parts, -1))
    out.meta = dict(u.meta)
    u.replace_all_uses_with(out)
    g.erase_node(u)
    return True


def on_meta(gm: torch.nn.Module) -> bool:
    """Whether ``gm``'s weights live on the meta device (shapes only, as a model too big to load is analysed)."""
    first = next(itertools.chain(gm.parameters(), gm.buffers()), None)     # a model is built on meta whole
    return first is not None and first.device.type == "meta"


def nonfinite(t, *, inf: bool = True) -> bool:
    """Whether tensor ``t`` holds a NaN (or, with ``inf``, an infinity); one on the meta device holds no values
    to check (a model too big to load is captured and planned there)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta":
        return False
    return not bool(torch.isfinite(t).all()) if inf else bool(torch.isnan(t).any())


def refresh_meta(gm: fx.GraphModule) -> None:
    """Re-run shape propagation with fake tensors so ``meta['val']`` describes the graph as it is now
    (at the example inputs ``gm.meta['amgfx_example']``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    example = gm.meta.get(EXAMPLE)
    if example is None:
        return
    flat = pytree.tree_leaves(example)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = FakeTensorProp(gm, mode)
    if on_meta(gm):
        # a model built on the meta device: the example and the index tables the passes added (real, on
        # the CPU, as the plan's indices must stay readable) are propagated there too
        flat = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in flat]
        fetch = prop.fetch_attr
        prop.fetch_attr = lambda target: _to_meta(fetch(target))
    prop.propagate(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat])


def _to_meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type != "meta" else t


_DROPOUTS = {torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
             torch.ops.aten.alpha_dropout.default}


def keep_node(n: fx.Node) -> bool:
    """What dead-code elimination must keep: inputs, outputs, module calls and side effects.

    An eval-mode dropout (``train=False``) and attention with ``dropout_p=0`` draw nothing (torch
    tags them random all the same), so an unread one is dead like any other op (block removal).
    """
    if n.target in _DROPOUTS and len(n.args) > 2 and n.args[2] is False:
        return False
    if n.target in FUSED_ATTENTION and not (sdpa_args(n).dropout_p or 0.0):
        return False
    return n.op in ("placeholder", "output", "call_module") or n.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code(is_impure_node=keep_node)
    return gm


def remove_marked(gm: fx.GraphModule, key: str) -> fx.GraphModule:
    """Take out every node whose ``meta[key]`` is set, wiring its users to its first input (in place).

    For nodes a pass inserted that change no value a reader cares about (kernel padding).
    """
    for n in list(gm.graph.nodes):
        if n.meta.get(key):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def batchable_gather(gm: fx.GraphModule, n: fx.Node):
    """(group key, index) of ``gather(expand(table, sizes), dim, constant)`` expanded along one dim only, else
    None; the key is (table, gather dim, expanded dim, the index's other sizes)."""
    if n.op != "call_function" or n.target is not torch.ops.aten.gather.default or len(n.args) != 3 or n.kwargs:
        return None
    e, dim, idx = n.args
    if not (isinstance(e, fx.Node) and e.target is torch.ops.aten.expand.default and isinstance(idx, fx.Node)
            and idx.op == "get_attr"):
        return None
    table, sizes = e.args[0], list(e.args[1])
    grown = [j for j, s in enumerate(sizes) if s != -1]
    val = table.meta.get("val")
    index = get_attr(gm, idx.target)
    if len(grown) != 1 or val is None or not isinstance(index, torch.Tensor) or len(sizes) != val.dim():
        return None
    j = grown[0]
    if val.shape[j] != 1 or j == dim % val.dim() or index.shape[j] != sizes[j]:
        return None
    rest = tuple(s for i, s in enumerate(index.shape) if i != j)
    return (table, dim % val.dim(), j, rest), index
