"""Pictures (matplotlib, no display needed): a plan per layer, one site's scores, one block's coupling.

Every PNG carries the numbers it shows in its ``amgfx`` text chunk (JSON), so what was drawn can
be read back without looking at pixels.
"""
from .coupling import draw_block
from .plan import draw_plan, plan_figure
from .scores import draw_scores

__all__ = ["draw_block", "draw_plan", "plan_figure", "draw_scores"]
