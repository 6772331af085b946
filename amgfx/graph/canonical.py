"""Canonical spellings, applied once after capture so every interpreter reads one form.

``x.reshape_as(y)`` and ``x.view_as(y)`` read only the *size* of ``y``, but as a tensor operand
they make ``y`` look like a second input whose values flow (LeViT's
``bn(x.flatten(0, 1)).reshape_as(x)``). They become ``reshape(x, [sizes of y])``, with a
``sym_size`` read for each dynamic dim, as export writes ``x.view(y.size())``.

Example:
    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return (x.flatten(0, 1) * 2).reshape_as(x)
    >>> gm = torch.export.export(M(), (torch.randn(2, 3, 4),), strict=False).module()
    >>> spell_out_shape_of(gm)
    1
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"][-1]
    'aten.reshape.default'
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
__all__ = ["SHAPED_LIKE", "spell_out_shape_of"]

SHAPED_LIKE = {aten.reshape_as.default, aten.view_as.default}


def spell_out_shape_of(gm: fx.GraphModule) -> int:
    """Rewrite every :data:`SHAPED_LIKE` node as a reshape to its second operand's sizes; returns how many."""
    done = 0
    for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SHAPED_LIKE]:
        x, like = n.args[:2]
        v = like.meta.get("val") if isinstance(like, fx.Node) else None
        if not isinstance(v, torch.Tensor):
            continue
        sizes = []
        with gm.graph.inserting_before(n):
            for d, s in enumerate(v.shape):
                if isinstance(s, int):
                    sizes.append(s)
                    continue
                r = gm.graph.call_function(aten.sym_size.int, (like, d))
                r.meta["val"] = s
                sizes.append(r)
            new = gm.graph.call_function(aten.reshape.default, (x, sizes))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
