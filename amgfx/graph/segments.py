"""Segments: the captured graph cut where only the residual stream is live, so it can run block by block.

A model too big for memory is pruned the way SparseGPT, Wanda and FLAP prune LLMs: one block's weights
in memory at a time, the calibration data carried from block to block as the activations between them.
Here the blocks are found in the graph, not by module name. Along the node order, a *cut* is a place
where exactly one activation (a value computed from a parameter) is live: the residual stream between
two blocks, or the embedding's output. A value only the graph returns (a decoder's KV cache, written
in every block) is handed out where it is made, and holds no cut. Values computed from inputs and buffers only (positions,
masks, RoPE tables) may be live across a cut too: they are small, computed once, and handed to every
segment that reads them. Parameters are not values here: a segment reads the weights it uses (a tied
embedding is read by the first segment and the last).

Cutting at every such place gives half-blocks of a transformer (attention, then MLP); segments that
read no parameter are merged into the next, and ``together`` (sets of parameter names a coupling group
spans) merges the segments such a set falls across, so no group is cut.

Example (a two-layer LLaMA: the embedding, then attention and MLP of each layer, then the norm):
    >>> import torch, transformers as tf, amgfx
    >>> cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                      num_key_value_heads=2, vocab_size=50)
    >>> gm = amgfx.capture(tf.LlamaModel(cfg).eval(), (), {"input_ids": torch.randint(0, 50, (1, 8))})
    >>> segs = segments(gm)
    >>> [len(s.params) for s in segs]
    [1, 5, 4, 5, 4, 1]
    >>> x = {"input_ids": torch.randint(0, 50, (1, 8))}
    >>> torch.equal(run_segments(gm, segs, (), x).last_hidden_state, gm(**x).last_hidden_state)
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import AmgfxError
from .fx import get_attr, off_meta
from .meta import CAPTURED, DYNAMIC_BATCH

__all__ = ["Segment", "segments", "extract", "run_segments"]


@dataclass
class Segment:
    """Consecutive nodes of a graph (by name): what it reads from before it (``inputs``: activations,
    graph inputs, values of inputs only), what it hands on (``outputs``), and the attributes it reads."""
    index: int
    nodes: list
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    params: list = field(default_factory=list)      # parameter FQNs read here
    buffers: list = field(default_factory=list)     # other attributes read here (buffers, index tables)


def _weighted(gm: fx.GraphModule) -> dict:
    """Node -> whether its value depends on a parameter (an activation, in the sense of this module)."""
    params = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out[n] = n.target in params
        elif n.op == "placeholder":
            out[n] = False
        else:
            out[n] = any(out[a] for a in n.all_input_nodes)
    return out


def _cuts(gm: fx.GraphModule) -> list[int]:
    """Positions ``i`` (a cut between node ``i - 1`` and node ``i``) where one activation is live; of a run
    of such positions with the same live value, the last (what is computed from inputs alone stays before)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    weighted = _weighted(gm)
    live = [0] * (len(nodes) + 1)
    first_live: dict = {}
    for n in nodes:
        # a value only the graph returns (a KV cache written) is handed out where it is made: it holds no cut
        readers = [pos[u] for u in n.users if u.op != "output"]
        if not weighted[n] or n.op == "get_attr" or not readers:
            continue
        last = max(readers)
        for i in range(pos[n] + 1, last + 1):     # live at the cut before each node up to its last reader
            live[i] += 1
            first_live.setdefault(i, n)
    cuts = [i for i in range(1, len(nodes)) if live[i] == 1]
    return [i for j, i in enumerate(cuts) if j + 1 == len(cuts) or cuts[j + 1] != i + 1
            or first_live[cuts[j + 1]] is not first_live[i]]


def segments(gm: fx.GraphModule, together: list = ()) -> list[Segment]:
    """``gm``'s nodes cut into :class:`Segment` s (see the module docstring); ``together``: sets of parameter
    FQNs that must stay in one segment (a coupling group's)."""
    # export's check of the input sizes (``_guards_fn``) is the caller's: each segment has its own inputs
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
             and not (n.op == "call_module" and n.target == "_guards_fn")]
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    bounds = [0] + _cuts(gm) + [len(pos)]
    seg_of = {}
    k = 0
    for n in nodes:
        while pos[n] >= bounds[k + 1]:
            k += 1
        seg_of[n] = k
    params = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    # a parameter is read where its get_attr's users are
    reads: dict = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            for u in n.users:
                if u in seg_of:
                    reads.setdefault(n.target, set()).add(seg_of[u])
    # merge: a segment that reads no parameter joins the next; a `together` set joins the segments it spans
    parent = list(range(len(bounds) - 1))
    find = lambda i: i if parent[i] == i else find(parent[i])
    def join(lo, hi):
        for i in range(lo, hi):
            parent[find(i + 1)] = find(i)
    has_param = {s for t, ss in reads.items() if t in params for s in ss}
    for s in range(len(parent) - 1):
        if s not in has_param:
            join(s, s + 1)
    for group in together:
        spans = {s for t in group for s in reads.get(t, ())}
        if spans:
            join(min(spans), max(spans))
    # the merges above only ever join runs of consecutive segments, so a root names a contiguous range
    order = sorted({find(s) for s in set(seg_of.values())})
    rank = {r: i for i, r in enumerate(order)}
    out = [Segment(i, []) for i in range(len(order))]
    for n in nodes:
        out[rank[find(seg_of[n])]].nodes.append(n.name)
    _wire(gm, out, params)
    return [s for s in out if s.nodes]


