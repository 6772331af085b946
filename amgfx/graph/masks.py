"""Shape inference under a plan: which elements of every tensor survive pruning.

Every tensor of the graph gets a boolean *keep mask* of its original shape (``None``: all
kept). Masks start at the parameters the plan shrinks and flow forward: data-movement ops
are executed on the mask itself (so any reshape/permute/slice is handled without a rule per
op), and compute ops follow the small rules below. The pruned tensor is the original with
the dropped elements removed, packed in row-major order; :func:`compact_shape` says which
dense shape that is, and refuses masks that do not pack (say q/k and v rows of one fused
reshape kept in different numbers).

This is analysis only: ``amgfx/passes/fix_shapes.py`` reads the masks to rewrite constants, and
:func:`amgfx.planning.cost.predict` reads them to predict FLOPs.

Example (a head dim shrunk differently per head still packs densely):
    >>> import torch
    >>> m = torch.zeros(2, 4, dtype=torch.bool)          # [heads, head_dim]
    >>> m[0, [0, 1]] = True; m[1, [1, 3]] = True
    >>> compact_shape(m)
    (2, 2)
    >>> m[1, 3] = False
    >>> compact_shape(m) is None
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import RewriteError, noted
from .bools import all_, any_, equal
from .indexprop import _concrete, _const, index_operands, is_layer, shape, tensor_args, val
from .meta import TOKEN_ROWS
from .ops import (ADD_MATMUL, CONCAT, FUSED_ATTENTION, GETITEM, IDENTITY, IGNORED_USERS, LAYERS, LIKE, MATMUL, MOVE, NORMS,
                  PAD, POINTWISE, REDUCTIONS, SDPA, SOFTMAX, STATE_WRITE, VECTOR_NORMS, add_matmul_args, is_depthwise_conv,
                  opname, reduced_dims, run_move, sdpa_args, state_write_args, where)

aten = torch.ops.aten



def compact_shape(m: torch.Tensor) -> tuple[int, ...] | None:
    """The dense shape the kept elements of ``m`` pack into (row-major), or None if they do not.

    Dim ``k`` packs to ``c_k`` when every index prefix that keeps anything keeps exactly ``c_k``
    distinct indices along ``k``, and the kept count is the product of the ``c_k``.
    """
    if m.ndim == 0:
        return ()
    total = int(torch.count_nonzero(m))     # (a bool .sum() is many times slower)
    # the common case, a product of kept indices per dim (a pruned weight): m lies inside the product of its
    # per-dim projections, so it is that product when the counts agree
    per_dim = [int(torch.count_nonzero(any_(m, [d for d in range(m.ndim) if d != k]) if m.ndim > 1 else m))
               for k in range(m.ndim)]
    if total == math.prod(per_dim):
        return tuple(per_dim)
    sizes = []
    for k in range(m.ndim):
        a = any_(m.flatten(k + 1), -1) if k + 1 < m.ndim else m        # [S0..Sk]: prefix keeps anything
        rows = a.reshape(-1, m.shape[k])
        counts = torch.count_nonzero(rows, -1)[any_(rows, -1)]
        if counts.numel() == 0:
            return tuple(0 for _ in m.shape)
        if not bool((counts == counts[0]).all()):
            return None
        sizes.append(int(counts[0]))
    return tuple(sizes) if total == math.prod(sizes) else None


def dim_ranks(m: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Old index -> new index along ``dim`` (-1 where dropped), if it is the same in every fiber."""
    dim = dim % m.ndim
    a = m.movedim(dim, -1)
    rows = a.reshape(-1, a.shape[-1])
    rows = rows[any_(rows, -1)]
    if rows.shape[0] == 0:
        return torch.full((m.shape[dim],), -1)
    if not all_(rows == rows[:1]):
        return None
    keep = rows[0]
    r = torch.cumsum(keep.long(), 0) - 1
    return torch.where(keep, r, torch.full_like(r, -1))


def kept_coords(m: torch.Tensor, new: tuple) -> torch.Tensor:
    """For every element of the packed tensor, its coordinates in the original: [*new, ndim]."""
    return torch.nonzero(m).reshape(*new, m.ndim)


