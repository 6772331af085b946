"""What amgfx itself costs on ViT-B shape: capture, analyze, score, plan, rewrite; time and memory.

Run: ``python -m benchmarks.tool_cost [--samples 16]``. Writes ``benchmarks/results/tool_cost.md``.

timm ``vit_base_patch16_224`` (random weights), batch 1 example, ``snp+amg`` scores on
``--samples`` random images (batches of 8), a plan to 50% of dense FLOPs (``round_to=8``), then
the rewrite. Memory is the process's resident high-water mark (``ru_maxrss``) after each stage and
its growth over the stage before: the stage's own peak where it set a new mark, 0 where it did not.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch

import amgfx

from ._report import RESULTS, write_md


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB -> GiB on Linux


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(RESULTS, "tool_cost.md"))
    a = ap.parse_args(argv)
    import timm
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(8, 3, 224, 224) for _ in range(max(1, a.samples // 8))]
    stages, last = [], _rss()
    stages.append(("model built", 0.0, last, 0.0))

    def stage(name, fn):
        nonlocal last
        t = time.perf_counter()
        out = fn()
        dt, now = time.perf_counter() - t, _rss()
        stages.append((name, dt, now, now - last))
        last = now
        print(f"{name}: {dt:.2f} s, peak RSS {now:.2f} GiB", flush=True)
        return out

    gm = stage("capture (torch.export)", lambda: amgfx.capture(m, x))
    cg = stage("analyze (structure + coupling groups)", lambda: amgfx.analyze(gm))
    s = stage(f"score (snp+amg, {len(calib) * 8} samples)", lambda: amgfx.score(cg, "snp+amg", calib, progress=False))
    from amgfx.planning.budget import allocate
    plan = stage("plan (allocate to 50% FLOPs)", lambda: allocate(cg, s.units, 0.5, round_to=8))
    small = stage("rewrite (amgfx.apply)", lambda: amgfx.apply(cg, plan))
    stage("verify (oracle run)", lambda: amgfx.verify(cg, plan, pruned=small))
    total = sum(st[1] for st in stages)
    lines = ["# Cost of the tool itself on ViT-B shape", "",
             f"`python -m benchmarks.tool_cost --samples {a.samples}` on {platform.machine()}, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}. timm `vit_base_patch16_224` (86.6 M parameters, random weights), one run.",
             "", "| stage | time (s) | peak RSS after (GiB) | growth (GiB) |", "|---|---|---|---|"]
    lines += [f"| {n} | {dt:.2f} | {rss:.2f} | {g:.2f} |" for n, dt, rss, g in stages]
    lines += ["", f"Total {total:.1f} s. Scoring dominates; it grows with the calibration samples "
              "(see calibration_cost.md for 64 samples and every method)."]
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
