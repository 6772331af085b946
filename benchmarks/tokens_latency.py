"""Static key/value token pruning on DeiT-S: latency against the dense model and AMG's own slicing.

Run: ``python -m benchmarks.tokens_latency [--runs 20] [--batches 1 8]``. Writes
``benchmarks/results/tokens_latency.md`` and ``tokens_latency.png``.

timm ``deit_small_patch16_224`` (random weights; 197 tokens, 12 blocks). AMG token scores are
calibrated once on random images; ``amgfx.budget.select_tokens`` then removes 25/40/60% of all
key positions (ranked globally, the class token kept). At each fraction, in eager mode:

* **dense**: the timm model (and the graph amgfx captured from it, nothing pruned: what the
  rewrite starts from, so graph execution itself is not mistaken for a saving);
* **AMG reference**: AMG's reference code, rebuilt here: every block projects q, k and v for
  all tokens, then slices K and V down to the kept positions (its ``forward`` is replaced on a
  copy of the model);
* **amgfx**: ``amgfx.apply`` with the same kept positions: the K/V projection *inputs* are
  gathered, so only kept rows are projected. Dead-token elimination is switched off here so
  both methods do the same work besides the projections; one more row shows it alone.

All variants of one batch are timed interleaved in one process: ``ms`` is the median of
``--runs`` after warm-up, and "latency vs dense" the median of each round's ratio to the dense
run of the same round (paired, so the machine's drift cancels). FLOPs are counted by
``torch.utils.flop_counter`` on each model.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import types

import torch
import torch.nn.functional as F

import amgfx
from amgfx.planning.budget import select_tokens

from ._report import RESULTS, pyplot, write_md
from .speed import time_paired

FRACTIONS = (0.25, 0.40, 0.60)


def _slice_after_projection(attn, kept):
    """AMG's reference attention: q, k, v for every token, then K and V sliced to ``kept``."""
    idx = torch.tensor(kept)

    def forward(self, x, *args, **kwargs):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        k, v = k.index_select(2, idx), v.index_select(2, idx)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C))))

    attn.forward = types.MethodType(forward, attn)


def amg_reference(model, tokens: dict):
    ref = copy.deepcopy(model)
    for name, kept in tokens.items():
        _slice_after_projection(ref.get_submodule(name), kept)
    return ref


def build(seed: int = 0):
    import timm
    torch.manual_seed(seed)
    m = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    cg = amgfx.analyze(m, x)
    calib = [torch.randn(2, 3, 224, 224) for _ in range(2)]
    scores = amgfx.score(cg, "amg", calib, kinds=("tokens",), progress=False).tokens
    off = {"dead_tokens": "off"}
    models = {"dense": m, "dense, as the captured graph": amgfx.apply(cg, amgfx.Plan(options=off)),
              "amgfx dead tokens only (0% removed)": amgfx.apply(cg, amgfx.Plan())}
    removed = dict.fromkeys(models, 0.0)
    for f in FRACTIONS:
        tokens = select_tokens(cg, scores, f)
        models[f"AMG reference, {f:.0%} removed"] = amg_reference(m, tokens)
        models[f"amgfx, {f:.0%} removed"] = amgfx.apply(cg, amgfx.Plan(tokens=tokens, options=off))
        removed[f"AMG reference, {f:.0%} removed"] = removed[f"amgfx, {f:.0%} removed"] = f
    return cg, models, removed


def check(models: dict, x) -> tuple[float, float]:
    """Both methods compute the same function at each fraction: their worst relative gap, and (to show
    the check can tell) the smallest gap of either to the dense model."""
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    worst, vs_dense = 0.0, float("inf")
    with torch.no_grad():
        dense = models["dense"](x)
        for f in FRACTIONS:
            a, b = models[f"AMG reference, {f:.0%} removed"](x), models[f"amgfx, {f:.0%} removed"](x)
            worst, vs_dense = max(worst, rel(a, b)), min(vs_dense, rel(a, dense), rel(b, dense))
    return worst, vs_dense


def plot(rows: list, batches, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), sharey=True)
    for ax, b in zip(axes if len(batches) > 1 else [axes], batches):
        for method, color in (("amgfx", "tab:blue"), ("AMG reference", "tab:orange")):
            pts = sorted((0.0, 0.0, 0.0) if r["variant"] == "dense" else (r["removed"], 1 - r["ratio"], 1 - r["flops_ratio"])
                         for r in rows if r["batch"] == b and (r["variant"] == "dense" or r["variant"].startswith(method + ",")))
            xs = [p[0] * 100 for p in pts]
            ax.plot(xs, [p[1] * 100 for p in pts], "o-", color=color, label=f"{method}: latency saved")
            ax.plot(xs, [p[2] * 100 for p in pts], "--", color=color, alpha=0.6, label=f"{method}: FLOPs saved")
        ax.set_title(f"DeiT-S, eager CPU, batch {b}")
        ax.set_xlabel("key/value tokens removed (%)")
        ax.grid(alpha=0.3)
    (axes[0] if len(batches) > 1 else axes).set_ylabel("saved vs dense (%)")
    (axes[0] if len(batches) > 1 else axes).legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=os.path.join(RESULTS, "tokens_latency.md"))
    a = ap.parse_args(argv)
    cg, models, removed = build()
    gap, vs_dense = check(models, torch.randn(2, 3, 224, 224))
    rows = []
    for b in a.batches:
        x = torch.randn(b, 3, 224, 224)
        t = time_paired({k: (lambda args, kw, m=m: m(*args)) for k, m in models.items()}, (x,), {}, a.runs)
        dense_flops = amgfx.cost.measure_flops(cg.gm, ((x,), {}))
        for k, (ms, ratio) in t.items():
            fl = dense_flops if k == "dense" else amgfx.cost.measure_flops(models[k], ((x,), {}))
            rows.append({"batch": b, "variant": k, "ms": ms, "ratio": ratio, "removed": removed[k],
                         "flops_ratio": fl / dense_flops})
            print(f"batch {b}  {k:<40} {ms:9.2f} ms  {ratio:.3f}x dense  FLOPs {fl / dense_flops:.3f}")
    lines = ["# Static key/value token pruning on DeiT-S (eager, CPU)", "",
             f"`python -m benchmarks.tokens_latency --runs {a.runs} --batches {' '.join(map(str, a.batches))}` on "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
             "timm `deit_small_patch16_224` (random weights, 197 tokens). `ms`: median of interleaved runs; latency vs "
             "dense: median of per-round ratios to dense; FLOPs from "
             "`torch.utils.flop_counter`. Key positions chosen by AMG scores, ranked over all 12 blocks; the class "
             "token is always kept.", "",
             "| batch | variant | ms | latency vs dense | FLOPs vs dense |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.3f} | {r['flops_ratio']:.3f} |"
              for r in rows]
    lines += ["", f"AMG reference and amgfx compute the same function at each fraction (largest relative gap "
              f"{gap:.1e}; either differs from dense by {vs_dense:.1e} or more); amgfx projects only the kept rows. Dead-token elimination is off in the amgfx token "
              "rows, so the two differ only in where K and V are cut."]
    write_md(a.out, lines)
    plot(rows, a.batches, a.out.replace(".md", ".png"))


if __name__ == "__main__":
    main()
