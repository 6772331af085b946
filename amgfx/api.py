"""The user-facing verbs: ``score`` (measure), ``plan_for`` (decide), ``apply`` (rewrite), ``prune`` (all),
``reconstruct`` (refit) and ``verify`` (the zeroing oracle).

The flow runs one way: model -> graph -> coupling groups -> scores -> plan -> passes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .analysis import analyze as _analysis
from .analysis.coupling import CouplingGraph
from .errors import AmgfxError, InternalError, foreign_errors
from .graph.fx import copy_module, get_attr, replace_attr
from .graph.meta import EXAMPLE, PLAN
from .passes.oracle import VerifyReport, check, zeroed
from .passes.rewrite import checked, rewrite, probe as probe_groups
from .planning.budget import allocate, select_tokens
from .planning.options import DEFAULT_KINDS, DEFAULT_RATIOS, KINDS, check_options
from .planning.plan import Plan, fingerprint
from .scoring.calibrate import calibrate
from .scoring.criteria import resolve_method, token_scores
from .weights.qk import qk_scales, scale_rows
from .weights.reconstruct import attach_bias, refit_layers
from .weights.recover import Iterative, iterative_config, recover

__all__ = ["score", "plan_for", "apply", "prune", "reconstruct", "verify", "Scores", "DEFAULT_RATIOS", "DEFAULT_KINDS"]

RECONSTRUCTION = "amgfx_reconstruction"     # gm.meta key: what reconstruct() refitted



def analyze(model_or_gm, example_inputs=None, example_kwargs: dict | None = None, *, probe: bool = True,
            strict: bool = False) -> CouplingGraph:
    """Find attention sites, MLPs and residual streams, link coupled neurons into groups, and (``probe``)
    take out the groups this model cannot have pruned, each with its reason (``cg.refused``).

    ``model_or_gm`` may be an ``nn.Module`` (captured first, with ``example_inputs``) or a
    GraphModule returned by :func:`amgfx.capture`. The model is not modified. The probe rewrites
    the model once with one unit of every group removed and checks it against the zeroing oracle
    (:func:`amgfx.passes.rewrite.probe`); ``probe=False`` skips it.

    Every softmax and fused-attention op ends in a supported site, a refused site or the list of ops
    that are not attention (``cg.structure.accounting``); one that ends in none is warned about, or
    raised as :class:`~amgfx.errors.AnalysisError` with ``strict=True``.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> [(s.name, s.num_heads, s.head_dim_qk) for s in cg.sites]
        [('blocks.0.attn', 3, 64), ('blocks.1.attn', 3, 64)]
        >>> sorted({g.kind for g in cg.groups}), cg.refused
        (['head', 'mlp', 'qk', 'residual', 'v'], {})
    """
    cg = _analysis.analyze(model_or_gm, example_inputs, example_kwargs, strict=strict)
    if probe:
        probe_groups(cg)
    return cg


def _coupling(model_or_gm, example_inputs, example_kwargs) -> CouplingGraph:
    if isinstance(model_or_gm, CouplingGraph):
        return model_or_gm
    return analyze(model_or_gm, example_inputs, example_kwargs)


@dataclass
class Scores:
    """Per-unit scores of every scored group (higher = keep), AMG token scores, and provenance."""
    units: dict = field(default_factory=dict)       # group name -> np.ndarray [units]
    tokens: dict = field(default_factory=dict)      # site name -> np.ndarray [N_k], sums to 1
    criteria: dict = field(default_factory=dict)    # kind -> criterion config (repr)
    samples: int = 0
    extra: dict = field(default_factory=dict)       # group name -> what its criterion explains (AMG: entropy)
    loss_scale: bool = False                        # every criterion used scores in units of loss (taylor)


def score(cg: CouplingGraph, method="snp", calib=None, *, kinds=DEFAULT_KINDS, loss_fn=None, seed: int = 0,
          progress: bool = True) -> Scores:
    """Score every group of ``kinds`` with ``method`` (calibrating on ``calib`` when it needs data).

    ``kinds`` may include ``"tokens"`` for AMG's key-position scores. Without ``calib``, a
    data-driven method calibrates on the example inputs alone, with a warning.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> s = amgfx.score(cg, "snp+amg", [torch.randn(4, 3, 32, 32)], progress=False)
        >>> sorted(s.units), s.criteria["head"]
        (['head:blocks.0.attn', 'mlp:blocks.0.mlp', 'qk:blocks.0.attn', 'v:blocks.0.attn'], 'AMG(depth_factor=0.02)')
    """
    by_kind = resolve_method(method)
    unknown = set(kinds) - set(KINDS) - {"tokens"}
    if unknown:
        raise AmgfxError(f"unknown kind(s) {sorted(unknown)}; use {', '.join(KINDS)} or tokens")
    if "tokens" in kinds:
        by_kind.setdefault("tokens", resolve_method("amg")["head"])
    groups = [g for g in cg.groups if g.kind in kinds and g.kind in by_kind]
    collectors = [c for g in groups for c in by_kind[g.kind].collectors(cg, g)]
    if "tokens" in kinds:
        collectors += by_kind["tokens"].token_collectors(cg)
    stats = None
    if collectors:
        if calib is None:
            warnings.warn(f"method {method!r} scores on calibration data, but no calib= was given; calibrating "
                          "on the example inputs alone", stacklevel=2)
            args, kwargs = cg.gm.meta[EXAMPLE]
            calib = [kwargs if kwargs and not args else args]
        with foreign_errors(InternalError, "calibration"):
            stats = calibrate(cg, calib, collectors=collectors, loss_fn=loss_fn, seed=seed, progress=progress)
    used = [c for k, c in by_kind.items() if k in kinds]
    out = Scores(criteria={k: repr(c) for k, c in by_kind.items() if k in kinds}, samples=stats.samples if stats else 0,
                 loss_scale=bool(used) and all(c.loss_scale for c in used))
    for g in groups:
        try:
            out.units[g.name] = np.asarray(by_kind[g.kind].score(cg, g, stats, seed=seed), dtype=np.float64)
        except ValueError as e:
            raise AmgfxError(str(e)) from None
        extra = by_kind[g.kind].explain(cg, g, stats)
        if extra:
            out.extra[g.name] = {k: np.asarray(v) for k, v in extra.items()}
    if "tokens" in kinds and stats is not None:
        out.tokens = token_scores(cg, stats)
    return out


def select(cg: CouplingGraph, scores: dict, ratios: dict) -> Plan:
    """Keep the best-scored units of every group, removing ``ratios[kind]`` of each.

    Counts are rounded per head for ``qk``/``v`` so every head keeps the same number, and at
    least one unit (one per head) always stays.
    """
    unknown = set(ratios) - set(KINDS)
    if unknown:
        raise AmgfxError(f"unknown kind(s) {sorted(unknown)} in ratios; use qk, v, head, mlp, residual")
    plan = Plan(meta={"ratios": dict(ratios)}, model={"fingerprint": fingerprint(cg.gm)})
    for g in cg.groups:
        r = float(ratios.get(g.kind, 0.0))
        if not 0.0 <= r < 1.0:
            raise AmgfxError(f"ratio for {g.kind!r} must be in [0, 1), got {r}")
        if r == 0.0 or g.name not in scores:
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


def plan_for(model_or_gm, example_inputs=None, example_kwargs=None, *, method="snp", target_flops: float | None = None,
             ratios: dict | None = None, tokens: float | None = None, calib=None, loss_fn=None, kinds=None,
             round_to: int | str = "auto", min_keep: float = 0.1, protect=(), same_head_dim: bool = True, blocks: bool = False,
             target_latency: float | None = None, runtime: str = "eager", measure_latency: bool = True,
             scope: str = "model", seed: int = 0, progress: bool = True) -> Plan:
    """Score the model's coupling groups and decide what to keep; nothing is rewritten.

    ``model_or_gm`` may be an nn.Module (captured with ``example_inputs``), a captured
    GraphModule or a :class:`amgfx.CouplingGraph`. Give either ``target_flops`` (a fraction of
    the dense FLOPs; per-site amounts are derived from the scores, see :mod:`amgfx.planning.budget`) or
    ``ratios`` (the fraction removed per kind in every site). ``kinds`` limits what is
    pruned (default qk, v, head, mlp: residual channels are opt-in). With ``target_flops``,
    ``round_to`` rounds kept widths up to a multiple and ``same_head_dim`` gives each site's
    q/k and v one width per head, which runtimes take without splitting or padding. Both default
    to the fast choice (``"auto"``: multiples of 16 where a group is wide enough, see
    :func:`amgfx.planning.budget.kernel_multiple`; ``True``), faster on CPU at the same FLOPs and
    no less accurate (``benchmarks/results/levers.md``); SNP's paper-faithful plan, every width
    chosen freely, is ``round_to=1, same_head_dim=False``. ``blocks=True`` lets a whole attention
    or MLP branch go when its units rank lowest (block removal: fewer ops, not only narrower ones;
    the plan lists such a group with no unit kept). ``scope="blocks"`` makes ``target_flops`` a fraction of
    the attention and MLP branches' FLOPs only, as LLM papers count (the embedding and output head,
    which width pruning leaves alone, are outside; ``plan.meta["flops"]["blocks"]`` has both counts).

    ``target_latency`` (instead of ``target_flops``) is a fraction of the dense model's time at the
    example inputs (their batch size) in ``runtime`` (``"eager"``, ``"inductor"`` or ``"ort"``). The
    budget then spends predicted milliseconds, not FLOPs (:mod:`amgfx.planning.latency`: op times
    measured once on this machine, cached on disk); with ``measure_latency`` (the default) the plan
    is then rewritten and timed beside the dense model in that runtime, and where the measured
    fraction misses the target by more than 0.01 the goal is scaled by target over measured (by
    at most 1.5x or 2/3x a round) and planned again (up to 4 rounds). ``plan.meta["latency"]`` holds predicted and measured fractions
    and every round.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> plan = amgfx.plan_for(m, x, method="snp+amg", target_flops=0.6, calib=[torch.randn(4, 3, 32, 32)],
        ...                       round_to=8, progress=False)
        >>> plan.meta["flops"]["planned"] <= 0.6 * plan.meta["flops"]["dense"]
        True
    """
    check_options(method, target_flops, ratios, target_latency, tokens=tokens, kinds=kinds, runtime=runtime)
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    if target_latency is not None or target_flops is not None:
        kinds = DEFAULT_KINDS if kinds is None else tuple(kinds)
    else:
        ratios = (DEFAULT_RATIOS if tokens is None else {}) if ratios is None else ratios
        kinds = tuple(k for k in KINDS if ratios.get(k, 0) and (kinds is None or k in kinds))
    s = score(cg, method, calib, kinds=kinds + (("tokens",) if tokens else ()), loss_fn=loss_fn, seed=seed,
              progress=progress)
    base = Plan(model={"fingerprint": fingerprint(cg.gm)})
    if tokens:
        base.tokens = select_tokens(cg, s.tokens, float(tokens), min_keep=min_keep, protect=protect)
        base.meta["tokens"] = float(tokens)
    if target_latency is not None:
        from .timed_plan import timed_plan      # imports the op-time model: only when asked
        plan = timed_plan(cg, s.units, float(target_latency), runtime, lambda p: apply(cg, p, check=False),
                          measure_latency, progress, dict(round_to=round_to, min_keep=min_keep, protect=protect,
                                                          base=base, same_head_dim=same_head_dim, blocks=blocks))
    elif target_flops is None:
        plan = select(cg, s.units, ratios)
        plan.tokens, plan.meta = base.tokens, {**base.meta, **plan.meta}
    else:
        plan = allocate(cg, s.units, float(target_flops), round_to=round_to, min_keep=min_keep, protect=protect,
                        base=base, same_head_dim=same_head_dim, blocks=blocks, scope=scope,
                        normalize="none" if s.loss_scale else "group")
    plan.meta.update({"method": method if isinstance(method, str) else repr(method), "criteria": s.criteria,
                      "seed": seed, "calibration_samples": s.samples})
    return plan


def _unshare(out: fx.GraphModule, original: fx.GraphModule) -> None:
    """Clone every tensor still shared with the user's model, so training the result cannot touch it."""
    theirs = {t.data_ptr() for t in list(original.parameters()) + list(original.buffers()) if t.numel()}
    for fqn, t in list(out.named_parameters()) + list(out.named_buffers()):
        if t.numel() and t.data_ptr() in theirs:
            replace_attr(out, fqn, t.detach().clone(), t)


