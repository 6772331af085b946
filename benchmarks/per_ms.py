"""Ranking by score per millisecond saved (``rank="per_ms"``) against the score ranking, speed and accuracy.

Run: ``python -m benchmarks.per_ms [--repeats 3] [--runs 20] [--alphas 1 0.5] [--skip speed accuracy latency]``.
Writes ``benchmarks/results/per_ms.md``.

``rank="per_ms"`` (:mod:`amgfx.planning.per_ms`) weighs each group's removal steps by how many milliseconds one
of its units saves on this machine (eager op times), against the others; ``ALPHA`` is the weights' exponent.

* **Speed**: DeiT-S (random weights, as :mod:`benchmarks.repeat`) and MiniLM-L6 (real weights) at 50% FLOPs,
  ``snp`` scores, default options otherwise; every variant planned from the same scores; timed as
  :mod:`benchmarks.repeat` times them (``--repeats`` full interleaved measurements, onnxruntime and
  inductor); efficiency = speedup x FLOPs kept, the median of the repeats.
* **Accuracy**: the models of :mod:`benchmarks.allocation` (digits ViT top-1 on its test images, MiniLM cosine
  on held-out text, amgfx-lm perplexity on held-out windows) at two FLOPs targets each, the default method
  (``auto``), refitted; data the planning never read.
* **Latency budgets**, where the ranking decides what a measured time buys: the digits ViT (batch 256) at
  ``target_latency`` 0.5 and 0.3, MiniLM at 0.7 and 0.5 (its smallest plan is predicted at 0.4), in eager
  PyTorch (planned, measured, corrected), ``snp``, refitted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import amgfx
from amgfx.planning import per_ms

from ._report import RESULTS, write_md
from .speed import CASES, measure

TARGET = 0.5
LATENCY_TARGETS, LATENCY_BATCH = {"digits ViT": (0.5, 0.3), "MiniLM-L6": (0.7, 0.5)}, 256   # MiniLM cannot reach 0.3
SPEED_CASES = {"DeiT-S": ("ort", "inductor"), "MiniLM-L6": ("ort",)}


def _plans(cg, calib, alphas, **opts) -> dict:
    """variant name -> plan, each rank (and per_ms exponent) from the same options."""
    out = {"rank=score": amgfx.plan_for(cg, calib=calib, rank="score", progress=False, **opts)}
    keep = per_ms.ALPHA
    try:
        for alpha in alphas:
            per_ms.ALPHA = alpha
            out[f"rank=per_ms, alpha {alpha:g}"] = amgfx.plan_for(cg, calib=calib, rank="per_ms", progress=False, **opts)
    finally:
        per_ms.ALPHA = keep
    return out


def speed_rows(alphas, repeats: int, runs: int, say) -> list:
    rows = []
    for case, runtimes in SPEED_CASES.items():
        model, inputs, calib = CASES[case][0]()
        args, kwargs = inputs(1)
        cg = amgfx.analyze(model, args, kwargs)
        plans = _plans(cg, calib, alphas, method="snp", target_flops=TARGET)
        models = {"dense": model, **{k: amgfx.apply(cg, p) for k, p in plans.items()}}
        flops = {k: amgfx.cost.measure_flops(m, inputs(1)) for k, m in models.items()}
        batches = [1, 8] if case == "DeiT-S" else [1]
        for _ in range(repeats):
            rows += measure(case, TARGET, models, flops, cg, inputs, runtimes, batches, runs, say)
    return rows


def speed_table(rows: list) -> list[str]:
    effs: dict = {}
    for r in rows:
        if r["variant"] != "dense":
            effs.setdefault((r["case"], r["runtime"], r["batch"], r["variant"]), []).append(r)
    out = ["| model | runtime | batch | variant | FLOPs kept | efficiency, each repeat | median |", "|---|---|---|---|---|---|---|"]
    for (case, rt, b, v), rs in effs.items():
        e = [r["efficiency"] for r in rs]
        out.append(f"| {case} | {rt} | {b} | {v} | {rs[0]['flops_kept']:.3f} | {', '.join(f'{x:.3f}' for x in e)} | "
                   f"{statistics.median(e):.3f} |")
    return out


def accuracy_rows(alphas, say) -> list:
    from .allocation import TARGETS, digits_case, lm_case, minilm_case
    rows = []
    for key, make in (("digits", digits_case), ("minilm", minilm_case), ("lm", lm_case)):
        name, metric, higher, cg, calib, score_of, loss_fn = make()
        dense = score_of(cg.gm)
        for target in TARGETS[key]:
            t = time.perf_counter()
            plans = _plans(cg, calib, alphas, target_flops=target, loss_fn=loss_fn)
            row = {"model": name, "metric": metric, "higher": higher, "target": target, "dense": dense,
                   "seconds": time.perf_counter() - t, "results": {}}
            for variant, plan in plans.items():
                fit = amgfx.reconstruct(amgfx.apply(cg, plan, check=False), cg, calib, progress=False)
                row["results"][variant] = (plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"], score_of(fit))
            say(str(row))
            rows.append(row)
    return rows


def _against(row: dict, variant: str, at: int) -> str:
    """How ``variant``'s metric (item ``at`` of its result) compares with ``rank=score``'s in ``row``."""
    value, base = row["results"][variant][at], row["results"]["rank=score"][at]
    diff = (value - base) * (1 if row["higher"] else -1)
    if variant == "rank=score":
        return "-"
    return "equal" if abs(diff) < 1e-9 else f"{'better' if diff > 0 else 'worse'} by {abs(value - base):.4f}"


def accuracy_table(rows: list) -> list[str]:
    out = ["| model | target FLOPs | metric | dense | variant | FLOPs kept | refit | against rank=score |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v, (kept, value) in r["results"].items():
            out.append(f"| {r['model']} | {r['target']} | {r['metric']} | {r['dense']:.4f} | {v} | {kept:.3f} | "
                       f"{value:.4f} | {_against(r, v, 1)} |")
    return out


def latency_rows(alphas, say) -> list:
    """At a latency budget (eager, measured and corrected), where the ranking decides what the time buys."""
    from .allocation import digits_case, minilm_case
    from .digits_vit import task
    rows = []
    for make in (digits_case, minilm_case):
        name, metric, higher, cg, calib, score_of, _ = make()
        if name == "digits ViT":        # at batch 1 the digits ViT is all launch overhead (benchmarks.latency_budget)
            t = task(64)
            cg = amgfx.analyze(t[0], t[2][:LATENCY_BATCH])
        for target in LATENCY_TARGETS[name]:
            plans = _plans(cg, calib, alphas, method="snp", target_latency=target, runtime="eager")
            row = {"model": name, "metric": metric, "higher": higher, "target": target, "results": {}}
            for variant, plan in plans.items():
                fit = amgfx.reconstruct(amgfx.apply(cg, plan, check=False), cg, calib, progress=False)
                lat = plan.meta["latency"]
                row["results"][variant] = (plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"],
                                           lat["measured"], score_of(fit), [r["measured"] for r in lat["rounds"]])
            say(str(row))
            rows.append(row)
    return rows


def latency_table(rows: list) -> list[str]:
    out = ["| model | target time | metric | variant | FLOPs kept | time measured (each round) | refit | against rank=score |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v, (kept, ms, value, rounds) in r["results"].items():
            verdict = _against(r, v, 2)
            out.append(f"| {r['model']} | {r['target']} | {r['metric']} | {v} | {kept:.3f} | {ms:.3f} "
                       f"({', '.join(f'{x:.3f}' for x in rounds)}) | {value:.4f} | "
                       f"{verdict} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--skip", nargs="*", choices=["speed", "accuracy", "latency"], default=[])
    ap.add_argument("--out", default=f"{RESULTS}/per_ms.md")
    a = ap.parse_args(argv)
    say = lambda s: print(s, flush=True)
    t0 = time.perf_counter()
    lines = ["# Ranking by score per millisecond saved against the score ranking", "",
             f"`python -m benchmarks.per_ms --repeats {a.repeats} --runs {a.runs} --alphas "
             f"{' '.join(f'{x:g}' for x in a.alphas)}{' --skip ' + ' '.join(a.skip) if a.skip else ''}` on 2 cores, torch "
             f"{torch.__version__}. What is measured: the module docstring.", ""]
    if "speed" not in a.skip:
        rows = speed_rows(a.alphas, a.repeats, a.runs, say)
        lines += ["## Speed at 50% FLOPs (snp scores; efficiency = speedup x FLOPs kept, median of the repeats)", ""]
        lines += speed_table(rows) + [""]
    if "accuracy" not in a.skip:
        lines += ["## Accuracy at FLOPs budgets (method auto, refitted, held-out data)", ""]
        lines += accuracy_table(accuracy_rows(a.alphas, say)) + [""]
    if "latency" not in a.skip:
        lines += [f"## Accuracy at latency budgets (eager, measured and corrected; snp, refitted; the digits ViT "
                  f"at batch {LATENCY_BATCH})", ""] + latency_table(latency_rows(a.alphas, say))
    lines += ["", f"{time.perf_counter() - t0:.0f} s in all."]
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
