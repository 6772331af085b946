"""The oracles: a pruned model must equal the original with the removed neurons zeroed and
the dropped key positions masked.

Removing a q/k pair, a value neuron, a head or an MLP neuron is exact in real arithmetic: the
original model with exactly those neurons zeroed computes the same function. Dropping key
positions (AMG's static token pruning) equals adding ``-inf`` to the logits of those keys.
``verify`` runs both and compares every output. Residual channels are different: norms then average over
fewer channels, so a plan that prunes them is reported as *approximate*, with its measured
error, and never passes as exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ..graph.fx import constant, copy_module, del_attr, get_attr, replace_attr
from ..graph.masks import compact_shape
from ..graph.meta import APPROXIMATE, EXACT, EXAMPLE, STATE

NOISE = "amgfx_noise_floor"     # gm.meta: the graph's own float32 rounding error at its example
from ..graph.ops import sdpa_args, set_sdpa_arg
from ..planning.plan import Plan

__all__ = ["VerifyReport", "compare", "zeroed", "masked_keys", "check"]

aten = torch.ops.aten


@dataclass
class VerifyReport:
    """Per-output errors of the pruned model against the zeroed original."""
    outputs: list = field(default_factory=list)     # [{"output", "shape", "max_abs", "max_rel"}]
    tol: float = 1e-5
    exact: bool = True                               # False when the plan prunes residual channels or
                                                     # units a norm averages over (an MLP with a norm inside)
    approximate_ops: list = field(default_factory=list)
    problems: list = field(default_factory=list)     # what could not be compared (a missing output, a shape)
    reconstruction: dict | None = None               # the refit of a reconstructed model (checked: its rewrite)
    removed: list = field(default_factory=list)      # branches the plan removed whole (block removal)

    @property
    def max_rel(self) -> float:
        if self.problems or not self.outputs:
            return float("inf")                      # nothing compared is no evidence
        return max(o["max_rel"] for o in self.outputs)

    @property
    def passed(self) -> bool:
        return self.exact and not self.problems and bool(self.outputs) and self.max_rel <= self.tol

    @property
    def status(self) -> str:
        why = "; ".join(self.problems) or ("no output was compared" if not self.outputs else "")
        if why:
            return f"FAIL ({why})"
        if not self.exact:
            ops = f" at {', '.join(self.approximate_ops[:3])}" if self.approximate_ops else ""
            return (f"APPROXIMATE (residual channels or units inside a norm pruned: norms average over fewer "
                    f"channels{ops}; max rel error {self.max_rel:.2e})")
        gone = f"; {len(self.removed)} branch(es) removed whole" if self.removed else ""
        return f"{'PASS' if self.passed else 'FAIL'} (max rel error {self.max_rel:.2e}, tolerance {self.tol:g}{gone})"

    def __str__(self) -> str:
        rows = [f"  {o['output']:<10} {str(o['shape']):<18} max_abs {o['max_abs']:.3e}  max_rel {o['max_rel']:.3e}"
                for o in self.outputs]
        return "\n".join(rows + [f"verify: {self.status}"])

    def to_dict(self) -> dict:
        return {"outputs": self.outputs, "tol": self.tol, "exact": self.exact, "passed": self.passed,
                "max_rel": self.max_rel, "approximate_ops": self.approximate_ops, "problems": self.problems,
                "removed": self.removed}


def compare(got, ref, report: VerifyReport) -> VerifyReport:
    """Fill ``report`` with the error of every leaf of ``got`` against ``ref`` (model outputs, any pytree).

    Both sides must have the same number of leaves, tensors where the other has tensors, and equal
    shapes and dtypes; anything else is a problem, and a report with problems (or with nothing
    compared) never passes.

    Example:
        >>> import torch
        >>> compare((), (torch.ones(2),), VerifyReport()).status
        'FAIL (the pruned model gives 0 outputs, the reference 1)'
    """
    got, ref = pytree.tree_leaves(got), pytree.tree_leaves(ref)
    if len(got) != len(ref):
        report.problems.append(f"the pruned model gives {len(got)} outputs, the reference {len(ref)}")
    for i, (a, b) in enumerate(zip(got, ref)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            report.problems.append(f"out[{i}] is a {type(a).__name__} where the reference has a {type(b).__name__}")
            continue
        if not isinstance(b, torch.Tensor):
            if a != b:
                report.problems.append(f"out[{i}] is {a!r}, the reference {b!r}")
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            report.problems.append(f"out[{i}] is {a.dtype} {list(a.shape)}, the reference {b.dtype} {list(b.shape)}")
            continue
        err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        scale = b.double().abs().max().item() if b.numel() else 1.0
        report.outputs.append({"output": f"out[{i}]", "shape": list(b.shape), "max_abs": err,
                               "max_rel": err / scale if scale > 0 else err})
    return report


def zeroed(cg, plan: Plan):
    """A copy of the captured model with every removed unit's members zeroed (the reference)."""
    ref = copy_module(cg.gm)
    plan.validate(cg)
    done = {}
    for g in cg.groups:
        r = plan.removed(g)
        if r.size == 0:
            continue
        for m in g.members:
            if m.param not in done:
                t = get_attr(ref, m.param)
                done[m.param] = t.detach().clone()
                replace_attr(ref, m.param, done[m.param], t)
            idx = torch.as_tensor(m.index[r].ravel(), dtype=torch.long)
            done[m.param].index_fill_(m.dim, idx, 0.0)
    return ref


