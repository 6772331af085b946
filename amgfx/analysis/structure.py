"""Structure discovery on the captured graph: attention sites, MLPs and residual streams.

Everything here reads the ATen graph and the op tables in :mod:`amgfx.graph.ops`; no module class
names, parameter-name patterns or per-model tables are used. Each part has its own module:
:mod:`.attention` (adapters and sites), :mod:`.mlp`, :mod:`.residual`; the records are in :mod:`.records`.
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.indexprop import is_layer
from ..errors import noted
from ..graph.fold import BATCH_NORMS
from ..graph.ops import (ADD_MATMUL, DATA_MOVEMENT, FUSED_ATTENTION, IGNORED_USERS, LAYERS, LIKE, LINEAR_LAYERS, MATMUL,
                         NORMS, PAD, POINTWISE, REDUCTIONS, SOFTMAX, VECTOR_NORMS, is_pointwise_conv, opname, where)
from .accounting import account
from .attention import ADAPTERS, NotAttention, attention_site
from .mlp import mlp_at
from .records import MLP, AttentionSite, Ctx, Layer, ResidualStream, Skipped, Structure
from .residual import residual_streams

__all__ = ["Layer", "AttentionSite", "MLP", "ResidualStream", "Skipped", "Structure", "find_structure", "unknown_weights"]


def find_structure(gm: fx.GraphModule) -> Structure:
    """Find every attention site, MLP and residual stream of a captured graph.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> st = find_structure(amgfx.capture(m, torch.randn(1, 3, 32, 32)))
        >>> len(st.sites), len(st.mlps), len(st.residual), st.skipped
        (2, 2, 1, [])
    """
    ctx = Ctx(gm)
    sites, skipped = [], []
    for n in gm.graph.nodes:
        with noted(lambda: where(n)):
            s = attention_site(ctx, n) if n.op == "call_function" else None
        if isinstance(s, NotAttention):
            skipped.append(Skipped(node=n.name, op=opname(n.target), what=s.what, rule=s.rule))
        elif s is not None:
            sites.append(s)
    names: dict = {}
    for s in sites:                                   # unique, stable names
        names[s.name] = names.get(s.name, 0) + 1
    for s in sites:
        if names[s.name] > 1:
            s.name = f"{s.name}:{s.node}"
    taken = {l.node for s in sites for l in (s.q, s.k, s.v, s.proj) if l is not None}
    mlps = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in LINEAR_LAYERS or is_pointwise_conv(n)) and is_layer(n):
            with noted(lambda: where(n)):
                m = mlp_at(ctx, n, taken)
            if m is not None:
                mlps.append(m)
    with noted("finding residual streams"):
        residual = residual_streams(ctx)
    acc = account(gm, sites, skipped, set(ADAPTERS) | set(FUSED_ATTENTION))
    return Structure(sites=sites, mlps=mlps, residual=residual, skipped=skipped + acc.ruled, unknown=unknown_weights(gm),
                     accounting=acc)


# ops that may read a parameter and have rules (layers, norms, element-wise maths, data movement)
_KNOWN = (set(LAYERS) | set(NORMS) | POINTWISE | DATA_MOVEMENT | set(REDUCTIONS) | VECTOR_NORMS | SOFTMAX | LIKE
          | PAD | set(BATCH_NORMS) | set(FUSED_ATTENTION) | MATMUL | set(ADD_MATMUL) | IGNORED_USERS)


def unknown_weights(gm: fx.GraphModule) -> list[Skipped]:
    """Ops that read a parameter (through data movement) but are no op amgfx has a rule for, so their
    weights are left whole: reported, not skipped in silence (an MoE's grouped matmul over stacked experts).

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> unknown_weights(amgfx.capture(m, torch.randn(1, 3, 32, 32)))
        []
    """
    params = {n for n, _ in gm.named_parameters()}
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in _KNOWN or n.target in LAYERS:   # LAYERS grows (MoE ops)
            continue
        for a in n.all_input_nodes:
            while a.op == "call_function" and a.target in DATA_MOVEMENT and a.args and isinstance(a.args[0], fx.Node):
                a = a.args[0]
            if a.op == "get_attr" and a.target in params:
                out.append(Skipped(node=n.name, op=opname(n.target),
                                   what=f"reads parameter {a.target}, and amgfx has no rule for this op: "
                                        "its weights are left whole"))
                break
    return out
