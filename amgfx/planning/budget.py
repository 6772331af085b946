"""Budgeting: turn per-unit scores into a Plan that meets a FLOPs target.

The papers hand-write per-layer ratios; we derive them. Every group becomes a *ladder* of
removal steps in score order (for ``qk``/``v`` one step removes the weakest remaining unit of
*every* head, so heads stay equal; for ``head`` a step is one key/value head). A step's
importance is the removed units' scores normalised by their group's mean, so ``1`` means "an
average unit of its group" whatever the criterion's scale (``head`` scores are normalised by
the mean over all head groups instead, so AMG's cross-layer depth factor keeps its meaning).

Steps are ranked globally by that importance, and the shortest prefix of the ranking whose
plan meets the target is found by bisection on exactly predicted FLOPs (FLOPs only fall as
steps are added, so bisection finds it). Weighting importance by the FLOPs a step saves was
tried and rejected: one whole head outweighs hundreds of neurons, so heads went first and
attention was cut to its floor before any MLP neuron. Options: ``round_to`` keeps widths
multiples of 8 (say) by rounding kept counts *up*; ``min_keep`` is the least fraction any
group keeps; ``protect`` lists glob patterns of places never touched; ``same_head_dim`` makes
each site's q/k and v keep the same width per head (the larger of the two), so attention runs
as one fused qkv projection into the flash kernel with no padding (see
:mod:`amgfx.passes.lower_attention`): which units are kept is still each group's own choice.

The defaults are the fast ones (``benchmarks/results/levers.md``: same FLOPs, faster in
onnxruntime and inductor, no accuracy lost on the digits ViT): ``round_to="auto"`` (each group's
widths in multiples of :func:`kernel_multiple` of its width, 16 for DeiT-S) and
``same_head_dim=True``. SNP's paper-faithful plan, every width free, is ``round_to=1,
same_head_dim=False``.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..analysis.branches import branches
from ..analysis.coupling import GroupId
from ..analysis.tokens import token_sites
from .cost import predict
from .latency import OpTimes, predict_ms
from .options import KINDS
from ..errors import AmgfxError
from .plan import Plan, fingerprint
from .regions import RegionCost, block_flops

__all__ = ["allocate", "select_ratios", "select_tokens", "Ladder", "kernel_multiple"]

KERNEL_MULTIPLE = 16    # GEMM kernels vectorise by 16 floats (AVX-512) or 8 (AVX2); 16 serves both


def kernel_multiple(width: int) -> int:
    """The multiple ``round_to="auto"`` rounds a group of ``width`` units per head to.

    16 where that leaves at least four kept widths to choose from, else the largest power of two
    that does (a head dim of 64 rounds to 16, of 16 to 4; a group of fewer than 8 is not rounded),
    so small models still prune at fine grain.

    Example:
        >>> [kernel_multiple(w) for w in (1536, 64, 32, 16, 7)]
        [16, 16, 8, 4, 1]
    """
    m = 1
    while m * 2 <= min(KERNEL_MULTIPLE, width // 4):
        m *= 2
    return m


def _multiple(g, round_to) -> int:
    """The rounding of group ``g``: ``round_to`` itself, or the kernel multiple of its width per head."""
    if g.kind == "head":
        return 1
    if round_to == "auto":
        per = g.units // len(np.unique(g.heads)) if g.kind in ("qk", "v") else g.units
        return kernel_multiple(per)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise AmgfxError(f'round_to must be a positive int or "auto", got {round_to!r}')
    return round_to


@dataclass
class Ladder:
    """One group's removal order: ``order[h]`` lists the units of head ``h`` weakest first."""
    group: object
    order: list            # per head (one "head" for non-qk/v kinds): unit ids, weakest first
    importance: np.ndarray  # [steps] normalised importance of each step
    max_steps: int
    whole: bool = False     # the last step removes the branch (every unit left)
    round_to: int = 1       # kept counts (per head) are rounded up to a multiple of this

    def keep(self, steps: int) -> list[int]:
        """Unit ids kept after ``steps`` steps, kept counts rounded up to ``round_to``."""
        if self.whole and steps >= self.max_steps:
            return []
        steps = min(steps, self.max_steps - self.whole)
        kept = []
        for units in self.order:
            n = len(units) - steps
            if self.round_to > 1:
                n = min(len(units), math.ceil(n / self.round_to) * self.round_to)
            kept += units[len(units) - n:]
        return sorted(int(u) for u in kept)


