"""Residual branches that can be removed whole: an attention branch (all of a site's heads) or an
MLP branch (all of its neurons).

With every unit of a branch zeroed, its output layer (the attention projection, the MLP's fc2)
computes its bias alone, the same for every token. What reaches the residual stream is then
that bias passed through the element-wise ops between the layer and the residual ``add``
(LayerScale's ``gamma``, a dropout, a cast), so the branch can be deleted and that constant
added instead, exactly. A branch is removable when its output layer's result has one reader at
each step, through element-wise ops whose other operands do not depend on the input and data
movement that leaves the channel axis last and whole (GPT-2's ``view``, Swin's window reverse), up
to an ``add`` with the residual (an operand that does depend on the input). Anything else (a
second reader, a norm after the branch, a permute of the channels) and the branch is kept, with
the reason.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, init_values=1e-5)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> b = branches(cg)["mlp:blocks.0.mlp"]
    >>> b.reason, b.out, [n.split("_")[0] for n in b.chain]      # fc2, its dropout, LayerScale's mul
    (None, 'linear_3', ['dropout', 'mul'])
"""
from __future__ import annotations

from dataclasses import dataclass

from ..graph.branches import ADDS, SCALES, keeps_channels
from .coupling import GroupId
from ..graph.indexprop import input_dependent, shape
from ..graph.ops import IDENTITY, IGNORED_USERS, LAYERS

__all__ = ["Branch", "branches"]

# element-wise ops a branch's constant output may pass on its way to the residual add
PASSABLE = SCALES | ADDS | IDENTITY


@dataclass(frozen=True)
class Branch:
    """The branch of one group: its output layer node, the ops up to the residual add, the add."""
    group: str
    out: str                     # the output layer's node (fc2, the attention projection)
    chain: tuple = ()            # nodes between ``out`` and ``add``, in order
    add: str | None = None       # the residual add that receives the branch
    reason: str | None = None    # why it cannot be removed (None: it can)

    @property
    def removable(self) -> bool:
        return self.reason is None


def _readers(n):
    return [u for u in n.users if u.target not in IGNORED_USERS]


def _walk(group: str, out, data) -> Branch:
    n, chain = out, []
    while True:
        users = _readers(n)
        if len(users) != 1:
            return Branch(group, out.name, reason=f"{n.name}'s output is read {len(users)} times before any "
                                                   "residual add")
        u = users[0]
        others = [a for a in u.all_input_nodes if a is not n]
        if u.target in ADDS and len(others) == 1 and others[0] in data and n in u.args[:2] \
                and shape(others[0]) == shape(u):     # the residual has the sum's shape: a constant broadcasts
            return Branch(group, out.name, tuple(c.name for c in chain), u.name)
        if keeps_channels(u) or u.target in PASSABLE and not any(a in data for a in others):
            chain.append(u)
            n = u
            continue
        return Branch(group, out.name, reason=f"its output passes {u.target} ({u.name}) before the residual add")


def branches(cg) -> dict:
    """Group name (``head:<site>``, ``mlp:<mlp>``) -> :class:`Branch`, for every site and MLP (cached)."""
    if cg.branches is not None:
        return cg.branches
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    data = input_dependent(cg.gm.graph)
    out = {}
    for s in cg.sites:
        if s.supported and s.proj is not None:
            out[GroupId("head", s.name)] = _walk(GroupId("head", s.name), nodes[s.proj.node], data)
    for m in cg.mlps:
        out[GroupId("mlp", m.name)] = _walk(GroupId("mlp", m.name), nodes[m.fc2.node], data)
    for name, b in out.items():
        layer = nodes[b.out]
        if b.removable and layer.target not in LAYERS:
            out[name] = Branch(name, b.out, reason=f"its output layer {layer.target} has no bias argument")
    cg.branches = out
    return out
