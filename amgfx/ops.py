"""Op tables, declared as data (in the spirit of Inductor's pattern matcher).

Structure discovery reads the ATen graph only through these tables, so a new op that
merely moves data is supported by adding it to one set here, never by new code paths.
"""
import operator

import torch

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
    aten.repeat.default, aten.index_select.default, aten.index.Tensor,
}
# Ops that keep every value where it is (casts, copies, eval-mode dropout).
IDENTITY = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
    aten._to_copy.default, aten.type_as.default, aten.dropout.default,
    aten.feature_dropout.default, aten.alpha_dropout.default,
}
CONCAT = {aten.cat.default, aten.stack.default}
# Element-wise ops that are affine in each operand (scale, bias, mask, rotation).
POINTWISE_AFFINE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.expand_as.default,
}
# Element-wise non-linearities: what makes "linear -> act -> linear" an MLP.
POINTWISE_NONLINEAR = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.erf.default, aten.exp.default, aten.pow.Tensor_Scalar,
    aten.softplus.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.relu6.default,
    aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default, aten.square.default,
}
POINTWISE = POINTWISE_AFFINE | POINTWISE_NONLINEAR
# Norms over the trailing dims with an optional affine weight/bias: (input, weight, bias) arg positions.
NORMS = {
    aten.layer_norm.default: (0, 2, 3),
    aten.rms_norm.default: (0, 2, None),
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SDPA = {aten.scaled_dot_product_attention.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
# Ops that move data without computing: a neuron keeps its identity through them.
DATA_MOVEMENT = MOVE | IDENTITY | CONCAT | {GETITEM}
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


def opname(target) -> str:
    """A short, readable name for an op target (`aten.linear`, `getitem`)."""
    if target is GETITEM:
        return "getitem"
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    return name.replace("::", ".").split(".default")[0]
