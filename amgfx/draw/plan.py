"""Draw a plan: per layer, the kept fraction of q/k, v, heads, MLP neurons and key tokens (a
heat-map strip, one column per layer, ``kept/dense`` written in each cell), and below it the FLOPs
each layer keeps against its dense FLOPs (the frame), with the total against the target.

The numbers come from :func:`amgfx.planning.layers.layers`; the PNG carries them in its ``amgfx``
text chunk, so a test (or a script) reads back exactly what was drawn.

Example:
    >>> import json, tempfile, torch, timm, amgfx
    >>> from PIL import Image
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> plan = amgfx.plan_for(cg, method="magnitude", ratios={"mlp": 0.5}, progress=False)
    >>> path = tempfile.mktemp(suffix=".png")
    >>> draw_plan(cg, plan, path)["layers"][0]["kept"]["mlp"]
    [384, 768]
    >>> json.loads(Image.open(path).text["amgfx"])["layers"][1]["kept"]["mlp"]
    [384, 768]
"""
from __future__ import annotations

import numpy as np

from ..planning.layers import KINDS, layers
from ._mpl import plt, save

LABELS = {"qk": "q/k pairs", "v": "v neurons", "head": "heads", "mlp": "MLP neurons", "tokens": "key tokens"}


def plan_figure(cg, plan, title: str | None = None):
    """(matplotlib Figure, the data drawn as a dict) for ``plan`` on ``cg``."""
    rep = layers(cg, plan)
    data = rep.to_dict()
    kinds = [k for k in KINDS if any(k in lay.kept for lay in rep.layers) and (k != "tokens" or plan.tokens)]
    n = len(rep.layers)
    frac = np.full((len(kinds), n), np.nan)
    for j, lay in enumerate(rep.layers):
        for i, k in enumerate(kinds):
            if k in lay.kept:
                kept, dense = lay.kept[k]
                frac[i, j] = kept / dense
    fig, (top, bot) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * n + 2.5), 2.2 + 0.45 * len(kinds)),
                                   gridspec_kw={"height_ratios": [max(len(kinds), 1), 3]}, sharex=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")    # grey: a kind this layer does not have
    im = top.imshow(np.ma.masked_invalid(frac), aspect="auto", cmap=cmap, vmin=0, vmax=1)
    for j, lay in enumerate(rep.layers):
        for i, k in enumerate(kinds):
            if k not in lay.kept:
                continue
            kept, dense = lay.kept[k]
            if kept == 0:                   # a removed branch: a gap
                top.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", lw=0))
            top.text(j, i, f"{kept}/{dense}" if n <= 16 else f"{kept}", ha="center", va="center", fontsize=6,
                     color="white" if kept / dense < 0.6 else "black")
    top.set_yticks(range(len(kinds)), [LABELS[k] for k in kinds], fontsize=8)
    top.tick_params(axis="x", bottom=False)
    fig.colorbar(im, ax=top, fraction=0.025, pad=0.01).set_label("kept", fontsize=7)
    x = np.arange(n + 1)
    dense = [lay.flops["dense"] for lay in rep.layers] + [rep.other["dense"]]
    pruned = [lay.flops["pruned"] for lay in rep.layers] + [rep.other["pruned"]]
    bot.bar(x, dense, width=0.8, fill=False, edgecolor="#555555", label="dense")
    bot.bar(x, pruned, width=0.8, color="#3b75af", label="planned")
    for xi, d, p in zip(x, dense, pruned):
        if d:
            bot.text(xi, p, f"{p / d:.0%}", ha="center", va="bottom", fontsize=6)
    bot.set_ylabel("FLOPs", fontsize=8)
    bot.set_xticks(x, [_short(lay.name) for lay in rep.layers] + ["other"], rotation=60, ha="right", fontsize=7)
    bot.legend(fontsize=7, loc="upper right")
    kept = rep.total["pruned"] / max(rep.total["dense"], 1)
    target = f" (target {rep.target:.0%})" if rep.target is not None else ""
    res = "; ".join(f"residual {k}: {a}/{b}" for k, (a, b) in rep.residual.items() if a < b)
    fig.suptitle((f"{title}\n" if title else "") + f"FLOPs kept {kept:.1%}{target}" + (f"; {res}" if res else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig, data


def draw_plan(cg, plan, path, title: str | None = None) -> dict:
    """Render :func:`plan_figure` to ``path``; returns the numbers drawn (also in the PNG's text)."""
    fig, data = plan_figure(cg, plan, title)
    save(fig, path, data)
    return data


def _short(name: str) -> str:
    """``encoder.layer.3.attention`` -> ``layer.3``; ``blocks.0.attn`` -> ``blocks.0``: the part with the index."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[max(i - 1, 0):i + 1])
    return name
