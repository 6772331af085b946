"""Stage 6, weights: steps that change the pruned model's weights after the rewrite, never its
graph (recovery by distillation).
May import: every earlier stage (graph, analysis, scoring, planning, passes).
"""
