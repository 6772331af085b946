"""What calibration costs: time and peak memory for a ViT-B-shaped model at 64 samples.

Run: ``python -m benchmarks.calibration_cost [--samples 64] [--batch 8]``. Writes
``benchmarks/results/calibration_cost.md``.

timm ``vit_base_patch16_224`` (random weights; 86M parameters, 197 tokens) is analysed once;
each method is then scored in a fresh child process, so each peak RSS is its own. Reported:
wall time of ``amgfx.score`` and the growth of peak RSS over the process after analysis
(model + capture). Statistics are accumulated, not stored, so memory follows one batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from ._report import RESULTS, write_md

METHODS = ["snp", "snp+amg", "taylor", "reconstruct"]


def child(method: str, samples: int, batch: int) -> dict:
    import timm
    import torch

    import amgfx
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    cg = amgfx.analyze(m, torch.randn(1, 3, 224, 224))
    calib = [torch.randn(batch, 3, 224, 224) for _ in range(samples // batch)]
    if method == "reconstruct":
        # magnitude needs no data, so the timed part is the refit alone (issue 21's budget: <= 60 s)
        pruned = amgfx.prune(cg, method="magnitude", target_flops=0.5, reconstruct=False, progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    if method == "reconstruct":
        fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
        groups = len(fit.meta["amgfx_reconstruction"]["layers"])
    else:
        groups = len(amgfx.score(cg, method, calib, progress=False).units)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"method": method, "seconds": dt, "base_gib": base, "peak_gib": peak, "groups": groups,
            "samples": samples}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.samples, a.batch)))
        return
    rows = []
    for method in METHODS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.calibration_cost", "--child", method, "--samples",
                              str(a.samples), "--batch", str(a.batch)], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# Calibration cost, ViT-B shape", "",
             f"`python -m benchmarks.calibration_cost --samples {a.samples} --batch {a.batch}`: `vit_base_patch16_224` "
             f"(random weights), {a.samples} samples in batches of {a.batch}, CPU ({os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()}), torch {__import__('torch').__version__}. "
             "Peak RSS growth is over the process after model creation and analysis. One run.", "",
             "| method | statistics gathered | time (s) | s / sample | peak RSS after analysis (GiB) | "
             "peak RSS during scoring (GiB) | growth (GiB) |", "|---|---|---|---|---|---|---|"]
    what = {"snp": "qk SVD scores, MLP activations", "snp+amg": "+ attention maps",
            "taylor": "w * dL/dw per unit (backward pass)",
            "reconstruct": "Gram matrices of the refit layers' inputs, float64 (magnitude plan at 50% FLOPs)"}
    lines[2] += " `reconstruct` is `amgfx.reconstruct` after a magnitude plan at 50% of FLOPs (the plan and rewrite not timed)."
    lines += [f"| {r['method']} | {what[r['method']]} | {r['seconds']:.1f} | {r['seconds'] / r['samples']:.2f} | "
              f"{r['base_gib']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] - r['base_gib']:.2f} |" for r in rows]
    write_md(f"{RESULTS}/calibration_cost.md", lines)


if __name__ == "__main__":
    main()
