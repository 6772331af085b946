"""Structure discovery on the captured graph: attention sites, MLPs and residual streams.

Everything here reads the ATen graph and the op tables in :mod:`amgfx.ops`; no module class
names, parameter-name patterns or per-model tables are used. Module paths from
``nn_module_stack`` are used only to *name* what was found.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from .indexprop import (_data_args, _scalar_factor, activation_taint, forward_region, is_layer, layer_input, layer_weight,
                        param_source, propagate, seed, shape, tensor_args, trace_back)
from .ops import (CONCAT, DATA_MOVEMENT, GETITEM, IDENTITY, IGNORED_USERS, LAYERS, LINEAR_LAYERS, MATMUL, MOVE, NORMS,
                  POINTWISE, POINTWISE_AFFINE, SDPA, SOFTMAX, opname)

__all__ = ["Layer", "AttentionSite", "MLP", "ResidualStream", "Structure", "find_structure"]


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """A parameterised layer as it appears in the graph."""
    node: str
    weight: str                      # FQN of the weight
    out_dim: int                     # weight dim that indexes outputs
    in_dim: int | None
    out_features: int
    bias: list = field(default_factory=list)  # [(FQN, offset, length)] pieces along the output dim

    def rows(self, idx) -> list[tuple[str, int, np.ndarray]]:
        """(param, dim, index) slices of this layer's outputs ``idx`` [units, k]: weight rows + bias.

        A bias made by concatenating parameters (EVA's q_bias/k_bias/v_bias) is sliced piece by piece.
        """
        idx = np.asarray(idx)
        out = [(self.weight, self.out_dim, idx)]
        for fqn, off, n in self.bias:
            inside = (idx >= off) & (idx < off + n)
            if inside.all():
                out.append((fqn, 0, idx - off))
            elif inside.any():
                raise ValueError(f"{self.node}: outputs straddle bias pieces")
        return out


@dataclass
class AttentionSite:
    name: str
    node: str                        # the SDPA or softmax node
    kind: str                        # "sdpa" | "matmul"
    supported: bool = True
    reason: str | None = None
    q: Layer | None = None
    k: Layer | None = None
    v: Layer | None = None
    proj: Layer | None = None
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim_qk: int = 0
    head_dim_v: int = 0
    rope: str | None = None          # "rotate_half" | "interleaved" | "paired"
    scale: float | None = None
    scale_explicit: bool = False
    per_head: list = field(default_factory=list)   # [(FQN, dim)]
    disabled: dict = field(default_factory=dict)   # kind -> reason
    # unit tables: per kv group g and unit u, the rows/cols each member contributes
    qk_q: np.ndarray | None = None   # [G, Uqk, rq]  q rows
    qk_k: np.ndarray | None = None   # [G, Uqk, rk]  k rows
    v_v: np.ndarray | None = None    # [G, Uv, rv]   v rows
    v_o: np.ndarray | None = None    # [G, Uv, ro]   proj input columns
    head_q: np.ndarray | None = None  # [G, *] every q row of kv group g (all its query heads)
    head_k: np.ndarray | None = None
    head_v: np.ndarray | None = None
    head_o: np.ndarray | None = None
    head_qheads: np.ndarray | None = None  # [G, q heads per kv head]
    operands: tuple = ()             # node names of the q, k, v operands of the attention op
    # calibration maps (None when heads do not sit on the operands' last lead axis)
    lead_heads: np.ndarray | None = None   # [Lq] query head at each index of q's last lead axis
    lead_k: np.ndarray | None = None       # [Lq] index of k's last lead axis each of them meets
    kv_group: np.ndarray | None = None     # [H] key/value group (head-group unit) of each query head
    qk_cols: np.ndarray | None = None      # [H, d] qk unit of column j of query head h

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // max(self.num_kv_heads, 1)


@dataclass
class MLP:
    name: str
    fc1: list                        # producer Layers (up, gate, or one fused)
    fc2: Layer
    hidden: int
    activation: str
    gated: bool
    exact: bool = True
    units: list = field(default_factory=list)  # per fc2 column c: [(layer_idx, row), ...]
    norm: list = field(default_factory=list)   # [(FQN, dim)] of norms over the hidden dim


@dataclass
class ResidualStream:
    name: str
    width: int
    members: list                    # [(FQN, dim)]
    prunable: bool = True
    reason: str | None = None


@dataclass
class Structure:
    sites: list
    mlps: list
    residual: list


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export prefixes paths with "L['self']." style in some versions
    return path.replace("L['self'].", "").replace("L__self__.", "") or None


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def _bias_pieces(gm: fx.GraphModule, node: fx.Node) -> list:
    """A layer's bias as (FQN, offset, length) pieces: a plain parameter, or a cat of them."""
    spec = LAYERS[node.target]
    b = node.args[spec[2]] if spec[2] is not None and len(node.args) > spec[2] else None
    if b is None:
        return []
    src = param_source(b)
    if src is not None:
        return [(src.target, 0, shape(src)[0])]
    if isinstance(b, fx.Node) and b.target in CONCAT and b.target is torch.ops.aten.cat.default:
        pieces, off = [], 0
        for a in b.args[0]:
            p = param_source(a)
            if p is None:
                return [("<computed>", 0, 0)]
            pieces.append((p.target, off, shape(p)[0]))
            off += shape(p)[0]
        return pieces
    return [("<computed>", 0, 0)]


def _layer(gm, node: fx.Node) -> Layer:
    spec = LAYERS[node.target]
    w = layer_weight(node)
    out_dim, in_dim = spec[3], spec[4]
    return Layer(node=node.name, weight=w.target, out_dim=out_dim, in_dim=in_dim,
                 out_features=shape(w)[out_dim], bias=_bias_pieces(gm, node))


def _sets(lanes, full_shape):
    """Per (lead position, feature j): the sorted set of source ids, as a padded tensor.

    Returns ``sets [P, d, S]`` (-1 padded) for the tensor laid out ``[*lead, N, d]``.
    """
    t = torch.stack([l.broadcast_to(full_shape) for l in lanes])        # [L, *lead, N, d]
    L, N, d = t.shape[0], t.shape[-2], t.shape[-1]
    t = t.reshape(L, -1, N, d)
    P = t.shape[1]
    t = t.permute(1, 3, 0, 2).reshape(P, d, L * N).sort(-1).values
    dup = torch.zeros_like(t, dtype=torch.bool)
    dup[..., 1:] = t[..., 1:] == t[..., :-1]
    t = t.masked_fill(dup, -1).sort(-1).values
    keep = (t != -1).any(dim=0).any(dim=0)
    if not keep.any():
        return t[..., :1]
    return t[..., int(keep.nonzero()[0]):]


def _heads(sets):
    """Group lead positions that carry identical neuron sets into heads (first-seen order)."""
    P = sets.shape[0]
    flat = sets.reshape(P, -1)
    _, inv = torch.unique(flat, dim=0, return_inverse=True)
    order, head_of = {}, []
    for u in inv.tolist():
        head_of.append(order.setdefault(u, len(order)))
    head_of = np.array(head_of)
    rep = [int(np.nonzero(head_of == h)[0][0]) for h in range(len(order))]
    return sets[rep].numpy(), head_of                                     # [H, d, S], [P]


def _columns(lanes) -> np.ndarray | None:
    """Neuron ids reaching each column of a layer input: [C, S] (-1 padded).

    None when the ids differ between positions (tokens), which a per-channel map cannot express.
    """
    sets = _sets([l.unsqueeze(-2) for l in lanes], tuple(lanes[0].shape[:-1]) + (1, lanes[0].shape[-1]))
    if not bool((sets == sets[:1]).all()):
        return None
    return sets[0].numpy()


def _last_axis(per_position, lead) -> np.ndarray | None:
    """``per_position`` over all lead positions, as a function of the last lead axis alone (else None).

    Calibration reshapes operands to ``[-1, lead[-1], N, d]`` whatever the batch, which is
    only right when heads sit on the last lead axis (true of every layout seen so far).
    """
    a = np.asarray(per_position).reshape(lead).reshape(-1, lead[-1])
    return a[0].copy() if (a == a[:1]).all() else None


def _rows(s) -> list[int]:
    return sorted(int(x) for x in np.unique(s) if x >= 0)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, gm):
        self.gm = gm
        self.graph = gm.graph
        self.tainted = activation_taint(gm.graph)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}