def apply(model_or_gm, plan: Plan, example_inputs=None, example_kwargs=None, *, check: bool = True) -> fx.GraphModule:
    """Rewrite the model into a smaller dense GraphModule that keeps what ``plan`` says.

    The model (or GraphModule) passed in is never modified. With ``check`` (the default) the result
    is held against the zeroing oracle on the example inputs before it is returned, and a wrong
    rewrite raises :class:`amgfx.RewriteError` naming the groups that break it
    (:func:`amgfx.passes.rewrite.checked`); ``check=False`` skips that (one forward of each model).

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = amgfx.apply(m, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100))}), x)
        >>> tuple(small.get_parameter("blocks.0.mlp.fc1.weight").shape), tuple(small(x).shape)
        ((100, 192), (1, 1000))
    """
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    out = checked(cg, plan) if check else rewrite(cg, plan)
    _unshare(out, cg.gm)
    return out


def prune(model, example_inputs=None, example_kwargs=None, *, method="snp", target_flops: float | None = None,
          ratios: dict | None = None, calib=None, loss_fn=None, plan: Plan | None = None, schedule=None,
          reconstruct: bool | None = None, **options) -> fx.GraphModule:
    """Score, plan and rewrite in one call; the Plan is in ``result.meta[PLAN]``.

    Give ``target_flops`` (fraction of dense FLOPs kept) or ``ratios`` (``{kind: fraction
    removed}`` per site), or a ready ``plan`` to replay. ``options`` go to :func:`plan_for`
    (``kinds``, ``round_to``, ``min_keep``, ``protect``, ``same_head_dim``, ``blocks``, ``seed``, ``progress``).

    With ``calib`` the kept weights are then refitted to the dense model on it (:func:`reconstruct`;
    ``reconstruct=False`` skips that, ``reconstruct=True`` without ``calib`` fits on the example inputs).
    ``check`` (default True) holds the structural rewrite against the oracle before any refit.

    ``model`` may also be an :func:`amgfx.decoder` (a causal LM's prefill and decode step over a KV cache):
    then ``calib`` holds ``[batch, prompt_len]`` token ids, both graphs are rewritten by the one plan, the
    cache shrinks with it, and the result is a Decoder for :func:`amgfx.generate`.

    ``schedule=amgfx.Iterative(steps=k, recover_steps=n)`` reaches ``target_flops`` in ``k``
    steps, re-scoring the pruned model, reconstructing each step against the model it was pruned from
    (when ``calib`` is given, unless ``reconstruct=False``) and recovering it (:func:`amgfx.recover`,
    against the dense model) after each. The result's plan is then the composition of the steps, in the
    original model's unit ids (replaying it gives the same shapes, without the recovered
    weights), and ``plan.meta["schedule"]`` records every step.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = amgfx.prune(m, x, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "mlp": 0.5})
        >>> n = lambda mod: sum(p.numel() for p in mod.parameters())
        >>> round(n(small) / n(m), 2), tuple(small(x).shape)
        (0.67, (1, 1000))
    """
    if plan is not None and not isinstance(plan, Plan):
        raise AmgfxError(f"plan must be an amgfx.Plan (Plan.load(path) reads a plan.json), got {type(plan).__name__}")
    if plan is None:
        check_options(method, target_flops, ratios, options.get("target_latency"), tokens=options.get("tokens"),
                      kinds=options.get("kinds"), runtime=options.get("runtime", "eager"))
    if hasattr(model, "amgfx_prune"):      # a model of several graphs prunes itself (amgfx.Decoder)
        return model.amgfx_prune(method=method, target_flops=target_flops, ratios=ratios, calib=calib,
                                 loss_fn=loss_fn, plan=plan, reconstruct=reconstruct, schedule=schedule, **options)
    cg = _coupling(model, example_inputs, example_kwargs)
    if schedule is not None:
        if plan is not None or target_flops is None:
            raise AmgfxError("schedule= needs target_flops= (and no plan=): it plans each step toward that target")
        if options.get("tokens"):
            raise AmgfxError("schedule= does not prune tokens yet; prune tokens in one shot (no schedule)")
        return _iterate(cg, schedule, target_flops, reconstruct=reconstruct, method=method, calib=calib,
                        loss_fn=loss_fn, **options)
    check = options.pop("check", True)
    if plan is None:
        plan = plan_for(cg, method=method, target_flops=target_flops, ratios=ratios, calib=calib, loss_fn=loss_fn,
                        **options)
    return _refit_if(apply(cg, plan, check=check), cg, plan, calib, reconstruct, options.get("progress", True))


