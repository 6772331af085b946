"""Recovery on the trained digits ViT: test accuracy vs FLOPs kept, before and after distillation.

Run: ``python -m benchmarks.recovery_digits [--targets 0.7 0.5 0.3] [--steps 1500]``. Writes
``benchmarks/results/recovery_digits.md`` and ``recovery_digits.png``.

For every FLOPs target, from one dense model (:mod:`benchmarks.digits_vit`, test top-1 in the
table) and one run:

* amgfx ``snp+amg`` one-shot, no recovery (calibrated on 64 training images), as rewritten and
  after :func:`amgfx.reconstruct` on the same 64 images (what ``amgfx.prune`` does by default);
* the reconstructed model after :func:`amgfx.recover`: ``--steps`` steps of logits KD (T=2, AdamW
  at 1e-3 with cosine decay, batches of 64 of the 1347 training images, no labels);
* ``amgfx.Iterative(steps=3)``: three prune steps, each followed by a third of the steps;
* Torch-Pruning magnitude at the same FLOPs (within 2%, bisected; fix-ups as in
  :mod:`benchmarks.criteria_digits`), before and after the same :func:`amgfx.recover` call.
  Its dropout and drop-path are switched off, as they are absent from amgfx's captured graph.

The recovery time is wall time on this machine; the issue's budget is 2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import time

import torch

import amgfx

from ._report import RESULTS, pyplot, write_md
from .criteria_digits import flops, tp_at
from .digits_vit import accuracy, task

BUDGET_S = 120.0
KD = {"lr": 1e-3, "loss": "kd", "temperature": 2.0}


def _no_dropout(m):
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "drop_prob"):
            mod.drop_prob = 0.0
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3], help="fractions of dense FLOPs kept")
    ap.add_argument("--steps", type=int, default=1500, help="recovery steps per model (default 1500)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    dense, example, xtr, _, calib, xte, yte = task(64)
    data = [xtr[i:i + 64] for i in range(0, len(xtr), 64)]
    cg = amgfx.analyze(dense, example)
    dense_flops, dense_acc = flops(dense, example), accuracy(dense, xte, yte)
    print(f"dense: {dense_acc:.4f}", flush=True)
    rows = []

    def row(name, target, model, rec_s=None):
        rows.append({"method": name, "target": target, "flops": flops(model, example) / dense_flops,
                     "acc": accuracy(model, xte, yte), "steps": a.steps if rec_s is not None else 0, "seconds": rec_s})
        print(rows[-1], flush=True)

    def recovered(model):
        t = time.perf_counter()
        out = amgfx.recover(model, dense, data, steps=a.steps, progress=False, **KD)
        return out, time.perf_counter() - t

    for target in a.targets:
        plan = amgfx.plan_for(cg, method="snp+amg", target_flops=target, calib=calib, progress=False)
        pruned = amgfx.apply(cg, plan)
        fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
        row("amgfx snp+amg", target, pruned)
        row("amgfx snp+amg, reconstructed", target, fit)
        row("amgfx snp+amg, reconstructed + recover", target, *recovered(fit))
        t = time.perf_counter()
        it = amgfx.prune(cg, method="snp+amg", target_flops=target, calib=calib, progress=False,
                         schedule=amgfx.Iterative(steps=3, recover_steps=a.steps // 3, data=data, recover=KD))
        row("amgfx snp+amg, Iterative(3) + recover", target, it, time.perf_counter() - t)
        tp, _, _ = tp_at(dense, flops(pruned, example), "magnitude", xtr[:64], example)
        tp = _no_dropout(tp)
        row("Torch-Pruning magnitude", target, tp)
        row("Torch-Pruning magnitude + recover", target, *recovered(tp))
    _write(a, rows, dense_acc)


def _write(a, rows, dense_acc):
    lines = ["# Recovery on the trained digits ViT", "",
             f"`python -m benchmarks.recovery_digits --targets {' '.join(map(str, a.targets))} --steps {a.steps}`: "
             f"the digits ViT (dense test top-1 {dense_acc:.4f}) pruned to each FLOPs target, then recovered by "
             f"`amgfx.recover` ({a.steps} steps of logits KD, T=2, AdamW 1e-3 with cosine decay, batches of 64 "
             "training images, no labels). FLOPs measured on the pruned model (`FlopCounterMode`); top-1 on the 450 "
             f"held-out test images; recovery time is wall time on this machine (budget {BUDGET_S:.0f} s). "
             "Every row from this one run.", "",
             "| method | target | FLOPs kept | test top-1 | vs dense (pt) | recovery steps | recovery time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.0f}" + (" (over budget)" if r["seconds"] > BUDGET_S
                                                                        else "")
        lines.append(f"| {r['method']} | {r['target']:.0%} | {r['flops']:.3f} | {r['acc']:.4f} | "
                     f"{100 * (r['acc'] - dense_acc):+.1f} | {r['steps']} | {sec} |")
    write_md(f"{RESULTS}/recovery_digits.md", lines)
    _plot(rows, dense_acc, f"{RESULTS}/recovery_digits.png")


def _plot(rows, dense_acc, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    style = {"amgfx snp+amg": ("C0", "o", ":"), "amgfx snp+amg, reconstructed": ("C1", "o", "--"),
             "amgfx snp+amg, reconstructed + recover": ("C0", "o", "-"),
             "amgfx snp+amg, Iterative(3) + recover": ("C2", "s", "-"),
             "Torch-Pruning magnitude": ("C3", "^", "--"), "Torch-Pruning magnitude + recover": ("C3", "^", "-")}
    for name, (c, mk, ls) in style.items():
        pts = sorted((r["flops"], r["acc"]) for r in rows if r["method"] == name)
        if pts:
            ax.plot(*zip(*pts), color=c, marker=mk, linestyle=ls, label=name)
    ax.axhline(dense_acc, color="k", lw=0.8, ls=":", label=f"dense ({dense_acc:.3f})")
    ax.set_xlabel("FLOPs kept (fraction of dense)")
    ax.set_ylabel("test top-1 (450 held-out digits)")
    ax.set_title("digits ViT: accuracy vs FLOPs, with and without recovery")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
