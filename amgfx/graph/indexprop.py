"""Index propagation: follow neurons through data movement by running it on channel ids.

A *lane value* stands for one tensor of the graph. It is a list of integer tensors
("lanes") of that tensor's shape; an element holds the id of a source neuron that
reaches that position (-1: none). Data-movement ops (view, permute, unbind, slice, cat, ...)
are executed unchanged on every lane, so a neuron is followed through any reshape without
a rule per op. Element-wise ops keep positions, and when two traced operands meet (the
``x*cos + rotate(x)*sin`` of RoPE, the ``act(gate)*up`` of a GLU) their lanes are
concatenated: a position then lists every source neuron that reaches it.

Example (the fused qkv of a timm ViT: which qkv rows reach the query of head 1?):
    >>> import torch, timm, amgfx
    >>> from amgfx.graph.indexprop import activation_taint, propagate, seed, trace_back
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> gm = amgfx.capture(m, torch.randn(1, 3, 32, 32))
    >>> sdpa = next(n for n in gm.graph.nodes if "scaled_dot" in str(n.target))
    >>> path = trace_back(sdpa.args[0], activation_taint(gm.graph))
    >>> qkv = path.producers[0]
    >>> env, _ = propagate(gm, {qkv: seed(qkv, torch.arange(576))}, path.nodes)
    >>> env[sdpa.args[0]][0][0, 1, 0, :3].tolist()    # [batch, head, token, dim]
    [64, 65, 66]
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import noted
from .ops import (CONCAT, GETITEM, IDENTITY, IGNORED_USERS, LAYERS, MOVE, NORMS, POINTWISE,
                  POINTWISE_NONLINEAR, REDUCTIONS, STATE_WRITE, TRANSPARENT, is_depthwise_conv, reduced_dims, run_move,
                  state_write_args, where)

Lanes = list  # list[Tensor] or, for multi-output ops, list[list[Tensor]]


def val(node):
    """The FakeTensor (or list of them) export recorded for ``node``."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node) -> tuple[int, ...] | None:
    v = val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def is_tensor(node) -> bool:
    return isinstance(val(node), torch.Tensor)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued Node inputs of ``node`` (flattening list args such as cat's)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and (is_tensor(x) or isinstance(val(x), (list, tuple))))
    return out


def layer_weight(node: fx.Node) -> fx.Node | None:
    """The weight node of a parameterised layer (None if the op is not a layer or its weight is an activation)."""
    spec = LAYERS.get(node.target) if node.op == "call_function" else None
    if spec is None or len(node.args) <= spec[1]:
        return None
    return param_source(node.args[spec[1]])


def param_source(node) -> fx.Node | None:
    """The ``get_attr`` behind ``node`` if only identity ops and 2-D transposes lie between, else None."""
    found = weight_source(node)
    return found[0] if found else None


def weight_source(node) -> tuple[fx.Node, bool] | None:
    """(the ``get_attr`` behind ``node``, whether an odd number of 2-D transposes lies between: ``x @ W.T``
    as Falcon writes its linears), or None when anything else does."""
    flipped = False
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node, flipped
        if node.op == "call_function" and node.args and (node.target in IDENTITY or _is_2d_transpose(node)):
            flipped ^= node.target not in IDENTITY
            node = node.args[0]
            continue
        return None
    return None


def _is_2d_transpose(n: fx.Node) -> bool:
    """A swap of the last two dims (of a 2-D weight, or of stacked expert weights ``[E, out, in]``)."""
    aten = torch.ops.aten
    v = val(n.args[0]) if isinstance(n.args[0], fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() not in (2, 3):
        return False
    d = v.dim()
    return (d == 2 and n.target in (aten.t.default, aten.numpy_T.default)) or \
        (n.target is aten.transpose.int and {a % d for a in n.args[1:3]} == {d - 2, d - 1}) or \
        (n.target is aten.permute.default and list(n.args[1]) == [*range(d - 2), d - 1, d - 2])


def layer_input(node: fx.Node) -> fx.Node | None:
    spec = LAYERS.get(node.target)
    return node.args[spec[0]] if spec else None


def is_layer(node: fx.Node) -> bool:
    """A parameterised layer: linear/addmm/mm/conv/embedding whose weight is a parameter."""
    return node.op == "call_function" and node.target in LAYERS and layer_weight(node) is not None


def activation_taint(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on the output of a parameterised layer.

    Masks, RoPE tables and position ids depend on no layer, so they are never mistaken
    for a path that carries neurons.
    """
    tainted: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if is_layer(n) or any(a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    return tainted


def input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the graph's inputs (not only on parameters and constants).

    A relative-position bias made by a small MLP from fixed coordinates (Swin-v2) is a layer output,
    so activation-tainted, but the same for every input: attention logits are told from it by this.
    """
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            out.add(n)
        elif n.op == "call_function" and n.target not in SHAPE_ONLY and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


# Ops that read only the shape of their input (a batch size, a ones_like mask): no data flows through them.
SHAPE_ONLY = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.zeros_like.default,
              torch.ops.aten.ones_like.default, torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default,
              torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default, torch.ops.aten.new_empty.default,
              torch.ops.aten.new_full.default}


@dataclass
class Path:
    """What lies between a tensor and the layers that produce it."""
    producers: list = field(default_factory=list)   # layer nodes, in discovery order
    nodes: set = field(default_factory=set)          # transparent nodes on the way
    blockers: list = field(default_factory=list)     # non-transparent nodes that carry neurons
    norms: list = field(default_factory=list)        # norms crossed (allowed only when asked)
    channelwise: list = field(default_factory=list)  # depthwise convs crossed (allowed only when asked)
    nonlinear: bool = False                          # crossed an activation
    scale: float = 1.0                               # product of scalar factors on the way

    @property
    def single_producer(self):
        return self.producers[0] if len(self.producers) == 1 and not self.blockers else None


def _data_args(n: fx.Node) -> list:
    """Inputs whose *values* reach the output: ``type_as(x, y)``, ``to``, ``expand_as(x, y)`` only read x's."""
    if n.target in IDENTITY or n.target is torch.ops.aten.expand_as.default:
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    return tensor_args(n)


def _scalar_factor(n: fx.Node, on_path) -> float:
    aten = torch.ops.aten
    if n.target in (aten.mul.Tensor, aten.mul.Scalar):
        other = [a for a in n.args if not (isinstance(a, fx.Node) and a is on_path)]
        if len(other) == 1 and isinstance(other[0], (int, float)):
            return float(other[0])
    if n.target in (aten.div.Tensor, aten.div.Scalar) and n.args[0] is on_path and isinstance(n.args[1], (int, float)):
        return 1.0 / float(n.args[1])
    return 1.0


def pools(n: fx.Node) -> bool:
    """A reduction over dims other than the last (channel) one: a max- or mean-pool over positions
    (Hiera pools its queries with ``amax``). Each channel stays itself, so neurons pass through."""
    if n.op != "call_function" or n.target not in REDUCTIONS or shape(n.args[0]) is None:
        return False
    dims, _ = reduced_dims(n)
    return bool(dims) and len(shape(n.args[0])) - 1 not in dims


def _pool_ids(n: fx.Node, lane: torch.Tensor) -> torch.Tensor | None:
    """The ids of a pooling node's output: the ids of one position, when every pooled position holds them."""
    dims, keep = reduced_dims(n)
    out = lane
    for d in dims:
        first = out.narrow(d, 0, 1)
        if not torch.equal(out, first.expand_as(out)):
            return None
        out = first
    return out if keep else out.squeeze(tuple(dims))


def _channel_ids(n: fx.Node, lane: torch.Tensor) -> torch.Tensor | None:
    """The ids of a depthwise conv's output: channel *c* keeps the ids of input channel *c*, which must be
    the same at every position (the conv mixes positions)."""
    flat = lane.flatten(2) if lane.dim() > 2 else lane.unsqueeze(-1)
    if not torch.equal(flat, flat[..., :1].expand_as(flat)):
        return None
    out = shape(n)
    return flat[..., :1].reshape(flat.shape[:2] + (1,) * (len(out) - 2)).expand(out).clone()


def _state_ids(n: fx.Node, lane: torch.Tensor) -> torch.Tensor | None:
    """A state write (a KV cache update) holds at every position the neurons its source holds: the source's
    ids spread along the written dim, or None where they differ between the positions written."""
    _, dim, _ = state_write_args(n)
    first = lane.narrow(dim, 0, 1)
    if not torch.equal(lane, first.expand_as(lane)):
        return None
    return first.expand(shape(n)).clone()


def trace_back(start: fx.Node, tainted: set, *, allow_norms: bool = False, allow_channelwise: bool = False,
               budget: int = 400) -> Path:
    """Walk back from ``start`` through transparent ops to the layers producing it (``allow_norms``: and
    through one norm; ``allow_channelwise``: and through depthwise convs, whose weights the caller prunes)."""
    path = Path()
    seen: set = set()
    todo = deque([start])
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > budget:
            path.blockers.append(n)
            break
        if allow_channelwise and is_depthwise_conv(n) and is_layer(n):
            path.nodes.add(n)
            path.channelwise.append(n)
            todo.append(n.args[0])
            continue
        if is_layer(n):
            path.producers.append(n)
            continue
        if n not in tainted:
            continue
        t = n.target
        if n.op == "call_function" and t in TRANSPARENT:
            path.nodes.add(n)
            path.nonlinear |= t in POINTWISE_NONLINEAR
            srcs = [a for a in _data_args(n) if a in tainted or is_layer(a)]
            if len(srcs) == 1:
                path.scale *= _scalar_factor(n, srcs[0])
            todo.extend(srcs)
        elif pools(n):
            path.nodes.add(n)
            todo.append(n.args[0])
        elif n.op == "call_function" and t in NORMS and allow_norms and not path.norms:
            path.nodes.add(n)
            path.norms.append(n)
            todo.append(n.args[NORMS[t][0]])
        else:
            path.blockers.append(n)
    return path


def forward_region(start: fx.Node, tainted: set, budget: int = 200) -> tuple[set, list, list]:
    """Nodes reachable from ``start`` through transparent ops, the layers they feed, and blockers."""
    region, consumers, blockers = {start}, [], []
    todo = deque([start])
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u in region or u.op != "call_function" or u.target in IGNORED_USERS:
                continue
            if is_layer(u) and layer_input(u) is n:
                if u not in consumers:
                    consumers.append(u)
            elif u.target in TRANSPARENT:
                region.add(u)
                todo.append(u)
            else:
                blockers.append(u)
        if len(region) > budget:
            break
    return region, consumers, blockers


def seed(node: fx.Node, values: torch.Tensor, dim: int = -1) -> Lanes:
    """A single-lane value: ``values`` laid along ``dim`` of ``node``'s shape, broadcast elsewhere."""
    shp = shape(node)
    view = [1] * len(shp)
    view[dim] = shp[dim]
    return [values.reshape(view).expand(shp).clone()]


def _const(node, gm: fx.GraphModule, cache: dict):
    """Concrete value of an activation-free node (buffers, index tables), or None."""
    if not isinstance(node, fx.Node):
        return node
    if node in cache:
        return cache[node]
    out = None
    if node.op == "get_attr":
        out = fetch_attr(gm, node.target)
    elif node.op == "call_function" and (node.target in MOVE or node.target in IDENTITY):
        args = [_const(a, gm, cache) if isinstance(a, fx.Node) else a for a in node.args]
        if all(not isinstance(a, fx.Node) for a in node.args) or all(x is not None for x in args):
            try:
                out = node.target(*args, **node.kwargs)
            except (RuntimeError, TypeError, IndexError, ValueError):   # not computable from constants alone
                out = None
    if isinstance(out, torch.Tensor) and out.device.type == "meta":
        out = None
    cache[node] = out
    return out


def fetch_attr(gm, target: str):
    """The parameter/buffer/submodule at dotted path ``target``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _pad_lanes(vals: list[Lanes]) -> list[Lanes]:
    n = max(len(v) for v in vals)
    return [v + [v[0]] * (n - len(v)) for v in vals]


def _dedupe(lanes: Lanes) -> Lanes:
    out = []
    for t in lanes:
        if not any(t.shape == o.shape and torch.equal(t, o) for o in out):
            out.append(t)
    return out


def _concrete(a):
    """Turn SymInt-valued Nodes in a shape argument into ints."""
    if isinstance(a, fx.Node):
        v = val(a)
        return int(v) if isinstance(v, (int, torch.SymInt)) else a
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def index_operands(n: fx.Node, x: torch.Tensor, gm: fx.GraphModule, cache: dict) -> list | None:
    """The indices of ``aten.index.Tensor`` node ``n`` to run on stand-in values ``x`` (ids, masks).

    Constant indices are used as they are. An input-dependent one (CLIP's pooled token,
    ``x[arange(B), ids.argmax(-1)]``) picks positions along a dim that carries no neuron, which is
    fine when ``x`` is the same all along that dim: position 0 stands in for it. None otherwise."""
    out = []
    for d, a in enumerate(n.args[1]):
        c = _const(a, gm, cache) if isinstance(a, fx.Node) else a
        if c is None and isinstance(a, fx.Node):
            if not torch.equal(x, x.narrow(d, 0, 1).expand_as(x)) or shape(a) is None:
                return None
            c = torch.zeros(shape(a), dtype=torch.long)
        out.append(c)
    return out


# The ops propagate() runs on ids: data movement (executed as is), element-wise ops and norms (positions kept);
# also pooling reductions (see pools), which keep the channels.
FOLLOWS = frozenset(MOVE | IDENTITY | CONCAT | POINTWISE | set(NORMS) | set(STATE_WRITE) | {GETITEM})


def propagate(gm: fx.GraphModule, seeds: dict, region: set, *, missing: int = -1) -> tuple[dict, list]:
    """Run the data movement of ``region`` on the seed lane values.

    Returns the lane values of every region node a seed reaches, and the region nodes
    that could not be run (an op outside the tables, or an index that is not a constant).
    """
    env: dict = dict(seeds)
    failed: list = []
    cache: dict = {}
    for n in gm.graph.nodes:
        if n not in region or n in env or n.op != "call_function":
            continue
        if not any(a in env for a in n.all_input_nodes):
            continue
        with noted(lambda: where(n)):
            try:
                got = _step(gm, n, env, cache, missing)
            except (RuntimeError, TypeError, IndexError, ValueError):   # the op does not run on ids: cannot follow
                got = _FAIL
        if got is _FAIL:
            failed.append(n)
        elif got is not None:                 # None: nothing of the seeds reaches this node's output
            env[n] = got
    return env, failed


_FAIL = object()        # what a step returns for a node it cannot run on ids


def _step(gm, n: fx.Node, env: dict, cache: dict, missing: int):
    """The lanes of ``n`` from its inputs' lanes, by the op's table; _FAIL where they cannot be followed."""
    t = n.target
    if t is GETITEM:
        return [lane[n.args[1]] for lane in env[n.args[0]]]
    if t in IDENTITY:
        return env[n.args[0]]
    if t in MOVE:
        return _move_step(gm, n, env, cache)
    if is_depthwise_conv(n) or pools(n):       # channels kept, positions mixed or pooled
        rule = _channel_ids if is_depthwise_conv(n) else _pool_ids
        return _all_or_fail([rule(n, lane) for lane in env[n.args[0]]] if n.args[0] in env else [None])
    if t in STATE_WRITE:
        src = state_write_args(n)[2]
        return _all_or_fail([_state_ids(n, lane) for lane in env[src]] if src in env else [None])
    if t in CONCAT:
        parts = _pad_lanes([env[a] if a in env else [torch.full(shape(a), missing, dtype=torch.long)]
                            for a in n.args[0]])
        return _dedupe([t([p[i] for p in parts], *n.args[1:]) for i in range(len(parts[0]))])
    if t in POINTWISE or t in NORMS:
        srcs = [a for a in ([n.args[NORMS[t][0]]] if t in NORMS else n.all_input_nodes) if a in env]
        if t is torch.ops.aten.expand_as.default:      # arg 1 only lends its shape
            srcs = [a for a in srcs if a is n.args[0]]
        lanes = [lane.broadcast_to(shape(n)) for a in srcs for lane in env[a]]
        return _dedupe(lanes) if lanes else None
    return _FAIL


def _all_or_fail(out: list):
    return _FAIL if any(o is None for o in out) else _dedupe(out)


def _move_step(gm, n: fx.Node, env: dict, cache: dict):
    """Data movement run on each lane, its other arguments made concrete (constants, index tensors)."""
    t = n.target
    if n.args[0] not in env:
        return _FAIL
    if t is torch.ops.aten.index.Tensor:      # None entries index nothing (x[:, idx])
        idx = [index_operands(n, lane, gm, cache) for lane in env[n.args[0]]]
        return _FAIL if any(i is None for i in idx) else [t(lane, i) for lane, i in zip(env[n.args[0]], idx)]
    rest = [_const(a, gm, cache) if isinstance(a, fx.Node) else _concrete(a) for a in n.args[1:]]
    if any(r is None for r in rest):
        return _FAIL
    return [run_move(t, lane, *rest, **n.kwargs) for lane in env[n.args[0]]]
