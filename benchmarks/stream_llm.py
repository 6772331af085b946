"""A model bigger than its float32 budget: a LLaMA-3.2-1B-shaped directory pruned block by block.

Run: ``python -m benchmarks.stream_llm`` (``--layers N`` for a shallower model of the same width, ``--samples``
for fewer calibration windows). Writes ``benchmarks/results/stream_llm.md``. ``--real`` runs, instead, SmolLM2-135M
and ``amgfx-lm`` pruned whole and streamed side by side (``benchmarks/results/stream_real.md``).

The directory is random weights in the shape of LLaMA-3.2-1B (16 layers, hidden 2048, 32 heads over 8 kv
heads, head dim 64, MLP 8192, vocab 128256, tied embeddings; 1.24B parameters) stored as bf16 safetensors
in two shards, with a byte-level BPE tokenizer trained here on the calibration text (nothing downloaded). It
is made once, in ``~/.cache/amgfx/bench``. Then, in a child process so its memory is its own,

    amgfx prune DIR --target-flops 0.5 --calib text --out OUT --json

which streams by itself (the float32 weights are over :data:`amgfx.cli.prune_stream.STREAM_ABOVE`), and the
table says: exit code, peak resident memory (the child's), wall time, every block verified, against the issue's
3.5 GB and 30 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from ._report import RESULTS, write_md

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192)
# LLaMA-3-8B: 32 layers of these, untied output head (8.03B parameters); run a few layers and projected
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192)


def make_dir(path: str, layers: int, shape: dict = SHAPE) -> str:
    """The random bf16 directory (config, safetensors shards of 1.3 GB, tokenizer); kept when it is there."""
    import transformers as tf
    from safetensors.torch import save_file

    from amgfx import data
    if os.path.isfile(os.path.join(path, "done")):
        return path
    os.makedirs(path, exist_ok=True)
    data.byte_bpe(path, 8000)
    cfg = tf.LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
                         **shape)
    cfg.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0
    for k, s in shapes.items():
        if k == "lm_head.weight" and shape["tie_word_embeddings"]:     # tied to the embedding, stored once
            continue
        t = (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        cur[k] = t
        size += t.numel() * 2
        if size > 1.3e9:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur)
    index = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in sh})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    open(os.path.join(path, "done"), "w").close()
    return path


def equivalence(name: str, path: str, calib, held, method: str = "snp", target: float = 0.5) -> list[str]:
    """One real model pruned both ways, whole and streamed, at the same settings and data: the table row."""
    import amgfx
    import transformers as tf
    from amgfx.stream import prune_streamed
    cfg = amgfx.PlanConfig(method=method, target_flops=target, scope="blocks")
    t = time.perf_counter()
    lm = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = int(calib[0].shape[1])
    dense = amgfx.decoder(lm, max_len=seq + 32, prompt_len=seq, batch=1)
    whole = amgfx.prune(dense, config=cfg, calib=calib, reconstruct=True, progress=False)
    t_whole = time.perf_counter() - t
    t = time.perf_counter()
    r = prune_streamed(path, cfg, calib=calib, max_new_tokens=32, progress=False)
    small = r.model()
    t_stream = time.perf_counter() - t
    diff = max(float((r.weights[k].float() - w.detach()).abs().max() / w.detach().abs().max().clamp_min(1e-12))
               for k, w in whole.prefill.named_parameters())
    p_whole, p_stream = whole.perplexity(held), small.perplexity(held)
    rel = abs(p_stream - p_whole) / p_whole
    same = r.plan.keep == whole.plan.keep
    print(f"{name}: same plan {same}, max rel weight diff {diff:.2e}, perplexity {p_whole:.3f} / {p_stream:.3f}",
          flush=True)
    return [f"| {name} | {method}, {target:.0%} of block FLOPs, {len(calib)} x {calib[0].shape[0]} windows of {seq} | "
            f"{'yes' if same else 'NO'} | {diff:.1e} ({'met' if diff <= 1e-5 else 'missed'}) | {p_whole:.3f} | "
            f"{p_stream:.3f} | {rel:.2%} ({'met' if rel <= 0.005 else 'missed'}) | {t_whole:.0f} / {t_stream:.0f} |"]


def real_rows(windows: int) -> list[str]:
    """SmolLM2-135M and the trained ``amgfx-lm``, pruned whole and streamed: the issue's second acceptance line."""
    from amgfx import data, models
    from amgfx.decode import lm as lmod
    rows = ["", "Whole-model route against streaming on real models (same plan, weights as stored, perplexity on "
                "held-out windows; the issue asks for weights within 1e-5 and perplexity within 0.5%):", "",
            "| model | settings | same plan | max relative weight difference | perplexity, whole | perplexity, "
            "streamed | difference | seconds whole / streamed |", "|---|---|---|---|---|---|---|---|"]
    lmod.bench_lm(progress=False)
    calib = [w[None] for w in lmod.windows("train", 128, windows, stride=997)]
    rows += equivalence("amgfx-lm", lmod._cache_dir(), calib, lmod.windows("eval", 128, 32))
    try:
        path = models.gguf_dir(models.smollm2_gguf())
    except models.ModelSpecError as e:
        return rows + [f"| smollm2-135m | not run: {e} | | | | | | |"]
    tok = models.tokenizer(path, ["plain text"])
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    calib = [w[None] for w in data.token_windows(enc, "calib", 128, windows)]
    return rows + equivalence("smollm2-135m", path, calib, data.token_windows(enc, "eval", 128, 32))


