"""Residual channels pruned and refitted, against the default kinds: accuracy and measured speed at equal FLOPs.

Run: ``python -m benchmarks.residual [--repeats 3] [--runs 20] [--skip speed accuracy]``.
Writes ``benchmarks/results/residual.md``.

SNP prunes residual channels too; amgfx keeps them whole by default (kinds qk, v, head, mlp) since the rewrite
is then not exact (every norm averages over fewer channels). With reconstruction in place, does pruning them
pay? Two plans from the same options at each FLOPs target: the default kinds, and ``+residual`` (kinds qk, v,
head, mlp, residual; the allocation decides how many channels go).

* **Accuracy**: the models of :mod:`benchmarks.allocation` (digits ViT top-1 on its test images, MiniLM cosine
  on held-out text, ``amgfx-lm`` perplexity on held-out windows) at its two targets each, the default method
  (``auto``), refitted by :func:`amgfx.reconstruct` (a layer writing into the stream fits the stream's sum).
* **Speed**: DeiT-S (random weights) and MiniLM-L6 at 50% FLOPs, ``snp`` scores, default options otherwise,
  timed as :mod:`benchmarks.repeat` times them (``--repeats`` interleaved measurements; onnxruntime and
  inductor at batch 1 and 8 for DeiT-S, onnxruntime at batch 1 for MiniLM); efficiency = speedup x FLOPs kept.

``+residual`` would become the default where it keeps the accuracy at a higher efficiency.
"""
from __future__ import annotations

import argparse
import time

import torch

import amgfx
from amgfx.planning.options import DEFAULT_KINDS, KINDS

from ._report import RESULTS, write_md
from .per_ms import speed_table
from .speed import CASES, measure

TARGET = 0.5
VARIANTS = {"default kinds": DEFAULT_KINDS, "+residual": KINDS}
SPEED_CASES = {"DeiT-S": ("ort", "inductor"), "MiniLM-L6": ("ort",)}


def speed_rows(repeats: int, runs: int, say) -> list:
    rows = []
    for case, runtimes in SPEED_CASES.items():
        model, inputs, calib = CASES[case][0]()
        args, kwargs = inputs(1)
        cg = amgfx.analyze(model, args, kwargs)
        plans = {k: amgfx.plan_for(cg, calib=calib, method="snp", target_flops=TARGET, kinds=kinds, progress=False)
                 for k, kinds in VARIANTS.items()}
        models = {"dense": model, **{k: amgfx.apply(cg, p, check=False) for k, p in plans.items()}}
        flops = {k: amgfx.cost.measure_flops(m, inputs(1)) for k, m in models.items()}
        for _ in range(repeats):
            rows += measure(case, TARGET, models, flops, cg, inputs, runtimes, [1, 8] if case == "DeiT-S" else [1],
                            runs, say)
    return rows


def accuracy_rows(say) -> list:
    from .allocation import TARGETS, digits_case, lm_case, minilm_case
    rows = []
    for key, make in (("digits", digits_case), ("minilm", minilm_case), ("lm", lm_case)):
        name, metric, higher, cg, calib, score_of, loss_fn = make()
        units = {g.name: g.units for g in cg.groups}
        dense = score_of(cg.gm)
        for target in TARGETS[key]:
            row = {"model": name, "metric": metric, "higher": higher, "target": target, "dense": dense, "results": {}}
            for variant, kinds in VARIANTS.items():
                t = time.perf_counter()
                plan = amgfx.plan_for(cg, calib=calib, target_flops=target, kinds=kinds, loss_fn=loss_fn,
                                      progress=False)
                pruned = amgfx.apply(cg, plan, check=False)
                rewritten = score_of(pruned)
                fit = score_of(amgfx.reconstruct(pruned, cg, calib, progress=False))
                kept = [f"{len(v)}/{units[k]}" for k, v in plan.keep.items() if k.startswith("residual")]
                row["results"][variant] = (plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"],
                                           ", ".join(kept) or "all", rewritten, fit, time.perf_counter() - t)
            say(str(row))
            rows.append(row)
    return rows


def accuracy_table(rows: list) -> list[str]:
    out = ["| model | target FLOPs | metric | dense | variant | FLOPs kept | residual channels kept | as rewritten | "
           "refit | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v, (kept, ch, rewritten, fit, secs) in r["results"].items():
            out.append(f"| {r['model']} | {r['target']} | {r['metric']} | {r['dense']:.4f} | {v} | {kept:.3f} | {ch} | "
                       f"{rewritten:.4f} | {fit:.4f} | {secs:.0f} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip", nargs="*", choices=["speed", "accuracy"], default=[])
    ap.add_argument("--out", default=f"{RESULTS}/residual.md")
    a = ap.parse_args(argv)
    say = lambda s: print(s, flush=True)
    t0 = time.perf_counter()
    lines = ["# Residual channels pruned and refitted, against the default kinds", "",
             f"`python -m benchmarks.residual --repeats {a.repeats} --runs {a.runs}"
             f"{' --skip ' + ' '.join(a.skip) if a.skip else ''}` on 2 cores, torch {torch.__version__}. "
             "What is measured: the module docstring.", ""]
    if "accuracy" not in a.skip:
        lines += ["## Accuracy at FLOPs budgets (method auto, held-out data)", ""] + accuracy_table(accuracy_rows(say))
        lines += [""]
    if "speed" not in a.skip:
        lines += ["## Speed at 50% FLOPs (snp scores; efficiency = speedup x FLOPs kept, median of the repeats)", ""]
        lines += speed_table(speed_rows(a.repeats, a.runs, say)) + [""]
    lines += [f"{time.perf_counter() - t0:.0f} s in all."]
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
