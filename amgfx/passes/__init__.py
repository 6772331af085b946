"""Stage 5, the rewrite stage: the passes (one per file, each ``(GraphModule, plan) -> GraphModule``), their
order (:data:`PIPELINE`), the driver (:mod:`.rewrite`) and the check every rewrite is held to (:mod:`.oracle`).

``plan`` is a :class:`amgfx.planning.plan.Resolved` (from ``Plan.resolve``): plain data saying which
indices every parameter keeps and which attention sites change. Passes never score and never look
at the original ``nn.Module`` classes; they read and edit the graph only. The graph edits the
passes share with the cost model (row gathers, branch removal, keep masks) are in :mod:`amgfx.graph`,
where the planner, an earlier stage, reaches them too.
May import: :mod:`amgfx.graph` and the plan's contract (:mod:`amgfx.planning.plan`).
"""
from .pipeline import PassOrderError, check_order, graph_pass, run
from .cleanup import cleanup
from .dead_tokens import dead_tokens
from .drop_noops import drop_noops
from .fix_shapes import fix_shapes
from .lower_attention import lower_attention
from .remove_branch import remove_branch
from .share_gathers import share_gathers
from .shrink_params import shrink_params
from .softmax_scale import softmax_scale
from .split_qkv import split_qkv
from .token_gather import token_gather

PIPELINE = [remove_branch, split_qkv, token_gather, dead_tokens, shrink_params, fix_shapes, softmax_scale, lower_attention,
            drop_noops, share_gathers, cleanup]
check_order(PIPELINE)

__all__ = ["PIPELINE", "cleanup", "dead_tokens", "drop_noops", "share_gathers", "fix_shapes", "lower_attention", "remove_branch", "shrink_params", "softmax_scale",
           "split_qkv", "token_gather", "graph_pass", "check_order", "run", "PassOrderError"]
