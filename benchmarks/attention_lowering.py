"""Dense vs pruned attention blocks: is pruned attention ever slower than what it replaced?

Run: ``python -m benchmarks.attention_lowering [--runs 40] [--batches 1 8]``. Writes
``benchmarks/results/attention_lowering.md``.

One DeiT-S-shaped timm attention block (dim 384, 6 heads of 64, 197 tokens) is captured,
pruned by amgfx with a fixed plan, and timed in eager mode against the dense block, all
variants interleaved in one process (medians of ``--runs`` after warm-up). Cases:

* q/k 32 < v 64: ``lowering=none`` (SDPA falls back to the math kernel) vs ``auto``
  (zero-pad q/k to 64: the flash kernel again). The fused qkv must split here.
* q/k 32 == v 32: the fused qkv projection kept (new reshape sizes) vs split in three.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import amgfx

from ._report import RESULTS, write_md


def block():
    from timm.models.vision_transformer import Attention
    return Attention(dim=384, num_heads=6, qkv_bias=True).eval()


def variants(batch):
    m, x = block(), torch.randn(batch, 197, 384)
    cg = amgfx.analyze(m, x)
    half = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5}).keep
    both = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.5}).keep
    plan = lambda keep, **o: amgfx.Plan(keep=keep, options={"lowering": "auto", "split_qkv": "auto", **o})
    return x, {
        "dense (qk 64, v 64)": cg.gm,
        "qk 32 < v 64, unequal dims (lowering=none)": amgfx.apply(cg, plan(half, lowering="none")),
        "qk 32 < v 64, q/k zero-padded (lowering=auto)": amgfx.apply(cg, plan(half)),
        "qk 32 = v 32, fused qkv kept (split_qkv=auto)": amgfx.apply(cg, plan(both)),
        "qk 32 = v 32, qkv split in three (split_qkv=always)": amgfx.apply(cg, plan(both, split_qkv="always")),
    }


def time_interleaved(models: dict, x, runs: int) -> dict:
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(5):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=os.path.join(RESULTS, "attention_lowering.md"))
    a = ap.parse_args(argv)
    lines = ["# Dense vs pruned attention blocks (eager, CPU)", "",
             f"`python -m benchmarks.attention_lowering --runs {a.runs} --batches {' '.join(map(str, a.batches))}` "
             f"on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
             "One DeiT-S-shaped timm attention block (dim 384, 6 heads, 197 tokens); medians, all variants interleaved.",
             "", "| batch | variant | ms | vs dense |", "|---|---|---|---|"]
    for b in a.batches:
        x, models = variants(b)
        t = time_interleaved(models, x, a.runs)
        dense = t["dense (qk 64, v 64)"]
        for k, ms in t.items():
            lines.append(f"| {b} | {k} | {ms:.3f} | {ms / dense:.2f}x |")
            print(f"batch {b}  {k:<52} {ms:8.3f} ms  {ms / dense:.2f}x dense")
    lines += ["", "`vs dense` below 1.00x means the pruned block is faster than the dense block it replaced."]
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
