"""Passes for running a decoder, not for pruning it: how its cache writes (``index_copy``, the
:data:`~amgfx.graph.ops.STATE_WRITE` ops) reach a runtime. Neither is in :data:`amgfx.passes.PIPELINE`:
they apply to a dense decoder's graphs as well as to a pruned one's, and change no value.

A decode step writes one slot of every layer's cache and returns the whole cache. Written out of place,
that is a copy of the cache per layer per token: the bytes a decode step is bound by once the context
is long.

* :func:`in_place` makes each write of a cache *input* that nothing else reads an ``index_copy_``: the
  step then updates the buffers it was given. :func:`amgfx.generate` runs such a copy of the graph on a
  cache it made itself; a caller's own tensors are never written.
* :func:`as_scatter` writes ``index_copy`` along dim d as ``scatter`` along d, its slot indices expanded
  over the written block. The ONNX exporter turns ``index_copy`` into a ``ScatterND`` between two
  ``Transpose`` (three copies of the cache per write) and ``scatter`` into one ``ScatterElements``,
  whose copy onnxruntime skips when the output is bound to the input's buffer (``amgfx.load(...,
  runtime="ort")`` binds it so).

Example:
    >>> import torch, torch.fx as fx
    >>> class W(torch.nn.Module):
    ...     def forward(self, cache, slots, kv):
    ...         return cache.index_copy(2, slots, kv) * 1.0
    >>> x = (torch.zeros(1, 2, 4, 3), torch.tensor([1]), torch.ones(1, 2, 1, 3))
    >>> gm = torch.export.export(W(), x).module()
    >>> [str(n.target) for n in as_scatter(gm).graph.nodes if n.op == "call_function"][-3:]
    ['aten.expand_as.default', 'aten.scatter.src', 'aten.mul.Tensor']
    >>> cache = torch.zeros(1, 2, 4, 3)
    >>> _ = in_place(gm)(cache, *x[1:])
    >>> float(cache.sum())          # the given buffer now holds the written slot
    6.0
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.fx import call, copy_module
from ..graph.ops import STATE_WRITE, state_write_args

aten = torch.ops.aten

__all__ = ["in_place", "as_scatter"]


def _writes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in STATE_WRITE]


def in_place(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (weights shared) whose writes of an input that nothing reads afterwards happen in
    that input's buffer. Only for a caller that owns what it passes: the inputs are changed."""
    out = copy_module(gm)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    for n in _writes(out):
        state = state_write_args(n)[0]
        # a reader before the write (torch.export's size guard) still sees the old values
        if n.target is aten.index_copy.default and state.op == "placeholder" and \
                all(order[u] < order[n] for u in state.users if u is not n):
            n.target = aten.index_copy_.default
    out.recompile()
    return out


def as_scatter(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (weights shared) with each ``index_copy(state, d, slots, src)`` written as
    ``scatter(state, d, slots viewed along d and expanded as src, src)``: the same values."""
    out = copy_module(gm)
    for n in _writes(out):
        if n.target is not aten.index_copy.default:
            continue
        state, dim, src = state_write_args(n)
        along = [1] * len(n.meta["val"].shape)
        along[dim] = -1
        idx = call(out, n, aten.view.default, [n.args[2], along])
        idx = call(out, n, aten.expand_as.default, [idx, src])
        n.target, n.args, n.kwargs = aten.scatter.src, (state, dim, idx, src), {}
    out.recompile()
    return out
