"""Fold eval-mode batch norms into the layer that feeds them: ``BN(W x + b) = W' x + b'``.

In eval mode a batch norm is a per-channel affine map, ``y_c = (x_c - mean_c) / sqrt(var_c + eps) *
gamma_c + beta_c``. When ``x`` is a linear or conv layer's output, reached only through data
movement that keeps each channel whole (LeViT's ``Linear -> flatten -> BatchNorm1d -> reshape``,
every conv-BN pair), the map moves into the layer's rows: each output row of ``W`` is scaled by
``gamma_c / sqrt(var_c + eps)`` and the bias shifted. The norm leaves the graph, so the layer's
rows are what the analysis finds and prunes, exactly as for a layer without a norm. This is the
folding every deployment toolchain does; the values differ from the unfolded graph by rounding only.

The folded weights are new tensors registered on the captured module under the layer's own
names; the user's model is not touched.

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> _ = m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 2), m[1].weight.data.normal_()
    >>> x = torch.randn(3, 4)
    >>> gm = torch.export.export(m, (x,), strict=False).module()
    >>> fold_batch_norms(gm)
    1
    >>> torch.allclose(gm(x), m(x), atol=1e-5)
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .indexprop import SHAPE_ONLY, fetch_attr, is_layer, layer_weight, propagate, seed, shape
from .ops import GETITEM, LAYERS, MOVE

aten = torch.ops.aten
__all__ = ["BATCH_NORMS", "fold_batch_norms"]

# Eval batch norms: (input, weight, bias, running mean, running var, training, eps) arg positions,
# and whether the op returns a tuple whose item 0 is the output.
BATCH_NORMS = {
    aten.batch_norm.default: ((0, 1, 2, 3, 4, 5, 7), False),
    aten._native_batch_norm_legit_no_training.default: ((0, 1, 2, 3, 4, None, 6), True),
}
_FOLDABLE = {aten.linear.default, aten.conv1d.default, aten.conv2d.default}


def _arg(n: fx.Node, pos):
    return None if pos is None or len(n.args) <= pos else n.args[pos]


def _feeding_layer(bn: fx.Node, x: fx.Node) -> fx.Node | None:
    """The foldable layer whose output reaches ``x`` through data movement only, used by nothing else."""
    def sole_user(n):                                 # reads of its size (a reshape_as) do not count
        return sum(u.target not in SHAPE_ONLY for u in n.users) == 1

    n = x
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in MOVE and sole_user(n):
        n = n.args[0]
    if not (isinstance(n, fx.Node) and n.target in _FOLDABLE and is_layer(n) and sole_user(n)):
        return None
    w = layer_weight(n)
    if w is None or len(w.users) != 1 or w is not n.args[LAYERS[n.target][1]]:
        return None                                   # a shared or transformed weight: folding would change others
    return n


def _channels_line_up(gm: fx.GraphModule, layer: fx.Node, x: fx.Node) -> bool:
    """Whether channel ``c`` of the layer's output is channel ``c`` (dim 1) of the norm's input everywhere."""
    chan = 1 if layer.target in (aten.conv1d.default, aten.conv2d.default) else -1
    c = shape(layer)[chan]
    region, n = set(), x
    while n is not layer:
        region.add(n)
        n = n.args[0]
    env, _ = propagate(gm, {layer: seed(layer, torch.arange(c), chan)}, region)
    got = env.get(x, [None])[0] if x is not layer else seed(layer, torch.arange(c), chan)[0]
    if got is None or len(shape(x)) < 2 or shape(x)[1] != c:
        return False
    want = torch.arange(c).reshape([1, c] + [1] * (len(shape(x)) - 2)).expand(shape(x))
    return torch.equal(got, want)


def _set_param(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    owner, _, name = fqn.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    setattr(mod, name, torch.nn.Parameter(value, requires_grad=False))


def _fold_one(gm: fx.GraphModule, bn: fx.Node) -> bool:
    (xi, wi, bi, mi, vi, ti, ei), tuple_out = BATCH_NORMS[bn.target]
    x = _arg(bn, xi)
    if _arg(bn, ti) is True or not isinstance(x, fx.Node):
        return False
    stats = [_arg(bn, p) for p in (wi, bi, mi, vi)]
    if any(s is not None and (not isinstance(s, fx.Node) or s.op != "get_attr") for s in stats) or stats[2] is None:
        return False
    layer = _feeding_layer(bn, x)
    if layer is None or not _channels_line_up(gm, layer, x):
        return False
    if tuple_out and any(u.target is not GETITEM or u.args[1] != 0 for u in bn.users):
        return False
    g, b, mean, var = (fetch_attr(gm, s.target).detach().double() if s is not None else None for s in stats)
    scale = (g if g is not None else 1.0) / torch.sqrt(var + float(_arg(bn, ei)))
    shift = (b if b is not None else 0.0) - mean * scale
    spec = LAYERS[layer.target]
    wnode = layer.args[spec[1]]
    W = fetch_attr(gm, wnode.target)
    view = [1] * W.dim()
    view[spec[3]] = -1
    _set_param(gm, wnode.target, (W.detach().double() * scale.reshape(view)).to(W.dtype))
    bnode = _arg(layer, spec[2])
    if isinstance(bnode, fx.Node) and bnode.op == "get_attr" and len(bnode.users) == 1:
        old = fetch_attr(gm, bnode.target)
        _set_param(gm, bnode.target, (old.detach().double() * scale + shift).to(old.dtype))
    elif bnode is None:
        fqn = wnode.target.rpartition(".")[0] + (".bias" if "." in wnode.target else "bias")
        if fqn in dict(gm.named_parameters()) or fqn in dict(gm.named_buffers()):
            return False
        _set_param(gm, fqn, shift.to(W.dtype))
        with gm.graph.inserting_before(layer):
            new_b = gm.graph.get_attr(fqn)
        new_b.meta["val"] = torch.empty(shift.shape, dtype=W.dtype, device="meta")
        args = list(layer.args) + [None] * (spec[2] + 1 - len(layer.args))
        args[spec[2]] = new_b
        layer.args = tuple(args)
    else:
        return False
    for u in list(bn.users) if tuple_out else [bn]:
        u.replace_all_uses_with(x)
        gm.graph.erase_node(u)
    if tuple_out:
        gm.graph.erase_node(bn)
    return True


def fold_batch_norms(gm: fx.GraphModule) -> int:
    """Fold every eval batch norm that follows a linear or conv layer into it; returns how many.

    Norms after anything else (a residual add, an activation) stay as they are."""
    done = 0
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BATCH_NORMS]:
        done += _fold_one(gm, bn)
    if done:
        unused = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
        for n in unused:
            gm.graph.erase_node(n)
        still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for fqn in {n.target for n in unused} - still:   # the norms' own parameters and statistics
            owner, _, name = fqn.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if hasattr(mod, name) and isinstance(getattr(mod, name), torch.Tensor):
                delattr(mod, name)
        gm.graph.lint()
        gm.recompile()
    return done