@dataclass
class Masks:
    """Keep masks of a graph under a plan (see the module docstring)."""
    env: dict
    gathers: list = field(default_factory=list)     # (node, arg position, target): operand keeps more than its
                                                     # user (target: the keep mask to gather to; None: the user's)
    approximate: list = field(default_factory=list)  # nodes that reduce over pruned elements (means, norms)
    _shapes: dict = field(default_factory=dict)

    def get(self, node):
        return self.env.get(node) if isinstance(node, fx.Node) else None

    @property
    def states(self) -> list:
        """The state inputs (KV caches) that shrink with what is written into them: the only graph inputs
        with a mask (see :func:`_state_write`)."""
        return [n for n in self.env if n.op == "placeholder"]

    def new_shape(self, node) -> tuple | None:
        """Packed shape of ``node``'s output (its original shape when nothing was dropped)."""
        m = self.get(node)
        if m is None:
            return shape(node)
        if node not in self._shapes:
            s = compact_shape(m)
            if s is None:
                raise RewriteError(f"{node.name} ({opname(node.target)}): the kept elements do not form a dense "
                                   "tensor (e.g. q/k and v of one fused reshape keep different head dims)")
            self._shapes[node] = s
        return self._shapes[node]

    def pruned(self, node) -> bool:
        m = self.get(node)
        return m is not None and self.new_shape(node) != tuple(m.shape)


def _ones(node):
    return torch.ones(shape(node), dtype=torch.bool)


def _m(masks, a):
    m = masks.get(a)
    return _ones(a) if m is None and isinstance(a, fx.Node) and shape(a) is not None else m


def _norm(m):
    """All-kept masks are stored as None so untouched regions cost nothing."""
    if isinstance(m, (list, tuple)):
        m = [_norm(x) for x in m]
        return None if all(x is None for x in m) else m
    return None if m is None or all_(m) else m


def _fail(n, why):
    raise RewriteError(f"cannot rewrite {n.name} ({opname(n.target)}): {why}")


# ------------------------------------------------------------------------------------------------
# rules: each returns the output mask of ``n`` given the masks of its inputs
# ------------------------------------------------------------------------------------------------
POSITIONAL = {aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.index_select.default}


def _move(n, ms, gm, cache):
    x = ms.get(n.args[0])
    if x is None:
        _fail(n, "only its index/shape operand is pruned")
    if n.target in POSITIONAL and x.numel() and not bool(any_(x)):
        # narrowed token rows that an earlier slice emptied: which channels survive cannot be read here
        _fail(n, "it reads positions of a tensor of which nothing survives")
    if n.target is aten.index.Tensor:
        idx = index_operands(n, x, gm, cache)
        if idx is None:
            _fail(n, "it picks input-dependent positions along a dim that is pruned")
        rest = [idx]
    else:
        rest = [_const(a, gm, cache) if isinstance(a, fx.Node) else _concrete(a) for a in n.args[1:]]
    if n.target is aten.expand.default:
        return x.expand(*rest[0])
    return run_move(n.target, x, *rest, **n.kwargs)


def _identity(n, ms, gm, cache):
    return ms.get(n.args[0])


def _concat(n, ms, gm, cache):
    return n.target([_m(ms, a) for a in n.args[0]], *n.args[1:])


def _pointwise(n, ms, gm, cache):
    out = shape(n)
    masked = [a for a in tensor_args(n) if ms.get(a) is not None]
    if n.target is aten.expand_as.default:
        masked = [a for a in masked if a is n.args[0]]
    ref = ms.get(masked[0]).broadcast_to(out)
    for a in masked[1:]:
        ref = ref & ms.get(a).broadcast_to(out)
    rows = any_(ref, -1, keepdim=True)
    for a in masked:
        # An operand may keep more rows (token positions) than the other, never other channels:
        # a residual whose partner was narrowed to the live tokens is gathered to them.
        if not equal(ms.get(a).broadcast_to(out) & rows, ref):
            _fail(n, f"its operands {masked[0].name} and {a.name} keep different elements")
    for pos, a in enumerate(n.args):
        if not isinstance(a, fx.Node) or shape(a) is None or math.prod(shape(a)) <= 1:
            continue
        m = ms.get(a)
        if m is None or not equal(m.broadcast_to(out), ref):
            ms.gathers.append((n, pos, None))
    return ref


def _norm_rule(n, ms, gm, cache):
    x = n.args[NORMS[n.target][0]]
    m = ms.get(x)
    if m is None:
        _fail(n, "its weight is pruned but its input is not")
    nd = len(n.args[1])
    if not all_(m) and any(s < o for s, o in zip(ms.new_shape(x)[-nd:], shape(x)[-nd:])):
        ms.approximate.append(n)                     # the norm now averages over fewer channels
    return m


