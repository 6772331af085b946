"""Token-axis analysis: which attention sites may drop key positions, and which positions must stay.

AMG prunes key/value *positions* statically: the same positions for every input. That is
meaningful only where a position means the same thing in every input, so a site is refused,
with the reason, when:

* its attention mask differs between queries (a causal decoder: every query sees other keys);
* its K/V rows mix the batch with positions (windowed attention, windows built by reshape);
* its key length depends on the input (a dynamic sequence axis);
* it is not an SDPA site, or its K/V projections cannot be told apart from the query's.

Some positions are always kept: the *special tokens* a model concatenates in front of its
patch tokens (a class token, a distillation token, registers). They are found in the graph as
the input-independent pieces (built from parameters only) of the ``cat`` along the token axis
that feeds the site, not by parameter name.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> t = token_sites(cg)["blocks.0.attn"]
    >>> t.keys, t.special, t.reason
    (6, [0, 1], None)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..graph.indexprop import activation_taint, shape
from ..graph.meta import DIMS, DYNAMIC_BATCH, EXAMPLE
from ..graph.ops import CONCAT, sdpa_args
from ..graph.rows import projection

__all__ = ["TokenSite", "token_sites"]


@dataclass
class TokenSite:
    """What static key pruning may do at one attention site."""
    site: str
    node: str                                   # the attention node
    keys: int = 0                               # key positions
    special: list = field(default_factory=list)  # positions always kept (class/distillation/register tokens)
    reason: str | None = None                   # why the site cannot drop key positions (None: it can)

    @property
    def prunable(self) -> bool:
        return self.reason is None


def _special(x: fx.Node, keys: int, tainted: set) -> list[int]:
    """Positions of the nearest token-axis ``cat`` above ``x`` whose pieces depend on no layer."""
    seen, todo = set(), [x]
    while todo:
        n = todo.pop(0)
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        out = shape(n)
        if n.target in CONCAT and out is not None and len(out) == 3 and out[1] == keys:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if dim % 3 == 1:
                pos, special = 0, []
                for piece in n.args[0]:
                    width = shape(piece)[1]
                    if piece not in tainted:             # built from parameters alone: a learned token
                        special += range(pos, pos + width)
                    pos += width
                return special if pos == keys else []
        todo.extend(n.all_input_nodes)
    return []


def _per_query_mask(gm: fx.GraphModule, masks: dict) -> dict:
    """attention node -> True where its mask, evaluated on the example inputs, differs between queries."""
    if not masks:
        return {}
    values = {}

    class _Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in masks.values():
                values[n] = out
            return out

    args, kwargs = gm.meta[EXAMPLE]
    with torch.no_grad():
        _Grab(gm).run(*args, *kwargs.values())
    out = {}
    for node, m in masks.items():
        v = values.get(m)
        if v is None:
            out[node] = False
            continue
        allowed = v if v.dtype == torch.bool else v > torch.finfo(v.dtype).min / 2
        out[node] = allowed.ndim >= 2 and bool((allowed != allowed[..., :1, :]).any())
    return out


def _analyse(cg) -> dict:
    gm = cg.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    tainted = activation_taint(gm.graph)
    out, masks = {}, {}
    batch = {n.meta.get(DIMS, (None,))[0] for n in gm.graph.nodes if n.op == "placeholder"} - {None}
    for s in cg.sites:
        t = TokenSite(site=s.name, node=s.node)
        out[s.name] = t
        if not s.supported or s.kind != "sdpa" or not s.operands:
            t.reason = f"{s.reason or s.kind + ' attention'}; static token pruning needs an SDPA site"
            continue
        attn = nodes[s.node]
        k = nodes[s.operands[1]]
        t.keys = shape(k)[-2]
        if isinstance(sdpa_args(attn).mask, fx.Node):
            masks[s.node] = sdpa_args(attn).mask
        if "tokens" in s.disabled:
            t.reason = s.disabled["tokens"]
            continue
        projs = [projection(nodes[o], tainted) for o in s.operands[1:]]
        if None in projs:
            t.reason = "the keys/values do not come from a single projection each"
            continue
        x = projs[1].args[0]
        xs, dims = shape(x), x.meta.get(DIMS, ())
        rows = [d for d, n in enumerate(xs or ()) if n == t.keys and d > 0]
        if xs is None or len(xs) != 3 or rows != [1]:
            t.reason = f"the K/V projection input {list(xs or ())} has no single token axis of {t.keys} positions"
        elif len(dims) > 1 and dims[1] is not None:
            t.reason = "the key length depends on the input (a dynamic sequence axis)"
        elif gm.meta.get(DYNAMIC_BATCH) and len(dims) and dims[0] not in batch:
            t.reason = "the K/V rows mix the batch with positions (windowed attention: windows built by reshape)"
        if t.reason:
            continue
        t.special = _special(x, t.keys, tainted)
    for node, per_query in _per_query_mask(gm, masks).items():
        if per_query:                                   # the deepest reason: say it first
            t = next(t for t in out.values() if t.node == node)
            t.reason = "its attention mask differs between queries (causal or per-query masking)"
    return out


def token_sites(cg) -> dict[str, TokenSite]:
    """Site name -> :class:`TokenSite` for every attention site of ``cg`` (computed once, then cached)."""
    if cg.token_sites is None:
        cg.token_sites = _analyse(cg)
    return cg.token_sites