def _refit_if(out: fx.GraphModule, cg: CouplingGraph, plan: Plan, calib, reconstruct: bool | None,
              progress: bool) -> fx.GraphModule:
    """``out`` reconstructed against ``cg`` when ``reconstruct`` says so (by default: when ``calib`` is
    given) and the plan removes something; else ``out`` itself."""
    if (calib is not None if reconstruct is None else reconstruct) and plan.keep:
        return _refit(out, cg, calib, progress=progress)
    return out


def reconstruct(pruned: fx.GraphModule, dense, calib=None, *, qk: bool = False, damp: float | None = None,
                sequential: bool = True, residual: bool = True, add_bias: bool = False,
                progress: bool = True) -> fx.GraphModule:
    """Refit the kept weights of ``pruned`` so its layers reproduce ``dense`` on ``calib``, with no training.

    Every layer whose input columns the plan removes (attention output projections, fc2/down, any
    linear or 1x1 conv a group's input side names) gets the ridge least-squares fit of
    :mod:`amgfx.weights.reconstruct`, layer by layer in graph order (``sequential``), each on what the
    already refitted layers produce; with ``residual`` a layer that writes into a residual ``add`` is
    fitted to the dense *sum* there, so it also makes up for what the skip input lost upstream.
    ``damp`` is the ridge toward the rewrite's weights, relative to the mean diagonal of each layer's
    Gram matrix; ``None`` (default) picks it per layer by two-fold cross-validation over the
    calibration chunks (weak damping overfits few tokens). With ``qk`` every head whose q/k pairs
    shrink also has its q rows rescaled so its logits keep their scale (:func:`amgfx.weights.qk.qk_scales`);
    it is off by default because it lowered MiniLM's held-out cosine (``docs/reconstruction.md``
    has the figures). The graph is the one the plan's rewrite gives (the plan in ``pruned.meta``); only weights differ, so
    :func:`amgfx.verify` still checks the structural rewrite. ``dense`` is the original model (or its
    :class:`CouplingGraph`); without ``calib`` the example inputs are used. Returns a new GraphModule
    whose ``meta["amgfx_reconstruction"]`` lists each layer refitted, on how many tokens, and its
    relative calibration output error before and after.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x, data = torch.randn(2, 3, 32, 32), [torch.randn(8, 3, 32, 32) for _ in range(2)]
        >>> small = amgfx.prune(m, x, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "mlp": 0.5}, reconstruct=False)
        >>> fit = amgfx.reconstruct(small, m, data, qk=True, progress=False)
        >>> r = fit.meta["amgfx_reconstruction"]
        >>> len(r["layers"]), all(l["after"] <= l["before"] for l in r["layers"]), sorted(r["qk_scales"])
        (4, True, ['blocks.0.attn', 'blocks.1.attn'])
    """
    import copy as _copy

    plan = pruned.meta.get(PLAN)
    if plan is None:
        raise AmgfxError("reconstruct() needs a model pruned by amgfx (its plan is in meta['amgfx_plan'])")
    if isinstance(dense, CouplingGraph):
        cg = dense
    else:
        args, kwargs = pruned.meta[EXAMPLE]
        cg = analyze(dense, args, kwargs, probe=False)
    if calib is None:
        args, kwargs = cg.gm.meta[EXAMPLE]
        calib = [kwargs if kwargs and not args else args]
    by_name = {g.name: g for g in cg.groups}
    sites = [s for s in cg.sites if f"qk:{s.name}" in plan.keep and f"qk:{s.name}" in by_name] if qk else []
    with foreign_errors(InternalError, "reconstruction"):
        scales = qk_scales(cg.gm, zeroed(cg, plan), sites, calib) if sites else {}
        src = cg
        if scales:                               # q rows rescaled in the dense weights, then the same rewrite
            src = _copy.copy(cg)
            src.gm = copy_module(cg.gm)
            for site, f in scales.items():
                scale_rows(src.gm, by_name[f"qk:{site}"], f)
        resolved = plan.resolve(cg)
        live = resolved.dead
        fit_plan = plan
        if live:                                 # fit where every token is computed; the weights are the same
            fit_plan = Plan.from_dict({**plan.to_dict(), "options": {**plan.options, "dead_tokens": "off"}})
        out = rewrite(src, plan) if scales else copy_module(pruned)
        fit_model = rewrite(src, fit_plan) if live else out
        fits = refit_layers(fit_model, cg.gm, resolved.params, calib, damp=damp, sequential=sequential,
                            residual=residual, add_bias=add_bias, progress=progress)
        if fit_model is not out:
            for f in fits:
                if f.bias and not _has_attr(out, f.bias):     # a bias the fit added: the same edit here
                    attach_bias(out, f.weight, f.bias)
                for fqn in (f.weight, *([f.bias] if f.bias else [])):
                    replace_attr(out, fqn, get_attr(fit_model, fqn).detach(), get_attr(out, fqn))
    _unshare(out, cg.gm)
    out.meta = {**out.meta, RECONSTRUCTION: {
        "layers": [f.to_dict() for f in fits], "qk_scales": {k: [round(float(x), 6) for x in v] for k, v in scales.items()},
        "samples": max((f.samples for f in fits), default=0), "damp": damp, "sequential": sequential,
        "residual": residual}}
    return out


