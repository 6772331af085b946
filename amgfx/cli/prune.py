"""``amgfx prune``: the main job. Score, plan to a FLOPs target, rewrite, verify, (recover), save, time."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from ..analysis.coupling import NO_ATTENTION
from ..analysis.tokens import token_sites
from ..analysis.captured import Captured
from ..api import verify
from ..bench import embedding_cosine, latency
from ..errors import AmgfxError
from ..files import save
from ..runtime import export_onnx, onnx_parity
from ..graph.meta import EXAMPLE, PLAN, RECONSTRUCTION
from ..planning.cost import count_params, measure_flops, predict
from ..planning.options import RUNTIMES
from ..planning.config import PlanConfig
from ..planning.plan import Plan
from ..sequence import Result, prune, run
from ..weights.config import RecoverConfig
from ..weights.recover import Iterative
from .. import models
from ..models import is_causal_lm
from . import grammar
from ._common import (analysed, auto_line, calibration, err, heldout, loaded_model, ort_runner, pinned_line,
                      recovery_lines)


# what --method means when it is not given: measured per model (amgfx.auto), except for causal LMs, where
# each candidate would cost minutes (taylor led there, benchmarks/results/llm_real.md)
METHOD, LM_METHOD = "auto", "taylor"
# recovery's batch and peak learning rate when the flags leave them (one table per route, printed by --help)
RECOVER = grammar.RECOVER["encoder"]


def _measure(a, cg, pruned, loaded, onnx_paths: dict, say) -> dict:
    """Latency at the example inputs (eager, and onnxruntime when exported) and cosine to dense."""
    import torch.utils._pytree as pytree

    args, kwargs = cg.gm.meta[EXAMPLE]
    say("measuring latency (median of 20, interleaved) and agreement with the dense model ...")
    fns = {"eager dense": lambda: cg.gm(*args, **kwargs), "eager pruned": lambda: pruned(*args, **kwargs)}
    for k, path in onnx_paths.items():
        fns[f"ort {k}"] = ort_runner(path, args, kwargs)
    ms = latency(fns, runs=20)
    batches, note = heldout(a, loaded)
    cos = embedding_cosine(cg.gm, pruned, batches or [(args, kwargs)])
    first = next(t for t in pytree.tree_leaves((args, kwargs)) if hasattr(t, "shape"))
    return {"latency_ms": {k: round(v, 3) for k, v in ms.items()}, "cosine_to_dense": round(cos, 4),
            "cosine_on": note, "latency_batch": int(first.shape[0])}


def _deploy(a, cg, pruned, say) -> dict:
    """Write the saved model (and ONNX, checked against onnxruntime); returns {files, onnx paths, parity}."""
    import tempfile

    os.makedirs(a.out, exist_ok=True)
    say(f"saving to {a.out} (torch.export .pt2, dynamic batch) ...")
    save(pruned, a.out)
    out = {"files": [os.path.join(a.out, f) for f in ("model.pt2", "plan.json", "manifest.json")], "onnx": {}}
    if a.onnx:
        say("exporting ONNX (opset 23) and checking onnxruntime parity ...")
        out["onnx"]["pruned"] = export_onnx(pruned, os.path.join(a.out, "model.onnx"))
        out["onnx"]["dense"] = export_onnx(cg.gm, os.path.join(tempfile.mkdtemp(prefix="amgfx_dense_"), "dense.onnx"))
        args, kwargs = cg.gm.meta[EXAMPLE]
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
            label = f"latency {RUNTIMES[rt]}"
            rows.append([f"{label} (ms)", f"{d:.2f}", f"{q:.2f}", f"{q / d:.3f}"])
    if "cosine_before" in report.get("recovery", {}):
        rows.append(["cosine to dense, before recovery", "1", f"{report['recovery']['cosine_before']:.4f}", ""])
    if "cosine_to_dense" in report:
        label = "cosine to dense" + (", after recovery" if "recovery" in report else "")
        rows.append([label, "1", f"{report['cosine_to_dense']:.4f}", ""])
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def _recovery(a, loaded):
    """The recovery settings from the flags: (RecoverConfig, data, note) or an exit code."""
    if a.recover_data is None and a.calib == "example":
        return err("--recover-steps needs data: give --recover-data text|digits|DIR (or --calib with one)")
    a.recover_batch, a.recover_lr = a.recover_batch or RECOVER["batch"], a.recover_lr or RECOVER["lr"]
    got = calibration(a, loaded, a.recover_data, a.recover_samples, a.recover_batch, flag="--recover-data")
    if isinstance(got, int):
        return got
    batches, note = got
    return RecoverConfig(steps=a.recover_steps, lr=a.recover_lr, loss=a.recover_loss, seed=a.seed), batches, note


def _recovery_report(a, cg, loaded, result, recovery) -> dict:
    """What recovery did, for the report: its settings, its guard, and the cosine to dense before it."""
    config, _, note = recovery
    rec = result.model.meta.get("amgfx_recovery", {})
    report = {"data": note, "steps": a.recover_steps, "schedule_steps": a.iterative,
              "loss": rec.get("loss", config.loss), "lr": a.recover_lr}
    if result.recovered is None:               # an iterative schedule recovered between its steps
        return report
    held, _ = heldout(a, loaded)
    before = result.refitted if result.refitted is not None else result.pruned[0]
    report["cosine_before"] = round(embedding_cosine(cg.gm, before, held or [cg.gm.meta[EXAMPLE]]), 4)
    report["seconds"], report["heldout"] = rec["seconds"], rec["heldout"]
    return report


def cmd_prune(a) -> int:
    """``amgfx prune``: load, analyse, plan, rewrite, verify, refit, recover, deploy, measure, report."""
    say = (lambda *x: None) if (a.quiet or a.json) else (lambda *x: print(*x, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    from .prune_stream import cmd_prune_stream, wants_stream   # (its imports: only a streamed prune pays for them)
    if wants_stream(a, models.hf_dir_of(a.model)):       # too big to hold whole (or --stream): block by block
        return cmd_prune_stream(a, models.hf_dir_of(a.model))
    if a.resume:
        return err("--resume goes on from an interrupted streamed run (--stream, or a model too big to hold whole)")
    if a.refit_samples is not None and a.refit_samples < a.calib_samples:
        return err(f"--refit-samples {a.refit_samples}: the refit reads every scoring sample, so at least "
                   f"--calib-samples ({a.calib_samples})")
    say(f"loading and analysing {a.model} ...")
    loaded = loaded_model(a)
    if isinstance(loaded, int):
        return loaded
    if is_causal_lm(getattr(loaded.model, "config", None)):      # two graphs over a KV cache, judged by perplexity
        from .prune_lm import cmd_prune_lm                        # (its own imports: only LMs pay for them)
        a.method = a.method or LM_METHOD
        return cmd_prune_lm(a, loaded, time.perf_counter() - t_start)
    a.method = a.method or METHOD
    got = _analysed(a, loaded)
    if isinstance(got, int):
        return got
    loaded, cg, dt, calib, batches = got
    say(f"analysed in {dt:.1f}s; calibrating on {calib['note']}")
    recovery = _recovery(a, loaded) if a.recover_steps else None       # its data and options, checked first
    if isinstance(recovery, int):
        return recovery
    t0 = time.perf_counter()
    try:
        result = _run(a, cg, batches, calib["batches"] is not None, recovery, say)
        plan, pruned = result.plan, result.model
        check = verify(cg, plan) if a.iterative > 1 else result.verify     # a schedule: its composed plan
        if a.draw:
            try:
                _draw(a, cg, plan)
            except OSError as e:
                return err(f"cannot draw to {a.draw}: {e}")
        report = _report(a, cg, plan, pruned, check, _refit_report(result), calib["note"])
        if recovery:
            report["recovery"] = _recovery_report(a, cg, loaded, result, recovery)
        t2 = time.perf_counter()
        deployed = _deploy(a, cg, pruned, say) if a.out else {"files": [], "onnx": {}}
        report.update(_measure(a, cg, pruned, loaded, deployed["onnx"], say))
    except OSError as e:
        return err(f"cannot write to {a.out}: {e}")
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    steps = result.seconds
    report["seconds"] = {"analyse": round(dt, 2), "score_plan_rewrite": round(steps.get("plan", 0) + steps["rewrite"], 2),
                         "verify_and_recover": round(t2 - t0 - steps.get("plan", 0) - steps["rewrite"], 2),
                         "total": round(time.perf_counter() - t_start, 2)}
    _finish(a, loaded, cg, report, check, deployed, calib["note"])
    return 0 if check.passed or not check.exact else 1


def _finish(a, loaded, cg, report: dict, check, deployed: dict, note: str) -> None:
    """report.json beside the model, then the report as JSON or as the table and its notes."""
    if "onnx_parity" in deployed:
        report["onnx_parity"] = deployed["onnx_parity"]
    if a.out:
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        deployed["files"].append(os.path.join(a.out, "report.json"))
    if a.json:
        print(json.dumps({**report, "files": deployed["files"]}))
    elif not a.quiet:
        _print(a, loaded, cg, report, check, deployed["files"], note)


def _analysed(a, loaded):
    """(model, coupling graph, seconds, {"batches", "note"} as given, the batches to calibrate on), or an exit
    code; the calibration data are made before the capture, so a bad --calib is refused first."""
    calib = {}

    def prepare(loaded):        # the refit's samples are the first --refit-samples; the first --calib-samples score
        got = calibration(a, loaded, n=max(a.calib_samples, a.refit_samples or 0))
        if isinstance(got, int):
            return got
        calib["batches"], calib["note"] = got
        return 0

    got = analysed(a, prepare, loaded)
    if isinstance(got, int):
        return got
    loaded, cg, dt = got
    batches = calib["batches"]
    if batches is None:                       # --calib example: the example inputs are the one batch
        args, kwargs = cg.gm.meta[EXAMPLE]
        batches = [kwargs if kwargs and not args else args]
    return loaded, cg, dt, calib, batches


def _config(a) -> PlanConfig:
    """The flags as a PlanConfig (checked once, saved into plan.json)."""
    return PlanConfig(method=a.method, target_flops=None if a.ratios or a.target_latency else a.target_flops,
                      ratios=a.ratios, tokens=a.tokens, target_latency=a.target_latency, runtime=a.runtime,
                      scope="model" if a.budget_scope == "auto" else a.budget_scope, kinds=a.kinds,
                      round_to=a.round_to, min_keep=a.min_keep, protect=a.protect, same_head_dim=a.same_head_dim,
                      massive=a.massive, blocks=a.remove_blocks, seed=a.seed, allocation=a.allocation, rank=a.rank,
                      score_batches=-(-a.calib_samples // a.batch_size) if a.refit_samples else None)


def _run(a, cg, batches, refit: bool, recovery, say):
    """The prune sequence (amgfx.sequence) with the flags' configs: plan (or replay --plan), rewrite, check
    against the oracle, refit (on calibration data, unless --no-reconstruct), recover (--recover-steps)."""
    progress, refit = not (a.quiet or a.json), refit and not a.no_reconstruct
    config, data = (recovery or (None, None, None))[:2]
    if a.iterative > 1:
        t = time.perf_counter()
        say(f"pruning in {a.iterative} steps, recovering {a.recover_steps} steps after each ...")
        opts = {k: v for k, v in (config.to_dict() if config else {}).items()
                if k in ("lr", "loss", "seed") and v is not None}
        pruned = prune(cg, config=_config(a), calib=batches, progress=progress, schedule=Iterative(
            steps=a.iterative, recover_steps=a.recover_steps, data=data, recover=opts))
        return Result(pruned.meta[PLAN], [pruned], seconds={"plan": time.perf_counter() - t, "rewrite": 0.0})
    if a.target_latency is not None:
        say(f"planning to {a.target_latency} of the dense time in {a.runtime} (op times measured once, "
            "cached; the plan is then timed and corrected) ...")
    if refit or config:
        say("then " + " and ".join(w for w, on in (("reconstructing the kept weights", refit),
                                                    (f"recovering {a.recover_steps} steps", config)) if on) + " ...")
    return run(Captured((cg,)), _config(a), calib=batches, plan=Plan.load(a.plan) if a.plan else None,
               reconstruct=refit, recover=config, recover_data=data, progress=progress)


def _refit_report(result) -> dict | None:
    """What reconstruction did, for the report (None when it did not run)."""
    if result.refitted is None:
        return None
    layers = result.refitted.meta[RECONSTRUCTION]["layers"]
    mean = lambda k: round(float(np.mean([x[k] for x in layers])), 4) if layers else 0.0
    return {"layers": len(layers), "tokens": max((x["samples"] for x in layers), default=0),
            "error_before": mean("before"), "error_after": mean("after"), "seconds": result.seconds["refit"]}


def _draw(a, cg, plan) -> None:
    from ..draw import draw_plan                # matplotlib, only when a picture is asked for
    draw_plan(cg, plan, a.draw, title=f"{a.model}: {a.method}")


def _report(a, cg, plan, pruned, check, refit, note: str) -> dict:
    pred = predict(cg, plan)
    report = {"model": a.model, "method": a.method, "calibration": note,
              "params": {"dense": count_params(cg.gm), "pruned": count_params(pruned)},
              "flops": {"dense": measure_flops(cg.gm), "predicted": pred["flops"]["pruned"],
                        "measured": measure_flops(pruned)},
              "verify": check.status, "torch": torch.__version__}
    if refit is not None:
        report["reconstruction"] = refit
    if a.target_latency is not None:
        report["target_latency"] = {"target": a.target_latency, **plan.meta["latency"]}
    elif a.target_flops and not a.ratios:
        report["target_flops"] = a.target_flops
    if "auto" in plan.meta:
        report["auto"] = plan.meta["auto"]
    if pinned_line(plan.meta):
        report["pinned"] = pinned_line(plan.meta)
    gone = sorted(plan.removed_branches(cg))
    if gone:
        report["removed"] = gone
    if plan.tokens:
        keys = {t.site: t.keys for t in token_sites(cg).values()}
        report["tokens"] = {"sites": len(plan.tokens), "keys": sum(keys[s] for s in plan.tokens),
                            "kept": sum(len(k) for k in plan.tokens.values())}
    return report


def _print(a, loaded, cg, report: dict, check, files: list, note: str) -> None:
    desc = loaded.description if loaded.description.startswith(a.model) else f"{a.model}: {loaded.description}"
    print(f"{desc}; {a.method} on {note}; torch {report['torch']}")
    if not cg.sites:
        print(NO_ATTENTION)
    print("\n".join(_table(report)))
    print(f"latency at batch {report['latency_batch']}; cosine on {report['cosine_on']}")
    for line in _notes(report):
        print(line)
    print(f"verify: {check.status}" + (f"; onnxruntime parity {report['onnx_parity']:.1e}" if "onnx_parity" in report else ""))
    sec = report["seconds"]
    print(f"time: analyse {sec['analyse']:.1f}s, score + plan + rewrite {sec['score_plan_rewrite']:.1f}s, "
          f"verify + recover {sec['verify_and_recover']:.1f}s, total {sec['total']:.1f}s")
    if files or a.draw:
        print("wrote " + ", ".join(files + ([a.draw] if a.draw else [])))


def _notes(report: dict) -> list[str]:
    """One line per optional part of the run the report holds (budget, refit, recovery, tokens, blocks)."""
    out = []
    if "auto" in report:
        out.append(auto_line(report["auto"]))
    if "pinned" in report:
        out.append(report["pinned"])
    if "target_latency" in report:
        t = report["target_latency"]
        out.append(f"latency budget: {t['target']} of dense in {t['runtime']}: predicted {t['predicted']:.3f}, "
                   f"measured {t['measured']:.3f} ({len(t['rounds'])} plan(s) timed)")
    if "reconstruction" in report:
        r = report["reconstruction"]
        out.append(f"reconstruction: {r['layers']} layers refitted on {r['tokens']} tokens, mean relative output "
                   f"error {r['error_before']:.4f} -> {r['error_after']:.4f}, {r['seconds']:.1f}s")
    if "recovery" in report:
        out += recovery_lines(report["recovery"])
    if "tokens" in report:
        t = report["tokens"]
        out.append(f"tokens: keys and values keep {t['kept']} of {t['keys']} key positions over {t['sites']} sites")
    if "removed" in report:
        g = report["removed"]
        out.append(f"blocks: {len(g)} branch(es) removed whole: {', '.join(g[:4])}{', ...' if len(g) > 4 else ''}")
    return out

