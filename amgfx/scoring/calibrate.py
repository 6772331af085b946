"""Calibration: run the captured graph on data and accumulate what the criteria read.

Nothing is stored per sample. Each batch adds to running sums (float64) and is then dropped,
so memory is one batch's activations plus fixed-size statistics:

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
output), and ``output + N(0, 1)`` otherwise. The gradient is then non-zero, and its expected
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import AmgfxError
from ..graph.indexprop import fetch_attr, layer_input
from ..graph.meta import DYNAMIC_BATCH, EXAMPLE
from ..graph.ops import SDPA, sdpa_args

__all__ = ["Stats", "calibrate", "as_batches", "CalibrationError"]


class CalibrationError(AmgfxError):
    """Calibration data that cannot be used (wrong shapes, NaN/Inf, nothing in it)."""


@dataclass
class Stats:
    """Running sums keyed ``"<what>:<site or group>"``, with sample counts under ``"n:<key>"``."""
    sums: dict = field(default_factory=dict)
    batches: int = 0
    samples: int = 0

    def add(self, key: str, value: torch.Tensor, n: int = 1) -> None:
        v = value.detach().to(torch.float64)
        if key in self.sums:
            self.sums[key] += v
        else:
            self.sums[key] = v.clone()
        self.sums["n:" + key] = self.sums.get("n:" + key, 0) + n

    def mean(self, key: str) -> np.ndarray | None:
        if key not in self.sums:
            return None
        return (self.sums[key] / max(float(self.sums["n:" + key]), 1.0)).numpy()

    def all_reduce(self) -> None:
        """Sum every statistic over the ranks of the default process group (in a fixed key order)."""
        import torch.distributed as dist
        keys = sorted(k for k in self.sums if not k.startswith("n:"))
        for k in keys:
            dist.all_reduce(self.sums[k])
            n = torch.tensor([float(self.sums["n:" + k])], dtype=torch.float64)
            dist.all_reduce(n)
            self.sums["n:" + k] = float(n.item())
        tot = torch.tensor([float(self.batches), float(self.samples)], dtype=torch.float64)
        dist.all_reduce(tot)
        self.batches, self.samples = int(tot[0]), int(tot[1])


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
    batch = None
    for name, g, w in zip(names, got, want):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor):
            raise CalibrationError(f"calibration batch {i}: {name} is missing (expected a tensor of shape "
                                   f"[B, {', '.join(map(str, w.shape[1:]))}])")
        if g.dim() != w.dim() or tuple(g.shape[1:]) != tuple(w.shape[1:]):
            raise CalibrationError(f"calibration batch {i}: {name} has shape {list(g.shape)}, but the example "
                                   f"inputs have {list(w.shape)}; only the batch (first) dim may differ. "
                                   "Pad or resize the data to the example's shape.")
        if g.is_floating_point() and not bool(torch.isfinite(g).all()):
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


def _content_seed(seed: int, args, kwargs) -> int:
    t = next((x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)), None)
    data = t.detach().cpu().contiguous().numpy().tobytes() if t is not None else b""
    return zlib.crc32(data, seed & 0xFFFFFFFF)


def default_loss(outputs, seed: int) -> torch.Tensor:
    """Loss against a target drawn from the dense model's own predictive distribution (see module doc)."""
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise CalibrationError("the model returns no floating-point tensor to build a loss on; pass loss_fn=")
    g = torch.Generator().manual_seed(seed)
    if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1:
        logits = leaves[0]
        y = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=g).squeeze(1)
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    loss = 0.0
    for t in leaves:
        r = torch.randn(t.shape, generator=g, dtype=t.dtype)
        loss = loss + 0.5 * ((t - (t.detach() + r)) ** 2).sum()
    return loss


# --------------------------------------------------------------------------------------------
# per-site statistics
# --------------------------------------------------------------------------------------------
def _lead(t: torch.Tensor, L: int) -> torch.Tensor:
    return t.reshape(-1, L, *t.shape[-2:])


