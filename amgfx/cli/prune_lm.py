"""``amgfx prune`` on a causal LM: its prefill and decode step pruned by one plan, judged by perplexity.

A causal LM (``smollm2-135m``, a ``.gguf`` file, a Hugging Face ``*ForCausalLM`` directory) is pruned as an
:func:`amgfx.decoder`: calibration is ``--calib-samples`` windows of ``--seq-len`` tokens of the standard
library's prose, perplexity is measured on windows of other modules' prose (never calibrated on), the
budget is a fraction of the decoder blocks' FLOPs by default, and ``--out`` holds a decoder that
``amgfx generate OUT`` runs (its tokenizer copied beside it; ``--onnx`` adds prefill.onnx and decode.onnx).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from .. import data, models
from ..sequence import captured, run
from ..decode import decoder, generate
from ..errors import AmgfxError
from ..files import save
from ..memory import peak_mb
from ..planning.config import config_from_options
from ..planning.plan import Plan
from ..runtime import export_onnx
from ..weights.config import RecoverConfig
from . import grammar
from ._common import auto_line, err, pinned_line, recovery_lines

PROMPTS = ("The capital of France is", "def fibonacci(n):")
EVAL_WINDOWS = 32
# the refit runs forward only: twice the scoring's windows cost it about a minute on SmolLM2 and, at 50% of
# block FLOPs, perplexity after refit is 55.9 (benchmarks/results/llm_real.md) against 61.8 on the scoring's 64
REFIT_WINDOWS = 128
# recovery of a causal LM when the flags leave it (measured on SmolLM2; the table and why: grammar.RECOVER)
RECOVER = grammar.RECOVER["lm"]


def _windows(encode, split: str, seq: int, n: int, batch: int):
    w = data.token_windows(encode, split, seq)
    n = min(n, len(w)) // batch * batch
    if n == 0:
        raise AmgfxError(f"the {split} text has {len(w)} windows of {seq} tokens, fewer than one batch of {batch}")
    return w[:n]


def _generate(dec, tok, max_new: int = 32) -> list[str]:
    rows = [tok(p, add_special_tokens=False)["input_ids"][-dec.prompt_len:] for p in PROMPTS]
    out = generate(dec, rows, max_new_tokens=min(max_new, dec.max_len - dec.prompt_len + 1), eos_token_id=None)
    return [tok.decode(r) for r in out]


def _recover_windows(a, encode) -> list:
    """Recovery's batches of windows: the calibration split's and the training split's (never the evaluation's),
    shuffled (seeded). On SmolLM2 at 50% of block FLOPs, 200 steps on these 634 windows reached perplexity 33.42
    against 37.88 on the calibration split's 147 (benchmarks/results/llm_real_distill.md)."""
    w = data.distill_windows(encode, a.seq_len, seed=a.seed)[:a.recover_samples]
    b = a.recover_batch or RECOVER["batch"]
    if len(w) < b:
        raise AmgfxError(f"--recover-samples {len(w)} is fewer than one --recover-batch of {b} windows")
    a.recover_windows = len(w) // b * b
    return [w[i:i + b] for i in range(0, a.recover_windows, b)]


def _prune(a, dense, calib: list, fit: list, encode):
    """The prune sequence on the decoder: (the pruned Decoder, the refitted one before recovery or None)."""
    scope = a.budget_scope if a.budget_scope != "auto" else "blocks"
    cfg = config_from_options(None, method=a.method, target_flops=None if (a.ratios or a.plan) else a.target_flops,
                              ratios=a.ratios, score_batches=len(calib), kinds=a.kinds, round_to=a.round_to,
                              min_keep=a.min_keep, protect=a.protect, same_head_dim=a.same_head_dim, seed=a.seed,
                              scope=scope, allocation=a.allocation, rank=a.rank, massive=a.massive)
    recover = None
    if a.recover_steps:
        recover = RecoverConfig(steps=a.recover_steps, lr=a.recover_lr or RECOVER["lr"], loss=a.recover_loss or "kd",
                                temperature=RECOVER["temperature"], seed=a.seed)
    cap = captured(dense, seed=a.seed)
    out = run(cap, cfg, calib=fit, plan=_plan(a), reconstruct=not a.no_reconstruct, recover=recover,
              recover_data=_recover_windows(a, encode) if recover else None, progress=not (a.quiet or a.json))
    small = cap.finish(out.graphs(), out.plan)
    before = None
    if out.recovered is not None:           # the same decoder as refitted, for perplexity before recovery
        before = dataclasses.replace(small, prefill=out.refitted if out.refitted is not None else out.pruned[0])
    return small, before


