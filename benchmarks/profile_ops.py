"""Where the time goes, per op kind, dense vs pruned at 50% of dense FLOPs (DeiT-S, MiniLM-L6).

Run: ``python -m benchmarks.profile_ops [--runs 20] [--batches 1 8] [--cases DeiT-S MiniLM-L6]``.
Writes ``benchmarks/results/profile_ops.md``.

The models, plan and runtime settings are those of :mod:`benchmarks.speed` (``amgfx snp``, 50%,
``speed.PLAN``). onnxruntime's own profiler times every node; per op type the sum over a run is
averaged over ``--runs`` runs. ``torch.profiler`` does the same for eager PyTorch and inductor
(self CPU time per op; inductor's generated C++ kernels are one entry, "inductor kernels").
Dense and pruned are profiled one after the other, so compare the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile

import torch

import amgfx

from ._report import RESULTS, write_md
from .speed import CASES, PLAN, _compiled


def ort_profile(path, a, kw, runs: int) -> dict:
    """op type -> mean ms per run (onnxruntime's node events, the first run included)."""
    sess = amgfx.ort_session(path, profile=True)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), list(a) + list(kw.values()))}
    for _ in range(runs):
        sess.run(None, feed)
    trace = sess.end_profiling()                    # onnxruntime writes it to the working directory
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    n = sum(1 for e in events if e.get("name") == "model_run") or runs
    per = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"] / 1e3
    return {k: v / n for k, v in per.items()}


KERNELS = "## Call CompiledFxGraph"     # the profiler's event for inductor's generated code


def torch_profile(model, a, kw, runs: int) -> dict:
    """op -> mean self-CPU ms per run."""
    from torch.profiler import profile
    with torch.inference_mode():
        for _ in range(3):
            model(*a, **kw)
        with profile() as p:
            for _ in range(runs):
                model(*a, **kw)
    out = collections.Counter()
    for e in p.key_averages():
        if e.self_cpu_time_total > 0:
            out["inductor kernels" if e.key.startswith(KERNELS) else e.key] += e.self_cpu_time_total / 1e3 / runs
    return out


def rows(dense: dict, pruned: dict, top: int = 8) -> list:
    keys = sorted(set(dense) | set(pruned), key=lambda k: -dense.get(k, 0.0))[:top]
    out = [(k, dense.get(k, 0.0), pruned.get(k, 0.0)) for k in keys]
    rest = sum(dense.values()) - sum(d for _, d, _ in out), sum(pruned.values()) - sum(p for _, _, p in out)
    return out + [("(everything else)", *rest), ("total", sum(dense.values()), sum(pruned.values()))]


def profiles(case: str, batches, runs: int, say) -> list[str]:
    """Markdown tables, one per runtime and batch, for one case of benchmarks.speed."""
    model, inputs, calib = CASES[case][0]()
    cg = amgfx.analyze(model, *inputs(1))
    plan = amgfx.plan_for(cg, method="snp", target_flops=0.5, calib=calib, progress=False, **PLAN)
    small = amgfx.apply(cg, plan)
    kept = amgfx.cost.measure_flops(small, inputs(1)) / amgfx.cost.measure_flops(cg.gm, inputs(1))
    tmp = tempfile.mkdtemp(prefix="amgfx-profile-")
    paths = [amgfx.export_onnx(g, os.path.join(tmp, f"{i}.onnx")) for i, g in enumerate((cg.gm, small))]
    compiled = _compiled({"dense": model, "pruned": small})
    lines = [f"## {case}: FLOPs kept {kept:.3f}", ""]
    for b in batches:
        a, kw = inputs(b)
        for runtime, d, p in (("onnxruntime", *(ort_profile(q, a, kw, runs) for q in paths)),
                              ("inductor", *(torch_profile(m, a, kw, runs) for m in compiled.values())),
                              ("eager PyTorch", *(torch_profile(m, a, kw, runs) for m in (model, small)))):
            lines += [f"**{case}, {runtime}, batch {b}**", "", "| op | dense ms | pruned ms | pruned / dense |",
                      "|---|---|---|---|"]
            lines += [f"| {k} | {dv:.2f} | {pv:.2f} | {pv / dv if dv else float('nan'):.2f} |" for k, dv, pv in rows(d, p)]
            lines.append("")
            say(f"{case} {runtime} b{b}: total {sum(d.values()):.1f} -> {sum(p.values()):.1f} ms")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cases", nargs="+", default=["DeiT-S", "MiniLM-L6"], choices=list(CASES))
    ap.add_argument("--out", default=os.path.join(RESULTS, "profile_ops.md"))
    a = ap.parse_args(argv)
    lines = ["# Where the time goes: dense vs amgfx snp at 50% FLOPs", "",
             f"`python -m benchmarks.profile_ops --runs {a.runs} --batches {' '.join(map(str, a.batches))} --cases "
             f"{' '.join(a.cases)}` on {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
             "Per op kind: mean ms per run; dense and pruned profiled one after the other. Runtime settings as in "
             "`benchmarks.speed` (inductor with its default config; onnxruntime with all graph optimisations).", ""]
    for case in a.cases:
        lines += profiles(case, a.batches, a.runs, lambda s: print(s, flush=True))
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