def _ladder(g, s: np.ndarray, norm: float, min_keep: float, round_to: int, whole: float | None = None,
            pinned=()) -> Ladder | None:
    s = np.asarray(s, dtype=np.float64)
    if not np.isfinite(s).all():
        raise AmgfxError(f"{g.name}: scores are not finite")
    heads = [np.nonzero(g.heads == h)[0] for h in np.unique(g.heads)] if g.kind in ("qk", "v") else [np.arange(g.units)]
    pin = np.zeros(g.units, dtype=bool)
    pin[np.asarray(list(pinned), dtype=np.int64)] = True
    # pinned units rank last and the floor keeps them: no step of this ladder reaches them
    order = [list(u[np.lexsort((s[u], pin[u]))]) for u in heads]
    per = len(order[0])
    floor = max(1, math.ceil(min_keep * per), min(round_to, per), max(int(pin[u].sum()) for u in heads))
    whole = None if pin.any() else whole
    steps = max(per - floor, 0)
    sn = s / norm if norm > 0 else np.ones_like(s)
    imp = [np.mean([sn[o[k]] for o in order]) for k in range(steps)]
    if whole is not None:   # a last step takes the branch away: the floor's mean score against its kind's mean
        imp.append(float(np.mean(s[order[0][steps:]]) / whole) if whole > 0 else 1.0)
    if not imp:
        return None
    return Ladder(g, order, np.array(imp), len(imp), whole is not None, round_to)


def _plan(ladders, steps: dict, base: Plan) -> Plan:
    plan = Plan(keep=dict(base.keep), units=dict(base.units), tokens=dict(base.tokens), options=dict(base.options),
                meta=dict(base.meta), model=dict(base.model))
    for lad in ladders:
        n = steps.get(lad.group.name, 0)
        if n:
            keep = lad.keep(n)
            if len(keep) < lad.group.units:
                plan.keep[lad.group.name] = keep
                plan.units[lad.group.name] = lad.group.units
    return plan


def _pinned_meta(pinned: dict | None) -> dict:
    """``plan.meta["pinned"]``: group name -> sorted unit ids the budget kept whatever they scored (JSON-ready)."""
    return {k: sorted(int(u) for u in v) for k, v in sorted((pinned or {}).items()) if len(v)}


def select_ratios(cg, scores: dict, ratios: dict, pinned: dict | None = None) -> Plan:
    """Keep the best-scored units of every group, removing ``ratios[kind]`` of each.

    Counts are rounded per head for ``qk``/``v`` so every head keeps the same number, and at
    least one unit (one per head) always stays; an ``mlp`` group keeps its ``pinned`` units too.
    """
    unknown = set(ratios) - set(KINDS)
    if unknown:
        raise AmgfxError(f"unknown kind(s) {sorted(unknown)} in ratios; use qk, v, head, mlp, residual")
    plan = Plan(meta={"ratios": dict(ratios), "pinned": _pinned_meta(pinned)}, model={"fingerprint": fingerprint(cg.gm)})
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
            pin = np.isin(np.arange(g.units), (pinned or {}).get(g.name, ()))
            keep = np.lexsort((-s, ~pin))[:max(n, int(pin.sum()))].tolist()     # pinned first, then by score
        if len(keep) < g.units:
            plan.keep[g.name] = sorted(int(i) for i in keep)
            plan.units[g.name] = g.units
    return plan


