"""A pruned language model that still generates: held-out perplexity, decode speed and KV-cache size.

Run: ``python -m benchmarks.decoder_lm``. Writes ``benchmarks/results/decoder_lm.md``.

The model is ``amgfx-lm`` (:mod:`amgfx.decode.lm`): a byte-level, LLaMA-shaped LM (4 layers, width 256,
4 query heads over 2 kv heads) trained here on standard-library docstrings and cached (trained on first
use, a few minutes on 2 cores). It is wrapped as an :func:`amgfx.decoder` (prefill + decode step over a
KV cache) and pruned to 70% and 50% of the prefill's FLOPs by each criterion, calibrating on 64 windows
of the training text. Perplexity is measured on 64 windows of 128 bytes from modules training never read,
as the rewrite leaves the model, after :func:`amgfx.reconstruct` (least-squares refit on the calibration
windows), and after ``--recover-steps`` of distillation from the dense model (the best 50% plan).
Speed: prefill and decode tokens per second at batch 1 and 8, dense and pruned timed interleaved in
this one run (eager PyTorch, median of the repeats).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import amgfx
from amgfx.decode import lm as lmod
from amgfx.graph.fx import tie_tensors

from ._report import RESULTS, write_md

METHODS = ["magnitude", "snp", "taylor", "obs+snp", "auto"]     # auto: the default, its choice in the row's name
TARGETS = [0.7, 0.5]
SEQ, BATCH = 128, 8
PROMPT = "Return a new list containing"


def ppl(prefill_of, dec, ids) -> float:
    return lmod.perplexity(lambda x: prefill_of(*dec.prefill_inputs(x))[0], ids, dec.batch)


def speed(decs: dict, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """Median prefill and decode tokens/s of every decoder, timed in turn (interleaved) ``repeats`` times."""
    ids = lmod.windows("eval", prompt, batch, stride=1013)
    times = {k: {"prefill": [], "decode": []} for k in decs}
    with torch.no_grad():
        for _ in range(repeats):
            for k, d in decs.items():
                inputs = d.prefill_inputs(ids)
                t = time.perf_counter()
                logits, *cache = d.prefill(*inputs)
                times[k]["prefill"].append(time.perf_counter() - t)
                tok, pos = logits[:, -1].argmax(-1), torch.full((batch,), prompt)
                t = time.perf_counter()
                for i in range(new):
                    logits, *cache = d.decode(*d.decode_inputs(tok, pos + i, prompt + i, inputs[3], cache))
                    tok = logits[:, -1].argmax(-1)
                times[k]["decode"].append(time.perf_counter() - t)
    return {k: {"prefill": batch * prompt / statistics.median(v["prefill"]),
                "decode": batch * new / statistics.median(v["decode"])} for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recover-steps", type=int, default=100, help="distillation steps for the best 50%% plan")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (default 7)")
    a = ap.parse_args(argv)
    lm = lmod.bench_lm()
    calib = list(lmod.windows("train", SEQ, 64, stride=997).split(BATCH))
    ev = lmod.windows("eval", SEQ, 64)
    dense = amgfx.decoder(lm, max_len=SEQ + 32, prompt_len=SEQ, batch=BATCH)
    rows = [{"name": "dense", "flops": 1.0, "cache": dense.cache_bytes_per_token(), "ppl": ppl(dense.prefill, dense, ev)}]
    print(rows[-1], flush=True)
    best = None
    for target in TARGETS:
        for method in METHODS:
            t = time.perf_counter()
            small = amgfx.prune(dense, method=method, target_flops=target, calib=calib, reconstruct=False,
                                progress=False)
            cg = small.meta["coupling"]["prefill"]
            calib_in = [dense.prefill_inputs(x) for x in calib]   # dense-shaped: the refit runs both
            fit = amgfx.reconstruct(small.prefill, cg, calib_in, progress=False)
            f = small.plan.meta["flops"]
            name = f"auto (chose {small.plan.meta['auto']['chosen']})" if method == "auto" else method
            row = {"name": name, "target": target, "flops": amgfx.cost.measure_flops(small.prefill) / amgfx.cost.measure_flops(cg.gm),
                   "planned": f["planned"] / f["dense"], "cache": small.cache_bytes_per_token(),
                   "ppl": ppl(small.prefill, small, ev), "ppl_fit": ppl(fit, small, ev), "s": time.perf_counter() - t}
            rows.append(row)
            print(row, flush=True)
            if target == 0.5 and (best is None or row["ppl_fit"] < best[0]["ppl_fit"]):
                best = (row, small, fit)
    row, small, fit = best
    rec = amgfx.recover(fit, small.meta["coupling"]["prefill"].gm, [dense.prefill_inputs(x) for x in calib],
                        steps=a.recover_steps, lr=1e-3, progress=False)
    ppl_rec = ppl(rec, small, ev)
    print("recovered", ppl_rec, flush=True)

    # speed and text: the best 50% plan replayed on decoders of batch 1 and 8, with the refit weights
    def pruned_at(batch):
        d = amgfx.decoder(lm, max_len=96, prompt_len=64, batch=batch)
        p = amgfx.prune(d, plan=small.plan, progress=False)
        tie_tensors(fit, p.prefill)
        tie_tensors(fit, p.decode)
        return d, p
    speeds = {}
    for b in (1, 8):
        d, p = pruned_at(b)
        speeds[b] = speed({"dense": d, "pruned": p}, b, 64, 32, a.repeats)
        print(b, speeds[b], flush=True)
        if b == 1:
            texts = {k: lmod.decode(amgfx.generate(m, [lmod.encode(PROMPT)], max_new_tokens=32)[0])
                     for k, m in (("dense", d), ("pruned", p))}

    lines = ["# A pruned LM that still generates", "",
             f"`python -m benchmarks.decoder_lm` on torch {torch.__version__}: `amgfx-lm` "
             f"({sum(p.numel() for p in lm.parameters()):,} parameters, byte-level LLaMA with 2 kv heads, trained on "
             "standard-library docstrings) as prefill + decode graphs over a KV cache, pruned to a fraction of the "
             f"prefill's FLOPs ({BATCH} x {SEQ} bytes, `FlopCounterMode`) by each criterion (and by `auto`, the default, which holds out a quarter of the windows to choose), calibrated on 64 windows "
             f"of the training text; perplexity on {len(ev)} held-out windows of {SEQ} bytes from other modules. "
             "Every row from this one run.", "",
             "| plan | FLOPs kept | KV cache bytes/token | perplexity | perplexity, reconstructed | time (s) |",
             "|---|---|---|---|---|---|",
             f"| dense | 1.000 | {rows[0]['cache']:,} | {rows[0]['ppl']:.3f} | - | - |"]
    lines += [f"| {r['name']} @ {r['target']:.0%} | {r['flops']:.3f} | {r['cache']:,} | {r['ppl']:.3f} | "
              f"{r['ppl_fit']:.3f} | {r['s']:.1f} |" for r in rows[1:]]
    lines += ["", f"The best 50% plan ({row['name']}, reconstructed) after {a.recover_steps} steps of distillation "
              f"from the dense model on the calibration windows: perplexity **{ppl_rec:.3f}** (dense "
              f"{rows[0]['ppl']:.3f}, before distillation {row['ppl_fit']:.3f}).", "",
              f"Tokens per second, eager PyTorch, 64-byte prompts, 32 new tokens (median of {a.repeats}, interleaved), "
              f"the best 50% plan:", "",
              "| batch | prefill dense | prefill pruned | speedup | decode dense | decode pruned | speedup |",
              "|---|---|---|---|---|---|---|"]
    for b, s in speeds.items():
        lines.append(f"| {b} | {s['dense']['prefill']:,.0f} | {s['pruned']['prefill']:,.0f} | "
                     f"{s['pruned']['prefill'] / s['dense']['prefill']:.2f}x | {s['dense']['decode']:,.0f} | "
                     f"{s['pruned']['decode']:,.0f} | {s['pruned']['decode'] / s['dense']['decode']:.2f}x |")
    lines += ["", f"Greedy text after {PROMPT!r}:", "", f"- dense: `{texts['dense']!r}`",
              f"- pruned: `{texts['pruned']!r}`"]
    write_md(f"{RESULTS}/decoder_lm.md", lines)


if __name__ == "__main__":
    main()
