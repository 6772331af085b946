"""Every softmax accounted for: each attention-like op of the graph is in a supported site, a refused site
(with its reason), or listed as not attention (with the rule that decided it); anything else is *unaccounted*.

Attention-like ops are found three ways, so that an op nobody wrote an adapter for is still seen:

* the ops an adapter reads (:data:`amgfx.analysis.attention.ADAPTERS`: softmax, fused attention);
* any other op whose name says softmax or attention (a custom kernel, ``aten._masked_softmax``, a
  backend's flash-attention op), unless :data:`NOT_ATTENTION_OPS` says what it is;
* a softmax written out: ``exp(x) / sum(exp(x))``.

:func:`amgfx.analyze` warns when something is unaccounted (raises with ``strict=True``); ``inspect``
prints the counts.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> a = cg.structure.accounting
    >>> a.counts()
    {'supported': 2, 'refused': 0, 'not attention': 0, 'unaccounted': 0}
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..graph.ops import opname
from .records import Skipped

__all__ = ["Accounting", "account", "attention_like", "NOT_ATTENTION_OPS"]

aten = torch.ops.aten

# ops whose names say softmax but which are known not to be attention weights: op -> (rule, what)
NOT_ATTENTION_OPS = {
    aten._log_softmax.default: ("log-probabilities", "log-softmax: log-probabilities (a classifier or a loss), "
                                                     "not attention weights"),
    aten.log_softmax.int: ("log-probabilities", "log-softmax: log-probabilities (a classifier or a loss), "
                                                "not attention weights"),
}
_WORDS = ("softmax", "attention", "attn")


@dataclass
class Accounting:
    """Node names of the attention-like ops, by outcome."""
    supported: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    not_attention: list = field(default_factory=list)
    unaccounted: list = field(default_factory=list)       # [Skipped]: what was seen and why it is listed
    ruled: list = field(default_factory=list)             # [Skipped]: not attention by the op table's rule

    def counts(self) -> dict:
        return {"supported": len(self.supported), "refused": len(self.refused),
                "not attention": len(self.not_attention), "unaccounted": len(self.unaccounted)}

    def line(self) -> str:
        c = self.counts()
        return (f"softmax/attention ops: {sum(c.values())} = {c['supported']} in supported sites + {c['refused']} "
                f"in refused sites + {c['not attention']} not attention" +
                (f" + {c['unaccounted']} UNACCOUNTED" if c["unaccounted"] else ""))


def _written_out_softmax(n: fx.Node) -> bool:
    """``e / sum(e)`` with ``e = exp(...)``: a softmax spelled in element-wise ops."""
    if n.target not in (aten.div.Tensor, aten.mul.Tensor) or len(n.args) < 2:
        return False
    e, d = n.args[:2]
    if not (isinstance(e, fx.Node) and isinstance(d, fx.Node) and e.op == "call_function"
            and e.target in (aten.exp.default, aten.exp2.default)):
        return False
    if n.target is aten.mul.Tensor:           # e * reciprocal(sum(e))
        if d.op != "call_function" or d.target is not aten.reciprocal.default:
            return False
        d = d.args[0]
    return (isinstance(d, fx.Node) and d.op == "call_function" and d.target is aten.sum.dim_IntList
            and d.args[0] is e)


def attention_like(gm: fx.GraphModule, adapted) -> list[tuple[fx.Node, str]]:
    """(node, how it was recognised) of every attention-like op; ``adapted``: the ops adapters read."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = opname(n.target).lower()
        if n.target in adapted:
            out.append((n, "adapter"))
        elif n.target in NOT_ATTENTION_OPS or any(w in name for w in _WORDS):
            out.append((n, "name"))
        elif _written_out_softmax(n):
            out.append((n, "written out"))
    return out


def account(gm: fx.GraphModule, sites, skipped, adapted) -> Accounting:
    """Sort every attention-like op of ``gm`` by what discovery made of it (``sites``, ``skipped``); the ops
    a table rule calls not attention are returned in ``ruled``, for the caller to list beside ``skipped``."""
    acc = Accounting()
    site_of = {s.node: s for s in sites}
    skipped_at = {k.node for k in skipped}
    for n, how in attention_like(gm, adapted):
        s = site_of.get(n.name)
        if s is not None:
            (acc.supported if s.supported else acc.refused).append(n.name)
        elif n.name in skipped_at:
            acc.not_attention.append(n.name)
        elif n.target in NOT_ATTENTION_OPS:
            rule, what = NOT_ATTENTION_OPS[n.target]
            acc.ruled.append(Skipped(node=n.name, op=opname(n.target), what=what, rule=rule))
            acc.not_attention.append(n.name)
        else:
            why = {"adapter": "its adapter returned nothing for it",
                   "name": "no adapter reads this op (its name says softmax or attention)",
                   "written out": "a softmax written as exp / sum(exp), which no adapter reads"}[how]
            acc.unaccounted.append(Skipped(node=n.name, op=opname(n.target), what=why, rule="unaccounted"))
    return acc