def qk_scores(q: torch.Tensor, k: torch.Tensor, cols: torch.Tensor, units: int, gamma: float) -> torch.Tensor:
    """SNP's pair score per qk unit, summed over the samples of one batch.

    For each sample and query head, with ``S = Q K^T`` and its SVD ``sum_j s_j u_j v_j^T``:
    ``omega(unit) = sum_{j <= gamma} |cos(u_j v_j^T, Q_U K_U^T)|``, the cosine taken over the
    flattened N x N matrices and ``U`` the unit's columns (two with RoPE). Computed without
    forming N x N matrices: with ``Q = Uq Rq`` and ``K = Uk Rk`` (QR), the SVD of ``Rq Rk^T``
    (d x d) gives ``u_j^T Q_c = (P^T Rq)_{jc}``, ``v_j^T K_c = (W^T Rk)_{jc}``, and
    ``|Q_U K_U^T|_F^2 = sum_{a,b in U} (Q^T Q)_{ab} (K^T K)_{ab}``.

    ``gamma``: an int keeps that many components; a float in (0, 1) keeps the fewest whose
    squared singular values hold that fraction of ``|S|_F^2`` (per sample and head).

    Args: q, k: [P, H, N, d] (k already paired with q's heads); cols: [H, d] unit of each column.
    Returns: [units] float64.
    """
    q, k = q.double(), k.double()
    _, rq = torch.linalg.qr(q)                          # [P, H, r, d]
    _, rk = torch.linalg.qr(k)
    p, s, wh = torch.linalg.svd(rq @ rk.transpose(-1, -2))   # rq rk^T = P diag(s) W^T
    a = p.transpose(-1, -2) @ rq                        # [P, H, r, d]: u_j^T Q_c
    b = wh @ rk                                         # v_j^T K_c
    if isinstance(gamma, int) or gamma >= 1:
        keep = torch.arange(s.shape[-1]) < int(gamma)
        keep = keep.expand_as(s)
    else:
        e = (s ** 2).cumsum(-1) / (s ** 2).sum(-1, keepdim=True).clamp_min(1e-300)
        keep = (e - s ** 2 / (s ** 2).sum(-1, keepdim=True).clamp_min(1e-300)) < gamma   # up to and incl. reaching gamma
    E = torch.nn.functional.one_hot(cols, units).double()  # [H, d, U]
    num = torch.einsum("phjd,hdu->phju", a * b, E).abs()   # |u_j^T Q_U K_U^T v_j|
    num = (num * keep[..., None]).sum(-2)               # [P, H, U]
    gram = (q.transpose(-1, -2) @ q) * (k.transpose(-1, -2) @ k)   # [P, H, d, d]
    den = torch.einsum("hau,phab,hbu->phu", E, gram, E).clamp_min(1e-300).sqrt()
    present = E.sum(1) > 0                              # [H, U]: which units a head holds
    omega = torch.where(present, num / den, torch.zeros_like(num))
    return omega.sum((0, 1))


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
    """Runs the captured graph, recording per-site q, k and A, and MLP hidden activations."""

    def __init__(self, cg, leaves: dict, sites: dict, mlp_inputs: dict):
        super().__init__(cg.gm, garbage_collect_values=True)
        self.leaves = leaves            # fqn -> leaf tensor requiring grad (taylor)
        self.sites = sites              # attention node name -> site
        self.by_operand = {}            # operand node name -> [site, ...]
        for s in sites.values():
            for o in s.operands[:2]:
                self.by_operand.setdefault(o, []).append(s)
        self.mlp_inputs = mlp_inputs    # fc2 input node name -> mlp name
        self.seen: dict = {}

    def get_attr(self, target, args, kwargs):
        return self.leaves.get(target) if target in self.leaves else fetch_attr(self.module, target)

    def run_node(self, n):
        if n.op == "call_function" and n.target in SDPA and n.name in self.sites:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            names = ["q", "k", "v", "mask", "dropout", "is_causal", "scale", "enable_gqa"]
            kw = dict(zip(names, args))
            kw.update({("mask" if k == "attn_mask" else "dropout" if k == "dropout_p" else k): v
                       for k, v in kwargs.items()})
            out, a = _attention(**kw)
            self.seen[n.name] = {"q": kw["q"], "k": kw["k"], "A": a}
            return out
        out = super().run_node(n)
        if n.name in self.by_operand:
            for s in self.by_operand[n.name]:
                self.seen.setdefault(s.node, {})["q" if s.operands[0] == n.name else "k"] = out
        if n.name in self.sites:                       # softmax of an explicit attention
            self.seen.setdefault(n.name, {})["A"] = out
        if n.name in self.mlp_inputs:
            self.seen["mlp:" + self.mlp_inputs[n.name]] = out.detach()
        return out


