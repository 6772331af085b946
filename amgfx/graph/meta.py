"""The ``meta`` keys amgfx reads and writes, declared once.

On nodes (``node.meta``), shared between the passes and the analyses:

* ``TOKEN_ROWS``: ``(dim, kept rows)`` on a row gather a pass inserted; the keep masks seed there.
* ``DIMS``: per output dim, the symbol's name where capture left it dynamic (the batch), else None.
* ``LOWERED``: on kernel padding ``lower_attention`` inserted; analysis of a pruned graph removes it.
* ``FOLD`` / ``FOLD_NAME``: a weight slice ``cleanup`` folds into a new parameter, and that parameter's name.

On a GraphModule (``gm.meta``):

* ``EXAMPLE``: ``(args, kwargs)`` it was captured at; ``DYNAMIC_BATCH``: whether dim 0 stayed symbolic;
  ``CAPTURED``: made by :func:`amgfx.capture`.
* ``PLAN``, ``EXACT``, ``APPROXIMATE``, ``DEAD_TOKENS``: what a rewrite did (the plan, whether it is
  exact under the zeroing oracle, the ops that now average over fewer channels, dead-token report).
* ``RECONSTRUCTION``: what :func:`amgfx.reconstruct` refitted; ``VERIFIED``: the oracle's report on the
  structural rewrite, when the prune sequence checked it.
* ``STATE``: ``{"inputs": {i: mask}, "outputs": {j: mask}}``, the keep masks of the state tensors (KV
  caches) a pruned graph reads at flat input ``i`` and returns at flat output ``j``, smaller than captured.
"""
TOKEN_ROWS = "amgfx_token_rows"
DIMS = "amgfx_dims"
LOWERED = "amgfx_lowered"
FOLD = "amgfx_fold"
FOLD_NAME = "amgfx_name"

EXAMPLE = "amgfx_example"
DYNAMIC_BATCH = "amgfx_dynamic_batch"
CAPTURED = "amgfx_captured"
PLAN = "amgfx_plan"
EXACT = "amgfx_exact"
APPROXIMATE = "amgfx_approximate"
DEAD_TOKENS = "amgfx_dead_tokens"
STATE = "amgfx_state"
RECONSTRUCTION = "amgfx_reconstruction"
VERIFIED = "amgfx_verified"