def verify(model_or_gm, plan: Plan, example_inputs=None, example_kwargs=None, *, pruned=None,
           tol: float = 1e-5) -> VerifyReport:
    """Compare the pruned model with the original whose removed neurons are zeroed and whose
    dropped key positions are masked with ``-inf`` (:func:`masked_keys`).

    ``pruned`` defaults to ``amgfx.apply(model, plan)``. The error of an output is
    ``max|pruned - reference| / max|reference|``. A reconstructed model (:func:`amgfx.reconstruct`)
    has refitted weights by design: the structural rewrite of its plan is checked instead, and the
    report's ``reconstruction`` lists the layers refitted with their calibration errors.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> plan = amgfx.plan_for(m, x, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "head": 0.34, "mlp": 0.5})
        >>> amgfx.verify(m, plan, x).passed
        True
    """
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    refit = pruned.meta.get(RECONSTRUCTION) if pruned is not None else None
    if pruned is None or refit is not None:
        pruned = apply(cg, plan, check=False)
    report = check(cg, plan, pruned, tol)
    report.reconstruction = refit
    return report


def _has_attr(gm, fqn: str) -> bool:
    try:
        get_attr(gm, fqn)
    except AttributeError:
        return False
    return True


_refit = reconstruct     # prune()'s ``reconstruct`` flag shadows the function's name there


