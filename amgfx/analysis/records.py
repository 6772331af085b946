"""What structure discovery finds, as plain records, and the small helpers that build them.

A :class:`Layer` is a parameterised op as the graph has it; an :class:`AttentionSite`, an
:class:`MLP` and a :class:`ResidualStream` say which rows and columns of which parameters form
each prunable unit. Module paths from ``nn_module_stack`` are used only to *name* what was found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..graph.indexprop import activation_taint, input_dependent, param_source, shape, weight_source
from ..graph.ops import CONCAT, LAYERS

__all__ = ["Layer", "AttentionSite", "MLP", "ResidualStream", "Structure", "Skipped", "Ctx", "module_path", "make_layer", "common_prefix",
           "id_sets", "group_heads", "columns", "on_last_axis", "rows_of"]


@dataclass
class Layer:
    """A parameterised layer as it appears in the graph."""
    node: str
    weight: str                      # FQN of the weight
    out_dim: int                     # weight dim that indexes outputs
    in_dim: int | None
    out_features: int
    bias: list = field(default_factory=list)  # [(FQN, offset, length)] pieces along the output dim
    # [(FQN, dim, channel of each output row, -1 where none)]: a depthwise conv after the layer, per channel
    channelwise: list = field(default_factory=list)

    def rows(self, idx) -> list[tuple[str, int, np.ndarray]]:
        """(param, dim, index) slices of this layer's outputs ``idx`` [units, k]: weight rows + bias, and the
        channels of a depthwise conv applied to them (EfficientViT-MSRA's q).

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
        for fqn, dim, chan in self.channelwise:
            c = np.asarray(chan)[idx]
            if (c >= 0).all():
                out.append((fqn, dim, c))
            elif (c >= 0).any():
                raise ValueError(f"{self.node}: some outputs pass through {fqn} and some do not")
        return out


@dataclass
class AttentionSite:
    """One attention op and the units it couples: q/k pairs, value neurons with the projection
    columns that read them, and whole (kv) heads. ``supported=False`` sites say why in ``reason``;
    ``disabled`` names the kinds a supported site cannot prune, each with its reason."""
    name: str
    node: str                        # the SDPA or softmax node
    kind: str                        # "sdpa" | "matmul" (the adapter that read it)
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
    """``fc2(act(fc1 x) [* gate x])``: hidden neuron ``c`` is fc1/gate rows ``units[c]`` and fc2 column ``c``."""
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
    """One embedding dimension shared by every member (embeddings, norms, projections in and out)."""
    name: str
    width: int
    members: list                    # [(FQN, dim)]
    prunable: bool = True
    reason: str | None = None


@dataclass
class Skipped:
    """An op that looks like attention but is not pruned as attention, and why (an MoE router, a pool)."""
    node: str
    op: str
    what: str
    rule: str = ""                   # for softmaxes: the rule that decided (router, pooling, table, ...)


@dataclass
class Structure:
    sites: list
    mlps: list
    residual: list
    skipped: list = field(default_factory=list)    # [Skipped]: softmaxes that are not attention
    unknown: list = field(default_factory=list)    # [Skipped]: ops reading a parameter amgfx has no rule for
    accounting: object = None                      # analysis.accounting.Accounting: every softmax, sorted


class Ctx:
    """What every discovery step reads: the graph, its activation taint, node order and attributes."""

    def __init__(self, gm):
        self.gm = gm
        self.graph = gm.graph
        self.tainted = activation_taint(gm.graph)
        self.data = input_dependent(gm.graph)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export prefixes paths with "L['self']." style in some versions
    return path.replace("L['self'].", "").replace("L__self__.", "") or None


def common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def bias_pieces(gm: fx.GraphModule, node: fx.Node) -> list:
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


def make_layer(gm, node: fx.Node) -> Layer:
    spec = LAYERS[node.target]
    w, flipped = weight_source(node.args[spec[1]])
    out_dim, in_dim = spec[3], spec[4]
    if flipped:                                      # x @ W.T: the parameter's rows are the outputs
        out_dim, in_dim = in_dim, out_dim
    return Layer(node=node.name, weight=w.target, out_dim=out_dim, in_dim=in_dim,
                 out_features=shape(w)[out_dim], bias=bias_pieces(gm, node))


def id_sets(lanes, full_shape):
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


def group_heads(sets):
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


def columns(lanes, dim: int = -1) -> np.ndarray | None:
    """Neuron ids reaching each column of a layer input: [C, S] (-1 padded); ``dim``: where the columns lie
    (1 for a conv's NCHW input).

    None when the ids differ between positions (tokens), which a per-channel map cannot express.
    """
    lanes = [l.movedim(dim, -1) for l in lanes]
    sets = id_sets([l.unsqueeze(-2) for l in lanes], tuple(lanes[0].shape[:-1]) + (1, lanes[0].shape[-1]))
    if not bool((sets == sets[:1]).all()):
        return None
    return sets[0].numpy()


def on_last_axis(per_position, lead) -> np.ndarray | None:
    """``per_position`` over all lead positions, as a function of the last lead axis alone (else None).

    Calibration reshapes operands to ``[-1, lead[-1], N, d]`` whatever the batch, which is
    only right when heads sit on the last lead axis (true of every layout seen so far).
    """
    a = np.asarray(per_position).reshape(lead).reshape(-1, lead[-1])
    return a[0].copy() if (a == a[:1]).all() else None


def depthwise_rows(gm, dw: fx.Node, lanes, rows: int, offset: int = 0) -> list | None:
    """The weight and bias of depthwise conv ``dw`` as :attr:`Layer.channelwise` entries of the layer whose
    ``rows`` outputs (ids ``offset`` on) reach it: (FQN, dim, the conv channel of each row, -1 where none),
    read from the neuron ids ``lanes`` at the conv's input. None when a channel carries more than one row."""
    sets = columns(lanes, 1) if lanes else None
    if sets is None or ((sets >= 0).sum(1) != 1).any():
        return None
    ids = sets.max(1) - offset
    inside = (ids >= 0) & (ids < rows)
    chan = np.full(rows, -1)
    chan[ids[inside]] = np.arange(len(sets))[inside]
    return [(fqn, d, chan) for fqn, d, _ in make_layer(gm, dw).rows(np.zeros((1, 1), dtype=int))]


def rows_of(s) -> list[int]:
    return sorted(int(x) for x in np.unique(s) if x >= 0)

