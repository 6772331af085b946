"""``rank="per_ms"``: rank removal steps by score per millisecond saved, not by score alone.

The budget (:func:`amgfx.planning.budget.allocate`) walks one ranking of steps by importance: every unit is
taken to cost alike. On hardware they do not: a unit of the last block of a ViT, which computes only the
class token, saves a twentieth of what a unit of an earlier MLP saves; a q/k unit saves its share of the
attention kernel beside two projections' columns. Here each group is cut alone by half its units (its
weakest, as the ladder would), the op-time model (:func:`amgfx.planning.latency.predict_ms`) predicts the
milliseconds that saves, and the group's steps are weighed by how many milliseconds one of its units saves,
against the others: a unit that saves twice the time of the geometric mean counts half as important.

Heads are weighed against heads only: a head step removes a head's every column, and ranked per
millisecond against single neurons, heads would all go first (as weighting by FLOPs saved did; see
:mod:`amgfx.planning.budget`). Weights are clipped to ``[1/CLIP, CLIP]``, so time never overrides scores by
more than that. The op times are this machine's, measured in eager PyTorch (cached on disk); fused runtimes
spend their time differently (``benchmarks/results/per_ms.md`` measures where it pays).

Example:
    >>> import torch, timm, amgfx
    >>> from amgfx.planning.latency import OpTimes
    >>> from amgfx.scoring.criteria import Magnitude
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 64, 64))
    >>> scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind == "mlp"}
    >>> w = time_weights(cg, scores, OpTimes(path=None))
    >>> w["mlp:blocks.1.mlp"] > w["mlp:blocks.0.mlp"]   # the last block computes 1 token of 17: its units save less
    True
"""
from __future__ import annotations

import math

import numpy as np

from .budget import select_ratios
from .latency import OpTimes, predict_ms
from .plan import Plan

__all__ = ["ALPHA", "CLIP", "FRACTION", "unit_ms", "time_weights"]

ALPHA = 1.0       # weight = (mean ms per unit / the group's) ** ALPHA: 1 is score per millisecond as it reads
CLIP = 4.0        # time moves a group's importance by at most 4x either way
FRACTION = 0.5    # each group is cut by half its units to measure what a unit saves (the middle of its ladder)


def unit_ms(cg, scores: dict, times: OpTimes, fraction: float = FRACTION) -> dict:
    """Group name -> predicted milliseconds one removed unit saves (its group cut alone by ``fraction``).

    A group whose cut saves nothing (or that cannot give a unit) maps to 0.0.
    """
    groups = {g.name: g for g in cg.groups}
    base = predict_ms(cg, Plan(keep={}), times)["pruned"]     # the graph's own row edits, in both
    out = {}
    for name, s in scores.items():
        g = groups.get(name)
        if g is None:
            continue
        plan = select_ratios(cg, {name: np.asarray(s)}, {g.kind: fraction})
        removed = g.units - len(plan.keep.get(name, range(g.units)))
        saved = base - predict_ms(cg, plan, times)["pruned"] if removed else 0.0
        out[name] = max(0.0, saved) / removed if removed else 0.0
    return out


def time_weights(cg, scores: dict, times: OpTimes | None = None, *, clip: float = CLIP) -> dict:
    """Group name -> factor on its steps' importance (:func:`~amgfx.planning.budget.allocate`'s ``weights``):
    the geometric mean of its family's milliseconds per unit over its own, to the power :data:`ALPHA`,
    clipped to ``[1/clip, clip]`` (families: ``head`` groups, and every other kind). A unit that saves no
    time weighs ``clip``."""
    times = times if times is not None else OpTimes()
    ms = unit_ms(cg, scores, times)
    kinds = {g.name: g.kind for g in cg.groups}
    weights = {}
    for family in (lambda k: k == "head", lambda k: k != "head"):
        names = [n for n in ms if family(kinds[n])]
        positive = [ms[n] for n in names if ms[n] > 0]
        if not positive:
            continue
        mean = math.exp(sum(math.log(v) for v in positive) / len(positive))
        for n in names:
            w = (mean / ms[n]) ** ALPHA if ms[n] > 0 else clip
            weights[n] = float(min(clip, max(1.0 / clip, w)))
    return weights
