"""The knobs that could close the gap to the ideal speedup, each measured: DeiT-S at 50% FLOPs.

Run: ``python -m benchmarks.levers [--runs 20] [--batches 1 8] [--runtimes ort inductor]``.
Writes ``benchmarks/results/levers.md``.

Every variant is amgfx ``snp`` at 50% of dense FLOPs from the same scores, with one knob changed
from what :mod:`benchmarks.speed` uses (``round_to=8``, default options):

* ``round_to=16`` / ``round_to=32``: kept widths padded further (friendlier GEMM shapes, fewer
  neurons removed where it matters least);
* ``split_qkv="always"``: q, k and v as three linears instead of the fused one;
* ``lowering="none"``: q/k left narrower than v (SDPA then takes its math path);
* ``+residual``: residual channels pruned too (shrinks the norms, adds and patch embedding that
  otherwise stay whole; not exact, so opt-in);
* inductor with ``freezing=True`` (weights become prepacked constants), dense compiled the same way.

Timing as in :mod:`benchmarks.speed` (interleaved, paired with dense, several runs in a row).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import amgfx

from ._report import RESULTS, write_md
from .speed import CASES, QUICK, measure, table

DEFAULT = ("qk", "v", "head", "mlp")
ALL = DEFAULT + ("residual",)
LEVERS = {                                   # name: (round_to, kinds, plan options)
    "round_to=8 (as speed)": (8, DEFAULT, {}),
    "round_to=16": (16, DEFAULT, {}),
    "round_to=32": (32, DEFAULT, {}),
    "split_qkv=always": (8, DEFAULT, {"split_qkv": "always"}),
    "lowering=none": (8, DEFAULT, {"lowering": "none"}),
    "+residual": (8, ALL, {}),
}


def variants(model, inputs, calib, target: float = 0.5) -> tuple[dict, dict, object]:
    from amgfx.budget import allocate
    cg = amgfx.analyze(model, *inputs(1))
    units = amgfx.score(cg, "snp", calib, kinds=ALL, progress=False).units      # scored once for all
    kind = {g.name: g.kind for g in cg.groups}
    models = {"dense": model}
    for name, (round_to, kinds, options) in LEVERS.items():
        plan = allocate(cg, {g: s for g, s in units.items() if kind[g] in kinds}, target, round_to=round_to)
        plan.options.update(options)
        models[name] = amgfx.apply(cg, plan)
    return models, {k: amgfx.cost.measure_flops(m, inputs(1)) for k, m in models.items()}, cg


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runtimes", nargs="+", default=["ort", "inductor"], choices=["eager", "inductor", "ort"])
    ap.add_argument("--quick", action="store_true", help="the small DeiT of speed --quick (checks the pipeline)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "levers.md"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    case, (build, _, _) = next(iter((QUICK if a.quick else CASES).items()))
    model, inputs, calib = build()
    models, flops, cg = variants(model, inputs, calib)
    say = lambda s: print(s, flush=True)
    rows = measure(case, 0.5, models, flops, cg, inputs, a.runtimes, a.batches, a.runs, say)
    if "inductor" in a.runtimes:               # freezing changes the dense model too: both compiled with it
        base = next(iter(LEVERS))
        with torch._inductor.config.patch(freezing=True):
            frozen = measure(case, 0.5, {k: models[k] for k in ("dense", base)}, flops, cg, inputs, ["inductor"],
                             a.batches, a.runs, say)
        rows += [{**r, "runtime": "inductor, freezing"} for r in frozen]
    lines = [f"# Speed levers: {case} at 50% FLOPs, amgfx snp with one knob changed", "",
             f"`python -m benchmarks.levers {'--quick ' if a.quick else ''}--runs {a.runs} --batches {' '.join(map(str, a.batches))} --runtimes "
             f"{' '.join(a.runtimes)}` on {platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; {time.perf_counter() - t0:.0f} s. Timing as in `benchmarks.speed`.", ""] + table(rows)
    write_md(a.out, lines)
    return rows


if __name__ == "__main__":
    main()
