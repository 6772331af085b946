"""Accuracy vs FLOPs kept, from 90% to 30%, no fine-tuning: every criterion on one plot.

Run: ``python -m benchmarks.accuracy_sweep [--targets 0.9 0.7 0.5 0.3]``. Writes
``benchmarks/results/accuracy_sweep.md`` and ``accuracy_sweep.png``.

* **Digits ViT** (:mod:`benchmarks.digits_vit`, trained): test top-1 on the 450 held-out images,
  for every amgfx criterion and Torch-Pruning magnitude and Taylor (its ratio bisected to amgfx
  snp's FLOPs within 2%, forward patched by hand; see :mod:`benchmarks.criteria_digits`).
* **MiniLM-L6** (real weights): mean cosine between dense and pruned sentence embeddings on 325
  held-out paragraphs (see :mod:`benchmarks.criteria_minilm`). Torch-Pruning is not run on it.

Each criterion scores once on its calibration data; :func:`amgfx.budget.allocate` then plans
every target from the same scores. Every amgfx plan is evaluated twice: as rewritten and after
:func:`amgfx.reconstruct` on the same calibration data (the layer-wise refit, no training).
"""
from __future__ import annotations

import argparse
import os

import torch

import amgfx
from amgfx import data, models
from amgfx.planning.budget import allocate

from ._report import RESULTS, pyplot, write_md
from .criteria_digits import tp_at
from .criteria_minilm import BATCH, SEQ, agreement, heldout
from .digits_vit import accuracy, task

DIGITS = ["snp", "snp+amg", "taylor", "obs", "magnitude", "random"]
TEXT = ["snp", "snp+amg", "taylor", "obs", "magnitude", "random"]


def _sweep(cg, methods, calib, targets, evaluate, flops) -> list:
    rows = []
    dense = flops(cg.gm)
    for method in methods:
        s = amgfx.score(cg, method, calib, progress=False)
        for t in targets:
            pruned = amgfx.apply(cg, allocate(cg, s.units, t))
            fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
            rows.append((f"amgfx {method}", t, flops(pruned) / dense, evaluate(pruned), evaluate(fit)))
            print(rows[-1], flush=True)
    return rows


def digits_rows(targets) -> list:
    torch.manual_seed(0)
    dense, example, _, calib_x, calib, xte, yte = task(64)
    cg = amgfx.analyze(dense, example)
    flops = lambda m: amgfx.cost.measure_flops(m, ((example,), {}))
    rows = [("dense", 1.0, 1.0, accuracy(dense, xte, yte), None)]
    rows += _sweep(cg, DIGITS, calib, targets,
                   lambda m: accuracy(m, xte, yte, batch=1), flops)
    snp = {t: f for name, t, f, *_ in rows if name == "amgfx snp"}
    for kind in ("magnitude", "taylor"):
        for t in targets:
            m, f, _ = tp_at(dense, int(snp[t] * flops(cg.gm)), kind, calib_x, example)
            rows.append((f"Torch-Pruning {kind}", t, f / flops(cg.gm), accuracy(m, xte, yte), None))
            print(rows[-1], flush=True)
    return rows


def minilm_rows(targets) -> list:
    path = str(models.minilm_dir())
    loaded = models.load(models.MINILM)
    enc = models.tokenize(path, data.text("calib", 64), SEQ)
    calib = [{k: v[i:i + BATCH] for k, v in enc.items()} for i in range(0, 64, BATCH)]
    cg = amgfx.analyze(loaded.model, (), {k: v[:BATCH] for k, v in enc.items()})
    ev = heldout(path, cg.gm)
    rows = [("dense", 1.0, 1.0, agreement(cg.gm, ev)[0], None)]
    return rows + _sweep(cg, TEXT, calib, targets, lambda m: agreement(m, ev)[0], amgfx.cost.measure_flops)


def plot(d_rows, t_rows, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, rows, ylabel, title in ((axes[0], d_rows, "test top-1", "digits ViT (trained), no fine-tuning"),
                                    (axes[1], t_rows, "cosine to dense embeddings", "MiniLM-L6 (real), no fine-tuning")):
        for i, name in enumerate(dict.fromkeys(r[0] for r in rows if r[0] != "dense")):
            colour = f"C{i}"
            pts = sorted((r[2], r[3]) for r in rows if r[0] == name)
            if name.startswith("amgfx"):       # solid: reconstructed; dotted: the same plan as rewritten
                fit = sorted((r[2], r[4]) for r in rows if r[0] == name)
                ax.plot([p[0] for p in fit], [p[1] for p in fit], "o-", color=colour, label=f"{name}, reconstructed")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o:", color=colour, alpha=0.5, lw=1)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color=colour, label=name)
        dense = next(r[3] for r in rows if r[0] == "dense")
        ax.axhline(dense, color="k", lw=0.8, ls=":", label="dense")
        ax.set_xlabel("FLOPs kept (measured)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    ap.add_argument("--out", default=os.path.join(RESULTS, "accuracy_sweep.md"))
    a = ap.parse_args(argv)
    d_rows, t_rows = digits_rows(a.targets), minilm_rows(a.targets)
    lines = ["# Accuracy vs FLOPs kept, no fine-tuning", "",
             f"`python -m benchmarks.accuracy_sweep --targets {' '.join(map(str, a.targets))}`. Digits ViT: top-1 on 450 "
             "held-out test images (calibration: 64 training images). MiniLM-L6: mean cosine to the dense embeddings on "
             "325 held-out paragraphs (calibration: 64 paragraphs, 128 tokens). FLOPs measured by `FlopCounterMode` on the "
             "pruned model. Torch-Pruning: ratio bisected to amgfx snp's FLOPs (within 2%), forward fixed by hand. Every "
             "row from this one run. \"reconstructed\": the same plan after `amgfx.reconstruct` on the calibration data "
             "(no training); in the plot, solid lines are reconstructed and faint dotted lines the same plans as rewritten.",
             "", "| model | method | FLOPs target | FLOPs kept | score | score, reconstructed |", "|---|---|---|---|---|---|"]
    cell = lambda v: "-" if v is None else f"{v:.4f}"
    lines += [f"| digits ViT | {n} | {t:.0%} | {f:.3f} | {s:.4f} | {cell(r)} |" for n, t, f, s, r in d_rows]
    lines += [f"| MiniLM-L6 | {n} | {t:.0%} | {f:.3f} | {s:.4f} | {cell(r)} |" for n, t, f, s, r in t_rows]
    write_md(a.out, lines)
    plot(d_rows, t_rows, a.out.replace(".md", ".png"))


if __name__ == "__main__":
    main()
