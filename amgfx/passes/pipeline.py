"""The pass contract: what each pass requires of the graph and ensures, and the order check.

In the manner of ``torch.fx.passes.infra.pass_base``: a pass is a function ``(GraphModule, Resolved) ->
GraphModule``, wrapped by :func:`graph_pass` with the properties it needs and the ones it makes
true; called, the wrapper returns a :class:`PassResult` (the module, and whether the pass changed it).
:func:`check_order` refuses a pipeline that runs a pass before what it requires;
:func:`run` checks, then runs each pass, turning an unexpected exception into a
:class:`~amgfx.errors.RewriteError` that names the pass (the original is its cause). With debug checks
on (``AMGFX_DEBUG=1``, as the test suite runs), every property a pass ensures is then held against the
graph (:mod:`.ensures`), and a pass that does not make it true raises :class:`PassContractError`.

Properties (strings, declared once here):

==================== ==========================================================================
``branches_removed`` branches removed whole (block removal) are gone, their constant added
``qkv_split``        a fused q/k/v projection that cannot be rewritten whole is split per operand
``token_rows``       static token gathers sit before the K/V projections (AMG)
``live_rows``        dead-token gathers sit before the layers whose outputs are read at some rows
``params_shrunk``    every parameter holds only its kept indices
``shapes_fixed``     every size and position constant matches the shrunk tensors
``scale_pinned``     attention whose q/k dim changed states its original softmax scale
``lowered``          attention with unequal q/k and v dims is padded for the kernel (or left, by option)
``folded``           weight slices are folded into parameters; dead code and attributes are gone
==================== ==========================================================================

Example:
    >>> from amgfx.passes import PIPELINE
    >>> check_order(PIPELINE)
    >>> check_order(PIPELINE[4:5] + PIPELINE[1:4])
    Traceback (most recent call last):
    ...
    amgfx.passes.pipeline.PassOrderError: shrink_params requires qkv_split, which no earlier pass ensures (order: shrink_params, split_qkv, token_gather, dead_tokens)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch.fx as fx

from ..errors import RewriteError, foreign_errors
from ..graph.rows import ROW_EDITS
from ..planning.resolved import Resolved
from . import ensures

__all__ = ["Pass", "PassResult", "graph_pass", "check_order", "run", "PassOrderError", "PassContractError",
           "PROPERTIES"]

PROPERTIES = ("branches_removed", "qkv_split", "token_rows", "live_rows", "params_shrunk", "shapes_fixed", "scale_pinned", "lowered",
              "noops_dropped", "gathers_shared", "folded")


class PassOrderError(RewriteError):
    """A pipeline runs a pass before a pass it depends on."""


class PassContractError(RewriteError):
    """A pass declared a property it did not make true (found by the debug checks)."""


class PassResult(NamedTuple):
    """What a pass returns, as ``torch.fx.passes.infra.pass_base.PassResult``: the module and whether it changed."""
    graph_module: fx.GraphModule
    modified: bool


def _state(gm: fx.GraphModule) -> tuple:
    """What a pass can change: the nodes (op, target, arguments) and every tensor's shape."""
    nodes = tuple((n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes)
    return nodes, tuple((k, tuple(t.shape)) for k, t in list(gm.named_parameters()) + list(gm.named_buffers()))


@dataclass(eq=False)
class Pass:
    """A graph pass with its contract; call it like the function it wraps."""
    fn: object
    requires: frozenset
    ensures: frozenset

    @property
    def name(self) -> str:
        return self.fn.__name__

    def __call__(self, gm: fx.GraphModule, resolved: Resolved | None = None) -> PassResult:
        before = _state(gm)
        out = self.fn(gm, resolved)
        return PassResult(out, out is not gm or _state(out) != before)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def graph_pass(*, requires=(), ensures=()):
    """Declare a function ``(gm, resolved) -> gm`` a pass, with the properties it requires and ensures."""
    unknown = (set(requires) | set(ensures)) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"unknown pass properties {sorted(unknown)}; declare them in PROPERTIES")

    def wrap(fn):
        p = Pass(fn, frozenset(requires), frozenset(ensures))
        functools.update_wrapper(p, fn)
        return p
    return wrap


def check_order(passes) -> None:
    """Raise :class:`PassOrderError` when a pass runs before the passes that ensure what it requires."""
    rows = [p.name for p in passes if p.name in ROW_EDITS]
    if rows != [e for e in ROW_EDITS if e in rows]:
        raise PassOrderError(f"the row edits run as {rows}, not in the order the cost model replays them "
                             f"({', '.join(ROW_EDITS)}: amgfx.graph.rows.ROW_EDITS)")
    have: set = set()
    for p in passes:
        missing = sorted(set(p.requires) - have)
        if missing:
            order = ", ".join(q.name for q in passes)
            raise PassOrderError(f"{p.name} requires {', '.join(missing)}, which no earlier pass ensures "
                                 f"(order: {order})")
        have |= p.ensures


def run(gm: fx.GraphModule, resolved: Resolved, passes) -> fx.GraphModule:
    """Check the order, then run ``passes`` on ``gm`` (in place where a pass edits in place); with debug
    checks on, hold what each pass ensures against the graph it leaves."""
    check_order(passes)
    debug = ensures.debug()
    for p in passes:
        with foreign_errors(RewriteError, f"pass {p.name}"):
            gm = p.fn(gm, resolved)          # the function itself: whether it modified the graph is not asked here
        problems = ensures.check(gm, resolved, p.ensures) if debug else []
        if problems:
            raise PassContractError(f"pass {p.name} does not ensure what it declares: " + "; ".join(problems[:3]))
    return gm