def masked_keys(gm, kept: dict):
    """A copy of ``gm`` whose attention nodes (by name) attend only to the ``kept`` key positions.

    The other keys get ``-inf`` logits, combined with any mask the node already has. This is the
    reference static token pruning must equal. With nothing to mask, ``gm`` itself (no copy: copying and
    recompiling a 30-layer LLM's graph costs about a second).
    """
    if not kept:
        return gm
    ref = copy_module(gm)
    for node in list(ref.graph.nodes):
        if node.name not in kept:
            continue
        a = sdpa_args(node)
        n = a.k.meta["val"].shape[-2]
        keep = torch.zeros(1, n, dtype=torch.bool)         # SDPA wants a mask of 2 dims at least
        keep[0, list(kept[node.name])] = True
        bias = torch.zeros(1, n).masked_fill(~keep, float("-inf"))
        mask = a.mask
        if mask is None:
            new = constant(ref, node, bias, "oracle")
        elif mask.meta["val"].dtype == torch.bool:
            k = constant(ref, node, keep, "oracle")
            with ref.graph.inserting_before(node):
                new = ref.graph.call_function(aten.logical_and.default, (mask, k))
        else:
            b = constant(ref, node, bias, "oracle")
            with ref.graph.inserting_before(node):
                new = ref.graph.call_function(aten.add.Tensor, (mask, b))
        set_sdpa_arg(node, "mask", new)
    ref.recompile()
    return ref


def _run(gm, example):
    args, kwargs = example
    with torch.no_grad():
        return gm(*args, **kwargs)


def _state_zeroed(example, state):
    """The example with the removed elements of every state input (a KV cache) zeroed: the history the
    zeroed model itself would have written."""
    if not state:
        return example
    flat, spec = pytree.tree_flatten(example)
    flat = [t * state["inputs"][i] if i in state["inputs"] else t for i, t in enumerate(flat)]
    return pytree.tree_unflatten(flat, spec)


def _state_kept(out, state):
    """The reference outputs with every returned state reduced to the elements the pruned graph keeps."""
    if not state:
        return out
    flat, spec = pytree.tree_flatten(out)
    flat = [t[state["outputs"][i]].reshape(compact_shape(state["outputs"][i])) if i in state["outputs"] else t
            for i, t in enumerate(flat)]
    return pytree.tree_unflatten(flat, spec)


