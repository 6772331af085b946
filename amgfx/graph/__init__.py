"""Stage 1, the graph: capture a model into an ATen GraphModule in one canonical form (eval batch norms
folded, ``reshape_as`` spelled out), and the machinery every later stage reads it with (op tables,
index propagation, keep masks, liveness, row surgery, fx helpers).
May import: torch and :mod:`amgfx.errors` only. Knows nothing of plans, scores or model classes.
"""