def _site_stats(st: Stats, s, seen: dict, needs: set, gamma) -> None:
    if s.lead_heads is None:
        return
    L = len(s.lead_heads)
    if "attn" in needs:
        a = _lead(seen["A"].detach(), L)
        st.add(f"attn:{s.name}", a.sum(0), a.shape[0])
    if "qk" in needs and s.qk_cols is not None:
        q = _lead(seen["q"].detach(), L)
        k = seen["k"].detach()
        if s.kind == "matmul":
            k = k.transpose(-1, -2)
        k = _lead(k, k.shape[-3] if k.dim() > 2 else 1)
        k = k[:, torch.as_tensor(s.lead_k) % k.shape[1]]        # the key head each query head meets
        k = k.expand(q.shape[0], L, *k.shape[-2:]) if k.shape[0] != q.shape[0] else k
        cols = torch.as_tensor(s.qk_cols)[torch.as_tensor(s.lead_heads)]
        units = int(s.qk_q.shape[0] * s.qk_q.shape[1])
        st.add(f"qk:{s.name}", qk_scores(q, k, cols, units, gamma), q.shape[0])


def _needs_grad(needs: set) -> bool:
    return bool(needs & {"tokens", "taylor"})


def calibrate(cg, calib, *, needs: set, loss_fn=None, seed: int = 0, gamma: float = 0.9,
              taylor_groups=(), progress: bool = True) -> Stats:
    """Run ``cg``'s captured graph over ``calib`` and return accumulated :class:`Stats`.

    ``needs`` picks the statistics (``attn``, ``qk``, ``tokens``, ``act``, ``taylor``); only
    ``tokens`` and ``taylor`` run a backward pass. ``loss_fn(outputs, batch)`` replaces the
    default loss (see the module docstring).

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
        >>> st = calibrate(cg, [torch.randn(4, 3, 32, 32)], needs={"attn"}, progress=False)
        >>> st.mean("attn:blocks.0.attn").shape, st.samples
        ((3, 5, 5), 4)
    """
    from tqdm.auto import tqdm
    ex_args, ex_kwargs = cg.gm.meta["amgfx_example"]
    sites = {s.node: s for s in cg.sites if s.supported and s.operands}
    mlp_inputs = {}
    if "act" in needs:
        nodes = {n.name: n for n in cg.gm.graph.nodes}
        for m in cg.mlps:
            mlp_inputs[layer_input(nodes[m.fc2.node]).name] = m.name
    params = {}
    if "taylor" in needs:
        for g in taylor_groups:
            for m in g.members:
                if m.param not in params:
                    params[m.param] = fetch_attr(cg.gm, m.param).detach().requires_grad_(True)
    st = Stats()
    run = _Run(cg, st, sites, mlp_inputs, params, needs, gamma, loss_fn, seed, tuple(taylor_groups))
    b0 = _check(0, ex_args, ex_kwargs, ex_args, ex_kwargs)
    total = len(calib) if hasattr(calib, "__len__") else None
    bar = tqdm(_batches(calib, ex_args, ex_kwargs), total=total, desc="calibrating", unit="batch",
               disable=not progress, leave=False)
    for i, (args, kwargs, raw, bsz) in enumerate(bar):
        if cg.gm.meta.get("amgfx_dynamic_batch"):
            b0 = bsz
        if bsz % b0:
            raise CalibrationError(f"calibration batch {i} has {bsz} samples, not a multiple of the example "
                                   f"inputs' batch size {b0} (the captured graph's shapes are static)")
        tokens, taylor = {}, {}
        for c in range(0, bsz, b0):      # the graph runs at the batch size it was captured with
            cut = lambda t: t[c:c + b0] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == bsz else t
            a_c, k_c, raw_c = pytree.tree_map(cut, (args, kwargs, raw))
            _run_chunk(run, a_c, k_c, raw_c, tokens, taylor)
        for name, v in tokens.items():   # AMG: |sum over the batch, heads and queries|
            st.add(f"tokens:{name}", v.abs())
        for name, v in taylor.items():   # squared first-order term per batch (see module doc)
            st.add(f"taylor:{name}", v ** 2)
        st.batches += 1
        st.samples += bsz
    bar.close()
    if st.batches == 0:
        raise CalibrationError("the calibration data is empty")
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        st.all_reduce()
    return st


