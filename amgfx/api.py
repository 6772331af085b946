"""The user-facing verbs, one per stage: ``analyze`` (structure), ``score`` (measure), ``plan_for`` (decide),
``apply`` (rewrite), ``reconstruct`` (refit) and ``verify`` (the zeroing oracle). ``prune``, all of them in
order, is the prune sequence (:mod:`amgfx.sequence`).

The flow runs one way: model -> graph -> coupling groups -> scores -> plan -> passes.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .analysis import analyze as _analysis
from .analysis.coupling import CouplingGraph
from .auto import choose
from .errors import AmgfxError, InternalError, foreign_errors
from .graph.fx import unshare
from .graph.meta import EXAMPLE, PLAN, RECONSTRUCTION
from .passes.oracle import VerifyReport, check
from .passes.rewrite import checked, rewrite, probe as probe_groups
from .planning.budget import allocate, select_ratios, select_tokens
from .planning.config import PlanConfig, config_from_options
from .planning.options import DEFAULT_KINDS, DEFAULT_RATIOS, KINDS
from .planning.plan import Plan, fingerprint
from .scoring.calibrate import calibrate
from .scoring.criteria import resolve_method, token_scores
from .scoring.massive import MASSIVE, collectors as massive_collectors, massive_units
from .weights.config import RefitConfig
from .weights.refit import refit

__all__ = ["analyze", "score", "plan_for", "apply", "reconstruct", "verify", "Scores", "DEFAULT_RATIOS", "DEFAULT_KINDS",
           "RECONSTRUCTION"]



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
    massive: dict = field(default_factory=dict)     # group name -> unit ids never removed (amgfx.scoring.massive)


def score(cg: CouplingGraph, method="snp", calib=None, *, kinds=DEFAULT_KINDS, loss_fn=None, seed: int = 0,
          progress: bool = True, massive: float | None = MASSIVE) -> Scores:
    """Score every group of ``kinds`` with ``method`` (calibrating on ``calib`` when it needs data).

    ``kinds`` may include ``"tokens"`` for AMG's key-position scores. Without ``calib``, a
    data-driven method calibrates on the example inputs alone, with a warning. Where calibration runs or
    ``calib`` is given (a weight-only method then makes one forward pass over it), MLP neurons whose output
    exceeds ``massive`` x their layer's median are listed in ``Scores.massive`` and the budget keeps them
    (:mod:`amgfx.scoring.massive`; 0 or None: no such guard).

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
    if massive and (collectors or calib is not None):   # forward-only: a pass over calib even for weight-only criteria
        collectors += massive_collectors(cg, groups)
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
    if stats is not None and massive:
        out.massive = massive_units(cg, groups, stats, massive)
    return out


