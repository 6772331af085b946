"""Collectors: what calibration accumulates, one class per statistic, declared by the criteria.

A criterion says which statistics it reads by returning collectors
(:meth:`amgfx.scoring.criteria.Criterion.collectors`); calibration only runs the graph and feeds
them. A collector names what it watches (:class:`Watch`: attention sites' q, k and probabilities,
values of graph nodes, parameters whose gradient it needs) and accumulates running sums into
:class:`Stats` under its own :attr:`key`; nothing is stored per sample. Two criteria that need the
same statistic share one collector (same key).

Example (a toy statistic: the mean absolute value of the MLP hidden activations):
    >>> import torch, timm, amgfx
    >>> from amgfx.scoring.calibrate import calibrate
    >>> class MeanAbs(Collector):
    ...     def __init__(self, node):
    ...         super().__init__(f"meanabs:{node}", Watch(values={node}))
    ...         self.node = node
    ...     def forward(self, seen, st):
    ...         h = seen.values[self.node].detach().reshape(-1, seen.values[self.node].shape[-1])
    ...         st.add(self.key, h.abs().sum(0), h.shape[0])
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> c = MeanAbs(mlp_input(cg, cg.mlps[0]))
    >>> st = calibrate(cg, [torch.randn(2, 3, 32, 32)], collectors=[c], progress=False)
    >>> st.mean(c.key).shape
    (768,)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis.coupling import GroupId
from ..graph.indexprop import fetch_attr, layer_input
from ..graph.ops import LINEAR_LAYERS
from ..graph.ranks import all_sum

__all__ = ["Stats", "Watch", "Seen", "Collector", "AttentionMaps", "QKScores", "MlpActivations", "TokenScores",
           "TaylorScores", "InputGram", "InputMoments", "mlp_input", "standard", "qk_scores"]


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
        keys = sorted(k for k in self.sums if not k.startswith("n:"))
        for k in keys:
            n = torch.tensor([float(self.sums["n:" + k])], dtype=torch.float64)
            all_sum(self.sums[k], n)
            self.sums["n:" + k] = float(n.item())
        tot = torch.tensor([float(self.batches), float(self.samples)], dtype=torch.float64)
        all_sum(tot)
        self.batches, self.samples = int(tot[0]), int(tot[1])


@dataclass(frozen=True)
class Watch:
    """What the recorder keeps for a collector during one forward (and backward)."""
    sites: frozenset = frozenset()        # attention node names: their q, k and probabilities A
    values: frozenset = frozenset()       # graph node names: their output tensors
    params: frozenset = frozenset()       # parameter FQNs: leaves whose gradient is needed
    grad_of_probs: frozenset = frozenset()  # attention node names whose dL/dA is needed

    def __init__(self, sites=(), values=(), params=(), grad_of_probs=()):
        object.__setattr__(self, "sites", frozenset(sites))
        object.__setattr__(self, "values", frozenset(values))
        object.__setattr__(self, "params", frozenset(params))
        object.__setattr__(self, "grad_of_probs", frozenset(grad_of_probs))

    def __or__(self, other: "Watch") -> "Watch":
        return Watch(self.sites | other.sites, self.values | other.values, self.params | other.params,
                     self.grad_of_probs | other.grad_of_probs)

    @property
    def grad(self) -> bool:
        return bool(self.params or self.grad_of_probs)


@dataclass
class Seen:
    """What one forward recorded: per attention node ``{"q", "k", "A"}``, node values, parameter leaves."""
    sites: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


class Collector:
    """One statistic. Subclasses set :attr:`key` and :attr:`watch` and override the hooks they need;
    a ``key_for(...)`` static method lets a criterion find the statistic without building a collector.

    * :meth:`forward` after every chunk's forward pass (add to ``st`` here);
    * :meth:`backward` after its backward pass, with ``grads`` by parameter FQN and by attention
      node (dL/dA); sum per-batch terms into ``acc``;
    * :meth:`batch_end` once per calibration batch, to turn ``acc`` into statistics (a square, an abs).
    """

    def __init__(self, key: str, watch: Watch):
        self.key, self.watch = key, watch

    def forward(self, seen: Seen, st: Stats) -> None:
        pass

    def backward(self, seen: Seen, grads: dict, acc: dict) -> None:
        pass

    def batch_end(self, acc: dict, st: Stats) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


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
    # thin: with fewer queries than keys (a prefill over a longer cache) rq and rk have unequal rows
    p, s, wh = torch.linalg.svd(rq @ rk.transpose(-1, -2), full_matrices=False)   # rq rk^T = P diag(s) W^T
    a = p.transpose(-1, -2) @ rq                        # [P, H, r, d]: u_j^T Q_c
    b = wh @ rk                                         # v_j^T K_c
    if isinstance(gamma, int) or gamma >= 1:
        keep = torch.arange(s.shape[-1]) < int(gamma)
        keep = keep.expand_as(s)
    else:
        e = (s ** 2).cumsum(-1) / (s ** 2).sum(-1, keepdim=True).clamp_min(1e-300)
        keep = (e - s ** 2 / (s ** 2).sum(-1, keepdim=True).clamp_min(1e-300)) < gamma   # up to and incl. reaching gamma
    # [H, d, U]; a column of no unit (-1: a rotated dim partial RoPE keeps whole) scores for none
    E = torch.nn.functional.one_hot(torch.where(cols < 0, units, cols), units + 1)[..., :units].double()
    num = torch.einsum("phjd,hdu->phju", a * b, E).abs()   # |u_j^T Q_U K_U^T v_j|
    num = (num * keep[..., None]).sum(-2)               # [P, H, U]
    gram = (q.transpose(-1, -2) @ q) * (k.transpose(-1, -2) @ k)   # [P, H, d, d]
    den = torch.einsum("hau,phab,hbu->phu", E, gram, E).clamp_min(1e-300).sqrt()
    present = E.sum(1) > 0                              # [H, U]: which units a head holds
    omega = torch.where(present, num / den, torch.zeros_like(num))
    return omega.sum((0, 1))


def _lead(t: torch.Tensor, L: int) -> torch.Tensor:
    return t.reshape(-1, L, *t.shape[-2:])


class AttentionMaps(Collector):
    """The data-averaged attention map of one site, ``[Lq, Nq, Nk]`` (AMG's head entropy reads it)."""

    def __init__(self, site):
        super().__init__(self.key_for(site), Watch(sites={site.node}))
        self.site = site

    @staticmethod
    def key_for(site) -> str:
        return f"attn:{site.name}"

    def forward(self, seen, st):
        if self.site.lead_heads is None or self.site.node not in seen.sites:
            return
        a = _lead(seen.sites[self.site.node]["A"].detach(), len(self.site.lead_heads))
        st.add(self.key, a.sum(0), a.shape[0])


class QKScores(Collector):
    """SNP's attention-preserving score of every q/k pair of one site (:func:`qk_scores`)."""

    def __init__(self, site, gamma):
        super().__init__(self.key_for(site), Watch(sites={site.node}))
        self.site, self.gamma = site, gamma

    @staticmethod
    def key_for(site) -> str:
        return GroupId("qk", site.name)

    def forward(self, seen, st):
        s = self.site
        if s.lead_heads is None or s.qk_cols is None or s.node not in seen.sites:
            return
        got = seen.sites[s.node]
        L = len(s.lead_heads)
        q = _lead(got["q"].detach(), L)
        k = got["k"].detach()
        if s.kind == "matmul":
            k = k.transpose(-1, -2)
        k = _lead(k, k.shape[-3] if k.dim() > 2 else 1)
        k = k[:, torch.as_tensor(s.lead_k) % k.shape[1]]        # the key head each query head meets
        k = k.expand(q.shape[0], L, *k.shape[-2:]) if k.shape[0] != q.shape[0] else k
        cols = torch.as_tensor(s.qk_cols)[torch.as_tensor(s.lead_heads)]
        units = int(s.qk_q.shape[0] * s.qk_q.shape[1])
        st.add(self.key, qk_scores(q, k, cols, units, self.gamma), q.shape[0])


def mlp_input(cg, mlp) -> str:
    """The name of the node whose value is an MLP's hidden activation (its fc2's input)."""
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    return layer_input(nodes[mlp.fc2.node]).name


class MlpActivations(Collector):
    """Mean squared hidden activation per neuron of one MLP, ``[hidden]`` (SNP's mlp score reads it)."""

    def __init__(self, cg, mlp):
        self.node = mlp_input(cg, mlp)
        super().__init__(self.key_for(mlp), Watch(values={self.node}))

    @staticmethod
    def key_for(mlp) -> str:
        return f"act:{mlp.name}"

    def forward(self, seen, st):
        h = seen.values.get(self.node)
        if h is not None:
            h = h.detach().double().reshape(-1, h.shape[-1])
            st.add(self.key, (h ** 2).sum(0), h.shape[0])


class InputGram(Collector):
    """The Gram matrix ``X^T X`` (float64) of what one layer reads, summed over tokens (the OBS
    criterion's statistic: its inverse says how well the other inputs can stand in for one)."""

    def __init__(self, cg, layer_node: str):
        nodes = {n.name: n for n in cg.gm.graph.nodes}
        self.node = layer_input(nodes[layer_node]).name
        super().__init__(self.key_for(layer_node), Watch(values={self.node}))
        self.conv = nodes[layer_node].target not in LINEAR_LAYERS

    @staticmethod
    def key_for(layer_node: str) -> str:
        return f"gram:{layer_node}"

    def forward(self, seen, st):
        x = seen.values.get(self.node)
        if x is not None:
            x = x.detach()
            x = (x.movedim(1, -1) if self.conv else x).reshape(-1, x.shape[1 if self.conv else -1]).double()
            st.add(self.key, x.T @ x, x.shape[0])


class InputMoments(Collector):
    """Per input channel of one layer: the sum and the sum of squares of what it reads, over tokens
    (FLAP's fluctuation and Wanda's input norm read them; a Gram matrix would be n² where these are n)."""

    def __init__(self, cg, layer_node: str):
        nodes = {n.name: n for n in cg.gm.graph.nodes}
        self.node = layer_input(nodes[layer_node]).name
        super().__init__(self.key_for(layer_node), Watch(values={self.node}))
        self.conv = nodes[layer_node].target not in LINEAR_LAYERS

    @staticmethod
    def key_for(layer_node: str) -> str:
        return f"moments:{layer_node}"

    def forward(self, seen, st):
        x = seen.values.get(self.node)
        if x is not None:
            x = x.detach()
            x = (x.movedim(1, -1) if self.conv else x).reshape(-1, x.shape[1 if self.conv else -1]).double()
            st.add(self.key + ":sum", x.sum(0), x.shape[0])
            st.add(self.key + ":sq", (x * x).sum(0), x.shape[0])


class TokenScores(Collector):
    """AMG's key-position score of one site: ``|sum_{batch, head, query} A * dL/dA|`` per key, per batch."""

    def __init__(self, site):
        super().__init__(self.key_for(site), Watch(sites={site.node}, grad_of_probs={site.node}))
        self.site = site

    @staticmethod
    def key_for(site) -> str:
        return f"tokens:{site.name}"

    def backward(self, seen, grads, acc):
        g = grads.get(self.site.node)
        if g is None:
            return
        a = seen.sites[self.site.node]["A"]
        v = (a.detach().double() * g.double()).reshape(-1, a.shape[-1]).sum(0)
        acc[self.key] = acc[self.key] + v if self.key in acc else v

    def batch_end(self, acc, st):
        if self.key in acc:
            st.add(self.key, acc[self.key].abs())


class TaylorScores(Collector):
    """First-order Taylor term of every unit of one group, squared per batch (the Fisher form)."""

    def __init__(self, group):
        super().__init__(self.key_for(group), Watch(params={m.param for m in group.members}))
        self.group = group

    @staticmethod
    def key_for(group) -> str:
        return f"taylor:{group.name}"

    def backward(self, seen, grads, acc):
        total = torch.zeros(self.group.units, dtype=torch.float64)
        for m in self.group.members:
            g = grads.get(m.param)
            if g is None:
                continue
            wg = (seen.params[m.param].detach().double() * g.double()).movedim(m.dim, 0)
            total += wg.reshape(wg.shape[0], -1).sum(1)[torch.as_tensor(m.index)].sum(1)
        acc[self.key] = acc[self.key] + total if self.key in acc else total

    def batch_end(self, acc, st):
        if self.key in acc:
            st.add(self.key, acc[self.key] ** 2)


def standard(cg, needs: set, *, gamma=0.9, taylor_groups=()) -> list[Collector]:
    """The built-in collectors by name (``attn``, ``qk``, ``tokens``, ``act``, ``taylor``) for every site/MLP."""
    sites = [s for s in cg.sites if s.supported and s.operands]
    out: list[Collector] = []
    if "attn" in needs:
        out += [AttentionMaps(s) for s in sites]
    if "qk" in needs:
        out += [QKScores(s, gamma) for s in sites]
    if "tokens" in needs:
        out += [TokenScores(s) for s in sites]
    if "act" in needs:
        out += [MlpActivations(cg, m) for m in cg.mlps]
    if "taylor" in needs:
        out += [TaylorScores(g) for g in taylor_groups]
    return out


def param_leaves(cg, collectors) -> dict:
    """FQN -> a leaf copy of the parameter requiring grad, for every parameter a collector watches."""
    fqns = sorted(set().union(*(c.watch.params for c in collectors))) if collectors else []
    return {f: fetch_attr(cg.gm, f).detach().requires_grad_(True) for f in fqns}