def select_tokens(cg, scores: dict, fraction: float, *, min_keep: float = 0.1, protect=()) -> dict:
    """AMG's static token selection: remove ``fraction`` of all prunable key positions, ranked globally.

    Each site's scores are divided by their mean (AMG's per-layer normalisation: ``1`` is an
    average position of its layer, whatever its length), then every position of every site is
    ranked together and the weakest go first. Special tokens (class, distillation, registers;
    see :mod:`amgfx.tokens`) are never candidates, every site keeps at least ``min_keep`` of its
    positions, and sites that cannot drop positions (causal, windowed, ...) are skipped.

    Returns ``{site name: kept positions}`` for :attr:`amgfx.Plan.tokens`.

    Example:
        >>> import numpy as np, torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> select_tokens(cg, {"blocks.0.attn": np.array([.1, .3, .15, .3, .15]), "blocks.1.attn": np.ones(5) / 5}, 0.2)
        {'blocks.0.attn': [0, 1, 3]}
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise AmgfxError(f"tokens must be a fraction of key positions in [0, 1), got {fraction}")
    sites = {name: t for name, t in token_sites(cg).items() if t.prunable and name in scores
             and not any(fnmatch.fnmatchcase(name, p) for p in protect)}
    if not sites:
        raise AmgfxError("tokens: no attention site of this model can drop key positions "
                         f"({'; '.join(sorted({t.reason for t in token_sites(cg).values() if t.reason})) or 'no scores'})")
    total = sum(t.keys for t in sites.values())
    budget = int(round(float(fraction) * total))
    ranked = []
    for name, t in sites.items():
        s = np.asarray(scores[name], dtype=float)
        s = s / s.mean() if s.mean() > 0 else np.ones_like(s)
        ranked += [(s[j], name, j) for j in range(t.keys) if j not in t.special]
    ranked.sort(key=lambda x: x[0])
    dropped = {name: set() for name in sites}
    for _, name, j in ranked:
        if budget == 0:
            break
        t = sites[name]
        if t.keys - len(dropped[name]) > max(1, math.ceil(min_keep * t.keys), len(t.special)):
            dropped[name].add(j)
            budget -= 1
    return {name: sorted(set(range(sites[name].keys)) - d) for name, d in dropped.items() if d}


def _head_pairs(cg) -> list[tuple[str, str, int, int]]:
    """(qk group, v group, columns per qk unit, columns per v unit) of each site whose q/k and v can keep
    one head dim: equal dense head dims, whole columns per unit on both sides (a RoPE q/k unit is a
    column pair, a v unit one column)."""
    groups = {g.name: g for g in cg.groups}
    per_head = lambda g: g.units // len(np.unique(g.heads))
    pairs = []
    for s in cg.sites:
        qk, v = groups.get(GroupId("qk", s.name)), groups.get(GroupId("v", s.name))
        if qk is None or v is None or s.head_dim_qk != s.head_dim_v:
            continue
        if s.head_dim_qk % per_head(qk) == 0 and s.head_dim_v % per_head(v) == 0:
            pairs.append((qk.name, v.name, s.head_dim_qk // per_head(qk), s.head_dim_v // per_head(v)))
    return pairs


def _equal_widths(qk: Ladder, v: Ladder, sq: int, sv: int, cq: int, cv: int) -> tuple[int, int]:
    """Step counts at most ``(sq, sv)`` giving q/k and v one kept head dim: the narrower side gives steps
    back until it is as wide as the other (both are whole at zero steps, so this ends)."""
    width = lambda lad, s, c: len(lad.keep(s)) // len(lad.order) * c
    while sq > 0 or sv > 0:
        wq, wv = width(qk, sq, cq), width(v, sv, cv)
        if wq == wv:
            break
        if wq < wv:
            sq -= 1
        else:
            sv -= 1
    return sq, sv


def _bisect(plan_at, n: int, goal: float, cost):
    """The smallest prefix ``m`` of the ranking whose plan costs <= ``goal`` (``n`` when none does), and the
    memoised cost of a prefix. FLOPs only fall as steps are added; predicted time nearly so (measured op
    times are not strictly monotone in width), so bisection lands on a plan within goal, if not always
    the first."""
    spent = functools.lru_cache(None)(lambda m: cost(plan_at(m)))
    lo, hi = 0, n
    if spent(hi) > goal:
        return hi, spent
    while lo < hi:
        mid = (lo + hi) // 2
        if spent(mid) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo, spent


def allocate(cg, scores: dict, target_flops: float | None = None, *, target_latency: float | None = None,
             times=None, round_to: int | str = "auto", min_keep: float = 0.1, protect=(), base: Plan | None = None,
             same_head_dim: bool = True, blocks: bool = False, scope: str = "model", normalize: str = "group",
             weights: dict | None = None, pinned: dict | None = None) -> Plan:
    """The plan with the fewest removals (in global score order) whose FLOPs are <= ``target_flops`` x dense
    (or whose predicted latency is <= ``target_latency`` x dense).

    Args:
        cg: the :class:`amgfx.CouplingGraph`.
        scores: group name -> per-unit scores (higher = keep); groups absent are not pruned.
        target_flops: fraction of the dense FLOPs (``FlopCounterMode`` count on the example
            inputs) the pruned model may keep, in (0, 1].
        target_latency: instead of ``target_flops``: the fraction of the dense model's milliseconds
            at the example inputs that :func:`amgfx.planning.latency.predict_ms` may predict for the
            plan (op times measured on this machine, from ``times``, an
            :class:`~amgfx.planning.latency.OpTimes`; default its cache file).
        round_to: kept widths (per head for qk/v) are rounded up to a multiple of this; ``"auto"``
            (the default) takes :func:`kernel_multiple` of each group's width, ``1`` rounds nothing.
        min_keep: every group keeps at least this fraction of its units (and at least one).
        protect: glob patterns matched against group names and places (``"blocks.0.*"``).
        base: a plan to build on (its token positions count toward the target).
        same_head_dim: q/k and v of a site keep the same width per head, the larger of the two
            (a group that is not pruned keeps the other whole too; RoPE sites are left as they are).
            On by default; ``False`` lets SNP choose them apart, as in its paper.
        blocks: a head or MLP group may also go whole (block removal, :mod:`amgfx.passes.remove_branch`):
            below its ``min_keep`` floor the next step removes the branch, ranked by the mean score
            of the units it takes over the mean score of its kind in every layer (so a layer weak
            as a whole goes first). Only branches :mod:`amgfx.analysis.branches` finds removable.
        normalize: ``"group"`` (default) ranks a step by its units' scores over their group's mean, so any
            criterion's scale is fine and every layer is pruned alike; ``"none"`` ranks the scores as they
            are, for criteria whose scores estimate the loss a removal costs (``taylor``): layers and kinds
            then keep what they are worth (on SmolLM2 at 50% of block FLOPs, perplexity 55.6 against 130.7
            by group means, after refit; :func:`amgfx.plan_for` picks it from the criteria).
        weights: group name -> factor on the importance of that group's steps (after ``normalize``): above 1
            a group keeps more than its scores alone would give it. :mod:`amgfx.error_budget` derives them
            from each layer's measured error after refit (``allocation="error"``).
        pinned: group name -> unit ids no step removes (and the group's branch is not removed whole):
            :mod:`amgfx.scoring.massive` pins the few neurons whose output dwarfs their layer's.
        scope: what ``target_flops`` is a fraction of: ``"model"`` (every FLOP of the graph) or ``"blocks"``
            (the attention and MLP branches only, :func:`amgfx.planning.regions.block_flops`: the embedding
            and an LLM's output head, a fifth of SmolLM2's FLOPs, are outside, as the LLM papers count).

    Example:
        >>> import torch, timm, amgfx
        >>> from amgfx.scoring.criteria import Magnitude
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind in ("qk", "mlp")}
        >>> plan = allocate(cg, scores, 0.7, round_to=8)     # or the default "auto": 16 here
        >>> c = amgfx.cost.predict(cg, plan)["flops"]
        >>> c["pruned"] <= 0.7 * c["dense"], all(len(v) % 8 == 0 for v in plan.keep.values())
        (True, True)
    """
    if (target_flops is None) == (target_latency is None):
        raise AmgfxError("give target_flops or target_latency (one of them)")
    what, target = ("target_flops", target_flops) if target_latency is None else ("target_latency", target_latency)
    if not 0.0 < float(target) <= 1.0:
        raise AmgfxError(f"{what} must be in (0, 1], got {target}")
    if scope not in ("model", "blocks") or (scope == "blocks" and target_latency is not None):
        raise AmgfxError(f'scope must be "model" or "blocks" (with target_flops), got {scope!r}')
    if normalize not in ("group", "none"):
        raise AmgfxError(f'normalize must be "group" or "none", got {normalize!r}')
    base = base or Plan(meta={}, model={"fingerprint": fingerprint(cg.gm)})
    if target_latency is None:
        cost = lambda p: predict(cg, p)["flops"]
    else:
        times = times if times is not None else OpTimes()
        cost = lambda p: predict_ms(cg, p, times)
    dense = cost(base)["dense"]
    inside = block_flops(cg) if scope == "blocks" else dense
    goal = dense - (1.0 - float(target)) * inside      # the FLOPs outside the scope stay as they are
    protected = lambda g: any(fnmatch.fnmatchcase(x, p) for p in protect for x in (g.name, g.where))
    ladders = _ladders(cg, scores, [g for g in cg.groups if g.name in scores and not protected(g)], min_keep,
                       round_to, normalize, blocks, pinned)
    for lad in ladders:
        lad.importance = lad.importance * float((weights or {}).get(lad.group.name, 1.0))
    if not ladders:                             # a valid answer: the model as it is, said out loud
        return _as_it_is(cg, base, what, target, dense, target_latency is not None)
    fast = RegionCost.build(cg, [lad.group for lad in ladders], base) if target_latency is None else None
    plan_at, n = _walk(cg, ladders, base, same_head_dim)
    whole_count = lambda p: cost(p)["pruned"]
    # a branch removed whole takes nodes outside its region with it (its norm, the residual add): whole graph
    counted = (lambda p: whole_count(p) if any(len(k) == 0 for k in p.keep.values()) else fast.flops(p))
    lo, spent = _bisect(plan_at, n, goal, counted if fast is not None else whole_count)
    if spent(lo) > goal:
        raise AmgfxError(f"{what}={target} cannot be reached: with min_keep={min_keep}, "
                         f"round_to={round_to} and the protected places, the smallest plan keeps {spent(lo) / dense:.1%} "
                         f"of the {'FLOPs' if target_latency is None else 'predicted time'}; lower min_keep, "
                         "protect less, or allow more kinds")
    plan = plan_at(lo)
    flops = predict(cg, plan)["flops"]
    if fast is not None and flops["pruned"] != spent(lo):     # never seen; the whole-graph count decides
        warnings.warn(f"the region FLOPs count ({spent(lo)}) differs from the whole graph's ({flops['pruned']}); "
                      "planning again on the whole graph (slower). Please report the model", stacklevel=3)
        lo, spent = _bisect(plan_at, n, goal, whole_count)
        plan = plan_at(lo)
        flops = predict(cg, plan)["flops"]
    plan.meta.update({what: float(target), "round_to": round_to, "min_keep": min_keep,
                      "protect": list(protect), "same_head_dim": bool(same_head_dim), "blocks": bool(blocks),
                      "removed": sorted(plan.removed_branches(cg)), "scope": scope,
                      "pinned": _pinned_meta(pinned),
                      "flops": {"dense": flops["dense"], "planned": flops["pruned"]}})
    if scope == "blocks":
        plan.meta["flops"]["blocks"] = {"dense": inside, "planned": inside - (flops["dense"] - flops["pruned"])}
    if target_latency is not None:
        plan.meta["latency"] = {"dense_ms": round(dense, 4), "planned_ms": round(spent(lo), 4)}
    return plan


def _ladders(cg, scores: dict, groups: list, min_keep: float, round_to, normalize: str, blocks: bool,
             pinned: dict | None = None) -> list:
    """One removal ladder per group that can give anything (see :func:`_ladder`), ranked as ``normalize`` says;
    with ``blocks``, removable branches may go whole, weighed against their kind's mean everywhere; ``pinned``
    (group name -> unit ids) are never removed."""
    head_scores = [np.asarray(scores[g.name], dtype=float) for g in groups if g.kind == "head"]
    head_norm = float(np.mean(np.concatenate(head_scores))) if head_scores else 1.0
    removable, kind_mean = set(), {}
    if blocks:
        removable = {n for n, b in branches(cg).items() if b.removable}
        for kind in ("head", "mlp"):     # a whole branch is weighed against its kind everywhere (a weak layer)
            got = [np.asarray(scores[g.name], dtype=float) for g in groups if g.kind == kind]
            kind_mean[kind] = float(np.mean(np.concatenate(got))) if got else 1.0
    ladders = []
    for g in groups:
        s = np.asarray(scores[g.name], dtype=float)
        norm = 1.0 if normalize == "none" else head_norm if g.kind == "head" else float(s.mean())
        lad = _ladder(g, s, norm, min_keep, _multiple(g, round_to),
                      whole=kind_mean[g.kind] if g.name in removable else None, pinned=(pinned or {}).get(g.name, ()))
        if lad is not None:
            ladders.append(lad)
    return ladders


def _as_it_is(cg, base: Plan, what: str, target: float, dense: float, latency: bool) -> Plan:
    warnings.warn("nothing to prune: every group is protected, unscored or at its minimum (see "
                  "`amgfx inspect` for what was found and why groups were left whole); the plan keeps "
                  "the model as it is", stacklevel=4)
    flops = predict(cg, base)["flops"]["dense"]
    base.meta.update({what: float(target), "flops": {"dense": flops, "planned": flops}})
    if latency:
        base.meta["latency"] = {"dense_ms": dense, "planned_ms": dense}
    return base


def _walk(cg, ladders: list, base: Plan, same_head_dim: bool):
    """(plan_at, n): ``plan_at(m)`` is the plan of the ``m`` lowest-ranked steps of all ladders, of ``n``."""
    steps = sorted((lad.importance[k], lad.group.name, k) for lad in ladders for k in range(lad.max_steps))
    pairs = _head_pairs(cg) if same_head_dim else []
    whole = {lad.group.name: lad.max_steps for lad in ladders if lad.whole}
    by_name = {lad.group.name: lad for lad in ladders}

    def plan_at(m: int) -> Plan:
        counts: dict = {}
        for _, name, k in steps[:m]:
            if whole.get(name) == k + 1:      # the branch's own step: it goes, whatever else of it ranked later
                counts[name] = float("inf")
            else:
                counts[name] = counts.get(name, 0) + 1
        for qk, v, cq, cv in pairs:             # the less pruned side sets both widths
            sq, sv = counts.get(qk, 0), counts.get(v, 0)
            if not (sq or sv) or math.isinf(sq) or math.isinf(sv):
                continue
            if qk not in by_name or v not in by_name:    # a side that cannot move keeps the other whole
                counts[qk] = counts[v] = 0
            else:
                counts[qk], counts[v] = _equal_widths(by_name[qk], by_name[v], sq, sv, cq, cv)
        return _plan(ladders, counts, base)

    return plan_at, len(steps)
