"""What each pass property means, as a check against the graph: ``ensures`` is held, not only declared.

:func:`amgfx.passes.pipeline.run` calls :func:`check` after every pass when debug checks are on
(``AMGFX_DEBUG=1``; the test suite turns them on), so a pass that declares a property and does not make it
true fails at that pass, naming it, instead of as a wrong number at the oracle. Each check is
``(GraphModule, Resolved) -> list of problems`` and reads only the graph and the resolved plan.

Example:
    >>> import torch, timm, amgfx
    >>> from amgfx.passes import shrink_params
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> r = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))}).resolve(cg)
    >>> gm = amgfx.graph.fx.copy_module(cg.gm)
    >>> sorted(check(gm, r, {"params_shrunk"}))[0]
    'params_shrunk: blocks.0.mlp.fc1.bias has 768 along dim 0, the plan keeps 384'
    >>> check(shrink_params(gm, r).graph_module, r, {"params_shrunk"})
    []
"""
from __future__ import annotations

import os
from collections import Counter

import torch.fx as fx
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           UnsupportedOperatorException)

from ..graph.meta import DEAD_TOKENS, EXAMPLE, LOWERED, TOKEN_ROWS
from ..graph.fx import batchable_gather, refresh_meta
from ..graph.ops import SDPA, is_noop, sdpa_args
from ..planning.resolved import Resolved

__all__ = ["CHECKS", "check", "debug"]

CANNOT_FAKE = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


def debug() -> bool:
    """Whether passes are checked against what they ensure (``AMGFX_DEBUG=1``)."""
    return os.environ.get("AMGFX_DEBUG", "") not in ("", "0")


def _branches_removed(gm, r: Resolved) -> list:
    names = {n.name for n in gm.graph.nodes}
    return [f"{b.group}: its output {b.out} is still in the graph" for b in r.removed.values() if b.out in names]


def _lints(gm, r: Resolved) -> list:
    try:
        gm.graph.lint()
    except RuntimeError as e:
        return [str(e).splitlines()[0]]
    return []


def _token_rows(gm, r: Resolved) -> list:
    gathered = [tuple(n.meta[TOKEN_ROWS][1]) for n in gm.graph.nodes if TOKEN_ROWS in n.meta]
    return [f"{t.site}: no row gather keeps its {len(t.kept)} key positions" for t in r.tokens.values()
            if tuple(t.kept) not in gathered]


def _live_rows(gm, r: Resolved) -> list:
    on = r.dead and r.options.get("dead_tokens", "auto") != "off"
    return ["dead-token elimination left no record in gm.meta"] if on and DEAD_TOKENS not in gm.meta else []


def _params_shrunk(gm, r: Resolved) -> list:
    have = dict(gm.named_parameters()) | dict(gm.named_buffers())
    out = []
    for fqn, dims in r.params.items():
        t = have.get(fqn)
        for d, kept in dims.items():
            if t is not None and t.shape[d] != len(kept):
                out.append(f"{fqn} has {t.shape[d]} along dim {d}, the plan keeps {len(kept)}")
    return out


def _shapes_fixed(gm, r: Resolved) -> list:
    """The graph propagates fake tensors of its example inputs: every size and view constant fits."""
    if EXAMPLE not in gm.meta:
        return []
    try:
        refresh_meta(gm)
    except CANNOT_FAKE:             # an op whose output shape depends on data: fake tensors cannot say
        return []
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        return [f"the graph does not propagate its example inputs: {type(e).__name__}: {str(e).splitlines()[0]}"]
    return []


def _scale_pinned(gm, r: Resolved) -> list:
    out = []
    for n in gm.graph.nodes:
        site = r.attention.get(n.name)
        if site is not None and n.target in SDPA and sdpa_args(n).scale != float(site.scale):
            out.append(f"{n.name}: scale {sdpa_args(n).scale} is not the original {site.scale}")
    return out


def _lowered(gm, r: Resolved) -> list:
    if r.options.get("lowering", "auto") == "none":
        return []
    out = []
    for n in gm.graph.nodes:
        site = r.attention.get(n.name)
        if site is None or n.target not in SDPA or site.qk_dim == site.v_dim:
            continue
        a = sdpa_args(n)
        padded = [x for x in (a.q, a.k, a.v) if isinstance(x, fx.Node) and x.meta.get(LOWERED)]
        if not padded:
            out.append(f"{n.name}: q/k dim {site.qk_dim} and v dim {site.v_dim} differ and nothing is padded")
    return out


def _folded(gm, r: Resolved) -> list:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    out = [f"{fqn} is held but never read" for fqn, _ in gm.named_parameters() if fqn not in used]
    out += [f"{n.name} is computed and never used" for n in gm.graph.nodes
            if n.op == "call_function" and not n.users and not n.is_impure()]
    return out + _lints(gm, r)


def _noops_dropped(gm, r: Resolved) -> list:
    return [f"{n.name}: {n.target} does nothing and is still there" for n in gm.graph.nodes if is_noop(n)]


def _gathers_shared(gm, r: Resolved) -> list:
    keys = Counter(b[0] for n in gm.graph.nodes if (b := batchable_gather(gm, n)) is not None)
    return [f"{k[0].name} is gathered {c} times along dim {k[1]} at indices one gather could hold"
            for k, c in keys.items() if c > 1]


# property -> what holding it means for the graph (the names are pipeline.PROPERTIES)
CHECKS = {"branches_removed": _branches_removed, "qkv_split": _lints, "token_rows": _token_rows,
          "live_rows": _live_rows, "params_shrunk": _params_shrunk, "shapes_fixed": _shapes_fixed,
          "scale_pinned": _scale_pinned, "lowered": _lowered, "noops_dropped": _noops_dropped,
          "gathers_shared": _gathers_shared, "folded": _folded}


def check(gm: fx.GraphModule, resolved: Resolved, properties) -> list:
    """The problems found with ``properties`` on ``gm``, each prefixed with its property."""
    return [f"{p}: {why}" for p in sorted(properties) for why in CHECKS[p](gm, resolved)]
