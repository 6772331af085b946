"""Criteria judged on a real trained model: the digits ViT pruned to a FLOPs target, no fine-tuning.

Run: ``python -m benchmarks.criteria_digits [--target 0.5]``. Writes
``benchmarks/results/criteria_digits.md``.

Every amgfx criterion and Torch-Pruning's magnitude and Taylor importance prune the same
trained model (:mod:`benchmarks.digits_vit`) to the same FLOPs (``FlopCounterMode``, within
2%), calibrating on the same 64 training images, and are scored on the 450 held-out test
images. amgfx uses its default, label-free loss; Torch-Pruning's Taylor needs a loss, and
gets cross-entropy against the dense model's own predictions on those 64 images.

Torch-Pruning leaves the timm forward broken after pruning; the manual fix-ups it needs are
written out in :func:`tp_prune` (``num_heads``, ``head_dim``, ``attn_dim`` per block). We also
switch its blocks to timm's explicit attention path so the original softmax scale is kept, as
amgfx keeps it (the fused path would recompute the scale from the pruned head dim). Its
pruning ratio is bisected until its FLOPs match amgfx's. Torch-Pruning prunes the embedding
(residual) channels too, as its ViT example does; amgfx's default leaves them alone.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import amgfx
from amgfx.planning.cost import measure_flops

from ._report import RESULTS, write_md
from .digits_vit import accuracy, task

METHODS = ["snp", "snp+amg", "taylor", "obs", "obs+snp", "magnitude", "random"]


def flops(model, x) -> int:
    return measure_flops(model, ((x,), {}))


def tp_prune(dense, ratio: float, kind: str, calib_x, example):
    """Torch-Pruning 1.6 on a timm ViT, with the fix-ups its README asks users to write."""
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention
    m = copy.deepcopy(dense).eval()
    imp = tp.importance.GroupMagnitudeImportance(p=2) if kind == "magnitude" else tp.importance.GroupTaylorImportance()
    heads = {a.qkv: a.num_heads for a in m.modules() if isinstance(a, Attention)}
    pruner = tp.pruner.MetaPruner(m, example, global_pruning=False, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[m.head], num_heads=heads, prune_head_dims=True, prune_num_heads=False)
    if kind == "taylor":
        m.zero_grad()
        with torch.no_grad():
            labels = dense(calib_x).argmax(-1)
        torch.nn.functional.cross_entropy(m(calib_x), labels).backward()
    pruner.step()
    for a in m.modules():                     # the manual fix-ups: TP does not rewrite forward code
        if isinstance(a, Attention):
            a.num_heads = pruner.num_heads[a.qkv]
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
            a.fused_attn = False              # keep the original softmax scale (self.scale), as amgfx does
    return m.eval()


def bisect_ratio(prune, measure, goal: int, tol: float = 0.02):
    """Bisect Torch-Pruning's ratio until ``measure(prune(ratio))`` (FLOPs) is within ``tol`` of ``goal``;
    returns (model, FLOPs, ratio)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = prune(mid)
        f = measure(m)
        best = (m, f, mid)
        if abs(f / goal - 1) <= tol / 2:
            break
        lo, hi = (mid, hi) if f > goal else (lo, mid)
    return best


