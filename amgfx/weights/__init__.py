"""Stage 6, weights: steps that change the pruned model's weights after the rewrite, never its
graph: reconstruction (layer-wise least squares, ``reconstruct``; the q/k logit rescale, ``qk``)
and recovery by distillation (``recover``).
May import: every earlier stage (graph, analysis, scoring, planning, passes).
"""