def _softmax(n, ms, gm, cache):
    m = ms.get(n.args[0])
    d = n.args[1] % m.ndim
    if ms.new_shape(n.args[0])[d] != m.shape[d]:
        _fail(n, "the softmax dim itself is pruned")
    return m


def _layer(n, ms, gm, cache):
    spec = LAYERS[n.target]
    t = n.target
    x, w = n.args[spec[0]], n.args[spec[1]]
    wm, xm = _m(ms, w), ms.get(x)
    out = shape(n)
    if t is aten.embedding.default:
        return any_(wm, 0).broadcast_to(out)
    wo = any_(wm, [d for d in range(wm.ndim) if d != spec[3]])
    wi = any_(wm, [d for d in range(wm.ndim) if d != spec[4]])
    if not equal(wm, _outer(wo, wi, spec[3], spec[4], wm.shape)):
        _fail(n, "its weight mask is not a product of kept rows and kept columns")
    conv = t in (aten.conv2d.default, aten.conv1d.default)
    chan = 1 if conv else -1
    if xm is not None:
        rows = xm.movedim(chan, -1).reshape(-1, xm.shape[chan])
        rows = rows[any_(rows, -1)]
        if rows.shape[0] and not all_(rows == wi):
            _fail(n, f"its input keeps channels its weight {w.name} does not (or the reverse)")
    view = [1] * len(out)
    view[chan] = -1
    kept = wo.reshape(view).expand(out)
    if xm is not None and not conv:                  # rows (tokens) the input dropped stay dropped
        kept = kept & any_(xm, -1, keepdim=True)
    return kept


def _depthwise(n, ms, gm, cache):
    """A depthwise conv keeps the channels its input and its weight rows both keep (they must agree)."""
    x, w = n.args[0], n.args[1]
    xm, wm = ms.get(x), _m(ms, w)
    wo = any_(wm.flatten(1), 1)
    if not equal(wm, wo.reshape([-1] + [1] * (wm.dim() - 1)).expand(wm.shape)):
        _fail(n, "its weight mask is not a set of kept channels")
    kept = xm.movedim(1, -1).reshape(-1, xm.shape[1]) if xm is not None else wo[None]
    kept = kept[any_(kept, -1)]
    if kept.shape[0] and not all_(kept == wo):
        _fail(n, f"its input keeps channels its weight {w.name} does not (or the reverse)")
    return wo.reshape([1, -1] + [1] * (len(shape(n)) - 2)).expand(shape(n))


def _outer(wo, wi, out_dim, in_dim, full):
    v_o = [1] * len(full)
    v_o[out_dim] = -1
    v_i = [1] * len(full)
    v_i[in_dim] = -1
    return (wo.reshape(v_o) & wi.reshape(v_i)).expand(full)


def _sdpa(n, ms, gm, cache):
    a = sdpa_args(n)
    q, k, v = (_m(ms, x) for x in (a.q, a.k, a.v))
    H, Hk = q.shape[-3], k.shape[-3]
    rep = H // Hk if a.enable_gqa and Hk != H else 1
    qf, kf, vf = any_(q, -2), any_(k, -2).repeat_interleave(rep, -2), any_(v, -2).repeat_interleave(rep, -2)
    heads = any_(qf, -1, keepdim=True)
    qf, kf = torch.broadcast_tensors(qf, kf)
    if not equal(qf & heads, kf & heads):
        _fail(n, "queries and keys keep different head dims")
    if not equal(*torch.broadcast_tensors(any_(k, -1), any_(v, -1))):
        _fail(n, "keys and values keep different token positions")
    if isinstance(a.mask, fx.Node):
        _sdpa_mask(n, ms, a.mask, q, any_(k, -1).repeat_interleave(rep, -2))
    return (any_(q, -1)[..., None] & vf[..., None, :]).broadcast_to(shape(n))


