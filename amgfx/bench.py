"""Side-by-side measurements: latency (interleaved medians) and output agreement with the dense model.

Example:
    >>> import torch
    >>> t = latency({"a": lambda: torch.ones(64, 64) @ torch.ones(64, 64)}, runs=5)
    >>> sorted(t) == ["a"] and t["a"] > 0
    True
"""
from __future__ import annotations

import statistics
import time

import torch
from .weights.recover import first_output

__all__ = ["latency", "embedding_cosine", "first_output", "runner", "paired", "RUNTIMES"]


def latency(fns: dict, *, runs: int = 20, warmup: int = 3) -> dict:
    """Median milliseconds of each zero-argument callable, runs interleaved so drift hits all alike."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(runs):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def embedding_cosine(dense, pruned, batches) -> float:
    """Mean cosine similarity of per-sample embeddings, pruned vs dense, over ``batches``.

    A batch is ``(args, kwargs)``. A 3-D first output is mean-pooled over tokens (over the
    attention mask when one is given, as sentence-transformers pools MiniLM); other outputs are
    flattened per sample.
    """
    sims = []
    with torch.inference_mode():
        for args, kwargs in batches:
            a, b = first_output(dense(*args, **kwargs)), first_output(pruned(*args, **kwargs))
            if a.dim() == 3:
                m = kwargs.get("attention_mask")
                w = (m if m is not None else torch.ones(a.shape[:2])).unsqueeze(-1).to(a.dtype)
                a, b = (t.mul(w).sum(1) / w.sum(1).clamp_min(1) for t in (a, b))
            sims.append(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)))
    return float(torch.cat(sims).mean())


RUNTIMES = ("eager", "inductor", "ort")


def runner(gm, runtime: str, workdir: str | None = None):
    """``f(args, kwargs)`` running ``gm`` in ``runtime``: eager PyTorch, ``torch.compile`` (inductor, static
    shapes, compiled at the first call) or onnxruntime (exported to ``workdir``, a temporary folder by default)."""
    import os
    import tempfile

    import torch.utils._pytree as pytree
    if runtime == "eager":
        return lambda a, kw: gm(*a, **kw)
    if runtime == "inductor":
        c = torch.compile(gm, dynamic=False)
        return lambda a, kw: c(*a, **kw)
    if runtime == "ort":
        from .files import export_onnx, ort_session
        d = workdir or tempfile.mkdtemp(prefix="amgfx-latency-")
        sess = ort_session(export_onnx(gm, os.path.join(d, f"m{len(os.listdir(d))}.onnx")), spinning=False)
        names = [i.name for i in sess.get_inputs()]
        return lambda a, kw: sess.run(None, {n: t.numpy() for n, t in zip(
            names, [t for t in pytree.tree_leaves((tuple(a), dict(kw))) if isinstance(t, torch.Tensor)])})
    raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def paired(dense, pruned, args, kwargs, *, runs: int = 20, block: int = 3) -> dict:
    """Median milliseconds of two ``f(args, kwargs)`` and the median over rounds of pruned / dense time.

    Rounds interleave the two, each running a model ``block`` times in a row and keeping the median
    (a deployed model runs back to back; the first run after the other model's is slower).
    """
    t = {"dense": [], "pruned": []}
    with torch.inference_mode():
        for f in (dense, pruned, dense, pruned):
            f(args, kwargs)
        for _ in range(runs):
            for k, f in (("dense", dense), ("pruned", pruned)):
                ts = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    f(args, kwargs)
                    ts.append(time.perf_counter() - t0)
                t[k].append(statistics.median(ts))
    return {"dense_ms": 1e3 * statistics.median(t["dense"]), "pruned_ms": 1e3 * statistics.median(t["pruned"]),
            "ratio": statistics.median([p / d for p, d in zip(t["pruned"], t["dense"])])}