def _wire(gm: fx.GraphModule, segs: list, params: set) -> None:
    """Fill each segment's inputs, outputs and attributes from the graph's edges."""
    by_name = {n.name: n for n in gm.graph.nodes}
    where = {name: s.index for s in segs for name in s.nodes}
    for s in segs:
        mine = set(s.nodes)
        ins, attrs = [], []
        for name in s.nodes:
            for a in by_name[name].all_input_nodes:
                if a.op == "get_attr":
                    attrs.append(a.target)
                elif a.name not in mine:
                    ins.append(a.name)
        s.inputs = sorted(set(ins), key=list(by_name).index)
        s.params = sorted({t for t in attrs if t in params})
        s.buffers = sorted({t for t in attrs if t not in params})
        s.outputs = [name for name in s.nodes
                     if any(u.op == "output" or where.get(u.name, s.index) != s.index for u in by_name[name].users)]


def extract(gm: fx.GraphModule, seg: Segment, attrs: dict, device="cpu") -> fx.GraphModule:
    """The segment as its own GraphModule: ``forward(*inputs) -> tuple(outputs)``, reading the attributes
    from ``attrs`` (FQN -> tensor; a Parameter stays one). Node names, metadata and attribute FQNs are
    the whole graph's, so the analysis finds the same groups under the same names. A graph captured on
    the meta device makes its tensors on ``device`` instead (and export's device checks are left out)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict = {}
    for name in seg.inputs:
        p = g.placeholder(name)
        p.meta.update(by_name[name].meta)
        env[by_name[name]] = p
    for t in seg.params + seg.buffers:
        src = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == t)
        env[src] = g.node_copy(src, lambda a: env[a])
    for name in seg.nodes:
        env[by_name[name]] = g.node_copy(by_name[name], lambda a: env[a])
    g.output(tuple(env[by_name[name]] for name in seg.outputs))
    off_meta(g, device)
    missing = [t for t in seg.params + seg.buffers if t not in attrs]
    if missing:
        raise AmgfxError(f"segment {seg.index} reads {missing[0]} (and {len(missing) - 1} more), which the "
                         "weights given do not hold")
    out = fx.GraphModule({t: attrs[t] for t in seg.params + seg.buffers}, g, class_name=f"Segment{seg.index}")
    out.meta[CAPTURED] = True
    out.meta[DYNAMIC_BATCH] = gm.meta.get(DYNAMIC_BATCH, False)
    return out


def graph_inputs(gm: fx.GraphModule, args, kwargs) -> dict:
    """Placeholder name -> value, for the model's own ``(args, kwargs)``."""
    from torch.fx._pytree import tree_flatten_spec
    info = getattr(gm.graph._codegen, "pytree_info", None)
    flat = tree_flatten_spec((tuple(args), kwargs), info.in_spec) if info and info.in_spec else list(args)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, flat))


def run_segments(gm: fx.GraphModule, segs: list, args, kwargs=None, *, attrs: dict | None = None):
    """Run ``gm`` segment by segment (each extracted with ``attrs``, default ``gm``'s own tensors) on
    ``(args, kwargs)``: what ``gm`` returns. A check that the cut is faithful; :mod:`amgfx.stream` does the
    same over many batches, block by block."""
    if attrs is None:        # every attribute the graph reads: parameters, buffers and plain tensor constants
        attrs = {n.target: get_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    env = graph_inputs(gm, args, kwargs or {})
    env.update({n.name: attrs[n.target] for n in gm.graph.nodes if n.op == "get_attr" and n.target in attrs})
    for s in segs:
        outs = extract(gm, s, attrs)(*[env[i] for i in s.inputs])
        env.update(zip(s.outputs, outs))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = pytree.tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a, out.args[0])
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info and info.out_spec:
        return pytree.tree_unflatten(list(flat), info.out_spec)
    return flat
