"""Pass: rewrite every constant that encoded an old size (reshape/view/expand/split/slice/...).

The keep masks of :mod:`amgfx.masks` say which elements of every tensor survive. For each
op whose arguments carry sizes or positions, the new argument is read off the masks:

* ``view``/``reshape``/``expand``/``unflatten``: the packed shape of the output;
* ``split``/``chunk``: the packed size of each piece (a split whose pieces became unequal
  turns into ``split_with_sizes``, as GPT-2's q/k/v split does when v keeps more dims);
* ``slice``/``narrow``/``select``/``unbind`` items/``index_select``: old position -> new;
* ``layer_norm``/``rms_norm``: the normalised shape;
* an unpruned operand broadcast against a pruned tensor (RoPE's cos/sin tables) is gathered
  at the kept positions, per head when heads keep different dims;
* a graph output whose channels were pruned (a residual stream leaving an encoder) is
  scattered back into zeros, so the model's interface is unchanged.

Ops whose output shape does not change are left exactly as they were.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import RewriteError, noted
from ..graph.bools import all_, any_
from ..graph.fx import call, constant, dims_of, drop_export_guards, keep_symbolic, size_args
from ..graph.indexprop import _const, shape
from ..graph.masks import Masks, compact_shape, dim_ranks, kept_coords, propagate_masks
from ..graph.meta import APPROXIMATE, EXAMPLE, STATE, TOKEN_ROWS
from ..graph.ops import (CONV_GROUPS, GETITEM, IGNORED_USERS, NORMS, STATE_WRITE, is_depthwise_conv, opname, sdpa_args,
                         set_sdpa_arg, state_write_args, where)
from .pipeline import graph_pass
from ..planning.resolved import Resolved

aten = torch.ops.aten


def _prefix_count(ms: Masks, node: fx.Node, dim: int, pos: int) -> int:
    """How many kept indices lie before ``pos`` along ``dim``: the same in every fiber, or an error."""
    m = ms.get(node)
    a = m.movedim(dim % m.ndim, -1)
    rows = a.reshape(-1, a.shape[-1])
    rows = rows[any_(rows, -1)]
    counts = rows[:, :max(0, min(pos, a.shape[-1]))].sum(-1)
    if counts.numel() and not all_(counts == counts[0]):
        raise RewriteError(f"{node.name}: position {pos} along dim {dim} maps to different positions in different "
                           "heads after pruning")
    return int(counts[0]) if counts.numel() else 0


def _dim_pruned(ms, node, dim) -> bool:
    m = ms.get(node)
    return m is not None and ms.new_shape(node)[dim % m.ndim] != m.shape[dim % m.ndim]


def _set_arg(n: fx.Node, i: int, v) -> None:
    args = list(n.args)
    while len(args) <= i:
        args.append(None)
    args[i] = v
    n.args = tuple(args)


# ------------------------------------------------------------------------------------------------
# one rewrite per op kind; each edits ``n`` in place
# ------------------------------------------------------------------------------------------------
def _reshape(gm, ms, n):
    new = ms.new_shape(n)
    if new != shape(n):
        _set_arg(n, 1, keep_symbolic(n.args[1], shape(n), new))


def _expand(gm, ms, n):
    new = ms.new_shape(n)
    if new != shape(n):
        _set_arg(n, 1, keep_symbolic(n.args[1], shape(n), new))


def _unflatten(gm, ms, n):
    d = n.args[1] % len(shape(n.args[0]))
    new = ms.new_shape(n)
    k = len(n.args[2])
    _set_arg(n, 2, keep_symbolic(n.args[2], shape(n)[d:d + k], new[d:d + k]))


def _slice(gm, ms, n):
    x, d = n.args[0], n.args[1] if len(n.args) > 1 else 0
    if not _dim_pruned(ms, x, d):
        return
    size = shape(x)[d]
    start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
    end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else size
    step = n.args[4] if len(n.args) > 4 and n.args[4] is not None else 1
    start, end = (min(p + size if p < 0 else p, size) for p in (start, end))
    # where the selected, kept elements land after packing: one arithmetic progression in every fiber
    m = ms.get(x).movedim(d % ms.get(x).ndim, -1)
    rows = m.reshape(-1, size)
    rows = rows[any_(rows, -1)]
    if rows.shape[0] == 0:   # every fiber is empty (narrowed token rows): the kept channels cannot be read
        raise RewriteError(f"{n.name}: slices a tensor of which nothing survives")
    ranks = torch.cumsum(rows.long(), -1) - 1
    sel = torch.arange(start, end, step)
    taken = rows[:, sel]
    counts = taken.sum(1)
    # every fiber (head, token row) must pick the same packed positions (one slice serves them all)
    if not all_(counts == counts[0]):
        raise RewriteError(f"{n.name}: slice over a pruned dim selects different positions in different heads")
    picked = ranks[:, sel][taken].reshape(rows.shape[0], -1)
    if not all_(picked == picked[:1]):
        raise RewriteError(f"{n.name}: slice over a pruned dim selects different positions in different heads")
    p = picked[0]
    new_step = int(p[1] - p[0]) if p.numel() > 1 else 1
    if p.numel() > 1 and not bool((p.diff() == new_step).all()):
        raise RewriteError(f"{n.name}: kept elements of a strided slice are no longer evenly spaced")
    first = int(p[0]) if p.numel() else 0
    _set_arg(n, 2, first)
    _set_arg(n, 3, int(p[-1]) + 1 if p.numel() else first)
    if len(n.args) > 4 or new_step != 1:
        _set_arg(n, 4, new_step)


def _narrow(gm, ms, n):
    x, d = n.args[0], n.args[1]
    if _dim_pruned(ms, x, d):
        _set_arg(n, 2, _prefix_count(ms, x, d, n.args[2]))
        _set_arg(n, 3, ms.new_shape(n)[d])


def _select(gm, ms, n):
    x, d, i = n.args[0], n.args[1], n.args[2]
    if _dim_pruned(ms, x, d):
        i = i % shape(x)[d]
        if not bool(any_(ms.get(x).movedim(d, 0)[i])):
            raise RewriteError(f"{n.name}: selects index {i} of dim {d}, which the plan removes")
        _set_arg(n, 2, _prefix_count(ms, x, d, i))


def _split(gm, ms, n):
    x = n.args[0]
    d = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    if not _dim_pruned(ms, x, d):
        return
    pieces = ms.get(n)
    old = [s.shape[d] for s in n.meta["val"]]
    sizes = [old[i] if pieces is None or pieces[i] is None else _packed(ms, n, i, d) for i in range(len(old))]
    if n.target is aten.split.Tensor and len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]:
        _set_arg(n, 1, sizes[0])
    elif n.target is aten.chunk.default and [c.numel() for c in torch.empty(sum(sizes)).chunk(n.args[1])] == sizes:
        return
    else:
        n.target = aten.split_with_sizes.default
        n.args = (x, sizes, d)


def _packed(ms, n, i, d):
    s = compact_shape(ms.get(n)[i])
    if s is None:
        raise RewriteError(f"{n.name}: piece {i} does not pack densely")
    return s[d]


def _index_select(gm, ms, n):
    x, d, idx = n.args[0], n.args[1], n.args[2]
    if not _dim_pruned(ms, x, d):
        return
    old = _const(idx, gm, {})
    rank = dim_ranks(ms.get(x), d)
    if old is None or rank is None:
        raise RewriteError(f"{n.name}: index_select over a pruned dim needs a constant index and the same kept "
                           "indices in every row")
    new = rank[old]
    _set_arg(n, 2, constant(gm, n, new[new >= 0].to(old.dtype), "index"))


def _squeeze(gm, ms, n):
    n.target = aten.squeeze.dims
    n.args = (n.args[0], [i for i, s in enumerate(shape(n.args[0])) if s == 1])


def _norm_shape(gm, ms, n):
    x = n.args[NORMS[n.target][0]]
    new = ms.new_shape(x)
    k = len(n.args[1])
    if tuple(new[-k:]) != tuple(n.args[1]):
        _set_arg(n, 1, list(new[-k:]))


def _getitem(gm, ms, n):
    src = n.args[0]
    if isinstance(src, fx.Node) and src.target is aten.unbind.int:
        d = src.args[1] if len(src.args) > 1 else 0
        if _dim_pruned(ms, src.args[0], d):
            _set_arg(n, 1, _prefix_count(ms, src.args[0], d, n.args[1]))


def _groups(gm, ms, n):
    # a depthwise conv has one group per channel: as many as it keeps
    if is_depthwise_conv(n) and _dim_pruned(ms, n, 1):
        if len(n.args) > CONV_GROUPS:
            _set_arg(n, CONV_GROUPS, ms.new_shape(n)[1])
        else:
            n.kwargs = {**n.kwargs, "groups": ms.new_shape(n)[1]}


REWRITES = {
    aten.conv1d.default: _groups, aten.conv2d.default: _groups,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.expand.default: _expand, aten.broadcast_to.default: _expand, aten.unflatten.int: _unflatten,
    aten.slice.Tensor: _slice, aten.narrow.default: _narrow, aten.select.int: _select,
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split, aten.chunk.default: _split,
    aten.index_select.default: _index_select, aten.squeeze.default: _squeeze,
    aten.layer_norm.default: _norm_shape, aten.rms_norm.default: _norm_shape, GETITEM: _getitem,
}


# ------------------------------------------------------------------------------------------------
def _gather(gm, ms, n, pos, target=None):
    """Replace operand ``pos`` of ``n`` (broadcast against ``n``, keeping more than ``n``) by its kept part.

    The operand is unpruned, or pruned only along dims it then keeps whole (a residual whose
    channels were pruned, meeting a partner narrowed to the live token rows). ``target`` is the keep
    mask to gather to when it is not ``n``'s output (an attention mask: the kept logits); ``pos``
    ``"mask"`` names SDPA's mask argument.
    """
    c = sdpa_args(n).mask if pos == "mask" else n.args[pos]
    keep = ms.get(n) if target is None else target
    out = shape(n) if target is None else tuple(target.shape)
    new = ms.new_shape(n) if target is None else compact_shape(target)
    if new is None:
        raise RewriteError(f"{n.name}: the kept logits do not form a dense tensor")
    r = len(out)
    pad = (1,) * (r - len(shape(c)))
    cs, have = pad + shape(c), pad + ms.new_shape(c)
    pruned = [k for k in range(r) if new[k] < have[k] and cs[k] > 1]
    if any(have[k] != cs[k] for k in pruned):
        raise RewriteError(f"{n.name}: {c.name} is pruned along a dim it would also need gathering on")
    if not pruned:
        return
    coords = kept_coords(keep, new)                            # [*new, r]
    if len(shape(c)) < r:
        c = call(gm, n, aten.view.default, [c, list(have)])
    for k in pruned:
        ik = coords[..., k]
        deps = [j for j in range(r) if j != k and ik.shape[j] > 1 and not bool((ik == ik.narrow(j, 0, 1)).all())]
        if not deps:
            idx = ik.movedim(k, -1).reshape(-1, new[k])[0]
            c = call(gm, n, aten.index_select.default, [c, k, constant(gm, n, idx.clone(), "gather")])
            continue
        if any(cs[j] > 1 for j in deps):
            raise RewriteError(f"{n.name}: {c.name} varies along a dim the kept indices depend on")
        gshape = [new[j] if (j in deps or j == k) else (have[j] if cs[j] > 1 else 1) for j in range(r)]
        g = ik
        for j in range(r):
            if gshape[j] == 1:
                g = g.narrow(j, 0, 1)
        exp = [out[j] if j in deps else -1 for j in range(r)]
        ce = call(gm, n, aten.expand.default, [c, exp])
        c = call(gm, n, aten.gather.default, [ce, k, constant(gm, n, g.contiguous().clone(), "gather")])
    if pos == "mask":
        set_sdpa_arg(n, "mask", c)
    else:
        _set_arg(n, pos, c)


def _is_state(ms, a) -> bool:
    return a.op == "call_function" and a.target in STATE_WRITE and state_write_args(a)[0] in ms.states


def _scatter_outputs(gm, ms, out_node):
    """Graph outputs keep their original shape: pruned channels come back as zeros. A state the graph
    returns (an updated KV cache) stays small, as it is read back in at the next step."""
    def fix(a):
        if not (isinstance(a, fx.Node) and ms.pruned(a)) or _is_state(ms, a):
            return a
        m, new = ms.get(a), ms.new_shape(a)
        dims = [k for k in range(m.ndim) if new[k] != m.shape[k]]
        coords = kept_coords(m, new)
        if len(dims) != 1:
            raise RewriteError(f"output {a.name}: pruned along several dims {dims}")
        k = dims[0]
        idx = coords[..., k].movedim(k, -1).reshape(-1, new[k])
        if not bool((idx == idx[:1]).all()):
            raise RewriteError(f"output {a.name}: kept channels differ between positions")
        z = call(gm, out_node, aten.new_zeros.default, [a, size_args(gm, out_node, list(m.shape), dims_of(a), [a])])
        return call(gm, out_node, aten.index_copy.default, [z, k, constant(gm, out_node, idx[0].clone(), "out"), a])
    out_node.args = fx.node.map_aggregate(out_node.args, fix)


def _shrink_states(gm, ms) -> None:
    """The state inputs shrink: the example holds their kept part, and ``gm.meta[STATE]`` the keep mask of
    each state input and output, by position among the flat inputs and outputs (what the oracle and
    :func:`amgfx.generate` read)."""
    if not ms.states:
        return
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outs = [a for a in pytree.tree_leaves(next(n for n in gm.graph.nodes if n.op == "output").args)
            if isinstance(a, fx.Node)]
    state = {"inputs": {inputs.index(s): ms.get(s) for s in ms.states},
             "outputs": {i: ms.get(a) for i, a in enumerate(outs) if _is_state(ms, a)}}
    args, kwargs = gm.meta[EXAMPLE]
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [t[state["inputs"][i]].reshape(ms.new_shape(inputs[i])) if i in state["inputs"] else t
            for i, t in enumerate(flat)]
    gm.meta[EXAMPLE] = pytree.tree_unflatten(flat, spec)
    gm.meta[STATE] = state
    drop_export_guards(gm)                   # it checks the captured cache sizes


@graph_pass(requires=("params_shrunk", "token_rows", "live_rows"), ensures=("shapes_fixed",))
def fix_shapes(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    """Rewrite size/position constants so the graph runs on the shrunk parameters of ``resolved``.

    Example (timm ViT, q/k and v keep half of every head):
        >>> import torch, timm, amgfx
        >>> from amgfx.passes import shrink_params, fix_shapes
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> half = list(range(0, 192, 2))
        >>> r = amgfx.Plan(keep={"qk:blocks.0.attn": half, "v:blocks.0.attn": half}).resolve(cg)
        >>> gm = fix_shapes(shrink_params(amgfx.capture(m, torch.randn(1, 3, 32, 32)), r).graph_module, r).graph_module
        >>> [n.args[1] for n in gm.graph.nodes if n.name == "reshape"]    # the batch stays dynamic
        [[sym_size_int_1, 5, 3, 3, 32]]
    """
    ms = propagate_masks(gm, resolved.params)
    for n in list(gm.graph.nodes):
        if n.op == "output":
            _scatter_outputs(gm, ms, n)
            continue
        if n.op != "call_function" or TOKEN_ROWS in n.meta or \
                not any(ms.get(a) is not None for a in n.all_input_nodes):
            continue
        if n.target in IGNORED_USERS:
            gm.graph.erase_node(n)                   # shape asserts about the old sizes
            continue
        fn = REWRITES.get(n.target)
        if fn is not None:
            with noted(lambda: where(n)):
                fn(gm, ms, n)
    for n, pos, target in ms.gathers:
        _gather(gm, ms, n, pos, target)
    _shrink_states(gm, ms)
    gm.meta[APPROXIMATE] = sorted({f"{n.name} ({opname(n.target)})" for n in ms.approximate})
    return gm