def _logits_back(ctx, start: fx.Node):
    """From the softmax input back to the QK matmul: (qk, off-path terms, scale, error)."""
    terms, scale, n = [], 1.0, start
    for _ in range(64):
        if n.op != "call_function":
            return None, terms, scale, None
        if is_layer(n):
            return None, terms, scale, (f"attention logits are mixed by {opname(n.target)} before softmax "
                                        "(talking heads), so heads are not independent")
        if n.target in MATMUL:
            if all(a in ctx.tainted for a in n.args[:2]):
                return n, terms, scale, None
            return None, terms, scale, None
        if n.target in MOVE or n.target in IDENTITY or n.target in POINTWISE_AFFINE:
            nxt = [a for a in tensor_args(n) if a in ctx.tainted]
            if len(nxt) != 1:
                return None, terms, scale, None
            terms += [a for a in tensor_args(n) if a not in ctx.tainted]
            scale *= _scalar_factor(n, nxt[0])
            n = nxt[0]
            continue
        return None, terms, scale, None
    return None, terms, scale, None


def _probs_forward(ctx, start: fx.Node):
    """From the softmax output forward to the AV matmul: (av, error)."""
    n = start
    for _ in range(32):
        users = [u for u in n.users if u.op == "call_function" and u.target not in IGNORED_USERS]
        if len(users) != 1:
            return None, None
        u = users[0]
        if is_layer(u):
            return None, (f"attention probabilities are mixed by {opname(u.target)} after softmax "
                          "(talking heads), so heads are not independent")
        if u.target in MATMUL and u.args[0] is n:
            return u, None
        if u.target in MOVE or u.target in IDENTITY or u.target in POINTWISE_AFFINE:
            n = u
            continue
        return None, None
    return None, None


