"""Calibration: run the captured graph on data and feed the collectors the criteria declared.

Nothing is stored per sample. Each batch adds to running sums (float64) and is then dropped,
so memory is one batch's activations plus fixed-size statistics. The built-in collectors
(:mod:`amgfx.scoring.collectors`):

===================  =====================  ================================================
statistic            shape (per site/MLP)   read by
===================  =====================  ================================================
``attn``             [Lq, Nq, Nk]           ``amg`` heads: entropy of the data-averaged map
``qk``               [units]                ``snp`` qk: attention-preserving pair score
``tokens``           [Nk]                   ``amg`` tokens: |sum A * dL/dA| per key position
``act``              [hidden]               ``snp`` mlp: mean squared hidden activation
``taylor``           [units] per group      ``taylor``: (sum over a unit of w * dL/dw)^2
===================  =====================  ================================================

Attention probabilities are computed from q, k, the scale and the mask even where the graph
calls fused SDPA, so fused and explicit attention are calibrated alike.

**The default loss.** The KL divergence (or MSE) to the dense model's own output is zero at
the dense model, and so is its gradient. We therefore draw the target from the dense model's
predictive distribution: a class sampled from ``softmax(logits)`` for a classifier (one 2-D
output), and ``output + N(0, 1)`` otherwise (token states whose batch has an attention mask: their mean
over the real tokens, as :mod:`amgfx.scoring.readout` reads them). The gradient is then non-zero, and its expected
square is the Fisher information, the curvature of that KL/MSE at the dense model; this is
why ``taylor`` squares its first-order term. Draws are seeded by the batch's content, so
sharding the data over ranks does not change them.

**Many machines.** When a ``torch.distributed`` process group is initialised, every rank
calibrates on its own shard and the sums are all-reduced before scoring, so every rank holds
the statistics of the union of the data (and then computes the same plan).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import AmgfxError
from ..graph.fx import nonfinite
from ..graph.indexprop import fetch_attr
from ..graph.meta import DYNAMIC_BATCH, EXAMPLE
from ..graph.ops import SDPA, sdpa_args
from .collectors import Seen, Stats, Watch, param_leaves, qk_scores, standard  # noqa: F401 (qk_scores: public here too)
from .readout import as_read

__all__ = ["Stats", "calibrate", "as_batches", "CalibrationError"]


class CalibrationError(AmgfxError):
    """Calibration data that cannot be used (wrong shapes, NaN/Inf, nothing in it)."""


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _split(batch, n_args: int, kw_names: list[str]):
    """A calibration item -> (args, kwargs) shaped like the example inputs."""
    if isinstance(batch, Mapping):
        if n_args:
            raise CalibrationError("calibration batches are dicts but the model takes positional inputs")
        return (), {k: batch[k] for k in kw_names if k in batch}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (list, tuple)):
        if kw_names and not n_args:
            raise CalibrationError("the model takes keyword inputs (a dict per batch), got a "
                                   f"{type(batch).__name__}")
        return tuple(batch[:n_args]), {}          # the rest (labels) is for loss_fn only
    raise CalibrationError(f"a calibration batch must be a tensor, a tuple/list of tensors or a dict of tensors, "
                           f"got {type(batch).__name__}")


def _check(i: int, args, kwargs, ex_args, ex_kwargs) -> int:
    """Shapes must match the example inputs except the batch dim; values must be finite."""
    got = list(args) + [kwargs.get(k) for k in ex_kwargs]
    want = list(ex_args) + list(ex_kwargs.values())
    names = [f"input {j}" for j in range(len(ex_args))] + [repr(k) for k in ex_kwargs]
    # the batch is dim 0 of the inputs that share the first input's leading size; another input (a
    # decode step's cache slots) has no batch dim and must be as in the example
    lead = next((w.shape[0] for w in want if isinstance(w, torch.Tensor) and w.dim()), None)
    batch = None
    for name, g, w in zip(names, got, want):
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(g, torch.Tensor) and (w.dim() == 0 or w.shape[0] != lead):
            if tuple(g.shape) != tuple(w.shape):
                raise CalibrationError(f"calibration batch {i}: {name} has shape {list(g.shape)}, but the example "
                                       f"inputs have {list(w.shape)} (it has no batch dim)")
            continue
        if not isinstance(g, torch.Tensor):
            raise CalibrationError(f"calibration batch {i}: {name} is missing (expected a tensor of shape "
                                   f"[B, {', '.join(map(str, w.shape[1:]))}])")
        if g.dim() != w.dim() or tuple(g.shape[1:]) != tuple(w.shape[1:]):
            raise CalibrationError(f"calibration batch {i}: {name} has shape {list(g.shape)}, but the example "
                                   f"inputs have {list(w.shape)}; only the batch (first) dim may differ. "
                                   "Pad or resize the data to the example's shape.")
        if nonfinite(g):
            raise CalibrationError(f"calibration batch {i}: {name} contains NaN or Inf")
        if batch is not None and g.shape[0] != batch:
            raise CalibrationError(f"calibration batch {i}: inputs disagree on the batch size")
        batch = g.shape[0]
    return batch or 1


def as_batches(calib, ex_args, ex_kwargs) -> list:
    """Validate calibration data up front when it is a sized sequence (lists, tuples, Datasets).

    Returns ``[(args, kwargs, raw, batch size)]`` for sequences; other iterables (DataLoaders) are checked
    batch by batch as they are read, each before any work is done on it.
    """
    if calib is None:
        raise CalibrationError("no calibration data: pass calib= (a DataLoader, or a list of tensors / dicts)")
    if isinstance(calib, (torch.Tensor, Mapping)):
        calib = [calib]
    if isinstance(calib, (list, tuple)):
        if not calib:
            raise CalibrationError("the calibration data is empty")
        out = []
        for i, b in enumerate(calib):
            a, k = _split(b, len(ex_args), list(ex_kwargs))
            out.append((a, k, b, _check(i, a, k, ex_args, ex_kwargs)))
        return out
    return None


def _batches(calib, ex_args, ex_kwargs):
    checked = as_batches(calib, ex_args, ex_kwargs)
    if checked is not None:
        yield from checked
        return
    for i, b in enumerate(calib):
        a, k = _split(b, len(ex_args), list(ex_kwargs))
        yield a, k, b, _check(i, a, k, ex_args, ex_kwargs)


def batch_chunks(gm, calib):
    """Per calibration batch, ``(batch size, [(args, kwargs, raw), ...])``: the batch cut into chunks
    of the batch size ``gm`` was captured with (its shapes are static unless the batch dim stayed
    symbolic). Calibration and reconstruction both read their data through this.
    """
    ex_args, ex_kwargs = gm.meta[EXAMPLE]
    b0 = _check(0, ex_args, ex_kwargs, ex_args, ex_kwargs)
    for i, (args, kwargs, raw, bsz) in enumerate(_batches(calib, ex_args, ex_kwargs)):
        step = bsz if gm.meta.get(DYNAMIC_BATCH) else b0
        if bsz % step:
            raise CalibrationError(f"calibration batch {i} has {bsz} samples, not a multiple of the example "
                                   f"inputs' batch size {step} (the captured graph's shapes are static)")
        cut = lambda t, c: t[c:c + step] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == bsz else t
        yield bsz, [pytree.tree_map(lambda t: cut(t, c), (args, kwargs, raw)) for c in range(0, bsz, step)]


def _content_seed(seed: int, args, kwargs) -> int:
    t = next((x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)), None)
    data = t.detach().cpu().contiguous().numpy().tobytes() if t is not None else b""
    return zlib.crc32(data, seed & 0xFFFFFFFF)


def default_loss(outputs, seed: int, kwargs: dict | None = None) -> torch.Tensor:
    """Loss against a target drawn from the dense model's own predictive distribution (see module doc).

    Where the batch's ``kwargs`` carry an attention mask that matches the first output, the target is drawn
    for that output as it is read (:func:`amgfx.scoring.readout.as_read`: token states mean-pooled over the
    real tokens), the rest unread: on MiniLM at half its FLOPs, taylor ranked per layer kept 0.860 cosine to
    dense after refit against 0.853 with a target for every position's state, padding included (ranked raw:
    0.851 against 0.836), and auto at 70% 0.927 against 0.920 (criteria_minilm)."""
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise CalibrationError("the model returns no floating-point tensor to build a loss on; pass loss_fn=")
    g = torch.Generator().manual_seed(seed)
    if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1:
        logits = leaves[0]
        y = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=g).squeeze(1)
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    read = as_read(leaves[0], kwargs or {})
    if read is not leaves[0]:
        leaves = [read]
    loss = 0.0
    for t in leaves:
        r = torch.randn(t.shape, generator=g, dtype=t.dtype)
        loss = loss + 0.5 * ((t - (t.detach() + r)) ** 2).sum()
    return loss


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def _attention(q, k, v, mask=None, dropout=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Explicit SDPA (eval semantics) that also returns the probabilities A."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    logits = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        n, m = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1 + m - n), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    a = torch.softmax(logits, -1)
    return a @ v, a


class _Recorder(fx.Interpreter):
    """Runs the captured graph, keeping what the collectors watch (:class:`Watch`)."""

    def __init__(self, cg, watch: Watch, leaves: dict, sites: dict):
        super().__init__(cg.gm, garbage_collect_values=True)
        self.leaves = leaves            # fqn -> leaf tensor requiring grad
        self.sites = {n: s for n, s in sites.items() if n in watch.sites}
        self.values = watch.values
        self.by_operand = {}            # operand node name -> [site, ...]
        for s in self.sites.values():
            for o in s.operands[:2]:
                self.by_operand.setdefault(o, []).append(s)
        self.seen = Seen(params=leaves)

    def get_attr(self, target, args, kwargs):
        return self.leaves.get(target) if target in self.leaves else fetch_attr(self.module, target)

    def run_node(self, n):
        if n.op == "call_function" and n.target in SDPA and n.name in self.sites:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            a = sdpa_args(args, kwargs, op=n.target)
            out, probs = _attention(a.q, a.k, a.v, a.mask, a.dropout_p, a.is_causal, a.scale, a.enable_gqa)
            self.seen.sites[n.name] = {"q": a.q, "k": a.k, "A": probs}
            return out
        out = super().run_node(n)
        if n.name in self.by_operand:
            for s in self.by_operand[n.name]:
                self.seen.sites.setdefault(s.node, {})["q" if s.operands[0] == n.name else "k"] = out
        if n.name in self.sites:                       # softmax of an explicit attention
            self.seen.sites.setdefault(n.name, {})["A"] = out
        if n.name in self.values:
            self.seen.values[n.name] = out
        return out


def calibrate(cg, calib, *, collectors=None, needs: set = frozenset(), loss_fn=None, seed: int = 0,
              gamma: float = 0.9, taylor_groups=(), progress: bool = True) -> Stats:
    """Run ``cg``'s captured graph over ``calib``, feeding ``collectors``; returns the accumulated :class:`Stats`.

    ``collectors`` are what the criteria declare (:mod:`amgfx.scoring.collectors`). ``needs`` adds
    the built-in ones by name for every site and MLP (``attn``, ``qk`` with ``gamma``, ``tokens``,
    ``act``, and ``taylor`` for ``taylor_groups``). A backward pass runs only when a collector
    needs gradients. ``loss_fn(outputs, batch)`` replaces the default loss (see the module docstring).

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> st = calibrate(cg, [torch.randn(4, 3, 32, 32)], needs={"attn"}, progress=False)
        >>> st.mean("attn:blocks.0.attn").shape, st.samples
        ((3, 5, 5), 4)
    """
    from tqdm.auto import tqdm
    collectors = _dedupe(list(collectors or []) + standard(cg, set(needs), gamma=gamma, taylor_groups=taylor_groups))
    watch = Watch()
    for c in collectors:
        watch = watch | c.watch
    st = Stats()
    run = _Run(cg, st, {s.node: s for s in cg.sites if s.supported and s.operands}, tuple(collectors), watch,
               param_leaves(cg, collectors), loss_fn, seed)
    total = len(calib) if hasattr(calib, "__len__") else None
    bar = tqdm(batch_chunks(cg.gm, calib), total=total, desc="calibrating", unit="batch",
               disable=not progress, leave=False)
    for bsz, pieces in bar:
        acc: dict = {}
        for a_c, k_c, raw_c in pieces:
            _run_chunk(run, a_c, k_c, raw_c, acc)
        for col in collectors:           # per-batch terms (AMG's |sum|, Taylor's square)
            col.batch_end(acc, st)
        st.batches += 1
        st.samples += bsz
    bar.close()
    if st.batches == 0:
        raise CalibrationError("the calibration data is empty")
    st.all_reduce()                      # over the ranks of a process group, if there is one
    return st


def _dedupe(collectors: list) -> list:
    """One collector per key: two criteria that read the same statistic share it."""
    out: dict = {}
    for c in collectors:
        out.setdefault(c.key, c)
    return list(out.values())


@dataclass
class _Run:
    """What one calibration run holds fixed across its chunks."""
    cg: object
    st: Stats
    sites: dict             # attention node name -> site
    collectors: tuple
    watch: Watch
    leaves: dict            # fqn -> leaf requiring grad
    loss_fn: object
    seed: int


def _run_chunk(run: _Run, args, kwargs, raw, acc: dict) -> None:
    """One forward (and backward, if a collector needs it) at the captured batch size."""
    from torch.fx._pytree import tree_flatten_spec
    cg = run.cg
    rec = _Recorder(cg, run.watch, run.leaves, run.sites)
    info = getattr(cg.gm.graph._codegen, "pytree_info", None)
    flat = tree_flatten_spec((tuple(args), kwargs), info.in_spec) if info and info.in_spec else list(args)
    grad = run.watch.grad
    with torch.set_grad_enabled(grad):
        out = rec.run(*flat)              # Interpreter.run rebuilds the output pytree itself
        for c in run.collectors:
            c.forward(rec.seen, run.st)
        if not grad:
            return
        loss = (run.loss_fn(out, raw) if run.loss_fn is not None
                else default_loss(out, _content_seed(run.seed, args, kwargs), kwargs))
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise CalibrationError("loss_fn must return a scalar tensor")
        probs = [n for n in sorted(run.watch.grad_of_probs) if "A" in rec.seen.sites.get(n, {})]
        wrt = [rec.seen.sites[n]["A"] for n in probs] + list(run.leaves.values())
        got = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads = {**dict(zip(probs, got)), **dict(zip(run.leaves, got[len(probs):]))}
    for c in run.collectors:
        c.backward(rec.seen, grads, acc)
