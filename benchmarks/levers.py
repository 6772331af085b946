"""The knobs that could close the gap to the ideal speedup, each measured: DeiT-S at 50% FLOPs.

Run: ``python -m benchmarks.levers [--runs 20] [--batches 1 8] [--runtimes ort inductor]``.
Writes ``benchmarks/results/levers.md``.

Every variant is amgfx ``snp`` at 50% of dense FLOPs from the same scores, with one knob changed
from the defaults, which :mod:`benchmarks.speed` uses (``round_to="auto"``: 16 on DeiT-S;
``same_head_dim=True``):

* ``round_to=8`` / ``round_to=32``: kept widths rounded to other multiples;
* ``same_head_dim`` off: q/k and v widths chosen apart, as SNP does; sites where they differ get
  their fused qkv split and the narrower side zero-padded for the flash kernel
  (:mod:`passes.lower_attention`); also with ``round_to=8`` (the speed suite's earlier setting) and
  with ``lowering="none"`` (q/k left narrower than v: SDPA then takes its math path);
* ``split_qkv="always"``: q, k and v as three linears instead of the fused one;
* ``+residual``: residual channels pruned too (shrinks the norms, adds and patch embedding that
  otherwise stay whole; not exact, so opt-in);
* ``+blocks``: whole attention/MLP branches may go (block removal, ``blocks=True``): fewer ops;
* ``paper-faithful``: every width chosen freely, as in SNP (``round_to=1``, ``same_head_dim`` off;
  the defaults before this benchmark made them fast), with and without ``+blocks``;
* inductor with ``freezing=True`` (weights become prepacked constants), dense compiled the same way.

Timing as in :mod:`benchmarks.speed` (interleaved, paired with dense, several runs in a row). The
same knobs on the trained digits ViT (:mod:`benchmarks.digits_vit`, no fine-tuning) show what they
cost in accuracy; the runtime-only knobs (split, lowering, freezing) are exact and are left out.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import amgfx

from ._report import RESULTS, write_md
from .speed import CASES, PLAN, QUICK, measure, table

DEFAULT = ("qk", "v", "head", "mlp")
ALL = DEFAULT + ("residual",)
LEVERS = {                                   # name: changes to speed.PLAN (and kinds, plan options)
    "defaults (round_to=auto, same_head_dim=True)": {},
    "round_to=8": {"round_to": 8},
    "round_to=32": {"round_to": 32},
    "same_head_dim off": {"same_head_dim": False},
    "same_head_dim off, round_to=8": {"same_head_dim": False, "round_to": 8},
    "same_head_dim off, lowering=none": {"same_head_dim": False, "options": {"lowering": "none"}},
    "split_qkv=always": {"options": {"split_qkv": "always"}},
    "+residual": {"kinds": ALL},
    "+blocks": {"blocks": True},
    "paper-faithful (round_to=1, same_head_dim off)": {"round_to": 1, "same_head_dim": False},
    "paper-faithful +blocks": {"round_to": 1, "same_head_dim": False, "blocks": True},
}
EXACT_RUNTIME_ONLY = ("options",)            # knobs that change how the graph runs, not what it computes


def plans(cg, units: dict, target: float = 0.5) -> dict:
    """lever name -> Plan, all allocated from the same scores."""
    from amgfx.planning.budget import allocate
    kind = {g.name: g.kind for g in cg.groups}
    out = {}
    for name, change in LEVERS.items():
        k = {**PLAN, "kinds": DEFAULT, "options": {}, **change}
        knobs = {o: k[o] for o in ("round_to", "same_head_dim", "blocks") if o in k}   # the rest: allocate's defaults
        plan = allocate(cg, {g: s for g, s in units.items() if kind[g] in k["kinds"]}, target, **knobs)
        plan.options.update(k["options"])
        out[name] = plan
    return out


def variants(model, inputs, calib, target: float = 0.5) -> tuple[dict, dict, object]:
    cg = amgfx.analyze(model, *inputs(1))
    units = amgfx.score(cg, "snp", calib, kinds=ALL, progress=False).units      # scored once for all
    models = {"dense": model, **{name: amgfx.apply(cg, p) for name, p in plans(cg, units, target).items()}}
    return models, {k: amgfx.cost.measure_flops(m, inputs(1)) for k, m in models.items()}, cg


def digits_accuracy(target: float = 0.5) -> list[str]:
    """Markdown rows: each lever that changes the plan, on the trained digits ViT (test top-1)."""
    from .digits_vit import accuracy, task
    dense, example, _, _, calib, xte, yte = task(64)
    cg = amgfx.analyze(dense, example)
    units = amgfx.score(cg, "snp", calib, kinds=ALL, progress=False).units
    dense_flops = amgfx.cost.measure_flops(cg.gm)
    rows = ["| amgfx snp, 50% FLOPs, with | FLOPs kept | test top-1 |", "|---|---|---|",
            f"| dense | 1.000 | {accuracy(dense, xte, yte):.4f} |"]
    for name, plan in plans(cg, units, target).items():
        if any(k in LEVERS[name] for k in EXACT_RUNTIME_ONLY):
            continue
        small = amgfx.apply(cg, plan)
        rows.append(f"| {name} | {amgfx.cost.measure_flops(small) / dense_flops:.3f} | {accuracy(small, xte, yte):.4f} |")
    return rows


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
    accuracy = digits_accuracy()
    lines = [f"# Speed levers: {case} at 50% FLOPs, amgfx snp with one knob changed", "",
             f"`python -m benchmarks.levers {'--quick ' if a.quick else ''}--runs {a.runs} --batches {' '.join(map(str, a.batches))} --runtimes "
             f"{' '.join(a.runtimes)}` on {platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; {time.perf_counter() - t0:.0f} s. Timing as in `benchmarks.speed`.", ""] + table(rows)
    lines += ["", "## What the plan knobs cost in accuracy", "",
              "The same knobs on the trained digits ViT (4 blocks, dim 128, head dim 32; `benchmarks.digits_vit`), "
              "snp scores from 64 training images, no fine-tuning, top-1 on the 450 held-out test images:", ""] + accuracy
    write_md(a.out, lines)
    return rows


if __name__ == "__main__":
    main()