def _operand_lanes(ctx, node: fx.Node, what: str):
    """Trace an attention operand back to its single projection and propagate its neuron ids."""
    path = trace_back(node, ctx.tainted)
    linears = [p for p in path.producers if p.target in LINEAR_LAYERS]
    if len(path.producers) != 1 or not linears:
        found = ", ".join(sorted({opname(p.target) for p in path.producers})) or "no layer"
        return None, path, f"{what} is not produced by exactly one linear projection (found: {found})"
    prod = linears[0]
    n_out = shape(prod)[-1]
    env, failed = propagate(ctx.gm, {prod: seed(prod, torch.arange(n_out))}, path.nodes | {node})
    if node is prod:
        env[node] = seed(prod, torch.arange(n_out))
    if node not in env:
        bad = ", ".join(opname(f.target) for f in failed[:3]) or "unknown op"
        return None, path, f"cannot follow {what} neurons through {bad}"
    return env[node], path, None


def _per_head_tensors(ctx, terms, logit_shape, head_of_lead, num_heads):
    """Off-path tensors added to (or multiplying) the logits that vary per head -> [(FQN, dim)]."""
    found, problems = [], []
    lead = logit_shape[:-2]
    ids = np.asarray(head_of_lead).reshape(lead)
    head_axes = [ax for ax in range(len(lead)) if lead[ax] > 1 and not (ids == ids.take([0], axis=ax)).all()]
    for term in terms:
        tshape = shape(term)
        if tshape is None:
            continue
        pad = (1,) * (len(logit_shape) - len(tshape)) + tshape
        if all(pad[ax] == 1 for ax in head_axes):
            continue                              # the same for every head: a mask, not per-head
        region, todo, params = set(), [term], []
        while todo:                               # the constant sub-graph feeding the term
            n = todo.pop()
            if n in region:
                continue
            region.add(n)
            if n.op == "get_attr":
                params.append(n)
            elif n.op == "call_function" and n.target in DATA_MOVEMENT:
                todo.extend(n.all_input_nodes)
        want = torch.as_tensor(head_of_lead).reshape(lead)
        hit = None
        for p in params:
            for dim, size in enumerate(shape(p)):
                if size != num_heads:
                    continue
                env, _ = propagate(ctx.gm, {p: seed(p, torch.arange(size), dim)}, region)
                got = env.get(term)
                if not got:
                    continue
                g = got[0].reshape(pad).broadcast_to(logit_shape)
                if torch.equal(g[..., 0, 0], want.broadcast_to(lead)):
                    hit = (p.target, dim)
                    break
            if hit:
                break
        if hit:
            found.append(hit)
        else:
            problems.append(term.name)
    return found, problems


