"""Op tables, declared as data (in the spirit of Inductor's pattern matcher).

Structure discovery reads the ATen graph only through these tables, so a new op that
merely moves data is supported by adding it to one set here, never by new code paths.
Every interpreter over the graph (keep masks, liveness, residual streams, index propagation)
has one rule per set; ``tests/test_extension.py`` checks that none of them misses an op.

SDPA's arguments are read in one place, :func:`sdpa_args`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten
GETITEM = operator.getitem

# Ops that only move, copy or re-view data. Index propagation executes them as they are on
# integer tensors of channel ids, which is what lets us follow a neuron through any reshape.
MOVE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.movedim.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.narrow.default,
    aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.repeat_interleave.self_int,
    aten.repeat.default, aten.index_select.default, aten.index.Tensor, aten.numpy_T.default,
    aten.broadcast_to.default,
}
# Ops that keep every value where it is (casts, copies, eval-mode dropout).
IDENTITY = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
    aten._to_copy.default, aten.type_as.default, aten.dropout.default,
    aten.feature_dropout.default, aten.alpha_dropout.default,
}
# The reshape family: sizes change, element order does not.
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
CONCAT = {aten.cat.default, aten.stack.default}
# ``view`` needs a layout its input may not have when the values are stand-ins (neuron ids, keep
# masks): an expanded or permuted one. The graph had a ``contiguous`` there, which such values
# skip as an identity. What a view means for the values is a reshape, so that is what runs.
_BY_VALUE = {aten.view.default: aten.reshape.default, aten._unsafe_view.default: aten.reshape.default}


def run_move(target, x, *args, **kwargs):
    """Run a :data:`MOVE` op on stand-in values ``x`` (ids or masks): a view runs as a reshape."""
    return _BY_VALUE.get(target, target)(x, *args, **kwargs)
# Element-wise ops that are affine in each operand (scale, bias, mask, rotation).
POINTWISE_AFFINE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.expand_as.default,
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.add_.Tensor, aten.mul_.Tensor, aten.div_.Tensor,
}
# Element-wise non-linearities: what makes "linear -> act -> linear" an MLP.
POINTWISE_NONLINEAR = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.erf.default, aten.exp.default, aten.pow.Tensor_Scalar,
    aten.softplus.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.relu6.default,
    aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.square.default,
    aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default, aten.log.default, aten.abs.default,
    aten.sin.default, aten.cos.default, aten.pow.Tensor_Tensor,
    aten.maximum.default, aten.minimum.default, aten.max.other, aten.min.other,
}


def _in_place(ops) -> set:
    """The in-place twins of ``ops`` (``relu_`` of ``relu``), which export keeps where a model writes them."""
    out = set()
    for op in ops:
        packet = getattr(aten, op._schema.name.split("::")[-1] + "_", None)
        twin = getattr(packet, op._overloadname, None) if packet is not None else None
        if twin is not None:
            out.add(twin)
    return out


POINTWISE_NONLINEAR |= _in_place(POINTWISE_NONLINEAR)
IDENTITY |= _in_place(IDENTITY)                  # eval dropout_ (nn.Dropout(inplace=True)) is still nothing
POINTWISE = POINTWISE_AFFINE | POINTWISE_NONLINEAR
# Norms over the trailing dims with an optional affine weight/bias: (input, weight, bias) arg positions.
NORMS = {
    aten.layer_norm.default: (0, 2, 3),
    aten.rms_norm.default: (0, 2, None),
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
# Reductions over dims, and whether the result averages (so it changes when the reduced dim shrinks).
REDUCTIONS = {aten.mean.dim: True, aten.sum.dim_IntList: False, aten.amax.default: False, aten.amin.default: False,
              aten.var.correction: True, aten.std.correction: True}
# Ops that make a new tensor shaped like their input (no values flow).
LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
        aten.rand_like.default, aten.randn_like.default}
PAD = {aten.pad.default, aten.constant_pad_nd.default}
# Vector norms (F.normalize): (input, ord, dims, keepdim), a reduction with its dims at position 2.
VECTOR_NORMS = {aten.linalg_vector_norm.default}


def reduced_dims(n) -> tuple[list, bool]:
    """(reduced dims, normalised to >= 0; keepdim) of a reduction node (REDUCTIONS or VECTOR_NORMS)."""
    rank = len(n.args[0].meta["val"].shape)
    at = 2 if n.target in VECTOR_NORMS else 1
    dims = n.args[at] if len(n.args) > at and n.args[at] is not None else n.kwargs.get("dim", None)
    dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    keep = n.args[at + 1] if len(n.args) > at + 1 else n.kwargs.get("keepdim", False)
    return sorted(d % rank for d in dims), bool(keep)
MATMUL = {aten.matmul.default, aten.bmm.default}
# Products with an added term, ``beta * input + alpha * (a @ b)``: (input, a, b) arg positions.
# BLOOM writes its attention logits as ``alibi.baddbmm(q, k^T, alpha=1/sqrt(d))``.
ADD_MATMUL = {aten.baddbmm.default: (0, 1, 2)}


def add_matmul_args(n) -> tuple:
    """(input, a, b, beta, alpha) of an :data:`ADD_MATMUL` node."""
    i, a, b = ADD_MATMUL[n.target]
    beta = n.args[3] if len(n.args) > 3 else n.kwargs.get("beta", 1)
    alpha = n.args[4] if len(n.args) > 4 else n.kwargs.get("alpha", 1)
    return n.args[i], n.args[a], n.args[b], beta, alpha
# Writes of new entries into a state tensor that the graph takes as an input and returns (a KV cache):
# (state, dim, source) arg positions. Along every other dim the state holds what the source holds, so a
# cache's head and head-dim axes carry the k/v projections' neurons and shrink with them.
STATE_WRITE = {aten.index_copy.default: (0, 1, 3)}


def state_write_args(n) -> tuple:
    """(state, dim, source) of a :data:`STATE_WRITE` node, dim normalised to >= 0."""
    s, d, src = STATE_WRITE[n.target]
    dim = n.args[d]
    return n.args[s], dim % len(n.meta["val"].shape), n.args[src]


# Ops that move data without computing: a neuron keeps its identity through them.
DATA_MOVEMENT = MOVE | IDENTITY | CONCAT | set(STATE_WRITE) | {GETITEM}
# Ops a neuron can be followed through: data movement plus element-wise maths.
TRANSPARENT = DATA_MOVEMENT | POINTWISE
# Side-effect-only nodes that read a tensor but produce nothing a pass must care about.
IGNORED_USERS = {aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}

# Parameterised layers, with where their activation input and weight sit, and which weight
# dim is the output (row) dim and which the input (column) dim.
#   op: (input_arg, weight_arg, bias_arg, weight_out_dim, weight_in_dim)
LAYERS = {
    aten.linear.default: (0, 1, 2, 0, 1),
    aten.addmm.default: (1, 2, 0, 1, 0),        # GPT-2 Conv1D: bias + x @ W, W is [in, out]
    aten.mm.default: (0, 1, None, 1, 0),
    aten.matmul.default: (0, 1, None, 1, 0),    # only when the weight is a parameter
    aten.conv2d.default: (0, 1, 2, 0, 1),
    aten.conv1d.default: (0, 1, 2, 0, 1),
    aten.embedding.default: (1, 0, None, 1, None),
}
# The subset whose output channel is a plain linear function of the input channel vector.
LINEAR_LAYERS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}

# Grouped matmuls over stacked expert weights (MoE): ``x [tokens, in] @ W[e] [in, out]`` for the experts'
# token ranges, W ``[E, in, out]``. Per token a linear layer whose output channel j is the same
# channel of every expert, so expert MLPs prune as one MLP whose neuron j spans all experts.
#   (namespace, op name): LAYERS spec
# (aten._grouped_mm is not listed yet: on CPU it needs 16-byte strides, which pruned widths need not keep)
GROUPED_LAYERS = {("transformers", "grouped_mm_fallback"): (0, 1, None, 2, 1)}


GROUPED: set = set()                 # the GROUPED_LAYERS ops registered so far (register_library_layers)


def register_library_layers() -> None:
    """Add the :data:`GROUPED_LAYERS` ops that are registered now (a library defines them on import) to
    LAYERS and LINEAR_LAYERS; capture calls this, so a model's own op is known when its graph is read."""
    for (ns, name), spec in GROUPED_LAYERS.items():
        try:
            op = getattr(getattr(torch.ops, ns), name).default
        except (AttributeError, RuntimeError):
            continue
        LAYERS.setdefault(op, spec)
        LINEAR_LAYERS.add(op)
        GROUPED.add(op)
