"""State a forward writes: a captured graph owns it, and an output that depends on it is refused.

``torch.export`` keeps a buffer update such as ``self.count += 1`` in the graph as an in-place op on a
``get_attr``, and ``ep.module()`` shares that tensor with the user's model. Every amgfx run of the graph
(calibration, the oracle, recovery) would then move the user's buffer. :func:`own_written_state` gives
the graph its own copies; :func:`refuse_stateful_outputs` refuses a model whose outputs change from call
to call because of that state (pruning is checked against the original on the same input, so such a
model could never verify, and the blame would fall on the plan).

Example:
    >>> import torch, amgfx
    >>> class Counting(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(4, 4)
    ...         self.register_buffer("calls", torch.zeros(()))
    ...     def forward(self, x):
    ...         self.calls += 1                 # bookkeeping only: the output does not read it
    ...         return self.lin(x)
    >>> m = Counting()
    >>> gm = amgfx.capture(m, torch.randn(2, 4))
    >>> written_attrs(gm), gm.get_buffer("calls").data_ptr() == m.calls.data_ptr()
    (['calls'], False)
    >>> _ = gm(torch.randn(2, 4)); float(m.calls)
    0.0
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import CaptureError
from .fx import replace_attr
from .indexprop import fetch_attr

__all__ = ["written_attrs", "own_written_state", "refuse_stateful_outputs"]


def _writes(node: fx.Node) -> list[int]:
    """Positions of the arguments ``node``'s op writes in place (from its schema's alias annotations)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    return [i for i, a in enumerate(schema.arguments[:len(node.args)]) if a.alias_info is not None and a.alias_info.is_write]


def written_attrs(gm: fx.GraphModule) -> list[str]:
    """FQNs of the parameters and buffers the graph writes in place, in graph order."""
    out: list[str] = []
    for n in gm.graph.nodes:
        for i in _writes(n):
            a = n.args[i]
            if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in out:
                out.append(a.target)
    return out


def own_written_state(gm: fx.GraphModule) -> list[str]:
    """Give ``gm`` its own copy of every tensor it writes, so running it never touches the user's model."""
    names = written_attrs(gm)
    for fqn in names:
        t = fetch_attr(gm, fqn)
        replace_attr(gm, fqn, t.detach().clone(), t)
    return names


def refuse_stateful_outputs(gm: fx.GraphModule, names: list[str], args: tuple, kwargs: dict) -> None:
    """Raise :class:`CaptureError` naming the written state when two calls on the same input differ.

    Run on the graph's own copies (:func:`own_written_state` first), which are put back afterwards. A
    write that leaves the output alone (a call counter, a lazily filled cache holding the same values)
    passes: only what the caller would see is compared.
    """
    if not names:
        return
    saved = {fqn: fetch_attr(gm, fqn).detach().clone() for fqn in names}
    try:
        with torch.no_grad():
            first = pytree.tree_leaves(gm(*args, **kwargs))
            second = pytree.tree_leaves(gm(*args, **kwargs))
    finally:
        for fqn, t in saved.items():
            fetch_attr(gm, fqn).data.copy_(t)
    same = len(first) == len(second) and all(
        not isinstance(a, torch.Tensor) or (isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b))
        for a, b in zip(first, second))
    if not same:
        listed = ", ".join(repr(n) for n in names)
        raise CaptureError(f"forward() writes {'buffer' if len(names) == 1 else 'buffers'} {listed} and its output "
                           "depends on it: two calls on the same input differ, so no pruned model can be checked "
                           "against it. Reset or remove that state (e.g. a call counter) before pruning")
