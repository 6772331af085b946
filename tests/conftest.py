import functools
import os
import sys

import pytest
from hypothesis import settings

# The same examples every run (CI clones clean, so a database would not persist anyway); set
# HYPOTHESIS_PROFILE=explore for a wider, randomised search on your machine.
settings.register_profile("ci", derandomize=True, database=None, max_examples=5, deadline=None)
settings.register_profile("explore", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# every pass is held to what it declares it ensures (amgfx.passes.ensures), here and in the CLI's subprocesses
os.environ.setdefault("AMGFX_DEBUG", "1")

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


def assert_outputs_match(got, ref, rtol=0.0, atol=0.0):
    """``got`` equals ``ref`` leaf by leaf: the same number of leaves (at least one), the same kinds,
    shapes and dtypes, and values within ``rtol``/``atol`` of ``ref``'s largest magnitude (0: bitwise).
    Unlike ``zip``, a missing or extra output fails."""
    import numpy as np
    import torch
    import torch.utils._pytree as pytree
    got, ref = pytree.tree_leaves(got), pytree.tree_leaves(ref)
    assert ref and len(got) == len(ref), f"{len(got)} outputs, expected {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        if isinstance(b, torch.Tensor) and isinstance(a, np.ndarray):
            a = torch.from_numpy(a)
        assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), (i, type(a), type(b))
        if not isinstance(b, torch.Tensor):
            assert a == b, (i, a, b)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.dtype, list(a.shape), b.dtype, list(b.shape))
        if rtol == atol == 0.0:
            assert torch.equal(a, b), i
        else:
            err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
            assert err <= atol + rtol * max(1.0, b.double().abs().max().item()), (i, err)