def tp_at(dense, goal: int, kind: str, calib_x, example, tol: float = 0.02):
    """Torch-Pruning on the ViT at ``goal`` FLOPs (its ratio bisected)."""
    return bisect_ratio(lambda r: tp_prune(dense, r, kind, calib_x, example), lambda m: flops(m, example), goal, tol)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of dense FLOPs to keep (default 0.5)")
    ap.add_argument("--calib", type=int, default=64, help="calibration images (default 64)")
    ap.add_argument("--out", default=f"{RESULTS}/criteria_digits.md", help="result file")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    dense, example, _, calib_x, calib, xte, yte = task(a.calib)
    cg = amgfx.analyze(dense, example)
    dense_flops = flops(dense, example)
    rows = [("dense", "-", 1.0, accuracy(dense, xte, yte), None, 0.0, "-")]
    print(f"dense: {rows[0][3]:.4f}", flush=True)
    amg_flops = []
    for method in METHODS:
        t = time.perf_counter()
        plan = amgfx.plan_for(cg, method=method, target_flops=a.target, calib=calib, progress=False)
        pruned = amgfx.apply(cg, plan)
        dt = time.perf_counter() - t
        f = flops(pruned, example)
        amg_flops.append(f)
        acc = accuracy(pruned, xte, yte, batch=1)
        fit = amgfx.reconstruct(pruned, cg, calib, progress=False)
        rows.append((f"amgfx {method}", _criteria(plan.meta["criteria"]), f / dense_flops, acc,
                     accuracy(fit, xte, yte, batch=1), dt, _shape(cg, plan)))
        print(rows[-1], flush=True)
    goal = int(sum(amg_flops) / len(amg_flops))
    for kind in ("magnitude", "taylor"):
        t = time.perf_counter()
        m, f, ratio = tp_at(dense, goal, kind, calib_x, example)
        dt = time.perf_counter() - t
        rows.append((f"Torch-Pruning {kind}", f"ratio {ratio:.3f}", f / dense_flops, accuracy(m, xte, yte), None, dt, "embed "
                     f"{m.cls_token.shape[-1]}, heads x dim {m.blocks[0].attn.num_heads}x{m.blocks[0].attn.head_dim}, "
                     f"mlp {m.blocks[0].mlp.fc1.out_features}"))
        print(rows[-1], flush=True)
    lines = ["# Criteria on the trained digits ViT, no fine-tuning", "",
             f"`python -m benchmarks.criteria_digits --target {a.target}{_out_flag(a.out)}` on torch {torch.__version__}: the digits ViT (4 blocks, dim 128, 4 heads; "
             f"trained from seed 0) pruned to {a.target:.0%} of dense FLOPs (`FlopCounterMode`, measured on the pruned "
             f"model), calibrated on {a.calib} training images, top-1 on the 450 held-out test images. Every row from this "
             "one run. Torch-Pruning needs manual `num_heads`/`head_dim`/`attn_dim` fix-ups after pruning (written in "
             "the benchmark) and prunes embedding channels too; its ratio is bisected to the same FLOPs (within 2%). "
             "\"reconstructed\": the same amgfx plan after `amgfx.reconstruct` on the calibration images.", "",
             "| method | setting | FLOPs kept | test top-1 | test top-1, reconstructed | time to prune (s) "
             "| shape of block 0 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.4f} | {'-' if r[4] is None else f'{r[4]:.4f}'} | {r[5]:.1f} "
              f"| {r[6]} |" for r in rows]
    write_md(a.out, lines)


def _out_flag(out: str) -> str:
    default = f"{RESULTS}/criteria_digits.md"
    return "" if os.path.abspath(out) == os.path.abspath(default) else f" --out {os.path.relpath(out, os.path.dirname(RESULTS) + '/..')}"


def _criteria(by_kind: dict) -> str:
    """{'qk': 'SNP(gamma=0.9)', 'head': 'AMG(...)', ...} -> 'qk/v/mlp SNP(gamma=0.9); head AMG(...)'."""
    groups: dict = {}
    for k, c in by_kind.items():
        groups.setdefault(c, []).append(k)
    return "; ".join(f"{'/'.join(ks)} {c}" for c, ks in groups.items())


def _shape(cg, plan) -> str:
    """Kept widths of the first site, e.g. 'heads 4, qk 16/32, v 24/32, mlp 300/512'."""
    s = next(s for s in cg.sites if s.supported)
    heads = len(plan.keep.get(f"head:{s.name}", range(s.num_kv_heads)))
    per = lambda kind, full: len(plan.keep.get(f"{kind}:{s.name}", range(full * s.num_kv_heads))) // s.num_kv_heads
    mlp = cg.mlps[0]
    return (f"heads {heads}, qk {per('qk', s.head_dim_qk)}/{s.head_dim_qk}, v {per('v', s.head_dim_v)}/{s.head_dim_v}, "
            f"mlp {len(plan.keep.get(f'mlp:{mlp.name}', range(mlp.hidden)))}/{mlp.hidden}")


if __name__ == "__main__":
    main()
