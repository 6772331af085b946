"""``amgfx prune DIR --stream``: a Hugging Face causal LM pruned one block at a time (:mod:`amgfx.stream`).

Taken with ``--stream``, and by itself when the model's weights in float32 are over 2 GiB (about 500M
parameters) or half the memory this machine has free: the whole-model route holds the dense model, its
graphs and the pruned one at once. Calibration and held-out text are the LM route's (token windows of standard-library prose); the
output is the same Decoder directory (``decoder.pt2``, ``plan.json``, ``manifest.json``, the tokenizer),
plus ``stream.json`` (every segment: its groups, seconds, memory, the oracle's verdict). The dense model's
perplexity is not measured here: that would load it whole.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import tempfile
import time

from .. import models
from ..errors import AmgfxError
from ..files import save
from ..memory import peak_mb
from ._common import err, pinned_line
from .prune_lm import EVAL_WINDOWS, PROMPTS, _generate, _windows, calib_note, emit

STREAM_ABOVE = 2 * 2**30    # float32 weights above this (about 500M parameters) stream ...
STREAM_HEADROOM = 0.5       # ... as do those over this share of the memory available


def footprint(path: str) -> tuple[int, int]:
    """``(bytes of the directory's weights in float32, bytes of memory available)``, from the safetensors
    headers and ``/proc/meminfo``: nothing is loaded."""
    numel = sum(math.prod(v["shape"]) for f in glob.glob(os.path.join(path, "*.safetensors"))
                for v in models.safetensors_header(f).values())
    avail = 0
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        pass
    return 4 * numel, avail


def wants_stream(a, path: str | None) -> bool:
    """``--stream``, or a directory too big to prune whole (:data:`STREAM_ABOVE`, :data:`STREAM_HEADROOM`): the
    whole-model route holds the dense model, its graphs, the pruned one and calibration state at once, several
    times the weights."""
    if path is None:
        return False
    if getattr(a, "stream", False):
        return True
    need, avail = footprint(path)
    return need > STREAM_ABOVE or (bool(avail) and need > STREAM_HEADROOM * avail)


def _refusal(a, path: str) -> str | None:
    """Why this command cannot stream, or None."""
    import transformers as tf
    if not models.is_causal_lm(tf.AutoConfig.from_pretrained(path)):
        return (f"{path}: streaming from the command line is for causal LMs (a *ForCausalLM directory); "
                "an encoder streams with amgfx.stream.prune_streamed in Python")
    if a.calib not in ("text", "example"):
        return f"--calib {a.calib}: a causal LM calibrates on text (--calib text)"
    if a.resume and not a.out:
        return "--resume goes on from the run in --out DIR; give --out"
    if (a.recover_steps or a.iterative > 1 or a.tokens or a.target_latency is not None or a.plan or a.onnx
            or a.refit_samples is not None or a.allocation != "ranking" or a.rank == "per_ms"):
        return ("--stream prunes by --target-flops or --ratios; recovery, --iterative, --tokens, "
                "--target-latency, --plan, --onnx, --refit-samples, --allocation error and --rank per_ms are not "
                "available while streaming yet")
    return None


def cmd_prune_stream(a, path: str) -> int:
    say = (lambda *x: None) if (a.quiet or a.json) else (lambda *x: print(*x, file=sys.stderr, flush=True))
    from ..stream import STREAM_METHOD, prune_streamed     # (the streaming machinery: only when it runs)
    why = _refusal(a, path)
    if why:
        return err(why)
    need, avail = footprint(path)
    t0 = time.perf_counter()
    work = os.path.join(a.out, "stream") if a.out else tempfile.mkdtemp(prefix="amgfx-stream-")
    try:
        tok = models.tokenizer(path, ["The quick brown fox jumps over the lazy dog."])
        encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]
        windows = _windows(encode, "calib", a.seq_len, a.calib_samples, a.batch_size)
        held = _windows(encode, "eval", a.seq_len, EVAL_WINDOWS, 1)
        calib = [windows[i:i + a.batch_size] for i in range(0, len(windows), a.batch_size)]
        say(f"streaming {path} ({need / 2**30:.1f} GiB in float32, {avail / 2**30:.1f} GiB available) block by "
            f"block on {len(windows)} windows of {a.seq_len} tokens ...")
        method = a.method if a.method not in (None, "auto") else STREAM_METHOD
        scope = a.budget_scope if a.budget_scope != "auto" else "blocks"
        r = prune_streamed(path, calib=calib, out=work, resume=a.resume, reconstruct=not a.no_reconstruct, method=method,
                           target_flops=None if a.ratios else a.target_flops, ratios=a.ratios, kinds=a.kinds,
                           round_to=a.round_to, min_keep=a.min_keep, protect=a.protect,
                           same_head_dim=a.same_head_dim, massive=a.massive, seed=a.seed, scope=scope, progress=not (a.quiet or a.json))
        t1 = time.perf_counter()
        say("assembling the pruned decoder and measuring its perplexity on held-out text ...")
        small = r.model()
        small.meta["tokenizer"] = path
        ppl = round(small.perplexity(held), 3)
        texts = _generate(small, tok)
        files = []
        if a.out:
            save(small, a.out)            # manifest.json last: an interrupted run leaves nothing that loads
            files = [os.path.join(a.out, f) for f in ("decoder.pt2", "plan.json", "manifest.json")]
        t2 = time.perf_counter()
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    except OSError as e:
        return err(f"cannot write to {a.out}: {e}")
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)
    report = _report(a, r, method, scope, windows, ppl, texts, need, t2 - t1, t2 - t0)
    for f in glob.glob(os.path.join(work, "segment-*.safetensors")) if a.out else ():
        os.remove(f)                      # decoder.pt2 holds them now
    return emit(a, report, files, lambda: _print(a, r, report))


def _report(a, r, method, scope, windows, ppl, texts, need, t_eval, t_total) -> dict:
    pinned = pinned_line(r.plan.meta)
    return {"model": a.model, "method": method, "streamed": True, "scope": scope,
            "calibration": calib_note(len(windows), a.seq_len),
            "flops": r.plan.meta.get("flops", {}),
            "perplexity": {"pruned": ppl, "on": f"{EVAL_WINDOWS} held-out windows of {a.seq_len} tokens", "dense": None},
            "generate": {"prompts": list(PROMPTS), "pruned": texts},
            "segments": [s.__dict__ for s in r.segments], "verified": all(s.verified for s in r.segments if s.groups),
            "seconds": {**{k: round(v, 2) for k, v in r.seconds.items()}, "assemble+evaluate+save": round(t_eval, 2),
                        "total": round(t_total, 2)},
            "peak_memory_mb": round(peak_mb()), "weights_float32_mb": round(need / 2**20),
            **({"pinned": pinned} if pinned else {})}


def _print(a, r, report: dict) -> None:
    b = report["flops"].get("blocks", {})
    print(f"{a.model}; {report['method']}, streamed block by block on {report['calibration']}")
    if b:
        print(f"FLOPs (decoder blocks) {b['dense']:,} -> {b['planned']:,} ({b['planned'] / b['dense']:.3f})")
    print(f"perplexity (pruned) {report['perplexity']['pruned']:.2f} on {report['perplexity']['on']}; dense not "
          "measured (not loaded whole)")
    print(f"{sum(1 for s in r.segments if s.verified)} of {sum(1 for s in r.segments if s.groups)} pruned "
          f"segments verified against the zeroing oracle")
    if "pinned" in report:
        print(report["pinned"])
    s = report["seconds"]
    print(f"time: capture {s['capture']:.1f}s, score {s.get('score', 0):.1f}s, plan {s.get('plan', 0):.1f}s, "
          f"prune+refit {s['prune']:.1f}s, assemble+evaluate+save {s['assemble+evaluate+save']:.1f}s; peak memory "
          f"{report['peak_memory_mb']:,} MB (weights in float32: {report['weights_float32_mb']:,} MB)")
