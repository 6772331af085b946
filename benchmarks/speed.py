"""Speed side by side: dense vs amgfx (snp, snp+amg with tokens) vs Torch-Pruning, at equal FLOPs.

Run: ``python -m benchmarks.speed [--quick] [--runs 20] [--batches 1 8] [--runtimes eager inductor ort]``.
Writes ``benchmarks/results/speed.md`` and ``speed.png`` (``--quick``: ``speed_quick.*``).

Cases: timm ``deit_small_patch16_224`` at 70/50/30% of dense FLOPs, ``vit_base_patch16_224`` at
50% (random weights: speed does not depend on them) and the real MiniLM-L6 at 50% (128 tokens).
``--quick`` runs one small DeiT (64 px, 4 blocks) at 50%: what CI runs to check the pipeline.

Variants at each target, all made from the same model:

* **dense**: the model as it is (eager), its captured graph for ONNX;
* **amgfx snp**: ``plan_for(method="snp", target_flops=t)`` with the default plan options
  (``PLAN`` is empty: ``round_to="auto"``, 16 on every group of these models, and
  ``same_head_dim=True``), the fastest at equal FLOPs of the knobs in :mod:`benchmarks.levers`,
  which also shows they cost no accuracy on the digits ViT;
* **amgfx snp+amg**: the same with AMG heads and ``tokens=0.25`` (static key positions);
* **Torch-Pruning**: magnitude importance, its ratio bisected until its FLOPs are within 2% of
  amgfx snp's. It does not rewrite timm's forward: ``num_heads``, ``head_dim`` and ``attn_dim``
  are patched by hand (:func:`benchmarks.criteria_digits.tp_prune`); on MiniLM, HF BERT's
  ``num_attention_heads``/``attention_head_size`` likewise (:func:`benchmarks.criteria_minilm.tp_prune`).

Calibration uses random images (timm) or real text (MiniLM); accuracy is elsewhere
(``criteria_*``, ``recovery_*``). FLOPs: ``torch.utils.flop_counter`` at batch 1.

Latency per runtime and batch: every variant interleaved in one process, ``--runs`` rounds after
warm-up. ``ms`` is the median; ``speedup`` is the median over rounds of dense time / variant time
(paired, so drift cancels). **Efficiency** = speedup / (dense FLOPs / variant FLOPs): 1.0 means
the FLOPs saved became time saved. Runtimes: eager PyTorch; ``torch.compile`` (inductor, static
shapes, default config; freezing is measured in :mod:`benchmarks.levers`); onnxruntime (opset 23,
all graph optimisations, its default spinning thread pool). Each round runs a variant several
times in a row (8 at batch 1, 3 above) and keeps the median (:func:`time_paired`). Timing is never asserted anywhere.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import amgfx
from amgfx.runtime import interleaved

from ._report import RESULTS, pyplot, write_md

TOKENS = 0.25
# plan_for's defaults, the fast ones (widths rounded for the kernels, one q/k/v width per head): see
# benchmarks.levers; a knob set here would be named in every result file's header
PLAN: dict = {}


def in_a_row(batch: int) -> int:
    """Runs of one variant in a row per round (see time_paired): fewer where one run is long."""
    return 8 if batch == 1 else 3


# --------------------------------------------------------------------------------------------- cases
def _timm(name, **kw):
    import timm
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    size = kw.get("img_size", 224)
    return m, lambda b: ((torch.randn(b, 3, size, size),), {}), [(torch.randn(4, 3, size, size),) for _ in range(2)]


def _minilm():
    from amgfx import data, models
    loaded = models.load(models.MINILM)
    path = str(models.minilm_dir())
    enc = models.tokenize(path, data.text("calib", 64), 128)
    calib = [{k: v[i:i + 8] for k, v in enc.items()} for i in range(0, 64, 8)]

    def inputs(b):
        reps = -(-b // 8)
        return (), {k: v[:8].repeat(reps, 1)[:b] for k, v in enc.items()}
    return loaded.model.eval(), inputs, calib


CASES = {
    "DeiT-S": (lambda: _timm("deit_small_patch16_224"), (0.7, 0.5, 0.3), True),
    "ViT-B": (lambda: _timm("vit_base_patch16_224"), (0.5,), True),
    "MiniLM-L6": (_minilm, (0.5,), True),
}
QUICK = {"DeiT-tiny 64px x4": (lambda: _timm("deit_tiny_patch16_224", img_size=64, depth=4), (0.5,), True)}


# --------------------------------------------------------------------------------------------- variants
def variants(model, inputs, calib, target: float, with_tp: bool) -> tuple:
    """(name -> model (an nn.Module or GraphModule), name -> FLOPs at batch 1, the CouplingGraph)."""
    args, kwargs = inputs(1)
    cg = amgfx.analyze(model, args, kwargs)
    flops = lambda m: amgfx.cost.measure_flops(m, inputs(1))
    models = {"dense": model}
    opts = dict(target_flops=target, calib=calib, progress=False, **PLAN)
    models["amgfx snp"] = amgfx.apply(cg, amgfx.plan_for(cg, method="snp", **opts))
    models["amgfx snp+amg"] = amgfx.apply(cg, amgfx.plan_for(cg, method="snp+amg", tokens=TOKENS, **opts))
    out = {k: flops(m) for k, m in models.items()}
    if with_tp:
        from .criteria_digits import bisect_ratio, tp_at
        from .criteria_minilm import tp_prune
        if kwargs:                         # an HF encoder, called with keyword inputs
            tp, f, _ = bisect_ratio(lambda r: tp_prune(model, r, kwargs), flops, out["amgfx snp"])
        else:
            tp, f, _ = tp_at(model, out["amgfx snp"], "magnitude", None, args[0])
        models["Torch-Pruning"], out["Torch-Pruning"] = tp, f
    return models, out, cg


def _ort(models: dict, cg, inputs, tmp: str) -> dict:
    """name -> callable(batch inputs) running the model in onnxruntime."""
    out = {}
    for name, m in models.items():
        gm = cg.gm if name == "dense" else m if isinstance(m, torch.fx.GraphModule) else amgfx.capture(m, *inputs(2))
        path = amgfx.export_onnx(gm, os.path.join(tmp, f"{len(out)}.onnx"))
        sess = amgfx.ort_session(path)                  # onnxruntime's defaults: idle threads spin
        names = [i.name for i in sess.get_inputs()]

        def run(a, kw, sess=sess, names=names):
            leaves = list(a) + list(kw.values())
            return sess.run(None, {n: t.numpy() for n, t in zip(names, leaves)})
        out[name] = run
    return out


def _compiled(models: dict) -> dict:
    # compiled lazily at the first call: settings such as freezing come from the caller's config
    torch._dynamo.reset()
    return {k: torch.compile(m, dynamic=False) for k, m in models.items()}


def time_paired(fns: dict, a, kw, runs: int, block: int = 1) -> dict:
    """name -> (median ms, median over rounds of dense/variant): :func:`amgfx.runtime.interleaved`
    rounds, paired with ``fns["dense"]``.

    ``block`` matters: onnxruntime's idle threads (spinning by default) from the previous session
    slow the first runs of the next (measured: at batch 1, blocks of 1 made dense DeiT-S 66 ms and
    blocks of 8 made it 39 ms, the pruned one 45 vs 22 ms).
    """
    times = interleaved(fns, a, kw, runs=runs, block=block, warm=3)
    d = times["dense"]
    return {k: (1e3 * statistics.median(v), statistics.median([x / y for x, y in zip(d, v)])) for k, v in times.items()}


def measure(case: str, target: float, models: dict, flops: dict, cg, inputs, runtimes, batches, runs, say) -> list:
    rows = []
    fns = {}
    if "eager" in runtimes:
        fns["eager"] = {k: (lambda a, kw, m=m: m(*a, **kw)) for k, m in models.items()}
    if "ort" in runtimes:
        fns["onnxruntime"] = _ort(models, cg, inputs, tempfile.mkdtemp(prefix="amgfx-speed-"))
    if "inductor" in runtimes:
        fns["inductor"] = {k: (lambda a, kw, m=m: m(*a, **kw)) for k, m in _compiled(models).items()}
    for runtime, fs in fns.items():
        for b in batches:
            a, kw = inputs(b)
            t0 = time.perf_counter()
            res = time_paired(fs, a, kw, runs, block=in_a_row(b))
            for k, (ms, speedup) in res.items():
                kept = flops[k] / flops["dense"]
                rows.append({"case": case, "target": target, "variant": k, "runtime": runtime, "batch": b, "ms": ms,
                             "speedup": speedup, "flops_kept": kept, "efficiency": speedup * kept})
            say(f"{case} {target:.0%} {runtime} b{b} ({time.perf_counter() - t0:.0f}s): " +
                ", ".join(f"{k} {ms:.1f}ms x{s:.2f}" for k, (ms, s) in res.items()))
    return rows


# --------------------------------------------------------------------------------------------- checks, report
def check(rows: list, flops_by_target: dict) -> list[str]:
    """Sanity of the numbers (not of the speed): finite, FLOPs where the plan put them, TP matched."""
    problems = []
    for r in rows:
        if not all(math.isfinite(r[k]) and r[k] > 0 for k in ("ms", "speedup", "flops_kept", "efficiency")):
            problems.append(f"not finite/positive: {r}")
    for (case, target), fl in flops_by_target.items():
        for k in ("amgfx snp", "amgfx snp+amg"):
            if not 0.8 * target <= fl[k] / fl["dense"] <= target * 1.0001:
                problems.append(f"{case} {k}: FLOPs kept {fl[k] / fl['dense']:.3f}, planned {target}")
        if "Torch-Pruning" in fl and abs(fl["Torch-Pruning"] / fl["amgfx snp"] - 1) > 0.02:
            problems.append(f"{case}: Torch-Pruning FLOPs {fl['Torch-Pruning']} not within 2% of amgfx snp's")
    return problems


def table(rows: list) -> list[str]:
    out = ["| case | FLOPs target | runtime | batch | variant | FLOPs kept | ms | speedup | efficiency |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = "-" if r["variant"] == "dense" else f"{r['efficiency']:.3f}"
        out.append(f"| {r['case']} | {r['target']:.0%} | {r['runtime']} | {r['batch']} | {r['variant']} | "
                   f"{r['flops_kept']:.3f} | {r['ms']:.2f} | {r['speedup']:.3f} | {eff} |")
    return out


def plot(rows: list, path: str) -> None:
    plt = pyplot()
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5 * len(runtimes), 4.2), sharey=True, squeeze=False)
    colors = {"amgfx snp": "tab:blue", "amgfx snp+amg": "tab:green", "Torch-Pruning": "tab:red"}
    marks = {b: m for b, m in zip(sorted({r["batch"] for r in rows}), "os^D")}
    for ax, rt in zip(axes[0], runtimes):
        grid = [x / 100 for x in range(25, 101)]
        ax.plot(grid, [1 / x for x in grid], "k--", lw=1, label="ideal (speedup = 1 / FLOPs kept)")
        for r in rows:
            if r["runtime"] == rt and r["variant"] != "dense":
                ax.scatter(r["flops_kept"], r["speedup"], color=colors[r["variant"]], marker=marks[r["batch"]], s=30)
        for v, c in colors.items():
            ax.scatter([], [], color=c, label=v)
        for b, mk in marks.items():
            ax.scatter([], [], color="gray", marker=mk, label=f"batch {b}")
        ax.set_xlim(0.25, 1.0)
        ax.set_title(rt)
        ax.set_xlabel("FLOPs kept")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small model, few runs: checks the pipeline (CI)")
    ap.add_argument("--runs", type=int, default=None, help="timed rounds per runtime and batch (default 20, quick 5)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runtimes", nargs="+", default=None, choices=["eager", "inductor", "ort"],
                    help="default: all three")
    ap.add_argument("--cases", nargs="+", default=None, help=f"subset of {list(CASES)}")
    ap.add_argument("--targets", type=float, nargs="+", default=None, help="subset of each case's FLOPs targets")
    ap.add_argument("--out", default=None, help="Markdown file to write (the .png goes next to it)")
    a = ap.parse_args(argv)
    cases = QUICK if a.quick else {k: v for k, v in CASES.items() if a.cases is None or k in a.cases}
    runs = a.runs or (5 if a.quick else 20)
    runtimes = a.runtimes or ["eager", "inductor", "ort"]
    out = a.out or os.path.join(RESULTS, "speed_quick.md" if a.quick else "speed.md")
    say = lambda s: print(s, flush=True)
    t_start = time.perf_counter()
    rows, flops_by_target = [], {}
    for case, (build, targets, with_tp) in cases.items():
        model, inputs, calib = build()
        for target in [t for t in targets if a.targets is None or t in a.targets]:
            models, flops, cg = variants(model, inputs, calib, target, with_tp)
            flops_by_target[(case, target)] = flops
            say(f"{case} at {target:.0%}: FLOPs kept " + ", ".join(f"{k} {v / flops['dense']:.3f}" for k, v in flops.items()))
            rows += measure(case, target, models, flops, cg, inputs, runtimes, a.batches, runs, say)
    problems = check(rows, flops_by_target)
    gpu = (f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else
           "GPU: none. No GPU is visible to this run (`torch.cuda.is_available()` is False), so there are no GPU "
           "rows; the tool library's GPU machine was not lent to the session that made this file.")
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Speed: dense vs amgfx vs Torch-Pruning at equal FLOPs", "",
             f"`python -m benchmarks.speed {argv_s}`".replace(" `", "`") + f" on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {runs} timed rounds per runtime and batch; "
             f"{time.perf_counter() - t_start:.0f} s in all.", "", gpu, "",
             "speedup: median over interleaved rounds of dense time / variant time. efficiency: speedup x FLOPs kept "
             "(1.00: every FLOP saved became time saved). Torch-Pruning: magnitude, ratio bisected to amgfx snp's FLOPs "
             "(within 2%), `num_heads`/`head_dim`/`attn_dim` (timm) or `num_attention_heads`/`attention_head_size` (HF BERT) "
             "patched by hand after pruning. amgfx snp+amg also removes "
             f"{TOKENS:.0%} of the key positions. amgfx plans: "
             + (", ".join(f"`{k}={v}`" for k, v in PLAN.items()) or "default options") + " (see `levers.md`). inductor: "
             "`torch.compile(m, dynamic=False)`, default config. onnxruntime: default (spinning) thread pool. "
             f"Each round runs a variant {in_a_row(1)} times in a row at batch 1 ({in_a_row(8)} above) and keeps "
             "the median.", ""] + table(rows)
    lines += ["", "Checks: " + ("all numbers finite, FLOPs where planned, Torch-Pruning matched." if not problems
                                 else "; ".join(problems))]
    write_md(out, lines)
    plot(rows, out.replace(".md", ".png"))
    if problems:
        raise SystemExit("speed: " + "; ".join(problems))
    return rows


if __name__ == "__main__":
    main()
