"""Pass: gather once for every layer, not once per layer.

When heads keep different dims, :mod:`.fix_shapes` gathers each unpruned operand broadcast against them
(RoPE's cos and sin tables) at each head's kept positions: an ``expand`` over the heads and a ``gather``
per table, per q and k, per layer. The tables are the same in every layer, only the indices differ, and
the indices depend only on the plan. So, first, index nodes that compute the same thing from the same
inputs become one (every layer's ``unsqueeze(cos, 1)``); then all gathers of one table along one dim,
whose index constants differ only along the expanded (head) dim, become one gather over the
concatenated indices, which each former gather reads back as a slice (a view, no copy).

In the pruned ``amgfx-lm`` decode graph this turns 16 gathers into 4 (one per table and kept width) and
16 slices.

Example:
    >>> import torch, torch.fx as fx
    >>> from amgfx.planning.resolved import Resolved
    >>> aten = torch.ops.aten
    >>> class M(torch.nn.Module):       # two layers' RoPE-like gathers: 2 heads and 1 head
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("ia", torch.tensor([[[[1, 0]], [[0, 1]]]]))
    ...         self.register_buffer("ib", torch.tensor([[[[1, 1]]]]))
    ...     def forward(self, t, a, b):
    ...         return (aten.gather.default(aten.expand.default(t.unsqueeze(1), [-1, 2, -1, -1]), 3, self.ia) * a,
    ...                 aten.gather.default(aten.expand.default(t.unsqueeze(1), [-1, 1, -1, -1]), 3, self.ib) * b)
    >>> gm = torch.export.export(M(), (torch.randn(1, 3, 2), torch.randn(1, 2, 3, 2), torch.randn(1, 1, 3, 2))).module()
    >>> x = (torch.randn(1, 3, 2), torch.randn(1, 2, 3, 2), torch.randn(1, 1, 3, 2))
    >>> want = gm(*x)
    >>> gm = share_gathers(gm, Resolved({}, {}, {}, True)).graph_module
    >>> [str(n.target) for n in gm.graph.nodes if n.target is aten.gather.default]
    ['aten.gather.default']
    >>> all(torch.equal(a, b) for a, b in zip(gm(*x), want))
    True
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from ..graph.fx import batchable_gather, constant
from ..graph.ops import MOVE
from .pipeline import graph_pass
from ..planning.resolved import Resolved

aten = torch.ops.aten

# Index nodes that may be merged when they read the same inputs with the same arguments: pure, and
# cheap enough that computing one where several were is never worse.
_SHAREABLE = MOVE - {aten.index.Tensor, aten.index_select.default, aten.repeat.default,
                     aten.repeat_interleave.self_int}


def share_index_nodes(gm: fx.GraphModule) -> int:
    """Merge shareable nodes with the same target and the same (merged) arguments; returns how many went."""
    seen: dict = {}
    gone = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _SHAREABLE:
            continue
        key = (n.target, _frozen(n.args), _frozen(n.kwargs))
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            gone += 1
    return gone


def _frozen(a):
    if isinstance(a, (list, tuple)):
        return tuple(_frozen(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in a.items()))
    return a if isinstance(a, (fx.Node, int, float, bool, str, type(None), torch.dtype, torch.device)) else id(a)


def share_gathers_once(gm: fx.GraphModule) -> int:
    """Batch the gathers (:func:`amgfx.graph.fx.batchable_gather`) that share a group key; returns how many
    gathers went."""
    groups = defaultdict(list)
    for n in gm.graph.nodes:
        b = batchable_gather(gm, n)
        if b is not None:
            groups[b[0]].append((n, b[1]))
    gone = 0
    for (table, dim, j, _), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0][0]
        index = torch.cat([idx for _, idx in members], dim=j)
        sizes = [-1] * len(first.args[0].args[1])
        sizes[j] = index.shape[j]
        with gm.graph.inserting_before(first):
            e = gm.graph.call_function(aten.expand.default, (table, sizes))
            g = gm.graph.call_function(aten.gather.default, (e, dim, constant(gm, first, index, "gather")))
            at = 0
            for n, idx in members:
                piece = gm.graph.call_function(aten.slice.Tensor, (g, j, at, at + idx.shape[j]))
                at += idx.shape[j]
                n.replace_all_uses_with(piece)
        for n, _ in members:
            expand = n.args[0]
            gm.graph.erase_node(n)
            if not expand.users:
                gm.graph.erase_node(expand)
        gone += len(members) - 1
    return gone


@graph_pass(requires=("shapes_fixed",), ensures=("gathers_shared",))
def share_gathers(gm: fx.GraphModule, resolved: Resolved) -> fx.GraphModule:
    share_index_nodes(gm)
    share_gathers_once(gm)
    gm.recompile()
    return gm
