"""Delete a residual branch and add what it would still contribute: its output layer's bias,
carried through the element-wise ops between that layer and the residual add (LayerScale).

The graph edit behind ``amgfx/passes/remove_branch``, kept here because the cost model makes the same
edit on a copy to predict what removing a block saves. Which branches may go is decided by
:mod:`amgfx.analysis.branches`; this module only edits.

Example (a ViT block with LayerScale; its MLP goes, ``gamma * fc2.bias`` stays):
    >>> import torch, timm, amgfx
    >>> from amgfx.analysis.branches import branches
    >>> from amgfx.graph.fx import copy_module
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, init_values=1e-5)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> cg = amgfx.analyze(m, x)
    >>> gm = copy_module(cg.gm)
    >>> b = branches(cg)["mlp:blocks.0.mlp"]
    >>> n = len(gm.graph.nodes); _ = remove_branch(gm, b.out, b.chain, b.add); len(gm.graph.nodes) < n
    True
    >>> with torch.no_grad():
    ...     _ = m.blocks[0].mlp.fc2.weight.zero_()      # the zeroing oracle: every hidden neuron's column
    >>> torch.allclose(gm(x)[0], m(x), atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import RewriteError
from .fx import call, eliminate_dead_code
from .ops import IDENTITY, LAYERS, VIEWS

aten = torch.ops.aten
__all__ = ["remove_branch", "keeps_channels", "ADDS", "SCALES"]

ADDS = {aten.add.Tensor, aten.add_.Tensor}
SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.div.Tensor, aten.div.Scalar}   # x * c, x / c
_ALONG = {aten.roll.default: 2, aten.slice.Tensor: 1, aten.narrow.default: 1, aten.select.int: 1}   # dim arg


def keeps_channels(n: fx.Node) -> bool:
    """Whether data movement ``n`` leaves the last (channel) axis last and whole: then a constant
    per channel passes it unchanged (GPT-2's ``view`` after ``addmm``, Swin's window reverse and roll)."""
    v, src = n.meta.get("val"), n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    iv = src.meta.get("val") if src is not None else None
    if not isinstance(v, torch.Tensor) or not isinstance(iv, torch.Tensor) or v.dim() == 0 or iv.dim() == 0:
        return False
    if v.shape[-1] != iv.shape[-1]:
        return False
    if n.target in VIEWS:
        return True
    last = iv.dim() - 1
    if n.target is aten.permute.default:
        return n.args[1][-1] % iv.dim() == last
    if n.target is aten.transpose.int:
        return last not in (n.args[1] % iv.dim(), n.args[2] % iv.dim())
    if n.target in _ALONG:
        d = n.args[_ALONG[n.target]] if len(n.args) > _ALONG[n.target] else 0
        dims = d if isinstance(d, (list, tuple)) else [d]
        return bool(dims) and all(x % iv.dim() != last for x in dims)
    return False


def _bias(layer: fx.Node):
    spec = LAYERS.get(layer.target)
    if spec is None or spec[2] is None:
        return None
    pos = spec[2]
    b = layer.args[pos] if len(layer.args) > pos else layer.kwargs.get("bias")
    return b if isinstance(b, fx.Node) else None


def remove_branch(gm: fx.GraphModule, out: str, chain: tuple, add: str) -> fx.GraphModule:
    """Replace the branch ending in node ``out`` by its constant contribution at residual ``add`` (in place).

    ``chain`` names the element-wise nodes between ``out`` and ``add``; everything that fed only
    the branch becomes dead and is eliminated.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [x for x in (out, add, *chain) if x not in nodes]
    if missing:
        raise RewriteError(f"branch {out}: node(s) {missing} are not in the graph")
    prev, value = nodes[out], _bias(nodes[out])          # value None: the branch is exactly zero
    sink = nodes[add]
    for name in chain:
        c = nodes[name]
        if keeps_channels(c):                            # moves tokens, not channels: the constant stays
            pass
        elif value is None and c.target in ADDS:         # zero + constant: the constant
            value = next(a for a in c.args[:2] if a is not prev)
        elif value is None and (c.target in IDENTITY or c.target in SCALES):
            pass                                         # zero stays zero
        elif value is not None:
            args = tuple(value if a is prev else a for a in c.args)
            value = call(gm, sink, c.target, args, dict(c.kwargs))
        else:
            raise RewriteError(f"branch {out}: {c.name} ({c.target}) is not element-wise with a constant")
        prev = c
    if value is None:                                    # x + 0: the residual itself
        other = next(a for a in sink.args[:2] if a is not prev)
        sink.replace_all_uses_with(other)
        gm.graph.erase_node(sink)
    else:
        sink.replace_input_with(prev, value)
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
