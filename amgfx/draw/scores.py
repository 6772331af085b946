"""Draw one site's scores: q/k and v units as (kv head x unit) maps coloured by score, the MLP
neurons of the same layer, the head scores (with AMG's entropy per query head when the head
criterion explains it), and the key-token scores over positions, special tokens marked. With a
plan, the kept units are outlined.

Example:
    >>> import tempfile, torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> s = amgfx.score(cg, "snp+amg", [torch.randn(2, 3, 32, 32)], kinds=("qk", "v", "head", "mlp", "tokens"),
    ...                 progress=False)
    >>> d = draw_scores(cg, s, tempfile.mktemp(suffix=".png"))
    >>> d["site"], len(d["qk"]["scores"]), len(d["head"]["entropy"]), d["tokens"]["special"]
    ('blocks.0.attn', 3, 3, [0])
"""
from __future__ import annotations

import numpy as np
from matplotlib.collections import PatchCollection

from ..analysis.coupling import GroupId
from ..analysis.tokens import token_sites
from ..planning.layers import by_layer
from ._mpl import plt, save


def _per_head(g, scores, kept):
    """[kv heads, units per head] scores and kept mask of a q/k or v group."""
    heads = np.unique(g.heads)
    rows = [np.nonzero(g.heads == h)[0] for h in heads]
    s = np.stack([scores[r] for r in rows])
    k = np.stack([kept[r] for r in rows])
    return s, k


def _norm(sc):
    """A log colour scale where positive scores span decades (SNP's MLP scores), else linear."""
    from matplotlib.colors import LogNorm
    v = np.asarray(sc, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > 100:
        return LogNorm(vmin=v.min(), vmax=v.max())
    return None


def _query_x(site, n: int) -> np.ndarray:
    """x of each query head: spread inside the bar of the kv head it reads."""
    group = np.asarray(site.kv_group) if site.kv_group is not None else np.arange(n)
    x = np.zeros(n)
    for g in np.unique(group):
        hs = np.nonzero(group == g)[0]
        x[hs] = g + (np.arange(len(hs)) - (len(hs) - 1) / 2) * 0.8 / len(hs)
    return x


def _outline(ax, kept) -> None:
    rects = [plt.Rectangle((j - 0.5, i - 0.5), 1, 1) for i, j in zip(*np.nonzero(kept))]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="red", lw=0.6))


def _mask(g, plan):
    kept = np.ones(g.units, dtype=bool)
    if plan is not None and g.name in plan.keep:
        kept[:] = False
        kept[plan.keep[g.name]] = True
    return kept


def draw_scores(cg, scores, path, site: int | str = 0, plan=None) -> dict:
    """Render the scores of one site (index among supported sites, or its name) to ``path``.

    ``scores`` is an :class:`amgfx.Scores`; ``plan`` (optional) outlines the kept units. Returns
    the numbers drawn (also written into the PNG's ``amgfx`` text chunk).
    """
    pairs = by_layer(cg)
    if not pairs:
        raise ValueError("no supported attention site to draw")
    i = next((j for j, (s, _) in enumerate(pairs) if s.name == site), None) if isinstance(site, str) else site
    if i is None:
        raise ValueError(f"no site {site!r}; sites: {', '.join(s.name for s, _ in pairs[:4])}, ...")
    s, mlps = pairs[min(i, len(pairs) - 1)]
    groups = {g.name: g for g in cg.groups}
    panels = [k for k in ("qk", "v") if GroupId(k, s.name) in scores.units]
    mlp = next((groups[GroupId("mlp", m.name)] for m in mlps if GroupId("mlp", m.name) in scores.units), None)
    head = groups.get(GroupId("head", s.name)) if GroupId("head", s.name) in scores.units else None
    tok = scores.tokens.get(s.name)
    rows = len(panels) + (mlp is not None) + (head is not None) + (tok is not None)
    if not rows:
        raise ValueError(f"{s.name}: nothing scored here (score with kinds qk, v, head, mlp or tokens)")
    fig, axes = plt.subplots(rows, 1, figsize=(9, 1.2 + 1.6 * rows), squeeze=False)
    axes = list(axes[:, 0])
    data: dict = {"site": s.name, "criteria": dict(scores.criteria)}
    for kind in panels:
        data[kind] = _qkv_panel(fig, axes.pop(0), groups[GroupId(kind, s.name)], kind, scores, plan)
    if mlp is not None:
        data["mlp"] = _mlp_panel(fig, axes.pop(0), mlp, scores, plan)
    if head is not None:
        data["head"] = _head_panel(axes.pop(0), head, s, scores, plan)
    if tok is not None:
        data["tokens"] = _token_panel(axes.pop(0), cg, s, tok, plan)
    fig.suptitle(f"{s.name}: {s.num_heads} heads / {s.num_kv_heads} kv, {scores.samples} calibration samples",
                 fontsize=9)
    fig.tight_layout()
    save(fig, path, data)
    return data


