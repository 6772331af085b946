"""The rewrite, checked: run the passes, hold the result against the zeroing oracle, and find the
groups a model cannot have pruned.

* :func:`rewrite` runs :data:`amgfx.passes.PIPELINE` on a copy of the captured graph.
* :func:`checked` rewrites and runs the oracle on the example inputs; when the result is wrong or
  a pass cannot rewrite it, it finds the groups whose removal breaks it (by halving the plan) and
  raises :class:`~amgfx.errors.RewriteError` naming them. ``amgfx.apply``/``prune`` call it, so a
  wrong model is never returned.
* :func:`probe` asks the same question of every group before any plan exists: one removal per
  group (different indices in different heads), all at once, and on failure halving until each
  group that breaks alone is found. Those groups are taken out of the coupling graph with their
  reason, so the rest of the model still prunes (``amgfx.analyze`` runs it).

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))      # probed: nothing refused here
    >>> cg.refused
    {}
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ..errors import RewriteError
from ..graph.fx import copy_module, on_meta
from ..graph.meta import EXACT, PLAN, VERIFIED
from .oracle import check
from .pipeline import PassOrderError
from ..planning.plan import Plan

__all__ = ["rewrite", "checked", "probe"]


def rewrite(cg, plan: Plan) -> fx.GraphModule:
    """Run the passes; unpruned weights stay shared with ``cg.gm`` (the compile backend wants that)."""
    from . import PIPELINE, run          # the package builds PIPELINE from every pass: at the top, a circle
    resolved = plan.resolve(cg)
    out = run(copy_module(cg.gm), resolved, PIPELINE)
    out.eval()                                   # captured in eval mode; the flag follows
    out.meta[PLAN] = plan
    out.meta[EXACT] = resolved.exact
    return out


def _attempt(cg, plan: Plan, tol: float):
    """(pruned model or None, why it failed or None, the exception if one was raised)."""
    try:
        pruned = rewrite(cg, plan)
    except PassOrderError:
        raise                          # amgfx's pipeline is wrong, whatever the plan: no group to blame
    except RewriteError as e:          # a pass that failed or broke its contract on this plan: halved to a group          # a plan that does not fit (PlanError) is the caller's to see
        return None, str(e).splitlines()[0], e
    rep = check(cg, plan, pruned, tol)
    pruned.meta[VERIFIED] = rep
    if rep.passed or (not rep.exact and not rep.problems):     # residual channels: approximate by nature
        return pruned, None, None
    return None, f"the rewrite differs from the zeroing oracle ({rep.status})", None


def _culprits(cg, plan: Plan, names: list, tol: float) -> dict:
    """The groups of ``names`` whose removal (as ``plan`` has it) breaks the rewrite: name -> why."""
    sub = Plan(keep={n: plan.keep[n] for n in names}, units={n: plan.units[n] for n in names if n in plan.units},
               tokens={}, options=dict(plan.options), model=dict(plan.model))
    _, why, _ = _attempt(cg, sub, tol)
    if why is None:
        return {}
    if len(names) == 1:
        return {names[0]: why}
    half = len(names) // 2
    found = {**_culprits(cg, plan, names[:half], tol), **_culprits(cg, plan, names[half:], tol)}
    return found or {n: f"{why} (together with the other groups listed)" for n in names}


def checked(cg, plan: Plan, tol: float = 1e-5) -> fx.GraphModule:
    """:func:`rewrite`, then the oracle; a wrong or failed rewrite raises, naming the groups."""
    plan.resolve(cg)                             # a plan that does not fit the model fails here, as itself
    if on_meta(cg.gm):
        raise RewriteError("the model's weights are on the meta device, so the oracle has nothing to run; rewrite "
                           "with check=False (amgfx.apply) and verify once real weights are loaded")
    pruned, why, exc = _attempt(cg, plan, tol)
    if why is None:
        return pruned
    bad = _culprits(cg, plan, sorted(plan.keep), tol) if plan.keep else {}
    names = ", ".join(sorted(bad)) or "(the token plan)"
    raise RewriteError(f"pruning {names} breaks the model: {why}. Leave these groups out of the plan "
                       "(or report the model: amgfx should have refused them)") from (exc.__cause__ or exc if exc else None)


def _probe_plan(cg, groups) -> Plan:
    """One removal per group: unit h of head h (distinct indices per head), one head, one neuron."""
    keep, units = {}, {}
    for g in groups:
        if g.kind in ("qk", "v"):
            heads = np.unique(g.heads)
            per = [np.nonzero(g.heads == h)[0] for h in heads]
            if len(per[0]) < 2:
                continue
            drop = {int(u[i % len(u)]) for i, u in enumerate(per)}
        else:
            if g.units < 2:
                continue
            drop = {g.units - 1}
        keep[g.name] = [u for u in range(g.units) if u not in drop]
        units[g.name] = g.units
    return Plan(keep=keep, units=units)


def probe(cg, tol: float = 1e-5) -> dict:
    """Find the groups of ``cg`` that cannot be pruned, and take them out (see the module docstring).

    Returns ``{group name: reason}`` (also kept in ``cg.refused``). Skipped for a graph whose
    parameters live on the meta device (nothing can run).
    """
    if on_meta(cg.gm):
        return cg.refused
    plan = _probe_plan(cg, cg.groups)
    if not plan.keep:
        return cg.refused
    _, why, _ = _attempt(cg, plan, tol)
    if why is not None:
        bad = _culprits(cg, plan, sorted(plan.keep), tol)
        cg.refuse(bad)
    return cg.refused