def _sdpa_mask(n, ms, mask, q, krows):
    """The mask (or bias) of the logits must keep every logit attention keeps: the kept heads and query
    rows of q, the kept keys. Where it keeps more (a per-query or per-head bias meeting narrowed queries
    or pruned heads), fix_shapes gathers it to the kept logits."""
    logits = any_(q, -1)[..., :, None] & krows[..., None, :]            # [B, H, Nq, Nk]
    mm = _m(ms, mask)
    mm = mm.reshape((1,) * (logits.dim() - mm.dim()) + tuple(mm.shape))
    logits, full = torch.broadcast_tensors(logits, mm)
    if not equal(full & logits, logits):
        _fail(n, "the attention mask drops logits the attention keeps (it is pruned other than along the keys)")
    if not equal(full, logits):
        ms.gathers.append((n, "mask", logits))


def _matmul(n, ms, gm, cache):
    return _product(n, ms, *n.args[:2])


def _add_matmul(n, ms, gm, cache):
    """``beta * input + alpha * a @ b``: the product's mask; an added input keeping more is gathered to it."""
    term, a, b, _, _ = add_matmul_args(n)
    out = _product(n, ms, a, b)
    tm = ms.get(term)
    if tm is not None and not equal(tm.broadcast_to(out.shape) | out, tm.broadcast_to(out.shape)):
        _fail(n, f"its added input {term.name} drops elements the product keeps")
    if isinstance(term, fx.Node) and not equal(_m(ms, term).broadcast_to(out.shape), out):
        ms.gathers.append((n, ADD_MATMUL[n.target][0], None))
    return out


def _product(n, ms, a_node, b_node):
    a, b = (_m(ms, x) for x in (a_node, b_node))
    ka, kb = torch.broadcast_tensors(any_(a, -2), any_(b, -1))
    lead = torch.broadcast_tensors(any_(a, [-2, -1]).unsqueeze(-1), any_(b, [-2, -1]).unsqueeze(-1))
    live = lead[0] & lead[1]
    if not equal(ka & live, kb & live):
        _fail(n, "its operands keep different elements along the contracted dim")
    return (any_(a, -1)[..., :, None] & any_(b, -2)[..., None, :]).broadcast_to(shape(n))


def _reduce(n, ms, gm, cache):
    m = ms.get(n.args[0])
    dims, keep = reduced_dims(n)
    new = ms.new_shape(n.args[0])
    if REDUCTIONS.get(n.target, True) and any(new[d] < m.shape[d] for d in dims):   # norms average too
        ms.approximate.append(n)
    return any_(m, list(dims), keepdim=keep) if dims else m


def _state_write(n, ms, gm, cache):
    """A cache update keeps, at every position, what its source keeps. The state it writes into is a graph
    input read nowhere else: it takes the same mask, so the pruned graph reads and returns a smaller cache."""
    st, dim, src = state_write_args(n)
    sm = ms.get(src)
    if sm is None:
        _fail(n, "it writes an unpruned source into a pruned state")
    along = any_(sm, dim, keepdim=True)
    if not equal(along.expand_as(sm), sm):
        _fail(n, "the positions it writes keep different elements")
    out = along.expand(shape(n))
    if isinstance(st, fx.Node) and st.op == "placeholder":
        if any(u is not n and u.op == "call_function" and u.target not in IGNORED_USERS for u in st.users):
            _fail(n, f"its state input {st.name} is read by other ops too")
        ms.env[st] = out.clone()
    elif not equal(_m(ms, st), out):
        _fail(n, "the state it writes into keeps other elements than the source")
    return out


