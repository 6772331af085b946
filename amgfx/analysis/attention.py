"""Attention sites: read an attention op, follow its operands to their projections, pair units.

**Adapters, as data.** One adapter per kind of attention op turns a graph node into one normalised
:class:`AttentionOperands` record (q, k, v, the output, off-path logit terms such as masks and
biases, scale, causality, GQA). :data:`ADAPTERS` maps ops to adapters; every op that
:mod:`amgfx.graph.ops` knows as fused attention (SDPA, and whatever
:func:`~amgfx.graph.ops.register_fused_attention` adds) is read by the SDPA adapter, and the
softmax ops by the matmul adapter (``q @ k^T -> softmax -> @ v``). An adapter may instead say the
op is attention amgfx cannot prune (:class:`Refused`) or no attention at all (:class:`NotAttention`,
an MoE router's softmax): both are reported, never skipped in silence.

**Then four steps**, the same for every adapter: :func:`~amgfx.analysis.operands.trace_operands` (each operand to its one
projection, neuron ids propagated), :func:`find_heads` (lead positions carrying the same neurons
are one head; which k/v head each query head meets), :func:`qk_units` (q row *i* with k row *i*;
RoPE adds the partner) and :func:`projection_units` (value neurons with the output projection
columns that read them, and whole heads).

Example:
    >>> import torch, timm, amgfx
    >>> aten = torch.ops.aten
    >>> adapter_for(aten.scaled_dot_product_attention.default).__name__, adapter_for(aten._softmax.default).__name__
    ('sdpa_adapter', 'matmul_adapter')
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> s = amgfx.analyze(m, torch.randn(1, 3, 32, 32)).sites[0]
    >>> s.kind, s.num_heads, s.head_dim_qk, s.q.weight
    ('sdpa', 3, 64, 'blocks.0.attn.qkv.weight')
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from ..graph.indexprop import (_scalar_factor, forward_region, is_layer, layer_input, propagate, shape,
                               tensor_args)
from ..graph.ops import (ADD_MATMUL, FUSED_ATTENTION, IDENTITY, IGNORED_USERS, LINEAR_LAYERS, MATMUL,
                         MOVE, POINTWISE, POINTWISE_AFFINE, REDUCTIONS, SOFTMAX, add_matmul_args,
                         channel_dim, is_pointwise_conv, opname, sdpa_args)
from .head_tensors import per_head_tensors
from .operands import trace_operands
from .records import (AttentionSite, Ctx, common_prefix, columns, group_heads, id_sets, make_layer, module_path,
                      on_last_axis, rows_of)

__all__ = ["AttentionOperands", "Refused", "NotAttention", "ADAPTERS", "register_adapter", "attention_site"]


# ------------------------------------------------------------------------------------------------
# what adapters return
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionOperands:
    """One attention op, normalised: ``out = softmax(scale * q k^T + terms) v``."""
    kind: str                      # the adapter's name, shown by inspect ("sdpa", "matmul")
    q: fx.Node
    k: fx.Node                     # laid out [..., N, d] unless k_transposed
    v: fx.Node
    out: fx.Node                   # whose output is the attention result (SDPA itself, or the AV matmul)
    terms: tuple = ()              # off-path tensors added to or multiplying the logits (masks, biases)
    scale: float | None = None     # the logit scale; None: SDPA's default 1/sqrt(head dim)
    scale_explicit: bool = False   # the graph states the scale (a pass must then not recompute it)
    causal: bool = False
    gqa: bool = False              # k/v heads are shared by groups of query heads inside the op
    k_transposed: bool = False     # k arrives as k^T ([..., d, N]), as ``q @ k.transpose`` writes it
    v_transposed: bool = False     # v and the output are [..., d, N]: ``v @ attn^T`` (LeViT's conv layout)


@dataclass(frozen=True)
class Refused:
    """Attention, but not prunable as it is (reported as an unsupported site, with the reason)."""
    reason: str


@dataclass(frozen=True)
class NotAttention:
    """A softmax or attention-like op that is something else (reported as what it is, and by which rule)."""
    what: str
    rule: str = "other"            # router | pooling | table | normaliser | not-qk: the rule that decided it


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
def sdpa_adapter(ctx: Ctx, node: fx.Node):
    """Fused attention (SDPA, or an op registered as one): the operands are its arguments."""
    a = sdpa_args(node)
    return AttentionOperands(kind="sdpa", q=a.q, k=a.k, v=a.v, out=node,
                             terms=(a.mask,) if isinstance(a.mask, fx.Node) else (),
                             scale=a.scale, scale_explicit=a.scale is not None, causal=bool(a.is_causal),
                             gqa=bool(a.enable_gqa))


def _upstream_matmul(ctx, start: fx.Node, budget: int = 24) -> bool:
    """Whether a product of two activations lies shortly above ``start`` (through data movement)."""
    todo, seen = [start], set()
    while todo and len(seen) < budget:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        ab = n.args[:2] if n.target in MATMUL else add_matmul_args(n)[1:3] if n.target in ADD_MATMUL else None
        if ab is not None and all(a in ctx.data for a in ab):
            return True
        if n.target in MOVE or n.target in IDENTITY or n.target in POINTWISE_AFFINE or is_layer(n):
            todo.extend(a for a in tensor_args(n) if a in ctx.tainted)
    return False


def _logits_back(ctx, start: fx.Node):
    """From the softmax input back to the QK product: ((q, k^T), off-path terms, scale, result if not attention).

    A product with an added term (``baddbmm``) is the QK product too; its added input is a logit term."""
    terms, scale, n = [], 1.0, start
    for _ in range(64):
        if n.op != "call_function":
            break
        if is_layer(n):
            if _upstream_matmul(ctx, layer_input(n)):
                return None, terms, scale, Refused(f"attention logits are mixed by {opname(n.target)} before softmax "
                                                   "(talking heads), so heads are not independent")
            return None, terms, scale, NotAttention(f"softmax over the output of {opname(n.target)} "
                                                    f"({n.name}), not over q.k products: a router or a gate",
                                                    "router")
        if n.target in MATMUL or n.target in ADD_MATMUL:
            term, a, b, beta, alpha = add_matmul_args(n) if n.target in ADD_MATMUL else (None, *n.args[:2], 0, 1)
            terms, scale = terms + ([term] if isinstance(term, fx.Node) and beta != 0 else []), scale * float(alpha)
            if all(x in ctx.tainted and x in ctx.data for x in (a, b)):
                return (a, b), terms, scale, None
            return None, terms, scale, NotAttention("softmax over a product with a constant (a learned query "
                                                    "against data: attention pooling), not over q.k of two projections",
                                                    "pooling")
        # element-wise maths on the logits (a scale, a bias, tanh soft-capping, a clamp) keeps heads apart
        if n.target in MOVE or n.target in IDENTITY or n.target in POINTWISE:
            nxt = [a for a in tensor_args(n) if a in ctx.tainted and a in ctx.data]   # the logits: input-dependent
            if len(nxt) != 1:
                break
            terms += [a for a in tensor_args(n) if a not in nxt]
            scale *= _scalar_factor(n, nxt[0])
            n = nxt[0]
            continue
        break
    return None, terms, scale, NotAttention(f"softmax whose input is made by {opname(n.target)} ({n.name}), "
                                            "not by a q.k matmul", "not-qk")


def _swaps_last_two(n: fx.Node) -> bool:
    r = len(shape(n.args[0]) or ())
    if n.target is torch.ops.aten.transpose.int:
        return r >= 2 and {a % r for a in n.args[1:3]} == {r - 1, r - 2}
    if n.target is torch.ops.aten.permute.default:
        return list(n.args[1]) == list(range(r - 2)) + [r - 1, r - 2]
    return False


def _probs_forward(ctx, start: fx.Node):
    """From the softmax output forward to the AV product: (av, v transposed?, result if not attention).
    ``attn @ v``, or ``v @ attn^T`` (the probabilities transposed on the way, as conv layouts write it)."""
    n, flipped = start, False
    for _ in range(32):
        users = [u for u in n.users if u.op == "call_function" and u.target not in IGNORED_USERS]
        if len(users) != 1:
            return None, False, NotAttention(f"its probabilities are read by {len(users)} ops, not by one A.v product",
                                             "normaliser")
        u = users[0]
        if is_layer(u):
            return None, False, Refused(f"attention probabilities are mixed by {opname(u.target)} after softmax "
                                        "(talking heads), so heads are not independent")
        if u.target in MATMUL and u.args[1 if flipped else 0] is n:
            return u, flipped, None
        if u.target in MOVE or u.target in IDENTITY or u.target in POINTWISE_AFFINE:
            flipped ^= u.target in MOVE and _swaps_last_two(u)
            n = u
            continue
        return None, False, NotAttention(f"its probabilities go to {opname(u.target)} ({u.name}), not to an A.v product",
                                     "normaliser")
    return None, False, NotAttention("no A.v product follows the softmax", "normaliser")


def _weighs_data(ctx, start: fx.Node, budget: int = 48):
    """The first product in which values derived from ``start`` (through data movement, element-wise maths
    and reductions: a gate, a renormalisation) weigh an input-dependent operand: an A.v product; else None."""
    todo, seen, mine = [start], set(), {start}
    while todo and len(seen) < budget:
        n = todo.pop(0)
        for u in n.users:
            if u in seen or u.op != "call_function" or u.target in IGNORED_USERS:
                continue
            seen.add(u)
            if u.target in MATMUL and any(a in ctx.data and a not in mine for a in u.args[:2]):
                return u
            if u.target in MOVE or u.target in IDENTITY or u.target in POINTWISE or u.target in REDUCTIONS:
                mine.add(u)
                todo.append(u)
    return None


_MIXED = "its probabilities are mixed with other terms ({how}) before the A.v product"


def matmul_adapter(ctx: Ctx, node: fx.Node):
    """``softmax(q @ k^T * s + terms) @ v`` written out: walk back to the logits, forward to A.v.

    A softmax that is not that form but still weighs input-dependent values by a product (outlook attention's
    linear-made weights, factorised attention's softmax over k's tokens, a gated mix of two softmaxes) is
    attention amgfx cannot prune as it is: :class:`Refused`, naming the identity that fails, not NotAttention."""
    if node.args[0] not in ctx.tainted:
        av = _weighs_data(ctx, node)
        if av is not None:
            return Refused(f"a softmax of values that depend on no input (a positional table) weighs {av.name}: "
                           "positional attention with no q.k^T product, so no q/k units exist")
        return NotAttention("softmax of values that depend on no layer (a constant table)", "table")
    qk, terms, logit_scale, other = _logits_back(ctx, node.args[0])
    if isinstance(other, NotAttention) and other.rule != "pooling":     # a learned query is pooling, as it says
        av = _weighs_data(ctx, node)
        if av is not None:
            return Refused(f"{other.what}; yet its probabilities weigh {'the tokens' if node in ctx.data else 'positions'}"
                           f" by a product ({av.name}): attention without q.k^T (outlook, factorised or positional), "
                           "so there are no q/k pairs to keep and the site is left whole")
    if other is not None:
        return other
    av, flipped, other = _probs_forward(ctx, node)
    if isinstance(other, NotAttention):
        mixed = _weighs_data(ctx, node)
        if mixed is not None:
            how = ", ".join(sorted({opname(u.target) for u in node.users if u.op == "call_function"}))
            return Refused(_MIXED.format(how=how) + f" {mixed.name} (gated or renormalised attention): "
                           "softmax(q.k^T).v holds for neither term alone, so the site is left whole")
    if other is not None:
        return other
    return AttentionOperands(kind="matmul", q=qk[0], k=qk[1], v=av.args[0 if flipped else 1], out=av,
                             terms=tuple(terms), scale=logit_scale, scale_explicit=True, k_transposed=True,
                             v_transposed=flipped)


ADAPTERS: dict = {op: matmul_adapter for op in SOFTMAX}


def register_adapter(op, adapter) -> None:
    """Read ``op`` with ``adapter(ctx, node) -> AttentionOperands | Refused | NotAttention``."""
    ADAPTERS[op] = adapter


def adapter_for(op):
    """The adapter of ``op``, or None; fused attention ops use the SDPA adapter unless registered."""
    if op in ADAPTERS:
        return ADAPTERS[op]
    return sdpa_adapter if op in FUSED_ATTENTION else None


# ------------------------------------------------------------------------------------------------
# step 2: heads
# ------------------------------------------------------------------------------------------------
@dataclass
class Heads:
    """Which neurons each head holds, and which key/value head each query head meets."""
    lead: tuple                      # q's lead dims (everything but tokens and features)
    qsets: np.ndarray                # [H, d, S] q neuron ids of head h, column j
    ksets: np.ndarray                # [Hk, d, S]
    vsets: np.ndarray                # [Hv, dv, S]
    q_head_of: np.ndarray            # [lead positions] query head at each
    q_to_k: dict = field(default_factory=dict)
    q_to_v: dict = field(default_factory=dict)

    @property
    def H(self):
        return len(self.qsets)


def find_heads(ops: AttentionOperands, lanes: dict, site: AttentionSite):
    """Group lead positions into heads by the neurons they carry; pair each query head with the one
    key and value head it meets (broadcast, or GQA grouping inside the op). Fills the site's head
    counts and calibration maps; returns :class:`Heads`, or a reason the site is unsupported."""
    qshape, kshape = shape(ops.q), tuple(lanes["k"][0].shape)
    vshape = tuple(lanes["v"][0].shape) if ops.v_transposed else shape(ops.v)
    lead = qshape[:-2]
    qsets, q_head_of = group_heads(id_sets(lanes["q"], qshape))
    ksets, k_head_of = group_heads(id_sets(lanes["k"], kshape))
    vsets, v_head_of = group_heads(id_sets(lanes["v"], vshape))

    def pair_with(other_head_of, other_lead):
        idx = np.arange(int(np.prod(other_lead))).reshape(other_lead)
        if ops.gqa and other_lead[-1] != lead[-1]:
            idx = np.repeat(idx, lead[-1] // other_lead[-1], axis=-1)
        return other_head_of[np.broadcast_to(idx, lead).reshape(-1)]

    q_to_k, q_to_v = {}, {}
    k_of, v_of = pair_with(k_head_of, kshape[:-2]), pair_with(v_head_of, vshape[:-2])
    for p, h in enumerate(q_head_of):
        q_to_k.setdefault(h, set()).add(int(k_of[p]))
        q_to_v.setdefault(h, set()).add(int(v_of[p]))
    if any(len(s) != 1 for s in q_to_k.values()) or any(len(s) != 1 for s in q_to_v.values()):
        return "a query head meets more than one key/value head"
    heads = Heads(lead, qsets, ksets, vsets, q_head_of, {h: s.pop() for h, s in q_to_k.items()},
                  {h: s.pop() for h, s in q_to_v.items()})
    if len(lead) and len(kshape) > 2:
        site.lead_heads = on_last_axis(q_head_of, lead)
        site.lead_k = on_last_axis(pair_with(np.arange(int(np.prod(kshape[:-2]))), kshape[:-2]) % kshape[-3], lead)
    site.kv_group = np.array([heads.q_to_k[h] for h in range(heads.H)])
    site.num_heads, site.num_kv_heads = heads.H, len(ksets)
    site.head_dim_qk, site.head_dim_v = qshape[-1], vshape[-1]
    return heads


# ------------------------------------------------------------------------------------------------
# step 3: q/k pairs
# ------------------------------------------------------------------------------------------------
def qk_units(site: AttentionSite, heads: Heads):
    """q row *j* and k row *j* of a head meet in one rank-1 term of ``q k^T``; RoPE rotates pairs of
    columns into each other, so a unit then holds both columns. Units are the connected components
    of that coupling (networkx). Returns a reason when the site is unsupported, else None."""
    H, Hk, d = heads.H, len(heads.ksets), site.head_dim_qk
    g = nx.Graph()
    for h in range(H):
        kh = heads.q_to_k[h]
        for j in range(d):
            members = [("q", r) for r in heads.qsets[h, j] if r >= 0] + [("k", r) for r in heads.ksets[kh, j] if r >= 0]
            if not members:
                return "a query position is not produced by the projection"
            g.add_nodes_from(members)
            g.add_edges_from((members[0], m) for m in members[1:])
    k_row_head = {r: kh for kh in range(Hk) for r in rows_of(heads.ksets[kh])}
    units: dict = {}
    for comp in nx.connected_components(g):
        qr = sorted(r for t, r in comp if t == "q")
        kr = sorted(r for t, r in comp if t == "k")
        owner = {k_row_head.get(r) for r in kr}
        if len(owner) != 1 or not qr:
            return "query/key coupling does not stay inside one key head"
        units.setdefault(owner.pop(), []).append((qr, kr))
    units = _one_unit_size(units, site)
    shapes_ = {(len(u), len(u[0][0]), len(u[0][1])) for u in units.values()} if units else set()
    if len(shapes_) != 1 or len(units) != Hk or any(len({(len(a), len(b)) for a, b in u}) != 1 for u in units.values()):
        site.disabled.setdefault("qk", "query/key coupling is irregular across heads")
    else:
        order = sorted(units)
        site.qk_q = np.array([[a for a, _ in sorted(units[kh], key=lambda t: t[1][0])] for kh in order])
        site.qk_k = np.array([[b for _, b in sorted(units[kh], key=lambda t: t[1][0])] for kh in order])
        U = site.qk_q.shape[1]
        unit_of_row = {int(r): gi * U + u for gi in range(len(order)) for u in range(U) for r in site.qk_q[gi, u]}
        site.qk_cols = np.array([[unit_of_row.get(int(next(x for x in heads.qsets[h, j] if x >= 0)), -1)
                                  for j in range(d)] for h in range(H)])      # -1: a column no unit prunes
    partners = [(r, s) for h in range(H) for j in range(d)
                for r in [x for x in heads.qsets[h, j] if x >= 0] for s in [x for x in heads.qsets[h, j] if x >= 0] if r < s]
    if partners:
        deltas = {(s - r) % d for r, s in partners}
        site.rope = "rotate_half" if deltas == {d // 2} else "interleaved" if deltas == {1} else "paired"
    return None


def _one_unit_size(units: dict, site: AttentionSite) -> dict:
    """Partial RoPE (GPT-NeoX, GPT-J, Phi rotate only part of each head) gives units of two sizes: rotated
    pairs and single unrotated dims. A slice then splits each head at the rotated width, so every head must
    keep as many of each; the qk group holds the size class with the most dims, and the other stays whole."""
    sizes = [sorted(len(a) for a, _ in u) for u in units.values()]
    if not units or len({len(a) for u in units.values() for a, _ in u}) < 2 or any(x != sizes[0] for x in sizes):
        return units
    dims = {n: sizes[0].count(n) * n for n in set(sizes[0])}
    pick = max(dims, key=lambda n: (dims[n], -n))
    kind = "rotated pairs" if pick > min(dims) else "unrotated dims"
    site.disabled["rope"] = (f"partial RoPE: qk prunes only the {kind} of each head; the other "
                             f"{sum(v for n, v in dims.items() if n != pick)} q rows per key head stay whole")
    return {kh: [(a, b) for a, b in u if len(a) == pick] for kh, u in units.items()}


# ------------------------------------------------------------------------------------------------
# step 4: values, the output projection, heads
# ------------------------------------------------------------------------------------------------
def projection_units(ctx: Ctx, site: AttentionSite, ops: AttentionOperands, heads: Heads) -> None:
    """Follow head *h*, column *j* of the attention output to the projection's input columns: a v
    unit is v row *j* of a value head with the column of every query head that reads it; a head
    unit is every row and column of one kv group. What cannot be followed disables v and head."""
    out, H = ops.out, heads.H
    region, consumers, blockers = forward_region(out, ctx.tainted)
    oshape = shape(out)
    if len(consumers) != 1 or blockers or not (consumers[0].target in LINEAR_LAYERS or is_pointwise_conv(consumers[0])):
        site.disabled["v"] = site.disabled["head"] = "attention output does not reach a single linear projection"
        return
    proj = consumers[0]
    std = oshape[:-2] + oshape[:-3:-1] if ops.v_transposed else oshape      # as [..., N, dv]
    dv = std[-1]
    coord = (torch.as_tensor(heads.q_head_of).reshape(heads.lead)[..., None, None] * dv + torch.arange(dv)).expand(std)
    coord = coord.transpose(-1, -2) if ops.v_transposed else coord
    env, _ = propagate(ctx.gm, {out: [coord.clone()]}, region | {proj})
    pin = layer_input(proj)
    if pin not in env:
        site.disabled["v"] = site.disabled["head"] = "cannot follow the attention output to its projection"
        return
    site.proj = make_layer(ctx.gm, proj)
    site.name = common_prefix([site.name, module_path(proj)]) or site.name
    ids = columns(env[pin], channel_dim(proj))
    if ids is None or ((ids >= 0).sum(1) != 1).any():
        site.disabled["v"] = site.disabled["head"] = "projection columns mix attention outputs"
        return
    ids = ids.max(1)
    cols = {divmod(int(i), dv): c for c, i in enumerate(ids.tolist())}
    q_to_k, q_to_v, qsets, ksets, vsets = heads.q_to_k, heads.q_to_v, heads.qsets, heads.ksets, heads.vsets
    Hk, Hv = len(ksets), len(vsets)
    v_units = []
    for hv in range(Hv):
        qh = [h for h in range(H) if q_to_v[h] == hv]
        v_units.append([(rows_of(vsets[hv, j]), [cols[(h, j)] for h in qh]) for j in range(site.head_dim_v)])
    site.v_v = np.array([[a for a, _ in u] for u in v_units])
    site.v_o = np.array([[b for _, b in u] for u in v_units])
    site.head_q = np.array([sorted(r for h in range(H) if q_to_k[h] == g for r in rows_of(qsets[h])) for g in range(Hk)])
    site.head_k = np.array([rows_of(ksets[g]) for g in range(Hk)])
    site.head_qheads = np.array([[h for h in range(H) if q_to_k[h] == g] for g in range(Hk)])
    if Hv == Hk and all(q_to_v[h] == q_to_k[h] for h in range(H)):
        site.head_v = np.array([rows_of(vsets[g]) for g in range(Hk)])
        site.head_o = np.array([sorted(cols[(h, j)] for h in range(H) if q_to_k[h] == g for j in range(site.head_dim_v))
                                for g in range(Hk)])
    if any(q_to_v[h] != q_to_k[h] for h in range(H)):
        site.disabled["head"] = "key and value heads are grouped differently"


# ------------------------------------------------------------------------------------------------
def attention_site(ctx: Ctx, node: fx.Node):
    """The :class:`AttentionSite` of ``node`` (supported or not, with its reason), a
    :class:`NotAttention` for an op that turns out not to be attention, or None for ops no adapter reads."""
    adapter = adapter_for(node.target) if node.op == "call_function" else None
    if adapter is None:
        return None
    ops = adapter(ctx, node)
    name = module_path(node) or node.name
    if isinstance(ops, NotAttention):
        return ops
    if isinstance(ops, Refused):
        return AttentionSite(name=name, node=node.name, kind="sdpa" if node.target in FUSED_ATTENTION else "matmul",
                             supported=False, reason=ops.reason)
    site = AttentionSite(name=name, node=node.name, kind=ops.kind, scale=ops.scale, scale_explicit=ops.scale_explicit,
                         operands=(ops.q.name, ops.k.name, ops.v.name))
    if ops.causal:
        site.disabled["tokens"] = "causal attention"
    if ops.v_transposed:
        site.disabled["tokens"] = "values laid out channels first (v @ attn^T): key gathering is not written for it"

    def fail(reason):
        site.supported, site.reason = False, reason
        return site

    traced = trace_operands(ctx, ops, site)
    if isinstance(traced, str):
        return fail(traced)
    lanes, paths = traced
    heads = find_heads(ops, lanes, site)
    if isinstance(heads, str):
        return fail(heads)
    site.q, site.k, site.v = (make_layer(ctx.gm, paths[w].producers[0]) for w in ("q", "k", "v"))
    for w in ("q", "k", "v"):          # a depthwise conv or a bias on an operand: its channels go with the rows
        getattr(site, w).channelwise += paths[w].row_params
    site.name = common_prefix([module_path(paths[w].producers[0]) for w in ("q", "k", "v")]) or site.name
    if site.scale is None and ops.kind == "sdpa":
        site.scale = 1.0 / math.sqrt(site.head_dim_qk)
    elif ops.kind == "matmul":
        site.scale = paths["q"].scale * paths["k"].scale * ops.scale
    err = qk_units(site, heads)
    if err:
        return fail(err)
    projection_units(ctx, site, ops, heads)
    keys = shape(ops.k)[-1 if ops.k_transposed else -2]
    site.per_head, problems = per_head_tensors(ctx, ops.terms, shape(ops.q)[:-1] + (keys,), heads.q_head_of, heads.H)
    if problems:
        site.disabled["head"] = f"per-head tensor(s) {', '.join(problems)} could not be traced to a parameter"
    return site
