"""The refit step of the prune sequence: the pruned model's kept weights fitted to the dense model.

:func:`refit` is what :func:`amgfx.reconstruct` runs once it has the dense model's coupling graph: the
optional q/k logit rescale (:mod:`.qk`, which rewrites the plan again from rescaled dense weights), then the
layer-wise least squares of :mod:`.reconstruct` on a model whose every token is computed (dead-token
elimination off, the weights the same), the fitted tensors copied into the pruned graph.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> cg = amgfx.analyze(m, x)
    >>> small = amgfx.apply(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))}))
    >>> fit = refit(small, cg, [torch.randn(8, 3, 32, 32)], RefitConfig(), progress=False)
    >>> [layer["weight"] for layer in fit.meta["amgfx_reconstruction"]["layers"]]
    ['blocks.0.mlp.fc2.weight']
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..analysis.coupling import GroupId
from ..errors import AmgfxError, InternalError, foreign_errors
from ..graph.fx import copy_module, get_attr, has_attr, replace_attr, unshare
from ..graph.meta import PLAN, RECONSTRUCTION
from ..passes.oracle import zeroed
from ..passes.rewrite import rewrite
from ..planning.plan import Plan
from .config import RefitConfig
from .qk import qk_scales, scale_rows
from .reconstruct import attach_bias, out_dim, refit_layers

__all__ = ["refit"]


def _qk_source(cg, plan: Plan, calib, on: bool):
    """(coupling graph to rewrite from, q/k scales): the dense weights with q rows rescaled per head whose
    q/k pairs shrink (``on``), else ``cg`` itself and no scales."""
    by_name = {g.name: g for g in cg.groups}
    sites = [s for s in cg.sites if GroupId("qk", s.name) in plan.keep and GroupId("qk", s.name) in by_name] if on else []
    scales = qk_scales(cg.gm, zeroed(cg, plan), sites, calib) if sites else {}
    if not scales:
        return cg, scales
    src = copy.copy(cg)
    src.gm = copy_module(cg.gm)
    for site, f in scales.items():
        scale_rows(src.gm, by_name[GroupId("qk", site)], f)
    return src, scales


def _with_fitted(cg, fitted: fx.GraphModule, fits, params: dict):
    """``cg`` whose dense weights carry ``fits``' fitted values at the kept indices (``params``: FQN -> {dim:
    kept}): rewritten by the plan, it gives those layers in whatever form the rewrite splits them into."""
    src = copy.copy(cg)
    src.gm = copy_module(cg.gm)
    for f in fits:
        if f.bias and not has_attr(src.gm, f.bias):      # the fit added a bias: the dense layer reads a zero one
            attach_bias(src.gm, f.weight, f.bias)
        keep = params.get(f.weight, {})
        _put(src.gm, f.weight, keep, fitted)
        if f.bias:                                       # a bias keeps its layer's output rows
            rows = keep.get(out_dim(src.gm, f.weight))
            _put(src.gm, f.bias, params.get(f.bias) or ({0: rows} if rows is not None else {}), fitted)
    return src


def _put(gm: fx.GraphModule, fqn: str, keep: dict, fitted: fx.GraphModule) -> None:
    """Write ``fitted``'s ``fqn`` into ``gm``'s at the kept indices (``keep``: {dim: kept}; other dims whole)."""
    old = get_attr(gm, fqn)
    along = lambda d: [-1 if e == d else 1 for e in range(old.dim())]
    at = tuple(torch.as_tensor(keep.get(d, range(n))).reshape(along(d)) for d, n in enumerate(old.shape))
    full = old.detach().clone()
    full[at] = get_attr(fitted, fqn).detach().to(full.dtype)
    replace_attr(gm, fqn, full, old)


def refit(pruned: fx.GraphModule, cg, calib, config: RefitConfig, *, progress: bool = True,
          pruned_calib=None) -> fx.GraphModule:
    """``pruned`` (rewritten from ``cg`` by the plan in its meta) with its kept weights refitted on ``calib``;
    a new GraphModule whose ``meta["amgfx_reconstruction"]`` lists every layer fitted. ``pruned_calib``: what
    the pruned model reads instead of ``calib``, item by item (see :func:`refit_layers`)."""
    plan = pruned.meta.get(PLAN)
    if plan is None:
        raise AmgfxError("reconstruct() needs a model pruned by amgfx (its plan is in meta['amgfx_plan'])")
    with foreign_errors(InternalError, "reconstruction"):
        src, scales = _qk_source(cg, plan, calib, config.qk)
        resolved = plan.resolve(cg)
        fit_plan = plan
        if resolved.dead:                        # fit where every token is computed; the weights are the same
            fit_plan = Plan.from_dict({**plan.to_dict(), "options": {**plan.options, "dead_tokens": "off"}})
        out = rewrite(src, plan) if scales else copy_module(pruned)
        fit_model = rewrite(src, fit_plan) if resolved.dead else out
        fits = refit_layers(fit_model, cg.gm, resolved.params, calib, damp=config.damp, sequential=config.sequential,
                            residual=config.residual, add_bias=config.add_bias, progress=progress,
                            pruned_calib=pruned_calib)
        if fit_model is not out:
            apart = [f for f in fits if not has_attr(out, f.weight)]
            if apart:      # dead tokens split a layer the fit kept whole: rewrite again from the fitted rows
                out = rewrite(_with_fitted(src, fit_model, apart, resolved.params), plan)
            for f in fits:
                if f in apart:
                    continue
                if f.bias and not has_attr(out, f.bias):     # a bias the fit added: the same edit here
                    attach_bias(out, f.weight, f.bias)
                for fqn in (f.weight, *([f.bias] if f.bias else [])):
                    replace_attr(out, fqn, get_attr(fit_model, fqn).detach(), get_attr(out, fqn))
    unshare(out, cg.gm)
    out.meta = {**out.meta, RECONSTRUCTION: {
        "layers": [f.to_dict() for f in fits], "qk_scales": {k: [round(float(x), 6) for x in v] for k, v in scales.items()},
        "samples": max((f.samples for f in fits), default=0), "damp": config.damp, "sequential": config.sequential,
        "residual": config.residual}}
    return out
