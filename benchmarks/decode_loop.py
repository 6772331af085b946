"""The decode loop: what writing the cache in place saves, and where a token's time goes at batch 1.

Run: ``python -m benchmarks.decode_loop``. Writes ``benchmarks/results/decode_loop.md``.

1. **Copy against in place.** The dense ``amgfx-lm`` decoder's captured graphs decode 32 tokens two ways,
   interleaved, median of ``--repeats``: as before (``index_copy`` out of place; in onnxruntime a ``ScatterND``
   between two ``Transpose``, inputs fed as numpy arrays) and as :func:`amgfx.generate` runs them now
   (:func:`amgfx.decode.generate.runners`: ``index_copy_``; one ``ScatterElements`` per write, bound in place).
   At 96 cache slots (``decode_speed``'s setting) and 512, batch 1 and 8. The tokens must agree.
2. **The loop's own work.** ``cProfile`` of :func:`amgfx.generate` at batch 1 on ``amgfx-lm`` (4 layers) and
   an untrained copy with 16 layers: per token, milliseconds in the runtime (onnxruntime's
   ``run_with_iobinding``; eager: the graph's ``forward``, of which its own Python lines and the op
   overloads' Python), in amgfx's binding around it, and in generate's loop. The profiler slows Python
   code, so these are upper bounds; the unprofiled ms/token is given beside them.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import statistics
import tempfile
import time

import torch

import amgfx
import amgfx.runtime as rt
from amgfx.decode import lm as lmod
from amgfx.decode.capture import capture_decoder
from amgfx.decode.generate import runners

from ._report import RESULTS, write_md

NEW = 32


class Copying:
    """onnxruntime as amgfx ran a decoder before: inputs fed as numpy, outputs allocated per call."""

    def __init__(self, path):
        self.session = rt.ort_session(path, spinning=False)
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args):
        return [torch.from_numpy(a) for a in self.session.run(None, {n: t.numpy() for n, t in zip(self.names, args)})]


def graphs(lm, prompt, batch):
    dec = amgfx.decoder(lm, max_len=prompt + NEW, prompt_len=prompt, batch=batch)
    cap = capture_decoder(dec)
    return dataclasses.replace(dec, prefill=cap.graphs[0].gm, decode=cap.graphs[1].gm)


def onnx_pair(dec, tmp):
    """(copying, in place) onnxruntime decoders: the first exported without the scatter rewrite."""
    amgfx.save(dec, f"{tmp}/new")
    amgfx.export_onnx(dec, f"{tmp}/new")
    os.makedirs(f"{tmp}/old")
    keep, rt.as_scatter = rt.as_scatter, (lambda gm: gm)
    try:
        amgfx.export_onnx(dec, f"{tmp}/old")
    finally:
        rt.as_scatter = keep
    old = dataclasses.replace(dec, prefill=Copying(f"{tmp}/old/prefill.onnx"), decode=Copying(f"{tmp}/old/decode.onnx"))
    return old, amgfx.load(f"{tmp}/new", runtime="ort")


@torch.no_grad()
def decode_time(dec, ids, in_place: bool):
    """(seconds for NEW decode steps, the tokens)."""
    prefill, decode = runners(dec) if in_place else (dec.prefill, dec.decode)
    inputs = dec.prefill_inputs(ids)
    logits, *cache = prefill(*inputs)
    p, b = dec.prompt_len, ids.shape[0]
    tok, toks = logits[:, -1].argmax(-1), []
    t = time.perf_counter()
    for i in range(NEW):
        logits, *cache = decode(*dec.decode_inputs(tok, torch.full((b,), p + i), p + i, inputs[3], cache))
        tok = logits[:, -1].argmax(-1)
        toks.append(tok)
    return time.perf_counter() - t, torch.stack(toks)


def copy_vs_in_place(lm, prompt, batch, repeats) -> list[dict]:
    dec = graphs(lm, prompt, batch)
    ids = lmod.windows("eval", prompt, batch, stride=1013)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old, new = onnx_pair(dec, tmp)
        for runtime, (a, b) in {"eager": (dec, dec), "onnxruntime": (old, new)}.items():
            same = torch.equal(decode_time(a, ids, False)[1], decode_time(b, ids, True)[1])
            t = {"copy": [], "in place": []}
            for _ in range(repeats):
                t["copy"].append(decode_time(a, ids, False)[0])
                t["in place"].append(decode_time(b, ids, True)[0])
            tps = {k: batch * NEW / statistics.median(v) for k, v in t.items()}
            rows.append({"slots": prompt + NEW, "batch": batch, "runtime": runtime, **tps, "same": same})
            print(rows[-1], flush=True)
    return rows


def _seconds(stats, match) -> tuple[float, float]:
    """(cumulative, own) seconds of the profiled functions ``match(file, name)`` picks."""
    cum = own = 0.0
    for (f, _, name), (_, _, tt, ct, _) in stats.stats.items():
        if match(f, name):
            cum, own = cum + ct, own + tt
    return cum, own


def profile_row(name, dec, runtime, prompts) -> dict:
    amgfx.generate(dec, prompts, max_new_tokens=4, eos_token_id=None)          # warm
    t = time.perf_counter()
    amgfx.generate(dec, prompts, max_new_tokens=NEW, eos_token_id=None)
    plain = (time.perf_counter() - t) / NEW
    prof = cProfile.Profile()
    prof.enable()
    amgfx.generate(dec, prompts, max_new_tokens=NEW, eos_token_id=None)
    prof.disable()
    s = pstats.Stats(prof)
    total = _seconds(s, lambda f, n: n == "_batch" and f.endswith("generate.py"))[0]
    if runtime == "onnxruntime":
        call = _seconds(s, lambda f, n: n == "__call__" and f.endswith("runtime.py"))[0]
        inner = _seconds(s, lambda f, n: n == "run_with_iobinding" and "onnxruntime" in f)[0]
        graph_py = 0.0
    else:
        call = inner = _seconds(s, lambda f, n: n == "forward" and f.startswith("<eval_with_key>"))[0]
        graph_py = (_seconds(s, lambda f, n: n == "forward" and f.startswith("<eval_with_key>"))[1] +
                    _seconds(s, lambda f, n: n == "__call__" and f.endswith("_ops.py"))[1])
    steps = NEW        # one prefill and NEW - 1 decode steps
    return {"model": name, "runtime": runtime, "plain": 1e3 * plain, "total": 1e3 * total / steps,
            "runtime_ms": 1e3 * inner / steps, "graph_py": 1e3 * graph_py / steps,
            "binding": 1e3 * (call - inner) / steps, "loop": 1e3 * (total - call) / steps,
            "binding_plain": binding_us(dec) if runtime == "onnxruntime" else None}


class _NoRun:
    """A session that runs nothing: what is left of a call is amgfx's Python around the run."""

    def run_with_iobinding(self, io):
        pass