def _pad(n, ms, gm, cache):
    m = ms.get(n.args[0])
    pads = list(n.args[1])
    new = ms.new_shape(n.args[0])
    for i in range(len(pads) // 2):                  # pads run from the last dim backwards
        d = m.ndim - 1 - i
        if (pads[2 * i] or pads[2 * i + 1]) and new[d] != m.shape[d]:
            _fail(n, f"it pads dim {d}, which is pruned")
    return torch.nn.functional.pad(m, pads, value=True)   # padding exists in the output: kept


def _like(n, ms, gm, cache):
    return ms.get(n.args[0])


def _size(n, ms, gm, cache):
    # a dynamic size (the batch) read at run time: fine unless that dim shrinks
    d = n.args[1]
    if ms.new_shape(n.args[0])[d] != shape(n.args[0])[d]:
        _fail(n, f"it reads the size of dim {d} at run time, and that dim is pruned")
    return None


RULES = {}
RULES.update({t: _move for t in MOVE})
RULES.update({t: _identity for t in IDENTITY})
RULES.update({t: _concat for t in CONCAT})
RULES.update({t: _pointwise for t in POINTWISE})
RULES.update({t: _norm_rule for t in NORMS})
RULES.update({t: _softmax for t in SOFTMAX})
RULES.update({t: _sdpa for t in SDPA})
RULES.update({t: _reduce for t in set(REDUCTIONS) | VECTOR_NORMS})
RULES.update({t: _like for t in LIKE})
RULES.update({t: _add_matmul for t in ADD_MATMUL})
RULES.update({t: _pad for t in PAD})
RULES.update({t: _state_write for t in STATE_WRITE})
RULES.update({aten.sym_size.int: _size})


def param_masks(gm: fx.GraphModule, params: dict) -> dict:
    """FQN -> keep mask of every parameter the plan shrinks (``params``: FQN -> {dim: kept})."""
    out = {}
    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn, dims in params.items():
        shp = shape(attrs[fqn]) if fqn in attrs else None
        if shp is None:
            continue
        m = torch.ones(shp, dtype=torch.bool)
        for d, kept in dims.items():
            k = torch.zeros(shp[int(d)], dtype=torch.bool)
            k[list(kept)] = True
            view = [1] * len(shp)
            view[int(d)] = -1
            m &= k.reshape(view)
        out[fqn] = m
    return out


def propagate_masks(gm: fx.GraphModule, params: dict, *, dense: bool = True, nodes=None,
                    base: Masks | None = None) -> Masks:
    """Keep masks of every node of ``gm`` when the parameters shrink as ``params`` says.

    ``dense``: check that every mask packs into a dense tensor (what a rewrite needs); ``split_qkv``
    turns it off to find the fused projections that do not pack, which it then splits.

    ``nodes`` (a subset, in graph order) with ``base`` (the masks of another plan) propagates over those
    nodes only, every other node keeping its mask in ``base``: the budget re-evaluates one region of the
    graph this way (:mod:`amgfx.planning.regions`) instead of the whole of it."""
    pm = param_masks(gm, params)
    ms = Masks(env=dict(base.env) if base is not None else {})
    cache: dict = {}
    for n in (gm.graph.nodes if nodes is None else nodes):
        if n.op == "get_attr":
            if n.target in pm:
                ms.env[n] = pm[n.target]
            else:
                ms.env.pop(n, None)
            continue
        if n.op == "output":
            continue
        if TOKEN_ROWS in n.meta:                        # a static token gather: keeps these rows of its input
            d, kept = n.meta[TOKEN_ROWS]
            rows = torch.zeros(shape(n)[d], dtype=torch.bool)
            rows[kept] = True
            view = [1] * len(shape(n))
            view[d] = -1
            ms.env[n] = _m(ms, n.args[0]) & rows.reshape(view)
            continue
        masked = [a for a in n.all_input_nodes if ms.get(a) is not None]
        if not masked:
            ms.env.pop(n, None)                         # (a base mask of this node is not this plan's)
            continue
        if n.op != "call_function":
            _fail(n, f"a pruned tensor ({masked[0].name}) flows into {n.op} {n.target}")
        t = n.target
        if t is GETITEM:
            src = ms.get(n.args[0])
            ms.env[n] = _norm(src[n.args[1]])
            continue
        if t in IGNORED_USERS:
            ms.env.pop(n, None)
            continue
        if is_depthwise_conv(n):
            rule = _depthwise
        elif is_layer(n) or (t in LAYERS and t not in MATMUL and t is not aten.mm.default):
            rule = _layer                            # a weight sliced by split_qkv is still a weight
        elif t in MATMUL or t is aten.mm.default:
            rule = _matmul
        else:
            rule = RULES.get(t) or (_sdpa if t in FUSED_ATTENTION else None)   # registered fused attention too
        if rule is None:
            _fail(n, f"amgfx has no rule for this op, and it reads the pruned tensor {masked[0].name}")
        with noted(lambda: where(n)):
            out = rule(n, ms, gm, cache)
        ms.env[n] = _norm(list(out) if isinstance(out, (list, tuple)) else out)
        if isinstance(ms.env[n], torch.Tensor) and not isinstance(val(n), torch.Tensor):
            _fail(n, "produced a mask for a non-tensor value")
    for n, m in (ms.env.items() if dense else ()):
        # Every tensor of the pruned graph is dense, so every mask must pack: a reshape downstream
        # that packs while its input does not would silently reorder channels (NesT's heads-last layout).
        if isinstance(m, torch.Tensor):
            ms.new_shape(n)
    return ms