# A correct rewrite differs from its reference by rounding only: seen up to 6x the model's own error (SmolLM2,
# 30 layers, 128 tokens: 2.2e-5 against 3.5e-6); a wrong one (a channel moved, a scale lost) errs by 1e-2 and more.
NOISE_FACTOR = 30
# Where that fails, the zeroed reference's own rounding error decides: the pruned model and it are two float32
# computations of one function, so they differ by about twice that error at most.
REFERENCE_FACTOR = 3


def noise_floor(gm) -> float:
    """The relative rounding error of ``gm`` at its example: its float32 outputs against the same graph
    run with float64 weights and inputs (0.0 where that run is not possible). Cached in ``gm.meta``.

    A pruned model and its zeroed reference are two float32 computations of one real function, so they
    differ by about this much; a deep model at a long input (a 30-layer LLM at 128 tokens: 2e-5) is
    beyond a fixed 1e-5 for that reason alone, while a wrong rewrite errs by 1e-3 and more.
    """
    if NOISE not in gm.meta:
        gm.meta[NOISE] = _noise_floor(gm)
    return gm.meta[NOISE]


def _noise_floor(gm, example=None) -> float:
    up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    example = gm.meta[EXAMPLE] if example is None else example
    wide, upped = copy_module(gm), []
    for fqn, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if t.is_floating_point():                # (tied weights: every name, so no reader stays narrow)
            replace_attr(wide, fqn, up(t.detach()), t)
            upped.append(fqn)
    narrow = (torch.float32, torch.float16, torch.bfloat16)
    widen = lambda a: torch.float64 if isinstance(a, torch.dtype) and a in narrow else a
    for n in wide.graph.nodes:                 # explicit casts (an RMSNorm's .to(float32)) go wide too
        n.args, n.kwargs = pytree.tree_map(widen, n.args), pytree.tree_map(widen, n.kwargs)
    wide.recompile()
    try:
        ref = pytree.tree_leaves(_run(wide, pytree.tree_map(up, example)))
        got = pytree.tree_leaves(_run(gm, example))
    except (RuntimeError, TypeError, ValueError, AssertionError):   # cannot run wide (a dtype check): no estimate
        return 0.0
    finally:        # a GraphModule is a reference cycle: its float64 weights (twice the model) would wait for gc
        for fqn in upped:
            del_attr(wide, fqn)
    rep = compare([g.double() if isinstance(g, torch.Tensor) else g for g in got], ref, VerifyReport())
    return 0.0 if rep.problems or not rep.outputs else float(rep.max_rel)


def check(cg, plan: Plan, pruned, tol: float = 1e-5) -> VerifyReport:
    """Hold ``pruned`` against the original with the removed units zeroed and the dropped key
    positions masked, on the example inputs (what :func:`amgfx.verify` and ``prune(check=True)`` run).

    ``tol`` is raised to :data:`NOISE_FACTOR` times the model's own rounding error
    (:func:`noise_floor`) where that is larger; the report states the tolerance used."""
    example = cg.gm.meta[EXAMPLE]
    tol = max(tol, NOISE_FACTOR * noise_floor(cg.gm))
    tokens = {node: t.kept for node, t in plan.resolve(cg).tokens.items()}
    state = pruned.meta.get(STATE)
    reference, ref_in = masked_keys(zeroed(cg, plan), tokens), _state_zeroed(example, state)
    ref = _run(reference, ref_in)
    got = _run(pruned, pruned.meta[EXAMPLE] if state else example)
    ref = _state_kept(ref, state)
    report = VerifyReport(tol=tol, exact=bool(pruned.meta.get(EXACT, True)),
                          approximate_ops=list(pruned.meta.get(APPROXIMATE, [])),
                          removed=sorted(plan.removed_branches(cg)))
    report = compare(got, ref, report)
    if report.exact and not report.problems and report.outputs and report.max_rel > report.tol:
        # the zeroed model can be far less well conditioned than the dense one (half of a real LLM's heads
        # gone: 2e-4 against 3e-6); within a few times its own rounding error, the two agree
        report.tol = max(report.tol, REFERENCE_FACTOR * _noise_floor(reference, ref_in))
    return report