def calib_note(n: int, seq: int) -> str:
    """What an LM was calibrated on, for its report (the whole and the streamed route)."""
    return f"{n} windows of {seq} tokens of standard-library docstrings"


def _report(a, loaded, dense, small, ppl, texts, seconds) -> dict:
    flops = small.plan.meta.get("flops", {})
    blocks = flops.get("blocks", {})
    count = lambda d: sum(p.numel() for p in {id(p): p for p in d.prefill.parameters()}.values())
    out = {"model": a.model, "method": a.method, "scope": small.plan.meta.get("scope", "model"),
           "calibration": calib_note(a.calib_samples, a.seq_len)
                          + (f" (the refit: {a.refit_samples})" if a.refit_samples != a.calib_samples else ""),
           "params": {"dense": count(dense), "pruned": count(small)},
           "flops": {"dense": flops.get("dense"), "pruned": flops.get("planned"),
                     **({"blocks_dense": blocks["dense"], "blocks_pruned": blocks["planned"]} if blocks else {})},
           "kv_cache_bytes_per_token": {"dense": dense.cache_bytes_per_token(), "pruned": small.cache_bytes_per_token()},
           "perplexity": ppl, "perplexity_on": f"{EVAL_WINDOWS} held-out windows of {a.seq_len} tokens",
           "generate": {"prompts": list(PROMPTS), **texts}, "seconds": seconds, "peak_memory_mb": round(peak_mb())}
    if small.plan.meta.get("reconstruction"):
        out["reconstruction"] = small.plan.meta["reconstruction"]
    if "auto" in small.plan.meta:
        out["auto"] = small.plan.meta["auto"]
    if pinned_line(small.plan.meta):
        out["pinned"] = pinned_line(small.plan.meta)
    rec = small.prefill.meta.get("amgfx_recovery")
    if rec:
        out["recovery"] = {"data": f"{a.recover_windows} windows of {a.seq_len} tokens of the calibration and "
                                   "training splits' docstrings", **rec}
    return out


def _print(r: dict) -> None:
    f, p = r["flops"], r["params"]
    print(f"{r['model']}; {r['method']} on {r['calibration']}")
    rows = [("params", p["dense"], p["pruned"]), ("FLOPs (whole graph)", f["dense"], f["pruned"])]
    if "blocks_dense" in f:
        rows.append(("FLOPs (decoder blocks)", f["blocks_dense"], f["blocks_pruned"]))
    kv = r["kv_cache_bytes_per_token"]
    rows.append(("KV cache bytes/token", kv["dense"], kv["pruned"]))
    print(f"{'':<26}{'dense':>16}{'pruned':>16}{'pruned/dense':>14}")
    for name, d, q in rows:
        print(f"{name:<26}{d:>16,}{q:>16,}{q / d:>14.3f}")
    pp = r["perplexity"]
    if "before_recovery" in pp:
        b = pp["before_recovery"]
        print(f"{'perplexity, no recovery':<26}{pp['dense']:>16.2f}{b:>16.2f}{b / pp['dense']:>14.3f}")
    label = "perplexity" + (f", {r['recovery']['steps']} steps" if "recovery" in r else "")
    print(f"{label:<26}{pp['dense']:>16.2f}{pp['pruned']:>16.2f}{pp['pruned'] / pp['dense']:>14.3f}")
    print(f"perplexity on {r['perplexity_on']}")
    if "auto" in r:
        print(auto_line(r["auto"]))
    if "pinned" in r:
        print(r["pinned"])
    for line in recovery_lines(r["recovery"]) if "recovery" in r else []:
        print(line)
    for i, prompt in enumerate(r["generate"]["prompts"]):
        print(f"prompt {prompt!r}\n   dense: {r['generate']['dense'][i]!r}\n  pruned: {r['generate']['pruned'][i]!r}")
    s = r["seconds"]
    steps = "analyse, score, plan, rewrite, verify, refit" + (", recover" if "recovery" in r else "")
    print(f"time: load {s['load']:.1f}s, prune ({steps}) {s['prune']:.1f}s, "
          f"evaluate {s['evaluate']:.1f}s; peak memory {r['peak_memory_mb']:,} MB")