def _qkv_panel(fig, ax, g, kind: str, scores, plan) -> dict:
    """q/k or v scores as a kv-head x unit map, kept units outlined."""
    sc, kept = _per_head(g, scores.units[g.name], _mask(g, plan))
    im = ax.imshow(sc, aspect="auto", cmap="magma", interpolation="nearest", norm=_norm(sc))
    if plan is not None:
        _outline(ax, kept)
    ax.set_ylabel("kv head", fontsize=8)
    ax.set_xlabel(f"{kind} unit within the head", fontsize=8)
    ax.set_title(f"{kind} scores ({scores.criteria.get(kind, '')})"
                 + (f", kept outlined: {int(kept.sum())}/{kept.size}" if plan is not None else ""), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    return {"scores": sc.tolist(), "kept": kept.astype(int).tolist()}


def _mlp_panel(fig, ax, mlp, scores, plan) -> dict:
    """MLP neuron scores as a wide strip, kept neurons outlined."""
    sc, kept = scores.units[mlp.name], _mask(mlp, plan)
    width = int(np.ceil(np.sqrt(mlp.units * 8)))     # a wide strip: rows of ``width`` neurons
    pad = (-mlp.units) % width
    grid = np.append(sc, np.full(pad, np.nan)).reshape(-1, width)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", interpolation="nearest", norm=_norm(sc))
    if plan is not None:
        _outline(ax, np.append(kept, np.zeros(pad, bool)).reshape(-1, width))
    ax.set_title(f"{mlp.name}: {mlp.units} neurons, {width} per row ({scores.criteria.get('mlp', '')})"
                 + (f", kept outlined: {int(kept.sum())}" if plan is not None else ""), fontsize=8)
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    return {"scores": sc.tolist(), "kept": kept.astype(int).tolist()}


def _head_panel(ax, head, s, scores, plan) -> dict:
    """Head scores as bars (kept ones edged red), with AMG's entropy per query head where scored."""
    sc, kept = scores.units[head.name], _mask(head, plan)
    bars = ax.bar(np.arange(head.units), sc, color=["#3b75af" if k else "#cccccc" for k in kept])
    if plan is not None:
        for b, k in zip(bars, kept):
            b.set_edgecolor("red" if k else "none")
    ax.set_xticks(range(head.units))
    ax.set_xlabel("kv head", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.set_title(f"head scores ({scores.criteria.get('head', '')})", fontsize=8)
    out = {"scores": sc.tolist(), "kept": kept.astype(int).tolist()}
    ent = scores.extra.get(head.name, {}).get("entropy")
    if ent is not None:
        tw = ax.twinx()
        tw.plot(_query_x(s, len(ent)), ent, "o", color="#d62728", ms=4)
        tw.set_ylabel("entropy per query head", fontsize=7, color="#d62728")
        out["entropy"] = np.asarray(ent).tolist()
    return out


def _token_panel(ax, cg, s, tok, plan) -> dict:
    """AMG's key-token scores as bars; special tokens red, the plan's kept positions opaque."""
    t = token_sites(cg).get(s.name)
    special = list(t.special) if t is not None else []
    keptpos = plan.tokens.get(s.name) if plan is not None else None
    colors = ["#d62728" if j in special else "#3b75af" for j in range(len(tok))]
    bars = ax.bar(np.arange(len(tok)), tok, color=colors, width=1.0)
    if keptpos is not None:
        for j, b in enumerate(bars):
            b.set_alpha(1.0 if j in keptpos else 0.25)
    ax.set_xlabel("key position (red: always kept, class/register tokens)", fontsize=8)
    ax.set_title("key-token scores (AMG)" + (f", kept {len(keptpos)}/{len(tok)} opaque" if keptpos else ""), fontsize=8)
    return {"scores": np.asarray(tok).tolist(), "special": special}
