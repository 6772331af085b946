"""A small ViT trained on real data (scikit-learn's digits), to judge criteria on.

Run ``python -m benchmarks.digits_vit`` to train (about a minute on 2 cores; 60 epochs) and print test
accuracy. The weights are cached under ``benchmarks/.cache/`` (not committed) and rebuilt
bit-for-bit from the seed when missing. ``factory()`` serves the CLI:
``amgfx prune benchmarks/digits_vit.py:factory --calib digits ...``.

Model: timm ``VisionTransformer`` on 8x8 grey images, patch 2 (16 patches + CLS), dim 128,
4 blocks of 4 heads (head dim 32), MLP 512, dropout 0.1 and drop-path 0.1 while training.
"""
from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from amgfx.data import digits  # noqa: E402

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
CONFIG = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4,
              mlp_ratio=4.0, global_pool="token", drop_rate=0.1, drop_path_rate=0.1)


def build():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**CONFIG)


def train(seed: int = 0, epochs: int = 60, verbose: bool = True) -> torch.nn.Module:
    """Train from scratch, deterministically (single-threaded-safe ops, fixed seed and order)."""
    torch.manual_seed(seed)
    m = build()
    x, y = digits("train")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    m.train()
    for ep in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(m(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (ep + 1) % 20 == 0:
            print(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, test acc {accuracy(m, *digits('test')):.4f}, "
                  f"{time.time() - t0:.0f}s", flush=True)
    return m.eval()


def load(seed: int = 0) -> torch.nn.Module:
    """The trained model: from the cache, or trained now (and cached)."""
    path = os.path.join(CACHE, f"digits_vit_seed{seed}.pt")
    m = build()
    if os.path.exists(path):
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval()
    m = train(seed)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(m.state_dict(), path)
    return m


class Task(NamedTuple):
    """What every digits benchmark starts from (see :func:`task`)."""
    dense: torch.nn.Module
    example: torch.Tensor      # zeros of one image: what the benchmarks capture with
    x_train: torch.Tensor
    calib_x: torch.Tensor      # the first ``calib`` training images
    calib: list                # calib_x in batches of 16
    x_test: torch.Tensor
    y_test: torch.Tensor


def task(calib: int = 64) -> Task:
    """The trained model, its calibration images and the held-out test set."""
    dense = load()
    xtr, _ = digits("train")
    xte, yte = digits("test")
    x = xtr[:calib]
    return Task(dense, torch.zeros(1, 1, 8, 8), xtr, x, [x[i:i + 16] for i in range(0, calib, 16)], xte, yte)


@torch.no_grad()
def accuracy(model, x, y, batch: int | None = None) -> float:
    """Top-1 accuracy; a GraphModule runs at the batch size it was captured with (``batch``)."""
    batch = batch or len(y)
    was = getattr(model, "training", False)
    model.eval()
    right = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return right / len(y)


def factory():
    """For the CLI: ``(trained model, example input)``."""
    return load(), (torch.zeros(1, 1, 8, 8),)


if __name__ == "__main__":
    t = time.time()
    m = load()
    print(f"test accuracy {accuracy(m, *digits('test')):.4f} ({time.time() - t:.0f}s)")
