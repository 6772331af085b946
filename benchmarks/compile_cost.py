"""What ``torch.compile(backend="amgfx")`` costs: compile time and peak RSS against plain inductor.

Run: ``python -m benchmarks.compile_cost [--rounds 2]``. Writes ``benchmarks/results/compile_cost.md``.

timm ``deit_small_patch16_224`` (random weights) and a plan to 50% FLOPs (``magnitude``,
``round_to=8``, made once and saved as JSON) are compiled in fresh child processes, each with
its own empty inductor cache, so every compile is cold. Reported per mode: wall time of the
first call (dynamo + amgfx capture/rewrite + inductor), peak RSS growth over the process
before compiling, and the run time of the compiled model afterwards. Rounds alternate the
modes; the table gives medians and the amgfx/inductor ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from ._report import RESULTS, write_md

MODEL = "deit_small_patch16_224"


def _model():
    import timm
    import torch
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False).eval()


def child(mode: str, plan: str) -> dict:
    import torch

    import amgfx  # noqa: F401  (imported in both modes, so its import cost is not counted)
    m = _model()
    x = torch.randn(1, 3, 224, 224)
    opts = {"backend": "inductor"} if mode == "inductor" else {"backend": "amgfx", "options": {"plan": plan}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    fast = torch.compile(m, fullgraph=True, **opts)
    t = time.perf_counter()
    with torch.inference_mode():
        fast(x)
    compile_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with torch.inference_mode():
        runs = []
        for _ in range(10):
            t = time.perf_counter()
            fast(x)
            runs.append(time.perf_counter() - t)
    return {"mode": mode, "compile_s": compile_s, "peak_gib": peak, "growth_gib": peak - base,
            "run_ms": 1e3 * statistics.median(runs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.plan)))
        return
    import torch

    import amgfx
    tmp = tempfile.mkdtemp(prefix="amgfx_compile_cost_")
    plan_path = os.path.join(tmp, "plan.json")
    m = _model()
    plan = amgfx.plan_for(m, torch.randn(1, 3, 224, 224), method="magnitude", target_flops=0.5, round_to=8,
                          progress=False)
    plan.save(plan_path)
    kept = plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"]
    rows = {"inductor": [], "amgfx": []}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for r in range(a.rounds):
        for mode in (("amgfx", "inductor") if r % 2 == 0 else ("inductor", "amgfx")):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor_", dir=tmp))
            out = subprocess.run([sys.executable, "-m", "benchmarks.compile_cost", "--child", mode, "--plan", plan_path],
                                 capture_output=True, text=True, check=True, cwd=root, env=env)
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[mode][-1], flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("compile_s", "peak_gib", "growth_gib", "run_ms")}
           for k, v in rows.items()}
    i, g = med["inductor"], med["amgfx"]
    lines = ["# Compile cost: `backend=\"amgfx\"` (with a plan) vs plain inductor", "",
             f"`python -m benchmarks.compile_cost --rounds {a.rounds}`: `{MODEL}` (random weights), batch 1, "
             f"plan to {kept:.3f} of dense FLOPs (magnitude, round_to=8). Each compile in a fresh process with an "
             f"empty inductor cache; medians of {a.rounds} rounds, modes alternating. CPU ({os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()}), torch {torch.__version__}.", "",
             "| | plain inductor (dense) | amgfx + inductor (pruned) | amgfx / inductor |", "|---|---|---|---|",
             f"| first call = compile (s) | {i['compile_s']:.1f} | {g['compile_s']:.1f} | "
             f"{g['compile_s'] / i['compile_s']:.2f} |",
             f"| peak RSS of the process (GiB) | {i['peak_gib']:.2f} | {g['peak_gib']:.2f} | "
             f"{g['peak_gib'] / i['peak_gib']:.2f} |",
             f"| peak RSS growth over the built model (GiB) | {i['growth_gib']:.2f} | {g['growth_gib']:.2f} | "
             f"+{g['growth_gib'] - i['growth_gib']:.2f} GiB |",
             f"| compiled run, median of 10 (ms) | {i['run_ms']:.1f} | {g['run_ms']:.1f} | "
             f"{g['run_ms'] / i['run_ms']:.2f} |", "",
             "The amgfx column includes capturing the dynamo graph with torch.export, analysis and the rewrite. "
             "Peak RSS is the high-water mark (`ru_maxrss`) of the whole process; growth is over the mark "
             "reached while building the model, so it understates what plain inductor allocates if building "
             "peaked higher than compiling. Dense weights are not copied: unpruned tensors are shared with the "
             "model, and pruned ones are made once per model (recompiles reuse them, see tests/test_backend.py)."]
    write_md(f"{RESULTS}/compile_cost.md", lines)


if __name__ == "__main__":
    main()
