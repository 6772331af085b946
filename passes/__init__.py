"""Rewrite passes, one per file. Each is ``(GraphModule, plan) -> GraphModule``.

``plan`` is a :class:`amgfx.plan.Resolved` (from ``Plan.resolve``): plain data saying which
indices every parameter keeps and which attention sites change. Passes never score and
never look at the original ``nn.Module`` classes; they read and edit the graph only.
"""
from .cleanup import cleanup
from .dead_tokens import dead_tokens
from .fix_shapes import fix_shapes
from .lower_attention import lower_attention
from .shrink_params import shrink_params
from .softmax_scale import softmax_scale
from .split_qkv import split_qkv
from .token_gather import token_gather

PIPELINE = [split_qkv, token_gather, dead_tokens, shrink_params, fix_shapes, softmax_scale, lower_attention, cleanup]

__all__ = ["PIPELINE", "cleanup", "dead_tokens", "fix_shapes", "lower_attention", "shrink_params", "softmax_scale", "split_qkv", "token_gather"]