def _iterate(cg0: CouplingGraph, schedule, target: float, reconstruct: bool | None = None,
             **plan_options) -> fx.GraphModule:
    """Prune toward ``target`` in ``schedule.steps`` steps, each reconstructed (as :func:`prune` would)
    against the model it was pruned from and then recovered; compose the plans."""
    if not isinstance(schedule, Iterative):
        raise AmgfxError(f"schedule must be an amgfx.Iterative, got {type(schedule).__name__}")
    data = schedule.data if schedule.data is not None else plan_options.get("calib")
    if schedule.recover_steps and data is None:
        raise AmgfxError("Iterative(recover_steps=...) needs data: give Iterative(data=...) or calib=")
    args, kwargs = cg0.gm.meta[EXAMPLE]
    ids = {g.name: np.arange(g.units) for g in cg0.groups}     # original unit ids still alive, per group
    cg, dense, history, pruned = cg0, None, [], None
    for goal in schedule.targets(target):
        if pruned is not None:                                   # score what the last step left
            cg = analyze(pruned, args, kwargs)
        now = 1.0 if dense is None else history[-1]["flops"]
        plan = plan_for(cg, target_flops=min(1.0, goal / now), **plan_options)
        dense = dense or plan.meta["flops"]["dense"]
        alive = plan.survivors(cg)
        for name, units in alive.items():
            if name in ids:
                ids[name] = ids[name][units]
        rewritten = apply(cg, plan)
        pruned = _refit_if(rewritten, cg, plan, plan_options.get("calib"), reconstruct, plan_options.get("progress", True))
        step = {"target": goal, "flops": now * plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"]}
        if pruned is not rewritten:
            step["reconstructed_layers"] = len(pruned.meta[RECONSTRUCTION]["layers"])
        if schedule.recover_steps:
            opts = {"progress": plan_options.get("progress", True), **schedule.recover}
            pruned = recover(pruned, cg0.gm, data, steps=schedule.recover_steps, inplace=True, **opts)
            step["recovery"] = pruned.meta["amgfx_recovery"]
        history.append(step)
    composed = Plan(keep={g.name: ids[g.name].tolist() for g in cg0.groups if len(ids[g.name]) < g.units},
                    units={g.name: g.units for g in cg0.groups if len(ids[g.name]) < g.units},
                    options=dict(plan.options), model={"fingerprint": fingerprint(cg0.gm)},
                    meta={**plan.meta, "target_flops": float(target),
                          "flops": {"dense": dense, "planned": history[-1]["flops"] * dense},
                          "schedule": {**iterative_config(schedule), "steps_taken": history}})
    pruned.meta[PLAN] = composed
    return pruned
