import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

import amgfx  # noqa: E402


@functools.lru_cache(None)
def analysed(name):
    """(model, args, kwargs, CouplingGraph) for a model of tests/models.py, built once per session."""
    m, args, kwargs = models.ALL[name]()
    return m, args, kwargs, amgfx.analyze(m, args, kwargs)


@pytest.fixture
def analysed_model():
    return analysed


@pytest.fixture(scope="session")
def saved_vit(tmp_path_factory):
    """A directory written by amgfx.save: a one-block timm ViT with half its MLP pruned."""
    import timm
    import torch
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    d = tmp_path_factory.mktemp("saved")
    amgfx.save(amgfx.prune(m, torch.randn(1, 3, 32, 32), method="magnitude", ratios={"mlp": 0.5}), d)
    return d


def skewed_scores(cg, kinds=("qk", "v", "mlp")) -> dict:
    """Scores that do not depend on the weights: qk and mlp units spread around their mean (so their
    weakest go first), v units all equal. A FLOPs budget then cuts q/k and v to different widths."""
    import numpy as np
    return {g.name: np.ones(g.units) if g.kind in ("v", "residual") else np.linspace(0.1, 1.9, g.units)
            for g in cg.groups if g.kind in kinds}
