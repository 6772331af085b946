"""Residual streams: the embedding dimension every block reads and writes, one coupled group.

A union-find over ``(node, dim)`` pairs links each tensor dim with the dims it becomes. One rule
per op family, in :data:`RULES` (like :data:`amgfx.graph.masks.RULES`): layers link their input
columns and output rows with their weight's dims, element-wise ops link broadcast-aligned dims,
and data movement is run on a meta tensor so dims are matched by *stride*, whatever the op
(permute, transpose, movedim, view, select, expand...). An op with no rule that reads a tensor
cuts every dim it reads, with its name, so a stream through it is reported, never lost.

A stream is a class that holds the channel dim of a skip-connection add and some layer's input
dim; it is prunable when its members agree on the width and nothing merges its channels into a
wider dim (a head split, a flatten).

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> r = amgfx.analyze(m, torch.randn(1, 3, 32, 32)).residual[0]
    >>> r.width, r.prunable, ("cls_token", 2) in r.members
    (192, True, True)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import noted
from ..graph.indexprop import _data_args, is_layer, layer_weight, shape, tensor_args, trace_back, val
from ..graph.ops import (CONCAT, GETITEM, IDENTITY, IGNORED_USERS, LAYERS, LIKE, LINEAR_LAYERS, MOVE, NORMS, PAD,
                         POINTWISE, REDUCTIONS, SOFTMAX, VECTOR_NORMS, VIEWS, opname, reduced_dims, where)
from .records import Ctx, ResidualStream

__all__ = ["RULES", "residual_streams"]

aten = torch.ops.aten


class _DSU:
    def __init__(self):
        self.p = {}

    def find(self, a):
        p = self.p.setdefault(a, a)
        while p != self.p[p]:
            self.p[p] = self.p[self.p[p]]
            p = self.p[p]
        self.p[a] = p
        return p

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[ra] = rb


class _State:
    """The union-find, and what the rules report: cut dims, skip-connection adds, layer input dims."""

    def __init__(self, ctx: Ctx):
        self.ctx, self.dsu = ctx, _DSU()
        self.cuts: list = []              # ((node, dim), op node): a dim whose channels do not survive as a dim
        self.adds: list = []              # (add node, channel dim): skip connections
        self.layer_in: list = []          # (weight node, in dim)

    def link(self, a, i, b, j):
        self.dsu.union((a, i), (b, j))

    def cut_unmatched(self, a, n, matched):
        s = shape(a)
        self.cuts.extend(((a, i), n) for i in range(len(s or ())) if i not in matched and s[i] != 1)


# ------------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------------
def _layer(n, st):
    if not is_layer(n):                              # a matmul of two activations: no weight to link
        return _unknown(n, st)
    t, out = n.target, shape(n)
    spec = LAYERS[t]
    w = n.args[spec[1]]          # the weight as the op sees it: a transpose in between is linked by its own rule
    x = n.args[spec[0]]
    xs = shape(x)
    if t is aten.embedding.default:
        st.link(n, len(out) - 1, layer_weight(n), 1)
        return
    conv = t in (aten.conv2d.default, aten.conv1d.default)
    chan, xchan = (1, 1) if conv else (len(out) - 1, len(xs) - 1)
    groups = n.args[6] if conv and len(n.args) > 6 else 1
    st.link(n, chan, w, spec[3])
    if groups == 1:
        st.link(x, xchan, w, spec[4])
        st.layer_in.append((w, spec[4]))
    elif groups == xs[xchan] == out[chan]:
        st.link(x, xchan, n, chan)                    # depthwise: channel c stays channel c
    b = n.args[spec[2]] if spec[2] is not None and len(n.args) > spec[2] else None
    if isinstance(b, fx.Node):
        st.link(n, chan, b, 0)
    if t in LINEAR_LAYERS:
        for i in range(len(xs) - 1):
            if i < len(out) and xs[i] == out[i]:
                st.link(x, i, n, i)


def _norm(n, st):
    spec, out = NORMS[n.target], shape(n)
    x = n.args[spec[0]]
    for i, s in enumerate(shape(x)):
        if s == out[i]:
            st.link(x, i, n, i)
    for pos in spec[1:]:
        if pos is not None and len(n.args) > pos and isinstance(n.args[pos], fx.Node):
            ws = shape(n.args[pos])
            for k in range(len(ws)):
                st.link(n.args[pos], k, n, len(out) - len(ws) + k)


def _elementwise(n, st):
    out = shape(n)
    if out is None:
        return
    for a in _data_args(n):
        s = shape(a)
        if s is None:
            continue
        off = len(out) - len(s)
        for k, size in enumerate(s):
            if size == out[k + off] and size != 1:
                st.link(a, k, n, k + off)
    tas = [a for a in tensor_args(n) if a in st.ctx.tainted]
    if n.target is aten.add.Tensor and len(tas) == 2 and all(shape(a) == out for a in tas):
        # a skip connection joins branches made by different layers (x + 0.04*x**3 does not)
        srcs = [frozenset(trace_back(a, st.ctx.tainted, budget=40).producers) for a in tas]
        if srcs[0] != srcs[1]:
            st.adds.append((n, len(out) - 1))


def _meta_out(n, source):
    """Run data-movement node ``n`` on a contiguous meta tensor shaped like its input ``source``."""
    x = torch.empty(shape(source), device="meta")
    rest = fx.node.map_arg(tuple(n.args[1:]), _scalar)       # sizes read at run time (the batch) as ints
    return x, n.target(x, *rest, **n.kwargs)


def _scalar(a: fx.Node):
    v = val(a)
    return int(v) if isinstance(v, (int, torch.SymInt)) else v


def _match_strides(n, src, x, y, st):
    """Link the dims a view keeps (same size and stride as a dim of its contiguous input); cut the rest."""
    matched = set()
    for j, (sj, tj) in enumerate(zip(y.shape, y.stride())):
        for i, (si, ti) in enumerate(zip(x.shape, x.stride())):
            if si == sj and ti == tj and si != 1 and i not in matched:
                st.link(src, i, n, j)
                matched.add(i)
                break
    st.cut_unmatched(src, n, matched)


def _align_end(n, src, y_shape, st):
    """A data-movement op that copies (index_select, repeat, gather by index): dims of equal size,
    aligned from the end, carry the same channels; the others are cut."""
    ins, off, matched = shape(src), len(y_shape) - len(shape(src)), set()
    for i, s in enumerate(ins):
        if 0 <= i + off < len(y_shape) and y_shape[i + off] == s and s != 1:
            st.link(src, i, n, i + off)
            matched.add(i)
    st.cut_unmatched(src, n, matched)


def _move(n, st):
    src = n.args[0]
    if not isinstance(src, fx.Node) or shape(src) is None:
        return
    try:
        x, y = _meta_out(n, src)
    except (RuntimeError, TypeError, IndexError, ValueError):
        return _unknown(n, st)
    if isinstance(y, (list, tuple)):
        return                                       # pieces (split, unbind): linked at their getitem
    if y._is_view() and y._base is x:
        _match_strides(n, src, x, y, st)
    else:
        _align_end(n, src, tuple(y.shape), st)


def _getitem(n, st):
    src = n.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in MOVE and src.args
            and isinstance(src.args[0], fx.Node) and shape(src.args[0]) is not None and shape(n) is not None):
        return
    try:
        x, ys = _meta_out(src, src.args[0])
    except (RuntimeError, TypeError, IndexError, ValueError):
        return _unknown(src, st)
    _match_strides(n, src.args[0], x, ys[n.args[1]], st)


def _pad(n, st):
    x, out = n.args[0], shape(n)
    matched = {i for i, s in enumerate(shape(x)) if s == out[i]}
    for i in matched:
        st.link(x, i, n, i)
    st.cut_unmatched(x, n, matched)


def _reduce(n, st):
    a = n.args[0]
    red, keep = reduced_dims(n)
    j = 0
    for i in range(len(shape(a))):
        if i in red:
            j += keep
            continue
        st.link(a, i, n, j)
        j += 1


def _concat(n, st):
    out = shape(n)
    d = n.args[1] if len(n.args) > 1 else 0
    stack = n.target is aten.stack.default
    for a in n.args[0]:
        s = shape(a)
        if s is None:
            continue
        dd = d % (len(out) if stack else len(s))
        for i in range(len(s)):
            if i != dd or stack:
                st.link(a, i, n, i + (1 if stack and i >= dd else 0))


def _nothing(n, st):
    """Ops whose output carries no channel of their input (``zeros_like``), or no tensor (``sym_size``)."""


def _unknown(n, st):
    """No rule: every dim of every tensor it reads is cut, and the op is named as the reason."""
    for a in tensor_args(n):
        st.cut_unmatched(a, n, set())


RULES = {}
RULES.update({t: _layer for t in LAYERS})
RULES.update({t: _norm for t in NORMS})
RULES.update({t: _elementwise for t in POINTWISE | IDENTITY | SOFTMAX})
RULES.update({t: _move for t in MOVE | VIEWS})
RULES.update({t: _pad for t in PAD})
RULES.update({t: _reduce for t in set(REDUCTIONS) | VECTOR_NORMS})
RULES.update({t: _concat for t in CONCAT})
RULES.update({t: _nothing for t in LIKE | IGNORED_USERS | {aten.sym_size.int}})
RULES[GETITEM] = _getitem


def residual_streams(ctx: Ctx) -> list[ResidualStream]:
    """Every residual stream of the graph (see the module docstring)."""
    st = _State(ctx)
    for n in ctx.graph.nodes:
        if n.op == "call_function":
            with noted(lambda: where(n)):
                RULES.get(n.target, _unknown)(n, st)
    dsu = st.dsu
    add_classes = {dsu.find(k) for k in st.adds}
    in_classes = {dsu.find(k) for k in st.layer_in}
    by_class: dict = {}
    for key in list(dsu.p):
        node, dim = key
        if isinstance(node, fx.Node) and node.op == "get_attr":
            by_class.setdefault(dsu.find(key), []).append((node, dim))
    first_use = lambda c: min(ctx.order[m] for m, _ in by_class.get(c, [(c[0], 0)]))
    streams = []
    for cls in sorted(add_classes & in_classes, key=first_use):
        members = sorted({(m.target, d) for m, d in by_class.get(cls, [])})
        widths = {shape(ctx.attrs[f])[d] for f, d in members}
        s = ResidualStream(name=f"stream{len(streams)}", width=max(widths), members=members)
        cut = [(k, n) for k, n in st.cuts if dsu.find(k) == cls]
        if cut:
            op = cut[0][1]
            why = "has no rule for residual channels" if op.target not in RULES else "merges or drops them"
            s.prunable, s.reason = False, f"channels are merged into a wider dim or cut: they reach " \
                                          f"{opname(op.target)} ({op.name}), which {why}"
        elif len(widths) != 1:
            s.prunable, s.reason = False, f"members have different widths {sorted(widths)}"
        streams.append(s)
    return streams
