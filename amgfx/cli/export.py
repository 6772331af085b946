"""``amgfx export`` (a deployable .pt2 and/or ONNX, checked in onnxruntime) and ``amgfx bench`` (latency)."""
from __future__ import annotations

import json
import os
import tempfile

from ..api import apply
from ..bench import latency
from ..errors import AmgfxError
from ..files import save
from ..runtime import export_onnx, onnx_parity
from ..planning.plan import Plan
from ._common import analysed, err, graph_of, inputs_at, load_model, ort_runner


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


