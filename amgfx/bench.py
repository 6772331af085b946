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

from .scoring.readout import mean_pool
from .weights.recover import first_output

__all__ = ["latency", "embedding_cosine", "first_output", "mean_pool"]


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
                a, b = (mean_pool(t, kwargs.get("attention_mask")) for t in (a, b))
            sims.append(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)))
    return float(torch.cat(sims).mean())