def cmd_prune_lm(a, loaded, t_load: float) -> int:
    """The LM route of ``amgfx prune`` (``loaded`` is the causal LM, already loaded)."""
    say = (lambda *x: None) if (a.quiet or a.json) else (lambda *x: print(*x, file=sys.stderr, flush=True))
    if a.calib not in ("text", "example"):
        return err(f"--calib {a.calib}: a causal LM calibrates on text (--calib text)")
    if a.iterative > 1 or a.tokens or a.target_latency is not None:
        return err("--iterative, --tokens and --target-latency are not available for causal LMs yet")
    if a.recover_data not in (None, "text"):
        return err(f"--recover-data {a.recover_data}: a causal LM recovers on text (--recover-data text)")
    try:
        tok = models.tokenizer(loaded.path, ["The quick brown fox jumps over the lazy dog."])
        encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]
        a.refit_samples = max(REFIT_WINDOWS, a.calib_samples) if a.refit_samples is None else a.refit_samples
        windows = _windows(encode, "calib", a.seq_len, max(a.calib_samples, a.refit_samples), a.batch_size)
        whole = lambda k: max(a.batch_size, k // a.batch_size * a.batch_size)     # whole batches
        calib, fit = windows[:whole(a.calib_samples)], windows[:whole(a.refit_samples)]
        held = _windows(encode, "eval", a.seq_len, EVAL_WINDOWS, 1)
        a.calib_samples, a.refit_samples = len(calib), len(fit)
        rows = lambda w: [w[i:i + a.batch_size] for i in range(0, len(w), a.batch_size)]
        # captured at batch 1: the analysis and the rewrite work on masks of the graph's shapes (4x fewer
        # rows than at batch 4); calibration batches are run in rows of the captured batch anyway
        dense = decoder(loaded.model, max_len=a.seq_len + 32, prompt_len=a.seq_len, batch=1)
        dense.meta["tokenizer"] = loaded.path
        t0 = time.perf_counter()
        say(f"pruning {a.model} as a decoder (prefill + decode step, one plan) on {len(calib)} windows ...")
        small, before = _prune(a, dense, rows(calib), rows(fit), encode)
        t1 = time.perf_counter()
        say("measuring perplexity on held-out text and generating ...")
        ppl = {"dense": round(dense.perplexity(held), 3), "pruned": round(small.perplexity(held), 3)}
        if before is not None:
            ppl["before_recovery"] = round(before.perplexity(held), 3)
        texts = {"dense": _generate(dense, tok), "pruned": _generate(small, tok)}
        t2 = time.perf_counter()
        files = []
        if a.out:
            say(f"saving the decoder to {a.out} ...")
            small.meta["tokenizer"] = loaded.path
            save(small, a.out)
            files = [os.path.join(a.out, f) for f in ("decoder.pt2", "plan.json", "manifest.json")]
            if a.onnx:
                export_onnx(small, a.out)
                files += [os.path.join(a.out, f) for f in ("prefill.onnx", "decode.onnx")]
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    except OSError as e:
        return err(f"cannot write to {a.out}: {e}")
    report = _report(a, loaded, dense, small, ppl, texts, {"load": round(t_load, 2), "prune": round(t1 - t0, 2),
                                                            "evaluate": round(t2 - t1, 2)})
    return emit(a, report, files, lambda: _print(report))


def emit(a, report: dict, files: list, show) -> int:
    """``report.json`` into ``--out``, then the report as JSON (``--json``), or ``show()`` and the files written."""
    if a.out:
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        files.append(os.path.join(a.out, "report.json"))
    if a.json:
        print(json.dumps({**report, "files": files}))
    elif not a.quiet:
        show()
        if files:
            print("wrote " + ", ".join(files))
    return 0


def _plan(a):
    return Plan.load(a.plan) if a.plan else None
