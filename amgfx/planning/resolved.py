"""The passes' contract: what :meth:`amgfx.Plan.resolve` hands them, as frozen, typed records.

A plan names coupling-group units; passes need graph facts. :class:`Resolved` is that translation:
for every parameter the indices it keeps, and per attention node what changes there. Passes read
these fields and nothing else of the analysis (they never score, never see ``nn.Module`` classes).

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> r = amgfx.Plan(keep={"qk:blocks.0.attn": list(range(0, 192, 2))}).resolve(cg)
    >>> a = r.attention["scaled_dot_product_attention"]
    >>> a.site, a.qk_dim, a.v_dim, a.fused, round(a.scale, 4)
    ('blocks.0.attn', 32, 64, True, 0.125)
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Resolved", "AttentionChange", "TokenKeep", "LiveQueries", "RemovedBranch"]


@dataclass(frozen=True)
class AttentionChange:
    """An attention node whose head dims or head count change."""
    site: str
    kind: str                 # "sdpa" | "matmul"
    scale: float              # the original logit scale, kept after the q/k dim shrinks
    scale_explicit: bool
    heads: int                # query heads kept
    kv_heads: int
    qk_dim: int               # kept q/k width per head
    v_dim: int
    fused: bool               # q, k and v come from one projection (timm's qkv)
    operands: tuple           # node names of q, k, v


@dataclass(frozen=True)
class TokenKeep:
    """Static key/value token pruning at one attention node: the key positions it keeps."""
    site: str
    kept: tuple
    keys: int                 # key positions before pruning
    operands: tuple
    fused: bool


@dataclass(frozen=True)
class RemovedBranch:
    """A residual branch removed whole (every head of a site, every neuron of an MLP): ``out`` is its
    output layer's node, ``chain`` the element-wise nodes to the residual ``add`` (see
    :mod:`amgfx.analysis.branches`)."""
    group: str
    out: str
    chain: tuple
    add: str


@dataclass(frozen=True)
class LiveQueries:
    """Dead-token elimination at one attention node: the query positions that reach an output."""
    site: str
    live: tuple
    operands: tuple
    fused: bool


@dataclass(frozen=True)
class Resolved:
    """What the passes read: plain data derived from a plan and a coupling graph.

    ``params``: FQN -> {dim: sorted kept indices} for every parameter that shrinks.
    ``attention``, ``tokens``, ``dead``: attention node name -> :class:`AttentionChange`,
    :class:`TokenKeep`, :class:`LiveQueries`. ``options``: the plan's rewrite options.
    ``exact``: whether the zeroing oracle must hold exactly (no residual channels pruned).
    ``removed``: group name -> :class:`RemovedBranch` for every branch removed whole.
    """
    params: dict
    attention: dict
    options: dict
    exact: bool
    tokens: dict = field(default_factory=dict)
    dead: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)
