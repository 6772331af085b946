"""``allocation="error"``: each layer's share of a FLOPs budget from its measured error after refit.

The ranking walk (:func:`amgfx.planning.budget.allocate`) spends the budget in score order, so how much a
layer gives up follows from scores alone. LLM pruning found that layers differ in how fast their *output
error* grows as they lose units (OWL sets per-layer sparsity from outlier ratios, BESA learns it per block);
after a least-squares refit (:mod:`amgfx.weights.refit`) they differ again, since some layers' losses refit
away and others' do not. Here that is measured rather than modelled:

1. the calibration batches are split (the last quarter, at least one, held out); the groups are scored on
   the rest and the ranking walk gives the plan ``P0``;
2. each layer (the groups of one attention site, or one MLP) is pruned alone as ``P0`` prunes it, refitted,
   and its output error against the dense model measured on the held-out batches
   (:func:`amgfx.auto.heldout_error`); over the FLOPs it gives up, that is its *error per FLOP*;
3. every step of a layer's groups has its importance multiplied by (its error per FLOP over the geometric
   mean of all layers') ``** ALPHA``, clipped to ``[1/CLIP, CLIP]``, and the budget is walked again (``P1``);
4. ``P0`` and ``P1`` are refitted and measured on the held-out batches; the lower error is kept (``P0`` kept:
   the ranking walk's plan scored on every batch, exactly what ``allocation="ranking"`` returns).

``plan.meta["allocation"]`` records each layer's error and weight and both plans' errors. Cost: one
rewrite and refit per layer, plus two (and one more scoring where the ranking is kept).

Example:
    >>> import torch, timm, amgfx
    >>> _ = torch.manual_seed(0)
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    >>> plan = amgfx.plan_for(m, calib[0], method="magnitude", target_flops=0.4, calib=calib,
    ...                       allocation="error", progress=False)
    >>> a = plan.meta["allocation"]
    >>> sorted(a["layers"]), a["errors"][a["chosen"]] == min(a["errors"].values())   # what the ranking pruned
    (['blocks.0.attn', 'blocks.0.mlp'], True)
"""
from __future__ import annotations

import math
import sys
import warnings

from .auto import heldout_error
from .passes.rewrite import rewrite
from .planning.cost import predict
from .planning.plan import Plan
from .weights.config import RefitConfig
from .weights.refit import refit

__all__ = ["ALPHA", "CLIP", "by_error", "layer_weights"]

ALPHA = 0.5      # weight = (error per FLOP / geometric mean) ** ALPHA; 0.5 did better than 1.0 on MiniLM (benchmarks.allocation)
CLIP = 4.0       # no layer's steps weigh more than 4x, or less than a quarter, of what its scores say


def _only(plan: Plan, names: set) -> Plan:
    """``plan`` with only the groups ``names`` pruned."""
    return Plan(keep={k: v for k, v in plan.keep.items() if k in names},
                units={k: v for k, v in plan.units.items() if k in names},
                options=dict(plan.options), meta={}, model=dict(plan.model))


def _error(cg, plan: Plan, fit, held) -> float:
    return heldout_error(cg.gm, refit(rewrite(cg, plan), cg, fit, RefitConfig(), progress=False), held)


def layer_weights(cg, plan: Plan, fit, held, *, progress: bool = False) -> dict:
    """``{layer: {"groups", "error", "flops", "weight"}}``: every layer ``plan`` prunes, pruned alone and
    refitted, its held-out error, the FLOPs it gives up and the weight of its steps (module docstring)."""
    groups = {g.name: g for g in cg.groups}
    layers: dict = {}
    for name in plan.keep:
        layers.setdefault(groups[name].where, set()).add(name)
    none = predict(cg, _only(plan, set()))["flops"]       # the graph's own row edits (dead tokens) save FLOPs too
    out = {}
    for where, names in sorted(layers.items()):
        alone = _only(plan, names)
        saved = (none["pruned"] - predict(cg, alone)["flops"]["pruned"]) / none["dense"]
        err = _error(cg, alone, fit, held)
        out[where] = {"groups": sorted(names), "error": err, "flops": saved}
        if progress:
            print(f"allocation: {where}: held-out error {err:.4f} alone, {saved:.3f} of the FLOPs",
                  file=sys.stderr, flush=True)
    per = {w: max(v["error"], 1e-12) / max(v["flops"], 1e-12) for w, v in out.items()}
    mean = math.exp(sum(math.log(x) for x in per.values()) / len(per)) if per else 1.0
    for w, v in out.items():
        v["weight"] = min(CLIP, max(1.0 / CLIP, (per[w] / mean) ** ALPHA))
    return out


def by_error(cg, calib, scored, spend, *, progress: bool = False) -> Plan:
    """The plan of ``allocation="error"`` (module docstring): ``scored(batches)`` scores the groups,
    ``spend(scores, weights)`` walks the budget with per-group weights (None: as scored)."""
    batches = list(calib) if calib is not None else []
    if len(batches) < 2:                   # nothing to hold out: the ranking walk, said so
        warnings.warn("allocation='error' needs at least 2 calibration batches to hold one out; "
                      "walking the score ranking instead", stacklevel=4)
        plan = spend(scored(batches or None), None)
        plan.meta["allocation"] = {"chosen": "ranking", "why": f"{len(batches)} calibration batch(es)"}
        return plan
    n_held = max(1, len(batches) // 4)
    fit, held = batches[:-n_held], batches[-n_held:]
    s = scored(fit)
    ranking = spend(s, None)
    layers = layer_weights(cg, ranking, fit, held, progress=progress)
    weights = {g: v["weight"] for v in layers.values() for g in v["groups"]}
    by_err = spend(s, weights)
    errors = {"ranking": _error(cg, ranking, fit, held), "error": _error(cg, by_err, fit, held)}
    chosen = "error" if errors["error"] < errors["ranking"] else "ranking"
    # the ranking kept: its plan from every batch, as allocation="ranking" makes it (the held-out ones only judged)
    plan = by_err if chosen == "error" else spend(scored(batches), None)
    plan.meta["allocation"] = {
        "chosen": chosen, "errors": {k: round(v, 6) for k, v in errors.items()},
        "layers": {w: {"error": round(v["error"], 6), "flops": round(v["flops"], 6), "weight": round(v["weight"], 4)}
                   for w, v in layers.items()},
        "heldout_batches": len(held), "fit_batches": len(fit), "alpha": ALPHA, "clip": CLIP}
    if progress:
        print(f"allocation: held-out error after refit, ranking {errors['ranking']:.4f}, by layer error "
              f"{errors['error']:.4f}: kept {chosen}", file=sys.stderr, flush=True)
    return plan
