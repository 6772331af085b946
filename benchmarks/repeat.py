"""How much one run's verdict moves: the DeiT-S 50% speed measurement, repeated.

Run: ``python -m benchmarks.repeat [--repeats 3] [--runs 20] [--batches 1 8] [--runtimes ort inductor]``.
Writes ``benchmarks/results/repeat.md``.

The variants of :mod:`benchmarks.speed` (dense, amgfx snp, amgfx snp+amg, Torch-Pruning) are built
once, then timed ``--repeats`` times in one process, each time a full interleaved measurement
(:func:`benchmarks.speed.measure`: ONNX sessions and compiled models made afresh). Per runtime,
batch and variant: the efficiency of every repeat, their median and their spread (max - min).
Timing is never asserted anywhere.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from ._report import RESULTS, write_md
from .speed import CASES, PLAN, measure, variants

CASE, TARGET = "DeiT-S", 0.5
GOAL, DEFAULT_VARIANT = 0.95, "amgfx snp"    # the efficiency the default plan is asked for (issue 22)


def summary(rows: list) -> list[str]:
    """Markdown table: one line per runtime, batch and variant (dense left out), repeats side by side."""
    effs: dict = {}
    for r in rows:
        if r["variant"] != "dense":
            effs.setdefault((r["runtime"], r["batch"], r["variant"]), []).append(r["efficiency"])
    out = ["| runtime | batch | variant | efficiency, each repeat | median | spread |", "|---|---|---|---|---|---|"]
    for (rt, b, v), e in effs.items():
        out.append(f"| {rt} | {b} | {v} | {', '.join(f'{x:.3f}' for x in e)} | {statistics.median(e):.3f} | "
                   f"{max(e) - min(e):.3f} |")
    return out


def verdict(rows: list) -> list[str]:
    """Lines saying, per runtime and batch, whether the default plan's median efficiency reaches GOAL,
    and by how much it falls short where it does not."""
    effs: dict = {}
    for r in rows:
        if r["variant"] == DEFAULT_VARIANT:
            effs.setdefault((r["runtime"], r["batch"]), []).append(r["efficiency"])
    out = [f"**Default plan (`{DEFAULT_VARIANT}`, default options) against efficiency {GOAL}, median of the repeats:**", ""]
    for (rt, b), e in effs.items():
        m = statistics.median(e)
        out.append(f"- {rt}, batch {b}: {m:.3f}, " + ("met" if m >= GOAL else f"short by {GOAL - m:.3f}"))
    if any(statistics.median(e) < GOAL for e in effs.values()):
        out += ["", "Where the time goes (ops that shrink less than the FLOPs): "
                "`benchmarks/results/profile_ops.md` (`python -m benchmarks.profile_ops`)."]
    return out


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runtimes", nargs="+", default=["ort", "inductor"], choices=["eager", "inductor", "ort"])
    ap.add_argument("--out", default=os.path.join(RESULTS, "repeat.md"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    build, _, with_tp = CASES[CASE]
    model, inputs, calib = build()
    models, flops, cg = variants(model, inputs, calib, TARGET, with_tp)
    say = lambda s: print(s, flush=True)
    rows = []
    for _ in range(a.repeats):
        rows += measure(CASE, TARGET, models, flops, cg, inputs, a.runtimes, a.batches, a.runs, say)
    lines = [f"# {CASE} at {TARGET:.0%} FLOPs, the speed measurement repeated", "",
             f"`python -m benchmarks.repeat --repeats {a.repeats} --runs {a.runs} --batches "
             f"{' '.join(map(str, a.batches))} --runtimes {' '.join(a.runtimes)}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {time.perf_counter() - t0:.0f} s. "
             f"Models as in `benchmarks.speed` (amgfx plans: {', '.join(f'`{k}={v}`' for k, v in PLAN.items()) or 'default options'}), "
             "built once; each repeat is one full interleaved measurement, as one run of `benchmarks.speed` makes.",
             ""] + summary(rows) + [""] + verdict(rows)
    write_md(a.out, lines)
    return rows


if __name__ == "__main__":
    main()
