"""Stage 4, the plan: which units every group keeps, as plain JSON data; the FLOPs cost model
that predicts a plan without rewriting; budgets that turn scores into a plan.
May import: :mod:`amgfx.graph`, :mod:`amgfx.analysis` (scores arrive as plain arrays).
"""