@dataclass
class _Run:
    """What one calibration run holds fixed across its chunks."""
    cg: object
    st: Stats
    sites: dict             # attention node name -> site
    mlp_inputs: dict        # fc2 input node name -> mlp name
    params: dict            # fqn -> leaf requiring grad (taylor)
    needs: set
    gamma: float
    loss_fn: object
    seed: int
    taylor_groups: tuple


def _run_chunk(run: _Run, args, kwargs, raw, tokens: dict, taylor: dict) -> None:
    """One forward (and backward, if needed) at the captured batch size; adds to ``run.st``,
    and sums per-batch terms into ``tokens``/``taylor`` (their abs/square is taken per batch)."""
    from torch.fx._pytree import tree_flatten_spec
    cg, st, sites, params, needs = run.cg, run.st, run.sites, run.params, run.needs
    rec = _Recorder(cg, params, sites, run.mlp_inputs)
    info = getattr(cg.gm.graph._codegen, "pytree_info", None)
    flat = tree_flatten_spec((tuple(args), kwargs), info.in_spec) if info and info.in_spec else list(args)
    grad = _needs_grad(needs)
    with torch.set_grad_enabled(grad):
        out = rec.run(*flat)              # Interpreter.run rebuilds the output pytree itself
        for s in sites.values():
            if s.node in rec.seen:
                _site_stats(st, s, rec.seen[s.node], needs, run.gamma)
        if grad:
            loss = (run.loss_fn(out, raw) if run.loss_fn is not None
                    else default_loss(out, _content_seed(run.seed, args, kwargs)))
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise CalibrationError("loss_fn must return a scalar tensor")
            a_nodes = [n for n in sites if "A" in rec.seen.get(n, {})] if "tokens" in needs else []
            leaves = [rec.seen[n]["A"] for n in a_nodes] + list(params.values())
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for n, g in zip(a_nodes, grads):
                a = rec.seen[n]["A"]
                if g is not None:
                    v = (a.detach().double() * g.double()).reshape(-1, a.shape[-1]).sum(0)
                    key = sites[n].name
                    tokens[key] = tokens[key] + v if key in tokens else v
            pg = dict(zip(params, grads[len(a_nodes):]))
            for grp in run.taylor_groups:
                v = _unit_taylor(grp, params, pg)
                taylor[grp.name] = taylor[grp.name] + v if grp.name in taylor else v
    for name in run.mlp_inputs.values():
        h = rec.seen.get(f"mlp:{name}")
        if h is not None:
            h = h.double().reshape(-1, h.shape[-1])
            st.add(f"act:{name}", (h ** 2).sum(0), h.shape[0])


def _unit_taylor(group, params, grads) -> torch.Tensor:
    """Sum of w * dL/dw over each unit's slices (one value per unit)."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        g = grads.get(m.param)
        if g is None:
            continue
        wg = (params[m.param].detach().double() * g.double()).movedim(m.dim, 0)
        per = wg.reshape(wg.shape[0], -1).sum(1)
        total += per[torch.as_tensor(m.index)].sum(1)
    return total
