"""``amgfx.verify``: prune by a plan (or take the pruned model) and hold it against the oracles of
:mod:`amgfx.oracle` (removed neurons zeroed, dropped key positions masked with ``-inf``)."""
from __future__ import annotations

from .api import RECONSTRUCTION, _coupling, apply
from .oracle import VerifyReport, check, compare, masked_keys, zeroed  # noqa: F401 (the oracle's names, here too)
from .planning.plan import Plan

__all__ = ["verify", "VerifyReport", "compare", "zeroed", "masked_keys"]


def verify(model_or_gm, plan: Plan, example_inputs=None, example_kwargs=None, *, pruned=None,
           tol: float = 1e-5) -> VerifyReport:
    """Compare the pruned model with the original whose removed neurons are zeroed and whose
    dropped key positions are masked with ``-inf`` (:func:`masked_keys`).

    ``pruned`` defaults to ``amgfx.apply(model, plan)``. The error of an output is
    ``max|pruned - reference| / max|reference|``. A reconstructed model (:func:`amgfx.reconstruct`)
    has refitted weights by design: the structural rewrite of its plan is checked instead, and the
    report's ``reconstruction`` lists the layers refitted with their calibration errors.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> plan = amgfx.plan_for(m, x, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "head": 0.34, "mlp": 0.5})
        >>> amgfx.verify(m, plan, x).passed
        True
    """
    cg = _coupling(model_or_gm, example_inputs, example_kwargs)
    refit = pruned.meta.get(RECONSTRUCTION) if pruned is not None else None
    if pruned is None or refit is not None:
        pruned = apply(cg, plan, check=False)
    report = check(cg, plan, pruned, tol)
    report.reconstruction = refit
    return report