def binding_us(dec, calls: int = 2000) -> float:
    """Microseconds of one decode call's own Python (binding included), unprofiled: the session stubbed."""
    prog = dec.decode
    args = dec.decode_inputs(torch.tensor([1]), torch.tensor([8]), 8, torch.ones(1, dec.max_len, dtype=torch.long),
                             dec.empty_cache())
    real, prog.session = prog.session, _NoRun()
    try:
        prog(*args, donate=True)
        t = time.perf_counter()
        for _ in range(calls):
            prog(*args, donate=True)
        return 1e6 * (time.perf_counter() - t) / calls
    finally:
        prog.session = real


def profiles() -> list[dict]:
    import transformers as tf
    deep = tf.LlamaForCausalLM(tf.LlamaConfig(**{**lmod.CONFIG, "num_hidden_layers": 16})).eval()
    rows = []
    for name, lm in (("amgfx-lm, 4 layers", lmod.bench_lm()), ("16 layers", deep)):
        dec = graphs(lm, 64, 1)
        prompts = lmod.windows("eval", 64, 1, stride=1013).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            ort = onnx_pair(dec, tmp)[1]
            for runtime, d in (("eager", dec), ("onnxruntime", ort)):
                rows.append(profile_row(name, d, runtime, prompts))
                print(rows[-1], flush=True)
    return rows


def _ms(us) -> str:
    return "-" if us is None else f"{us / 1e3:.3f}"


def lines_of(cmp, prof, a) -> list[str]:
    out = ["# The decode loop: cache in place, and where a token's time goes", "",
           f"`python -m benchmarks.decode_loop` on torch {torch.__version__}, {torch.get_num_threads()} threads. "
           f"Dense `amgfx-lm` decoder graphs, {NEW} greedy tokens, tokens/s as the median of {a.repeats} interleaved "
           "repeats. *copy*: the cache written out of place (onnxruntime: ScatterND between two Transpose, numpy "
           "feeds); *in place*: as `amgfx.generate` runs it now.", "",
           "| cache slots | batch | runtime | decode tok/s, copy | in place | speedup | same tokens |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['slots']} | {r['batch']} | {r['runtime']} | {r['copy']:,.0f} | {r['in place']:,.0f} | "
            f"{r['in place'] / r['copy']:.2f}x | {'yes' if r['same'] else 'NO'} |" for r in cmp]
    out += ["", "## Per token at batch 1 (cProfile of `amgfx.generate`, 64-token prompt)", "",
            "Milliseconds per generated token. *runtime*: onnxruntime's `run_with_iobinding`, or the eager graph's "
            "`forward` (of which *graph Python*: its own lines and the op overloads' Python); *binding*: amgfx's "
            "`OrtProgram` around the run (and, unprofiled, one decode call with the session stubbed out); *loop*: "
            "`generate`'s own Python (picking, bookkeeping, inputs).", "",
            "| model | runtime | ms/token unprofiled | profiled | runtime | graph Python | binding | binding, "
            "unprofiled | loop |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['runtime']} | {r['plain']:.2f} | {r['total']:.2f} | {r['runtime_ms']:.2f} | "
            (f"{r['graph_py']:.2f} | - | - | " if r["runtime"] == "eager" else
             f"- | {r['binding']:.3f} | {_ms(r['binding_plain'])} | ") + f"{r['loop']:.3f} |" for r in prof]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (default 7)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = lmod.bench_lm()
    cmp = [r for prompt in (64, 480) for batch in (1, 8) for r in copy_vs_in_place(lm, prompt, batch, a.repeats)]
    write_md(f"{RESULTS}/decode_loop.md", lines_of(cmp, profiles(), a))


if __name__ == "__main__":
    main()