def plan_for(model_or_gm, example_inputs=None, example_kwargs=None, *, config: PlanConfig | None = None,
             method=None, target_flops: float | None = None, ratios: dict | None = None, calib=None, loss_fn=None,
             progress: bool = True, **options) -> Plan:
    """Score the model's coupling groups and decide what to keep; nothing is rewritten.

    ``model_or_gm`` may be an nn.Module (captured with ``example_inputs``), a captured
    GraphModule or a :class:`amgfx.CouplingGraph`. What to plan is a :class:`amgfx.PlanConfig`
    (``config``); ``method``, ``target_flops``, ``ratios`` and ``options`` (any other PlanConfig field, by
    name) change it, and the config used is saved in ``plan.meta["config"]["plan"]``. Give either ``target_flops`` (a fraction of
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
    cfg = config_from_options(config, method=method, target_flops=target_flops, ratios=ratios, **options)
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    if cfg.method == "auto":
        plan = choose(cg, cfg, calib, lambda c, data: _plan(cg, c, data, loss_fn, progress), progress=progress)
    else:
        plan = _plan(cg, cfg, calib, loss_fn, progress)
    plan.meta.update({"method": cfg.method if isinstance(cfg.method, str) else repr(cfg.method),
                      "config": {"plan": cfg.to_dict()}})
    return plan


def _plan(cg: CouplingGraph, cfg: PlanConfig, calib, loss_fn, progress: bool) -> Plan:
    """Score what ``cfg`` prunes, then spend its budget (latency, FLOPs or per-kind ratios)."""
    ratios, kinds = plan_kinds(cfg)

    def scored(data):
        if data is not None and cfg.score_batches is not None:      # the first batches score; a refit reads all
            data = list(itertools.islice(data, cfg.score_batches))
        return score(cg, cfg.method, data, kinds=kinds + (("tokens",) if cfg.tokens else ()), loss_fn=loss_fn,
                     seed=cfg.seed, progress=progress, massive=cfg.massive)
    if cfg.allocation == "error" and cfg.target_flops is not None:
        from .error_budget import by_error     # rewrites and refits to measure: only when asked
        return by_error(cg, calib, scored, lambda s, w: spend(cg, cfg, s, ratios, progress, weights=w),
                        progress=progress)
    return spend(cg, cfg, scored(calib), ratios, progress)


def plan_kinds(cfg: PlanConfig) -> tuple:
    """``(ratios, kinds)``: what ``cfg`` scores and prunes."""
    ratios, kinds = cfg.ratios, cfg.kinds
    if cfg.target_latency is not None or cfg.target_flops is not None:
        return ratios, DEFAULT_KINDS if kinds is None else tuple(kinds)
    ratios = (DEFAULT_RATIOS if cfg.tokens is None else {}) if ratios is None else ratios
    return ratios, tuple(k for k in KINDS if ratios.get(k, 0) and (kinds is None or k in kinds))


def spend(cg: CouplingGraph, cfg: PlanConfig, s: Scores, ratios=None, progress: bool = False, *,
          weights: dict | None = None) -> Plan:
    """The plan ``cfg``'s budget (latency, FLOPs or per-kind ratios) buys with the scores ``s`` (``weights``: per
    group factors on the FLOPs budget's ranking, :func:`amgfx.planning.budget.allocate`)."""
    ratios = plan_kinds(cfg)[0] if ratios is None else ratios
    base = Plan(model={"fingerprint": fingerprint(cg.gm)})
    if cfg.tokens:
        base.tokens = select_tokens(cg, s.tokens, float(cfg.tokens), min_keep=cfg.min_keep, protect=cfg.protect)
        base.meta["tokens"] = float(cfg.tokens)
    if cfg.per_ms:                  # PlanConfig holds that a budget (FLOPs or latency) comes with it
        from .planning.per_ms import time_weights     # times ops on this machine: only when asked
        tw = time_weights(cg, s.units)
        weights = {n: tw.get(n, 1.0) * (weights or {}).get(n, 1.0) for n in set(tw) | set(weights or {})}
    opts = dict(round_to=cfg.round_to, min_keep=cfg.min_keep, protect=cfg.protect, base=base,
                same_head_dim=cfg.same_head_dim, blocks=cfg.blocks, weights=weights, pinned=s.massive)
    if cfg.target_latency is not None:
        from .timed_plan import timed_plan      # imports the op-time model: only when asked
        plan = timed_plan(cg, s.units, float(cfg.target_latency), cfg.runtime, lambda p: apply(cg, p, check=False),
                          cfg.measure_latency, progress, opts)
    elif cfg.target_flops is None:
        plan = select_ratios(cg, s.units, ratios, s.massive)
        plan.tokens, plan.meta = base.tokens, {**base.meta, **plan.meta}
    else:
        plan = allocate(cg, s.units, float(cfg.target_flops), scope=cfg.scope,
                        normalize="none" if s.loss_scale else "group", **opts)
    plan.meta.update({"criteria": s.criteria, "seed": cfg.seed, "calibration_samples": s.samples})
    if cfg.per_ms:
        plan.meta["rank"] = {"per_ms": {n: round(w, 4) for n, w in sorted(tw.items())}}
    return plan


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
    unshare(out, cg.gm)
    return out


def reconstruct(pruned: fx.GraphModule, dense, calib=None, config: RefitConfig | None = None, *,
                progress: bool = True, **options) -> fx.GraphModule:
    """Refit the kept weights of ``pruned`` so its layers reproduce ``dense`` on ``calib``, with no training.

    Every layer whose input columns the plan removes (attention output projections, fc2/down, any
    linear or 1x1 conv a group's input side names) gets the ridge least-squares fit of
    :mod:`amgfx.weights.reconstruct`, layer by layer in graph order (``sequential``), each on what the
    already refitted layers produce; with ``residual`` a layer that writes into a residual ``add`` is
    fitted to the dense *sum* there, so it also makes up for what the skip input lost upstream.
    How is a :class:`amgfx.RefitConfig` (``config``; ``options`` are its fields by name: ``qk``, ``damp``,
    ``sequential``, ``residual``, ``add_bias``). ``damp`` is the ridge toward the rewrite's weights, relative to the mean diagonal of each layer's
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
    if config is not None and not isinstance(config, RefitConfig):
        raise AmgfxError(f"config must be an amgfx.RefitConfig, got {type(config).__name__}")
    config = RefitConfig.from_dict({**(config or RefitConfig()).to_dict(), **options})
    if PLAN not in pruned.meta:
        raise AmgfxError("reconstruct() needs a model pruned by amgfx (its plan is in meta['amgfx_plan'])")
    if isinstance(dense, CouplingGraph):
        cg = dense
    else:
        args, kwargs = pruned.meta[EXAMPLE]
        cg = analyze(dense, args, kwargs, probe=False)
    if calib is None:
        args, kwargs = cg.gm.meta[EXAMPLE]
        calib = [kwargs if kwargs and not args else args]
    return refit(pruned, cg, calib, config, progress=progress)


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
