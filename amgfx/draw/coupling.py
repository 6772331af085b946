"""Draw one block's coupling: which q rows pair with which k rows, v rows with proj columns,
and MLP hidden rows with fc2 columns, coloured by head.

For a plain ViT or BERT every line is horizontal (q row i pairs with k row i), so unless a block
is asked for, the site drawn is the first whose pairing says something: RoPE pairs, grouped-query
heads, a fused qkv projection; the title says which and why.
"""
from __future__ import annotations

import numpy as np

from ..planning.layers import by_layer
from ._mpl import plt, save


def _column(ax, x, n, label, colors):
    ax.scatter(np.full(n, x), np.arange(n), s=4, c=colors, zorder=3)
    ax.text(x, -0.04 * n - 1, label, ha="center", va="top", fontsize=8)


def informative(sites) -> tuple[int, str]:
    """(index, why) of the first site whose pairing is not the identity, else (0, "")."""
    tests = [(lambda s: bool(s.rope), lambda s: f"RoPE ({s.rope}): q/k units pair rotated rows"),
             (lambda s: 0 < s.num_kv_heads < s.num_heads,
              lambda s: f"grouped-query: {s.q_per_kv} query heads share each kv head"),
             (lambda s: s.q is not None and s.k is not None and s.q.node == s.k.node,
              lambda s: "fused qkv: q, k and v rows are slices of one projection")]
    for test, why in tests:
        for i, s in enumerate(sites):
            if test(s):
                return i, why(s)
    return 0, ""


def draw_block(cg, path, block: int | None = None) -> str:
    """Render site ``block`` (and the MLP after it) to ``path``; returns the site name.

    ``block=None`` picks the first site where the pairing is informative (:func:`informative`).
    """
    sites = [s for s in cg.sites if s.supported]
    if not sites:
        raise ValueError("no supported attention site to draw")
    why = ""
    if block is None:
        block, why = informative(sites)
    s = sites[min(block, len(sites) - 1)]
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if s.qk_q is not None and s.v_v is not None:
        _site_panel(ax, s, cmap)
    rope = f", RoPE {s.rope}" if s.rope else ""
    picked = f"\ndrawn because it is the first site with {why}" if why else ""
    ax.set_title(f"{s.name}: {s.num_heads} heads / {s.num_kv_heads} kv, qk {s.head_dim_qk}, v {s.head_dim_v}{rope}\n"
                 "qk units pair q row i with k row i of one head; v units pair v row i with proj column i"
                 f"{picked}", fontsize=9)
    ax.axis("off")
    ax = axes[1]
    mlps = next(ms for site, ms in by_layer(cg) if site.name == s.name)
    mlp = mlps[0] if mlps else (cg.mlps[0] if cg.mlps else None)
    if mlp is not None:
        _mlp_panel(ax, mlp, cmap)
    ax.axis("off")
    res = ", ".join(f"{r.name}: width {r.width}, {len(r.members)} members" for r in cg.residual)
    fig.text(0.5, 0.01, f"residual streams: {res}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save(fig, path, {"site": s.name, "why": why})
    return s.name


def _qhead_rows(s, h):
    g = next(g for g in range(s.head_qheads.shape[0]) if h in s.head_qheads[g])
    per = s.head_q.shape[1] // s.head_qheads.shape[1]
    i = list(s.head_qheads[g]).index(h)
    return sorted(s.head_q[g].tolist())[i * per:(i + 1) * per] if s.head_qheads.shape[1] > 1 else s.head_q[g].tolist()


def _short(fqn: str) -> str:
    """``encoder.layer.0.intermediate.dense.weight`` -> ``intermediate.dense``."""
    parts = fqn.split(".")[:-1]
    return ".".join(parts[-2:]) if len(parts) > 1 and not parts[-2].isdigit() else parts[-1]


def _site_panel(ax, s, cmap) -> None:
    """q/k rows paired per head on the left, v rows with the projection's columns on the right."""
    G, U = s.qk_q.shape[:2]
    H = s.num_heads
    qrows = sorted(int(r) for r in s.head_q.reshape(-1))
    krows = sorted(int(r) for r in s.head_k.reshape(-1))
    rank = lambda rows: {r: i for i, r in enumerate(rows)}
    rq, rk = rank(qrows), rank(krows)
    head_of_row = {r: h for h in range(H) for r in _qhead_rows(s, h)}
    qcol = [cmap(head_of_row[r] % 20) for r in qrows]
    kcol = [cmap(next(g for g in range(G) if r in set(s.head_k[g].tolist())) * max(H // G, 1) % 20) for r in krows]
    for g in range(G):
        for u in range(U):
            for a in s.qk_q[g, u]:
                for b in s.qk_k[g, u]:
                    ax.plot([0, 1], [rq[int(a)], rk[int(b)]], lw=0.4, color=cmap(g * max(H // G, 1) % 20), alpha=0.6)
    vrows = sorted(int(r) for r in s.v_v.reshape(-1))
    ocols = sorted(int(c) for c in s.v_o.reshape(-1))
    rv, ro = rank(vrows), rank(ocols)
    for g in range(s.v_v.shape[0]):
        for u in range(s.v_v.shape[1]):
            for a in s.v_v[g, u]:
                for b in s.v_o[g, u]:
                    ax.plot([2, 3], [rv[int(a)] * len(ocols) / max(len(vrows), 1), ro[int(b)]], lw=0.4,
                            color=cmap(g * max(H // G, 1) % 20), alpha=0.6)
    _column(ax, 0, len(qrows), f"q rows ({s.q.weight.split('.')[-2]})", qcol)
    _column(ax, 1, len(krows), "k rows", kcol)
    _column(ax, 2, len(vrows), "v rows", "k")
    _column(ax, 3, len(ocols), "proj cols", "k")
    ax.set_xlim(-0.5, 3.5)


def _mlp_panel(ax, mlp, cmap) -> None:
    """Each hidden unit of the MLP with the fc1 rows and fc2 column it owns (every few drawn)."""
    n = mlp.hidden
    step = max(1, n // 96)
    for c in range(0, n, step):
        for li, r in mlp.units[c]:
            ax.plot([li, len(mlp.fc1)], [r * n / (mlp.fc1[li].out_features), c], lw=0.5,
                    color=cmap((c // step) % 20), alpha=0.7)
    for li, l in enumerate(mlp.fc1):
        _column(ax, li, l.out_features, _short(l.weight) + " rows", "k")
    _column(ax, len(mlp.fc1), n, _short(mlp.fc2.weight) + " cols", "k")
    ax.set_title(f"{mlp.name}: hidden {n}, {mlp.activation.replace('aten.', '')}"
                 f"{' (gated)' if mlp.gated else ''}\nmlp units (every {step}th drawn)", fontsize=9)
    ax.set_xlim(-0.5, len(mlp.fc1) + 0.5)