def run_child(d: str, samples: int):
    """``amgfx prune DIR --target-flops 0.5 --calib text`` in a child process: (command, process, wall seconds, the
    child's peak resident MB, its JSON report or {})."""
    out = tempfile.mkdtemp(prefix="stream_llm_")
    cmd = [sys.executable, "-m", "amgfx", "prune", d, "--target-flops", "0.5", "--calib", "text",
           "--calib-samples", str(samples), "--out", out, "--json"]
    print("running: " + " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
    return cmd, proc, wall, peak, report


def eight_b(a, argv) -> None:
    """A LLaMA-3-8B-shaped directory of ``--layers`` layers (default 2) streamed; each layer's seconds and memory,
    and the 32-layer run projected from them (``stream_8b.md``)."""
    from amgfx.cli.prune_stream import footprint
    from amgfx.models import cache_root
    layers = a.layers or 2
    d = make_dir(os.path.join(cache_root(), "bench", f"llama-8b-shape-{layers}l"), layers, SHAPE_8B)
    cmd, proc, wall, peak, r = run_child(d, a.samples)
    need, _ = footprint(d)
    segs = r.get("segments", [])
    body = [s for s in segs if s["groups"]]
    per_layer = sum(s["seconds"].get("score", 0) + s["seconds"].get("prune", 0) for s in body) / layers
    sec = r.get("seconds", {})
    grows = sec.get("plan", 0) + sec.get("assemble+evaluate+save", 0)      # taken as linear in depth
    rest = sec.get("total", wall) - per_layer * layers - grows
    projected = rest + 32 * per_layer + grows * 32 / layers
    argv = sys.argv[1:] if argv is None else argv
    lines = [f"`python -m benchmarks.stream_llm {' '.join(argv)}` on {os.cpu_count()} cores, "
             f"torch {torch.__version__}, device cpu: a random LLaMA-3-8B-shaped directory cut to {layers} of its 32 "
             f"layers (hidden 4096, 32 heads over 8 kv heads, head dim 128, MLP 14336, vocab 128256, untied head; "
             f"{need / 4 / 1e9:.2f}B parameters, bf16), pruned by `amgfx prune DIR {' '.join(cmd[5:])}` in a child "
             f"process. Exit code {proc.returncode}; wall {wall:,.0f} s; peak resident {peak:,.0f} MB (the child's).", ""]
    if r:
        lines += ["| segment | groups | parameters (dense) | seconds scoring | seconds pruning | resident MB after | "
                  "peak MB so far, after scoring / pruning it |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['index']} | {', '.join(g.split(':')[0] for g in s['groups']) or '-'} | {s['params']:,} | "
                  f"{s['seconds'].get('score', 0):.1f} | {s['seconds'].get('prune', 0):.1f} | {s['rss_mb']:,.0f} | "
                  f"{s['peak_mb'].get('score', 0):,} / {s['peak_mb'].get('prune', 0):,} |" for s in segs]
        lines += ["", f"Peak by stage: scoring pass {max(s['peak_mb'].get('score', 0) for s in segs):,} MB, pruning "
                  f"pass {max(s['peak_mb'].get('prune', 0) for s in segs):,} MB, the whole run {r['peak_memory_mb']:,} MB "
                  "(above both where the final assembly, evaluation and saving raised it; the process's own count).", "",
                  "Seconds: " + ", ".join(f"{k} {v:,.1f}" for k, v in sec.items()) + f". One layer (attention and "
                  f"MLP segments, both passes): {per_layer:,.0f} s. Projected for the 32 layers of LLaMA-3-8B: "
                  f"{projected / 3600:.1f} h ({rest:,.0f} s that do not grow with depth, 32 x {per_layer:,.0f} s of "
                  f"layers, and planning and the final assembly, {grows:,.0f} s here, taken as growing linearly). "
                  "Memory: the segments do not grow with depth (one layer's weights and the windows' activations are "
                  "resident at a time); the final assembly holds every pruned weight in bf16, so it grows by the pruned "
                  "layers' bytes (about 32 x half of 218M parameters x 2 bytes, 7 GB, at 50% of block FLOPs)."]
    write_md(os.path.join(RESULTS, "stream_8b.md"), ["# Streaming an 8B-shaped LLM: per layer, and projected", "",
                                                      *lines])
    print("\n".join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["1b", "8b"], default="1b",
                   help="LLaMA-3.2-1B (the acceptance run), or LLaMA-3-8B cut to --layers layers and projected "
                        "(writes stream_8b.md)")
    p.add_argument("--layers", type=int, default=None, help="layers of the directory (default 16 for 1b, 2 for 8b)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64, the CLI's)")
    p.add_argument("--real", action="store_true",
                   help="instead: prune SmolLM2-135M and amgfx-lm whole and streamed (writes stream_real.md)")
    p.add_argument("--real-windows", type=int, default=32, help="calibration windows of the --real rows")
    p.add_argument("--out", default=os.path.join(RESULTS, "stream_llm.md"))
    a = p.parse_args(argv)
    if a.real:                  # its own file: the 1B run and this one are each long enough alone
        lines = [f"`python -m benchmarks.stream_llm {' '.join(argv or sys.argv[1:])}` on {os.cpu_count()} cores, "
                 f"torch {torch.__version__}."] + real_rows(a.real_windows)
        out = a.out if a.out != os.path.join(RESULTS, "stream_llm.md") else os.path.join(RESULTS, "stream_real.md")
        write_md(out, ["# Streaming against the whole-model route on real models", "", *lines])
        return
    from amgfx.models import cache_root
    if a.shape == "8b":
        return eight_b(a, argv)
    d = make_dir(os.path.join(cache_root(), "bench", f"llama-1b-shape-{a.layers or 16}l"), a.layers or 16)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cmd, proc, wall, peak, report = run_child(d, a.samples)
    from amgfx.cli.prune_stream import footprint
    need, _ = footprint(d)
    params = need // 4
    segs = report.get("segments", [])
    pruned = [s for s in segs if s["groups"]]
    ok_mem, ok_time = peak <= 3.5 * 1024, wall <= 30 * 60
    rows = [["exit code", str(proc.returncode), "0", "met" if proc.returncode == 0 else "missed"],
            ["peak resident memory (MB)", f"{peak:,.0f}", "3,584", "met" if ok_mem else f"missed by {peak - 3584:,.0f}"],
            ["wall time (s)", f"{wall:,.0f}", "1,800", "met" if ok_time else f"missed by {wall - 1800:,.0f}"],
            ["blocks verified", f"{sum(1 for s in pruned if s['verified'])} of {len(pruned)}", "all",
             "met" if pruned and all(s["verified"] for s in pruned) else "missed"]]
    sec = report.get("seconds", {})
    b = report.get("flops", {}).get("blocks", {})
    lines = [f"`python -m benchmarks.stream_llm{' ' + ' '.join(argv) if argv else ''}` on {os.cpu_count()} cores, "
             f"torch {torch.__version__}: a random LLaMA-3.2-1B-shaped directory ({cfg['num_hidden_layers']} layers, "
             f"hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads over {cfg['num_key_value_heads']} kv "
             f"heads, MLP {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, tied embeddings; {params / 1e9:.2f}B "
             f"parameters, bf16 safetensors: {need / 2 / 2**30:.2f} GiB stored, {need / 2**30:.2f} GiB in float32), "
             f"pruned by `amgfx {' '.join(cmd[3:4])} DIR {' '.join(cmd[5:])}` in a child process; peak memory is the "
             "child's resident set.", "",
             "| | measured | target | |", "|---|---|---|---|", *[f"| {' | '.join(r)} |" for r in rows], ""]
    if report:
        lines += [f"Streamed: {report.get('streamed')}; method {report.get('method')}; decoder-block FLOPs kept "
                  f"{b.get('planned', 0) / max(b.get('dense', 1), 1):.3f}; perplexity of the pruned model on held-out "
                  f"text {report['perplexity']['pruned']:.1f} (random weights: a number, not a quality). Seconds: "
                  + ", ".join(f"{k} {v:,.1f}" for k, v in sec.items()) + ".", "",
                  "| segment | groups | parameters (dense) | seconds scoring | seconds pruning | resident MB after |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s['index']} | {', '.join(g.split(':')[0] for g in s['groups']) or '-'} | {s['params']:,} | "
                  f"{s['seconds'].get('score', 0):.1f} | {s['seconds'].get('prune', 0):.1f} | {s['rss_mb']:,.0f} |"
                  for s in segs]
    write_md(a.out, ["# Streaming a 1B-parameter LLM block by block", "", *lines])
    print("\n".join(lines[2:8]), flush=True)


if __name__ == "__main__":
    main()