def _attention_site(ctx, node: fx.Node) -> AttentionSite | None:
    gm = ctx.gm
    name = module_path(node) or node.name
    if node.target in SDPA:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        terms = [mask] if isinstance(mask, fx.Node) else []
        gqa = bool(node.kwargs.get("enable_gqa", False))
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        site = AttentionSite(name=name, node=node.name, kind="sdpa", scale=scale, scale_explicit=scale is not None)
        out, k_transposed, logit_scale = node, False, 1.0
        if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            site.disabled["tokens"] = "causal attention"
    else:
        if node.args[0] not in ctx.tainted:
            return None
        qk, terms, logit_scale, err = _logits_back(ctx, node.args[0])
        av, err2 = _probs_forward(ctx, node)
        if err or err2:
            return AttentionSite(name=name, node=node.name, kind="matmul", supported=False, reason=err or err2)
        if qk is None or av is None:
            return None                      # a softmax that is not attention (e.g. a router)
        q, k, v = qk.args[0], qk.args[1], av.args[1]
        gqa, out, k_transposed = False, av, True
        site = AttentionSite(name=name, node=node.name, kind="matmul")

    def fail(reason):
        site.supported, site.reason = False, reason
        return site

    lanes = {}
    paths = {}
    site.operands = (q.name, k.name, v.name)
    for what, t in (("q", q), ("k", k), ("v", v)):
        l, path, err = _operand_lanes(ctx, t, what)
        if err:
            return fail(err)
        if what == "k" and k_transposed:
            l = [x.transpose(-1, -2) for x in l]
        lanes[what], paths[what] = l, path
    qshape, kshape, vshape = shape(q), tuple(lanes["k"][0].shape), shape(v)
    q0 = lanes["q"][0]
    if not torch.equal(q0, q0[..., :1, :].expand_as(q0)) or torch.equal(q0, q0[..., :1].expand_as(q0)):
        return fail("attention contracts over tokens, not channels (cross-covariance attention): "
                    "query/key neurons are not paired per head")
    for what in ("q", "k", "v"):
        blockers = [b for b in paths[what].blockers]
        if blockers:
            ops_ = ", ".join(sorted({opname(b.target) for b in blockers}))
            norms = all(b.target in NORMS for b in blockers)
            if norms and what in ("q", "k"):
                site.disabled["qk"] = f"{what} is normalised over the head dim ({ops_}); q/k dims cannot shrink exactly"
            else:
                return fail(f"{what} passes through {ops_} between its projection and attention")

    # heads: lead positions that carry the same neurons are one head
    lead = qshape[:-2]
    qsets, q_head_of = _heads(_sets(lanes["q"], qshape))
    ksets_full = _sets(lanes["k"], kshape)
    vsets_full = _sets(lanes["v"], vshape)
    ksets, k_head_of = _heads(ksets_full)
    vsets, v_head_of = _heads(vsets_full)
    H, Hk, Hv = len(qsets), len(ksets), len(vsets)

    def pair_with(other_head_of, other_lead):
        # which k/v head each q lead position meets (broadcast, or GQA grouping in SDPA)
        idx = np.arange(int(np.prod(other_lead))).reshape(other_lead)
        if gqa and other_lead[-1] != lead[-1]:
            idx = np.repeat(idx, lead[-1] // other_lead[-1], axis=-1)
        idx = np.broadcast_to(idx, lead).reshape(-1)
        return other_head_of[idx]

    q_to_k, q_to_v = {}, {}
    for p, h in enumerate(q_head_of):
        q_to_k.setdefault(h, set()).add(int(pair_with(k_head_of, kshape[:-2])[p]))
        q_to_v.setdefault(h, set()).add(int(pair_with(v_head_of, vshape[:-2])[p]))
    if any(len(s) != 1 for s in q_to_k.values()) or any(len(s) != 1 for s in q_to_v.values()):
        return fail("a query head meets more than one key/value head")
    q_to_k = {h: s.pop() for h, s in q_to_k.items()}
    if len(lead) and len(kshape) > 2:
        site.lead_heads = _last_axis(q_head_of, lead)
        site.lead_k = _last_axis(pair_with(np.arange(int(np.prod(kshape[:-2]))), kshape[:-2]) % kshape[-3], lead)
    site.kv_group = np.array([q_to_k[h] for h in range(H)])
    q_to_v = {h: s.pop() for h, s in q_to_v.items()}
    site.num_heads, site.num_kv_heads = H, Hk
    site.head_dim_qk, site.head_dim_v = qshape[-1], vshape[-1]
    site.q, site.k, site.v = (_layer(gm, paths[w].producers[0]) for w in ("q", "k", "v"))
    site.name = _common_prefix([module_path(paths[w].producers[0]) for w in ("q", "k", "v")]) or site.name
    if site.scale is None and site.kind == "sdpa":
        site.scale = 1.0 / math.sqrt(site.head_dim_qk)
    elif site.kind == "matmul":
        site.scale = paths["q"].scale * paths["k"].scale * logit_scale
        site.scale_explicit = True

    # qk units: q row j and k row j of a head meet in one rank-1 term; RoPE adds the partner
    g = nx.Graph()
    for h in range(H):
        kh = q_to_k[h]
        for j in range(site.head_dim_qk):
            members = [("q", r) for r in qsets[h, j] if r >= 0] + [("k", r) for r in ksets[kh, j] if r >= 0]
            if not members:
                return fail("a query position is not produced by the projection")
            g.add_nodes_from(members)
            g.add_edges_from((members[0], m) for m in members[1:])
    k_row_head = {r: kh for kh in range(Hk) for r in _rows(ksets[kh])}
    units: dict = {}
    for comp in nx.connected_components(g):
        qr = sorted(r for t, r in comp if t == "q")
        kr = sorted(r for t, r in comp if t == "k")
        heads = {k_row_head.get(r) for r in kr}
        if len(heads) != 1 or not qr:
            return fail("query/key coupling does not stay inside one key head")
        units.setdefault(heads.pop(), []).append((qr, kr))
    shapes_ = {(len(u), len(u[0][0]), len(u[0][1])) for u in units.values()} if units else set()
    if len(shapes_) != 1 or len(units) != Hk or any(len({(len(a), len(b)) for a, b in u}) != 1 for u in units.values()):
        site.disabled.setdefault("qk", "query/key coupling is irregular across heads")
    else:
        order = sorted(units)
        site.qk_q = np.array([[a for a, _ in sorted(units[kh], key=lambda t: t[1][0])] for kh in order])
        site.qk_k = np.array([[b for _, b in sorted(units[kh], key=lambda t: t[1][0])] for kh in order])
        U = site.qk_q.shape[1]
        unit_of_row = {int(r): gi * U + u for gi in range(len(order)) for u in range(U) for r in site.qk_q[gi, u]}
        site.qk_cols = np.array([[unit_of_row[int(next(x for x in qsets[h, j] if x >= 0))]
                                  for j in range(site.head_dim_qk)] for h in range(H)])
    partners = [(r, s) for h in range(H) for j in range(site.head_dim_qk)
                for r in [x for x in qsets[h, j] if x >= 0] for s in [x for x in qsets[h, j] if x >= 0] if r < s]
    if partners:
        d = site.head_dim_qk
        deltas = {(s - r) % d for r, s in partners}
        site.rope = "rotate_half" if deltas == {d // 2} else "interleaved" if deltas == {1} else "paired"

    # the output projection: follow head h, column j of the attention output to proj inputs
    region, consumers, blockers = forward_region(out, ctx.tainted)
    oshape = shape(out)
    if len(consumers) != 1 or blockers or consumers[0].target not in LINEAR_LAYERS:
        site.disabled["v"] = site.disabled["head"] = "attention output does not reach a single linear projection"
        return site
    proj = consumers[0]
    coord = torch.as_tensor(q_head_of).reshape(lead)[..., None, None] * oshape[-1] + torch.arange(oshape[-1])
    env, _ = propagate(gm, {out: [coord.expand(oshape).clone()]}, region | {proj})
    pin = layer_input(proj)
    if pin not in env:
        site.disabled["v"] = site.disabled["head"] = "cannot follow the attention output to its projection"
        return site
    site.proj = _layer(gm, proj)
    site.name = _common_prefix([site.name, module_path(proj)]) or site.name
    ids = _columns(env[pin])
    if ids is None or ((ids >= 0).sum(1) != 1).any():
        site.disabled["v"] = site.disabled["head"] = "projection columns mix attention outputs"
        return site
    ids = ids.max(1)
    cols = {divmod(int(i), oshape[-1]): c for c, i in enumerate(ids.tolist())}
    # v units: v row j of a value head, with proj column j of every query head reading it
    v_units = []
    for hv in range(Hv):
        qh = [h for h in range(H) if q_to_v[h] == hv]
        v_units.append([(_rows(vsets[hv, j]), [cols[(h, j)] for h in qh]) for j in range(site.head_dim_v)])
    site.v_v = np.array([[a for a, _ in u] for u in v_units])
    site.v_o = np.array([[b for _, b in u] for u in v_units])
    site.head_q = np.array([sorted(r for h in range(H) if q_to_k[h] == g for r in _rows(qsets[h])) for g in range(Hk)])
    site.head_k = np.array([_rows(ksets[g]) for g in range(Hk)])
    site.head_qheads = np.array([[h for h in range(H) if q_to_k[h] == g] for g in range(Hk)])
    if Hv == Hk and all(q_to_v[h] == q_to_k[h] for h in range(H)):
        site.head_v = np.array([_rows(vsets[g]) for g in range(Hk)])
        site.head_o = np.array([sorted(cols[(h, j)] for h in range(H) if q_to_k[h] == g for j in range(site.head_dim_v))
                                for g in range(Hk)])
    if any(q_to_v[h] != q_to_k[h] for h in range(H)):
        site.disabled["head"] = "key and value heads are grouped differently"
    site.per_head, problems = _per_head_tensors(ctx, terms, shape(out)[:-1] + (kshape[-2],), q_head_of, H)
    if problems:
        site.disabled["head"] = f"per-head tensor(s) {', '.join(problems)} could not be traced to a parameter"
    return site


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------
def _mlp(ctx, node: fx.Node, taken: set) -> MLP | None:
    x = layer_input(node)
    if x not in ctx.tainted or node.name in taken:
        return None
    path = trace_back(x, ctx.tainted, allow_norms=True, budget=80)
    if path.blockers or not path.producers or not path.nonlinear:
        return None
    if any(p.target not in LINEAR_LAYERS or p.name in taken for p in path.producers):
        return None
    offs, seeds, off = [], {}, 0
    for p in path.producers:
        n = shape(p)[-1]
        seeds[p] = seed(p, torch.arange(n) + off)
        offs.append((off, n))
        off += n
    env, failed = propagate(ctx.gm, seeds, path.nodes | {x})
    if x not in env:
        return None
    ids = _columns(env[x])
    if ids is None:
        return None
    starts = np.array([o for o, _ in offs])
    valid = ids >= 0
    li = np.searchsorted(starts, ids, side="right") - 1
    row = ids - starts[li]
    units = [list(zip(li[c][valid[c]].tolist(), row[c][valid[c]].tolist())) for c in range(ids.shape[0])]
    if not units or any(not u for u in units) or len({len(u) for u in units}) != 1:
        return None
    used = [(li, r) for u in units for li, r in u]
    if len(used) != len(set(used)):
        return None
    acts = sorted({opname(n.target) for n in path.nodes if n.target in POINTWISE and n.target not in POINTWISE_AFFINE})
    fc1 = [_layer(ctx.gm, p) for p in path.producers]
    names = [module_path(p) for p in path.producers] + [module_path(node)]
    name = _common_prefix([n for n in names if n]) or node.name
    norm = []
    for nn_ in path.norms:
        spec = NORMS[nn_.target]
        for pos in spec[1:]:
            if pos is not None and len(nn_.args) > pos and param_source(nn_.args[pos]) is not None:
                norm.append((param_source(nn_.args[pos]).target, 0))
    return MLP(name=name, fc1=fc1, fc2=_layer(ctx.gm, node), hidden=len(units), activation="+".join(acts),
               gated=len(path.producers) > 1 or len(units[0]) > 1, exact=not path.norms, units=units, norm=norm)


# --------------------------------------------------------------------------------------------
# residual streams: a union-find over (node, dim)
# --------------------------------------------------------------------------------------------
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


def _view_pairs(ins, outs):
    """Dims that a reshape keeps intact: same size and same product of the dims before them."""
    pi = np.cumprod((1,) + tuple(ins))[:-1]
    po = np.cumprod((1,) + tuple(outs))[:-1]
    pairs = []
    for i, s in enumerate(ins):
        for j, t in enumerate(outs):
            if s == t and pi[i] == po[j] and s != 1:
                pairs.append((i, j))
                break
    return pairs


def _residual(ctx) -> list[ResidualStream]:
    dsu, leaks, residual_adds, layer_in = _DSU(), [], [], []
    aten = torch.ops.aten
    for n in ctx.graph.nodes:
        if n.op != "call_function":
            continue
        t, out = n.target, shape(n)
        u = dsu.union

        def same(a, dims=None):
            s = shape(a)
            if s is None or out is None:
                return
            for i in range(len(s)) if dims is None else dims:
                if i < len(out) and s[i] == out[i]:
                    u((a, i), (n, i))

        if t in LAYERS and is_layer(n):
            spec = LAYERS[t]
            w = layer_weight(n)
            xs = shape(n.args[spec[0]])
            if t is aten.embedding.default:
                u((n, len(out) - 1), (w, 1))
                continue
            conv = t in (aten.conv2d.default, aten.conv1d.default)
            chan = 1 if conv else len(out) - 1
            xchan = 1 if conv else len(xs) - 1
            groups = n.args[6] if conv and len(n.args) > 6 else 1
            u((n, chan), (w, spec[3]))
            if groups == 1:
                u((n.args[spec[0]], xchan), (w, spec[4]))
                layer_in.append((w, spec[4]))
            elif groups == xs[xchan] == out[chan]:
                u((n.args[spec[0]], xchan), (n, chan))    # depthwise: channel c stays channel c
            b = n.args[spec[2]] if spec[2] is not None and len(n.args) > spec[2] else None
            if isinstance(b, fx.Node):
                u((n, chan), (b, 0))
            if t in LINEAR_LAYERS:
                same(n.args[spec[0]], range(len(xs) - 1))
        elif t in NORMS:
            spec = NORMS[t]
            same(n.args[spec[0]])
            for pos in spec[1:]:
                if pos is not None and len(n.args) > pos and isinstance(n.args[pos], fx.Node):
                    ws = shape(n.args[pos])
                    for k in range(len(ws)):
                        u((n.args[pos], k), (n, len(out) - len(ws) + k))
        elif t in POINTWISE or t in IDENTITY or t in SOFTMAX:
            if out is None:
                continue
            for a in _data_args(n):
                s = shape(a)
                if s is None:
                    continue
                off = len(out) - len(s)
                for k, size in enumerate(s):
                    if size == out[k + off] and size != 1:
                        u((a, k), (n, k + off))
            tas = [a for a in tensor_args(n) if a in ctx.tainted]
            if t is aten.add.Tensor and len(tas) == 2 and all(shape(a) == out for a in tas):
                # a skip connection joins branches made by different layers (x + 0.04*x**3 does not)
                srcs = [frozenset(trace_back(a, ctx.tainted, budget=40).producers) for a in tas]
                if srcs[0] != srcs[1]:
                    residual_adds.append((n, len(out) - 1))
        elif t in (aten.permute.default,):
            for j, i in enumerate(n.args[1]):
                u((n.args[0], i % len(out)), (n, j))
        elif t in (aten.transpose.int,):
            r = len(out)
            a, b = n.args[1] % r, n.args[2] % r
            for i in range(r):
                u((n.args[0], {a: b, b: a}.get(i, i)), (n, i))
        elif t in (aten.t.default,):
            u((n.args[0], 0), (n, 1)); u((n.args[0], 1), (n, 0))
        elif t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                   aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                   aten.squeeze.default, aten.expand.default, aten.pad.default, aten.repeat.default):
            a = n.args[0]
            ins = shape(a)
            pairs = _view_pairs(ins, out) if t is not aten.expand.default else [
                (i, i + len(out) - len(ins)) for i in range(len(ins)) if ins[i] == out[i + len(out) - len(ins)]]
            if t is aten.pad.default:
                pairs = [(i, i) for i in range(len(ins)) if ins[i] == out[i]]
            for i, j in pairs:
                u((a, i), (n, j))
            kept = {i for i, _ in pairs}
            leaks.extend(((a, i), n) for i in range(len(ins)) if i not in kept and ins[i] != 1)
        elif t in (aten.slice.Tensor, aten.narrow.default, aten.index_select.default):
            d = n.args[1] % len(out)
            same(n.args[0], [i for i in range(len(out)) if i != d])
        elif t in (aten.select.int,):
            a = n.args[0]
            d = n.args[1] % len(shape(a))
            for i in range(len(shape(a))):
                if i != d:
                    u((a, i), (n, i - (i > d)))
        elif t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
            a = n.args[0]
            ins = shape(a)
            red = {d % len(ins) for d in (n.args[1] if len(n.args) > 1 and n.args[1] is not None else range(len(ins)))}
            keep = len(n.args) > 2 and n.args[2]
            j = 0
            for i in range(len(ins)):
                if i in red:
                    j += keep
                    continue
                u((a, i), (n, j))
                j += 1
        elif t in CONCAT:
            d = n.args[1] if len(n.args) > 1 else 0
            for a in n.args[0]:
                s = shape(a)
                if s is None:
                    continue
                dd = d % (len(out) if t is aten.stack.default else len(s))
                for i in range(len(s)):
                    j = i + (1 if t is aten.stack.default and i >= dd else 0)
                    if i != dd or t is aten.stack.default:
                        u((a, i), (n, j))
        elif t is GETITEM:
            src = n.args[0]
            ins = shape(src.args[0]) if isinstance(src, fx.Node) and src.args and isinstance(src.args[0], fx.Node) else None
            if ins is None or out is None:
                continue
            if src.target is aten.unbind.int:
                d = (src.args[1] if len(src.args) > 1 else 0) % len(ins)
                for i in range(len(ins)):
                    if i != d:
                        u((src.args[0], i), (n, i - (i > d)))
            elif src.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
                d = (src.args[2] if len(src.args) > 2 else 0) % len(ins)
                for i in range(len(ins)):
                    if i != d:
                        u((src.args[0], i), (n, i))
    # a stream: a class holding the channel dim of a residual add and a layer's input dim
    add_classes = {dsu.find(k) for k in residual_adds}
    in_classes = {dsu.find(k) for k in layer_in}
    streams = []
    by_class: dict = {}
    for key in list(dsu.p):
        node, dim = key
        if isinstance(node, fx.Node) and node.op == "get_attr":
            by_class.setdefault(dsu.find(key), []).append((node, dim))
    first_use = lambda c: min(ctx.order[m] for m, _ in by_class.get(c, [(c[0], 0)]))
    for cls in sorted(add_classes & in_classes, key=first_use):
        members = sorted({(m.target, d) for m, d in by_class.get(cls, [])})
        widths = {shape(ctx.attrs[f])[d] for f, d in members}
        s = ResidualStream(name=f"stream{len(streams)}", width=max(widths), members=members)
        merged = [(k, n) for k, n in leaks if dsu.find(k) == cls]
        if merged:
            s.prunable, s.reason = False, f"channels are merged into a wider dim by {opname(merged[0][1].target)} ({merged[0][1].name})"
        elif len(widths) != 1:
            s.prunable, s.reason = False, f"members have different widths {sorted(widths)}"
        streams.append(s)
    return streams


# --------------------------------------------------------------------------------------------
def find_structure(gm: fx.GraphModule) -> Structure:
    """Find every attention site, MLP and residual stream of a captured graph."""
    ctx = _Ctx(gm)
    sites = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in SDPA or n.target in SOFTMAX):
            s = _attention_site(ctx, n)
            if s is not None:
                sites.append(s)
    names = {}
    for s in sites:                                   # unique, stable names
        names[s.name] = names.get(s.name, 0) + 1
    for s in sites:
        if names[s.name] > 1:
            s.name = f"{s.name}:{s.node}"
    taken = {l.node for s in sites for l in (s.q, s.k, s.v, s.proj) if l is not None}
    mlps = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LINEAR_LAYERS and is_layer(n):
            m = _mlp(ctx, n, taken)
            if m is not None:
                mlps.append(m)
    return Structure(sites=sites, mlps=mlps, residual=_residual(ctx))
