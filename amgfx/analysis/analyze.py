"""``amgfx.analyze``: model -> graph -> structure -> coupling groups."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

import warnings

from ..errors import AnalysisError, InternalError, foreign_errors
from ..graph.capture import capture
from ..graph.fx import copy_module, refresh_meta, remove_marked
from ..graph.meta import CAPTURED, LOWERED
from .coupling import CouplingGraph
from .structure import find_structure


def _unlowered(gm: fx.GraphModule) -> fx.GraphModule:
    """A module pruned by amgfx may carry kernel padding (``lower_attention``): analyse it without."""
    if not any(n.meta.get(LOWERED) for n in gm.graph.nodes):
        return gm
    out = remove_marked(copy_module(gm), LOWERED)
    refresh_meta(out)
    return out


def analyze(model_or_gm: nn.Module | fx.GraphModule, example_inputs=None, example_kwargs: dict | None = None,
            *, strict: bool = False) -> CouplingGraph:
    """Find attention sites, MLPs and residual streams, and link coupled neurons into groups.

    ``model_or_gm`` may be an ``nn.Module`` (captured first, with ``example_inputs``) or a
    GraphModule returned by :func:`amgfx.capture`. The model is not modified.

    This is the discovery alone; :func:`amgfx.analyze` runs it and then the probe.

    Example:
        >>> import torch, timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> cg = analyze(m, torch.randn(1, 3, 32, 32))
        >>> len(cg.groups), sorted({g.kind for g in cg.groups})
        (9, ['head', 'mlp', 'qk', 'residual', 'v'])
    """
    if isinstance(model_or_gm, fx.GraphModule) and model_or_gm.meta.get(CAPTURED):
        gm = _unlowered(model_or_gm)
    else:
        if example_inputs is None and not example_kwargs:
            raise TypeError("analyze(model) needs example_inputs (or pass a GraphModule from amgfx.capture)")
        gm = capture(model_or_gm, example_inputs, example_kwargs)
    with foreign_errors(InternalError, "structure discovery"):
        cg = CouplingGraph(gm, find_structure(gm))
    _report_unaccounted(cg.structure.accounting, strict)
    return cg


def _report_unaccounted(acc, strict: bool) -> None:
    """A softmax or attention op discovery made nothing of is said out loud: a user reading ``inspect``
    must not believe the model was covered (raised with ``strict``)."""
    if acc is None or not acc.unaccounted:
        return
    text = (f"{len(acc.unaccounted)} attention-like op(s) are in no site and not known as something else, so "
            "they are not pruned and nothing was checked about them: "
            + "; ".join(f"{k.node} [{k.op}]: {k.what}" for k in acc.unaccounted[:5])
            + (" ..." if len(acc.unaccounted) > 5 else "")
            + ". Register an adapter (amgfx.analysis.attention.register_adapter) or report the model")
    if strict:
        raise AnalysisError(text)
    warnings.warn(text, stacklevel=3)
