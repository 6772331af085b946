"""The user-facing verbs: ``plan_for`` (decide), ``apply`` (rewrite), ``prune`` (both)."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from passes._graph import copy_module, replace_attr

from .analyze import analyze
from .coupling import CouplingGraph
from .criteria import CRITERIA
from .errors import AmgfxError
from .plan import Plan, fingerprint

__all__ = ["plan_for", "apply", "prune", "DEFAULT_RATIOS"]

DEFAULT_RATIOS = {"qk": 0.25, "v": 0.25, "head": 0.0, "mlp": 0.5, "residual": 0.0}


def _coupling(model_or_gm, example_inputs, example_kwargs) -> CouplingGraph:
    if isinstance(model_or_gm, CouplingGraph):
        return model_or_gm
    return analyze(model_or_gm, example_inputs, example_kwargs)


def select(cg: CouplingGraph, scores: dict, ratios: dict) -> Plan:
    """Keep the best-scored units of every group, removing ``ratios[kind]`` of each.

    Counts are rounded per head for ``qk``/``v`` so every head keeps the same number, and at
    least one unit (one per head) always stays.
    """
    unknown = set(ratios) - {"qk", "v", "head", "mlp", "residual"}
    if unknown:
        raise AmgfxError(f"unknown kind(s) {sorted(unknown)} in ratios; use qk, v, head, mlp, residual")
    plan = Plan(meta={"ratios": dict(ratios)}, model={"fingerprint": fingerprint(cg.gm)})
    for g in cg.groups:
        r = float(ratios.get(g.kind, 0.0))
        if not 0.0 <= r < 1.0:
            raise AmgfxError(f"ratio for {g.kind!r} must be in [0, 1), got {r}")
        if r == 0.0:
            continue
        s = np.asarray(scores[g.name])
        if g.kind in ("qk", "v"):
            keep = []
            for h in np.unique(g.heads):
                units = np.nonzero(g.heads == h)[0]
                n = len(units) - min(int(round(r * len(units))), len(units) - 1)
                keep += units[np.argsort(-s[units], kind="stable")[:n]].tolist()
        else:
            n = g.units - min(int(round(r * g.units)), g.units - 1)
            keep = np.argsort(-s, kind="stable")[:n].tolist()
        if len(keep) < g.units:
            plan.keep[g.name] = sorted(int(i) for i in keep)
            plan.units[g.name] = g.units
    return plan


def plan_for(model_or_gm, example_inputs=None, example_kwargs=None, *, method: str = "magnitude",
             ratios: dict | None = None, seed: int = 0) -> Plan:
    """Score every coupling group with ``method`` and return the Plan, without applying it.

    ``model_or_gm`` may be an nn.Module (captured with ``example_inputs``), a captured
    GraphModule or a :class:`amgfx.CouplingGraph`.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> plan = amgfx.plan_for(m, torch.randn(1, 3, 32, 32), ratios={"mlp": 0.5})
        >>> {k: len(v) for k, v in plan.keep.items()}
        {'mlp:blocks.0.mlp': 384}
    """
    if method not in CRITERIA:
        raise AmgfxError(f"unknown method {method!r}; choose one of {sorted(CRITERIA)}")
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    ratios = DEFAULT_RATIOS if ratios is None else ratios
    crit = CRITERIA[method]
    scores = {g.name: crit(cg, g, seed=seed) for g in cg.groups if ratios.get(g.kind, 0)}
    plan = select(cg, scores, ratios)
    plan.meta.update({"method": method, "seed": seed})
    return plan


def _unshare(out: fx.GraphModule, original: fx.GraphModule) -> None:
    """Clone every tensor still shared with the user's model, so training the result cannot touch it."""
    theirs = {t.data_ptr() for t in list(original.parameters()) + list(original.buffers()) if t.numel()}
    for fqn, t in list(out.named_parameters()) + list(out.named_buffers()):
        if t.numel() and t.data_ptr() in theirs:
            replace_attr(out, fqn, t.detach().clone(), t)


def apply(model_or_gm, plan: Plan, example_inputs=None, example_kwargs=None) -> fx.GraphModule:
    """Rewrite the model into a smaller dense GraphModule that keeps what ``plan`` says.

    The model (or GraphModule) passed in is never modified.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = amgfx.apply(m, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100))}), x)
        >>> tuple(small.get_parameter("blocks.0.mlp.fc1.weight").shape), tuple(small(x).shape)
        ((100, 192), (1, 1000))
    """
    from passes import PIPELINE
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    resolved = plan.resolve(cg)
    out = copy_module(cg.gm)
    for p in PIPELINE:
        out = p(out, resolved)
    _unshare(out, cg.gm)
    out.eval()                                   # captured in eval mode; the flag follows
    out.meta["amgfx_plan"] = plan
    out.meta["amgfx_exact"] = resolved.exact
    return out


def prune(model, example_inputs=None, example_kwargs=None, *, method: str = "magnitude",
          ratios: dict | None = None, seed: int = 0) -> fx.GraphModule:
    """Score, plan and rewrite in one call; the Plan is in ``result.meta["amgfx_plan"]``.

    ``ratios[kind]`` is the fraction of units of that kind removed in every site (rounded
    per head). Kinds: ``qk``, ``v``, ``head``, ``mlp``, ``residual``.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = amgfx.prune(m, x, ratios={"qk": 0.5, "v": 0.25, "mlp": 0.5})
        >>> n = lambda mod: sum(p.numel() for p in mod.parameters())
        >>> round(n(small) / n(m), 2), tuple(small(x).shape)
        (0.67, (1, 1000))
    """
    cg = _coupling(model, example_inputs, example_kwargs)
    plan = plan_for(cg, method=method, ratios=ratios, seed=seed)
    return apply(cg, plan)