CONVS = {aten.conv1d.default, aten.conv2d.default}
# conv args after (input, weight, bias): stride, padding, dilation, groups
CONV_GROUPS = 6


def _conv_weight_shape(n):
    w = n.args[1]
    v = w.meta.get("val") if isinstance(w, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def conv_groups(n) -> int:
    return int(n.args[CONV_GROUPS]) if len(n.args) > CONV_GROUPS else int(n.kwargs.get("groups", 1))


def is_pointwise_conv(n) -> bool:
    """A 1x1 conv (stride 1, no padding, one group): a linear layer over the channel dim (dim 1)."""
    if n.op != "call_function" or n.target not in CONVS or conv_groups(n) != 1:
        return False
    w = _conv_weight_shape(n)
    flat = lambda a, one: all(x == one for x in (a if isinstance(a, (list, tuple)) else [a]))
    args = list(n.args) + [None] * 7
    return w is not None and all(k == 1 for k in w[2:]) and flat(args[3] or 1, 1) and flat(args[4] or 0, 0)


def is_depthwise_conv(n) -> bool:
    """A conv with one group per channel: channel *c* of the output reads channel *c* of the input only
    (PVT-v2's and FastViT's MLPs mix positions with one between fc1 and fc2)."""
    if n.op != "call_function" or n.target not in CONVS:
        return False
    w = _conv_weight_shape(n)
    return w is not None and w[1] == 1 and conv_groups(n) == w[0] > 1


def channel_dim(n) -> int:
    """The dim of a layer's output that indexes its output channels (units)."""
    return 1 if n.target in CONVS else -1


def where(n) -> str:
    """``at node <name> (<op>)``: how errors say where in the graph they happened."""
    return f"at node {n.name} ({opname(n.target)})"


def opname(target) -> str:
    """A short, readable name for an op target (`aten.linear`, `getitem`)."""
    if target is GETITEM:
        return "getitem"
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    return name.replace("::", ".").split(".default")[0]


# ------------------------------------------------------------------------------------------------
# fused attention: SDPA, and ops like it
# ------------------------------------------------------------------------------------------------
SDPA_ARGS = ("q", "k", "v", "mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class SdpaArgs:
    """The arguments of one fused attention call, by name, whatever way it was written."""
    q: object
    k: object
    v: object
    mask: object = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False


# op -> {our name: the op's argument name}: ops that compute softmax(scale q k^T + mask) v themselves.
FUSED_ATTENTION = {aten.scaled_dot_product_attention.default: {
    "q": "query", "k": "key", "v": "value", "mask": "attn_mask", "dropout_p": "dropout_p", "is_causal": "is_causal",
    "scale": "scale", "enable_gqa": "enable_gqa"}}
SDPA = FUSED_ATTENTION            # membership tests read the registry, so a registered op counts too


def register_fused_attention(op, **names) -> None:
    """Make ``op`` known as fused attention (SDPA-like): ``names`` maps q, k, v (and mask, scale,
    is_causal, enable_gqa, dropout_p where it has them) to its argument names. Every interpreter then
    treats it as SDPA: masks, liveness, calibration, the passes and structure discovery.

    Example:
        >>> register_fused_attention(aten.scaled_dot_product_attention.default, q="query", k="key", v="value",
        ...                          mask="attn_mask", dropout_p="dropout_p", is_causal="is_causal", scale="scale",
        ...                          enable_gqa="enable_gqa")
    """
    unknown = set(names) - set(SDPA_ARGS)
    if unknown or not {"q", "k", "v"} <= set(names):
        raise ValueError(f"names must map q, k, v (and optionally {', '.join(SDPA_ARGS[3:])}); got {sorted(names)}")
    FUSED_ATTENTION[op] = dict(names)


def _schema_names(op) -> list[str]:
    return [a.name for a in op._schema.arguments]


def sdpa_args(node_or_args, kwargs: dict | None = None, *, op=None) -> SdpaArgs:
    """Read a fused attention call's arguments: from an FX node, or from ``(args, kwargs)`` of ``op`` at run time.

    Example:
        >>> g = fx.Graph(); q = g.placeholder("q")
        >>> n = g.call_function(aten.scaled_dot_product_attention.default, (q, q, q, None, 0.0, True), {"scale": .5})
        >>> a = sdpa_args(n); a.is_causal, a.scale, a.mask
        (True, 0.5, None)
    """
    if isinstance(node_or_args, fx.Node):
        op, args, kwargs = node_or_args.target, node_or_args.args, node_or_args.kwargs
    else:
        args, kwargs = node_or_args, kwargs or {}
    ours = {theirs: mine for mine, theirs in FUSED_ATTENTION[op].items()}
    got = {}
    for name, a in list(zip(_schema_names(op), args)) + list(kwargs.items()):
        if name in ours:
            got[ours[name]] = a
    return SdpaArgs(**got)


def set_sdpa_arg(node: fx.Node, name: str, value) -> None:
    """Set one argument of a fused attention node (``"mask"``, ``"scale"``, ...) where it sits, else as a keyword."""
    theirs = FUSED_ATTENTION[node.target][name]
    pos = _schema_names(node.target).index(theirs)
    if pos < len(node.args):
        node.update_arg(pos, value)
    else:
        node.update_kwarg(theirs, value)


# Nodes that do nothing at run time (:mod:`amgfx.passes.drop_noops` removes them).
ASSERTS = {aten._assert_tensor_metadata.default}
# Casts that return their input when nothing changes (``copy`` defaults to False); ``_to_copy`` always copies.
CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.alias.default}


def is_noop(n: fx.Node) -> bool:
    """Whether ``n`` is an assert or a cast that changes nothing about its input."""
    if n.op != "call_function":
        return False
    if n.target in ASSERTS:
        return True
    if n.target not in CASTS or not isinstance(n.args[0], fx.Node) or n.kwargs.get("copy", False):
        return False
    if n.target is aten.to.dtype and len(n.args) > 3 and n.args[3]:            # to(x, dtype, non_blocking, copy)
        return False
    if n.target is aten.to.device and len(n.args) > 4 and n.args[4]:           # to(x, device, dtype, nb, copy)
        return False
    if n.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    a, b = n.args[0].meta.get("val"), n.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.layout == b.layout)
