"""The Plan: which units every coupling group keeps. Plain data, saved as JSON, replayable.

A plan names groups exactly as :class:`amgfx.CouplingGraph` does (``"qk:blocks.0.attn"``) and
lists the *unit* ids each one keeps. A unit is one prunable neuron set (a q/k pair, a value
neuron, a kv head, an MLP neuron, a residual channel); which parameter rows a unit owns is the
coupling graph's business, so a plan stays short and readable and survives hand edits.

:meth:`Plan.resolve` turns the units into what the passes consume: for every parameter, the
indices kept along each pruned dim, plus the original softmax scale of every attention site
whose head dims change.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(0, 768, 2))})
    >>> r = plan.resolve(cg)
    >>> len(r.params["blocks.0.mlp.fc1.weight"][0]), len(r.params["blocks.0.mlp.fc2.weight"][1])
    (384, 384)
    >>> amgfx.Plan(keep={"mlp:blocks.7.mlp": [0]}).validate(cg)
    Traceback (most recent call last):
    ...
    amgfx.errors.PlanError: group 'mlp:blocks.7.mlp' is not in this model (it has 1 mlp group(s), e.g. 'mlp:blocks.0.mlp'); was the plan made for another model?
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..analysis.coupling import GroupId
from ..errors import PlanError
from ..graph.indexprop import fetch_attr
from .resolved import AttentionChange, LiveQueries, RemovedBranch, Resolved, TokenKeep

__all__ = ["Plan", "Resolved", "fingerprint"]

FORMAT = "amgfx.plan/1"
OPTIONS = {"lowering": "auto", "split_qkv": "auto", "dead_tokens": "auto"}


@dataclass
class Plan:
    """Kept units per coupling group, and kept key positions per attention site.

    Attributes:
        keep: group name -> sorted unit ids to keep. Groups not listed keep everything.
        units: group name -> number of units the group had (checked on replay).
        tokens: site name -> kept key positions (static AMG token pruning: the keys and values of
            that site see only these positions; queries keep all).
        options: rewrite options: ``lowering`` ("auto" | "pad" | "none") for attention whose
            q/k dim differs from its v dim, ``split_qkv`` ("auto" | "always" | "never"),
            ``dead_tokens`` ("auto" | "off": compute only the positions that reach an output).
        meta: provenance (method, ratios, model), for people reading the file.
        model: ``{"fingerprint": ...}`` of the parameters (names and shapes) the plan was made
            for; replaying on a model with another fingerprint is refused. Hand-written plans
            may leave it empty.
    """
    keep: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    options: dict = field(default_factory=lambda: dict(OPTIONS))
    meta: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "meta": self.meta, "options": self.options, "units": self.units,
                "keep": {k: [int(i) for i in v] for k, v in self.keep.items()}, "tokens": self.tokens}

    def to_json(self) -> str:
        # one group per line: a plan is meant to be read and edited by hand
        d = self.to_dict()
        keep = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in d.pop("keep").items())
        head = json.dumps(d, indent=2)[:-2]
        return head + ',\n  "keep": {\n' + keep + "\n  }\n}\n"

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"not an amgfx plan (expected \"format\": \"{FORMAT}\")")
        try:
            keep = {str(k): [int(i) for i in v] for k, v in d.get("keep", {}).items()}
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan 'keep' must map group names to lists of integers ({e})") from None
        opts = {**OPTIONS, **d.get("options", {})}
        return cls(keep=keep, units={str(k): int(v) for k, v in d.get("units", {}).items()},
                   tokens=d.get("tokens", {}), options=opts, meta=d.get("meta", {}), model=d.get("model", {}))

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None

    # ----------------------------------------------------------------------------- checks
    def removed(self, group) -> np.ndarray:
        kept = self.keep.get(group.name)
        if kept is None:
            return np.zeros(0, dtype=int)
        return np.setdiff1d(np.arange(group.units), np.asarray(kept, dtype=int))

    def validate(self, cg) -> None:
        """Raise :class:`amgfx.PlanError` when the plan does not fit the model of ``cg``."""
        by_name = {g.name: g for g in cg.groups}
        for name, kept in self.keep.items():
            g = by_name.get(name)
            if g is None and name in getattr(cg, "refused", {}):
                raise PlanError(f"group {name!r} cannot be pruned in this model: {cg.refused[name]}")
            if g is None:
                kind = GroupId(name).kind
                same = [x.name for x in cg.groups if x.kind == kind]
                hint = f"it has {len(same)} {kind} group(s), e.g. {same[0]!r}" if same else f"it has no {kind} groups"
                raise PlanError(f"group {name!r} is not in this model ({hint}); was the plan made for another model?")
            if name in self.units and self.units[name] != g.units:
                raise PlanError(f"group {name!r} has {g.units} units in this model but the plan was made for "
                                f"{self.units[name]}; was the plan made for another model?")
            k = np.asarray(kept, dtype=int)
            if k.size and (k.min() < 0 or k.max() >= g.units):
                bad = int(k[(k < 0) | (k >= g.units)][0])
                raise PlanError(f"group {name!r}: unit {bad} is out of range (the group has units 0..{g.units - 1})")
            if len(set(k.tolist())) != k.size:
                raise PlanError(f"group {name!r}: a unit is listed twice")
            if k.size == 0:
                self._check_removal(cg, g)
        for s in cg.sites:
            self._check_site(s, by_name)
        want = self.model.get("fingerprint")
        if want and want != fingerprint(cg.gm):
            first = next(iter(self.keep), None)
            raise PlanError(f"plan was made for another model: group {first!r} exists here, but the parameters differ "
                            f"(fingerprint {want} != {fingerprint(cg.gm)}); make a plan for this model")

    def _check_removal(self, cg, g) -> None:
        """An empty ``keep`` removes a branch whole: only for heads and MLPs, and where it can go."""
        from ..analysis.branches import branches  # the passes' contract: analysis loads only to resolve
        if g.kind in ("qk", "v"):
            raise PlanError(f"group {g.name!r}: the plan keeps no unit; to remove the attention branch, keep no "
                            f"head (\"head:{g.where}\": [])")
        b = branches(cg).get(g.name) if g.kind in ("head", "mlp") else None
        if b is None:
            raise PlanError(f"group {g.name!r}: the plan keeps no unit; keep at least one")
        if not b.removable:
            raise PlanError(f"group {g.name!r}: the plan keeps no unit, but this branch cannot be removed whole "
                            f"({b.reason}); keep at least one")

    def removed_branches(self, cg) -> dict:
        """Group name -> :class:`~amgfx.analysis.branches.Branch` of every branch the plan removes whole."""
        from ..analysis.branches import branches  # the passes' contract: analysis loads only to resolve
        return {n: branches(cg)[n] for n, k in self.keep.items() if len(k) == 0 and n in branches(cg)}

    def _gone(self, cg) -> set:
        """Groups that vanish with a removed branch: an MLP's own, every group of a removed site."""
        removed = self.removed_branches(cg)
        sites = {GroupId(n).where for n in removed if GroupId(n).kind == "head"}
        return set(removed) | {g.name for g in cg.groups if g.kind in ("qk", "v", "head") and g.where in sites}

    def _check_site(self, s, by_name) -> None:
        """Inside one site every kept head keeps the same number of q/k and of v units."""
        heads = self.kept_heads(s, by_name)
        if not heads:                           # the attention branch is removed whole
            return
        for kind in ("qk", "v"):
            g = by_name.get(GroupId(kind, s.name))
            if g is None or g.name not in self.keep:
                continue
            counts = self.per_head_counts(g, heads)
            if len(set(counts.values())) > 1:
                raise PlanError(f"group {g.name!r}: kept units per head differ {counts}; every head of a site "
                                "must keep the same number (which ones may differ)")
            if 0 in counts.values():
                raise PlanError(f"group {g.name!r}: a head keeps no unit; remove the head instead")

    def kept_heads(self, s, by_name) -> list[int]:
        """The kv heads of site ``s`` that the plan keeps."""
        g = by_name.get(GroupId("head", s.name))
        return sorted(self.keep[g.name]) if g is not None and g.name in self.keep else list(range(s.num_kv_heads))

    def per_head_counts(self, g, heads) -> dict:
        """Kept units of a qk/v group in each of the kept ``heads``."""
        kept = np.zeros(g.units, dtype=bool)
        kept[self.keep.get(g.name, list(range(g.units)))] = True
        return {int(h): int(kept[g.heads == h].sum()) for h in heads}

    def survivors(self, cg) -> dict:
        """group name -> the unit ids of every group of ``cg`` that outlive the rewrite, in order.

        More than ``keep`` says: a removed head takes its q/k and v units with it. A unit survives
        while any parameter row it owns is kept (a head whose q/k pairs were thinned lives on). This is how plans of successive prune steps
        compose into one plan for the original model (see :class:`amgfx.Iterative`).

        Example:
            >>> import torch, timm, amgfx
            >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
            >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
            >>> s = amgfx.Plan(keep={"head:blocks.0.attn": [0, 2]}).survivors(cg)
            >>> s["head:blocks.0.attn"].tolist(), len(s["qk:blocks.0.attn"]), len(s["mlp:blocks.0.mlp"])
            ([0, 2], 128, 768)
        """
        params = self.resolve(cg).params
        gone = self._gone(cg)
        out = {}
        for g in cg.groups:
            if g.name in gone:
                out[g.name] = np.zeros(0, dtype=int)
                continue
            alive = np.ones(g.units, dtype=bool)
            for m in g.members:
                kept = params.get(m.param, {}).get(m.dim)
                if kept is not None:
                    alive &= np.isin(m.index, kept).reshape(g.units, -1).any(1)
            out[g.name] = np.nonzero(alive)[0]
        return out

    # ----------------------------------------------------------------------------- resolve
    def resolve(self, cg) -> Resolved:
        """Validate against ``cg`` and compute the kept indices of every parameter."""
        self.validate(cg)
        removed: dict = {}
        exact = True
        gone = self._gone(cg)                    # their parameters are not sliced: the branch is deleted
        for g in cg.groups:
            r = self.removed(g)
            if r.size == 0 or g.name in gone:
                continue
            exact &= g.exact
            for m in g.members:
                removed.setdefault(m.param, {}).setdefault(m.dim, set()).update(m.index[r].ravel().tolist())
        params = {}
        for fqn, dims in removed.items():
            t = fetch_attr(cg.gm, fqn)
            params[fqn] = {d: sorted(set(range(t.shape[d])) - rm) for d, rm in dims.items()}
        attention = {}
        by_name = {g.name: g for g in cg.groups}
        gone_sites = {g.where for g in cg.groups if g.name in gone and g.kind == "head"}
        for s in cg.sites:
            if not s.supported or s.q is None or s.name in gone_sites:
                continue
            q_kept = params.get(s.q.weight, {}).get(s.q.out_dim)
            v_kept = params.get(s.v.weight, {}).get(s.v.out_dim)
            if q_kept is None and v_kept is None:
                continue
            heads = self.kept_heads(s, by_name)

            def head_dim(kind, full):
                # kept units of one kept head x rows per unit
                g = by_name.get(GroupId(kind, s.name))
                if g is None or g.name not in self.keep:
                    return full
                return self.per_head_counts(g, heads[:1])[heads[0]] * (full // (g.units // s.num_kv_heads))

            attention[s.node] = AttentionChange(
                site=s.name, kind=s.kind, scale=s.scale, scale_explicit=s.scale_explicit,
                heads=len(heads) * s.q_per_kv, kv_heads=len(heads),
                qk_dim=head_dim("qk", s.head_dim_qk), v_dim=head_dim("v", s.head_dim_v),
                fused=_fused(s), operands=tuple(s.operands))
        branches = {n: RemovedBranch(n, b.out, b.chain, b.add) for n, b in self.removed_branches(cg).items()}
        keep_site = lambda d: {k: v for k, v in d.items() if v.site not in gone_sites}
        return Resolved(params=params, attention=attention, options=dict(self.options), exact=exact,
                        tokens=keep_site(self._resolve_tokens(cg)), dead=keep_site(self._resolve_dead(cg)),
                        removed=branches)

    def _resolve_dead(self, cg) -> dict:
        """Attention sites whose queries reach the outputs at some positions only (dead-token elimination)."""
        from ..graph.liveness import live_queries  # the passes' contract: analysis loads only to resolve
        if self.options.get("dead_tokens", "auto") == "off":
            return {}
        sites = {s.node: s for s in cg.sites}
        return {node: LiveQueries(site=sites[node].name, live=tuple(live), operands=tuple(sites[node].operands),
                                  fused=_fused(sites[node]))
                for node, live in live_queries(cg).items() if sites[node].supported and sites[node].q is not None}

    def _resolve_tokens(self, cg) -> dict:
        """Kept key positions per attention node, checked against what each site allows."""
        from ..analysis.tokens import token_sites  # the passes' contract: analysis loads only to resolve
        sites = {s.name: s for s in cg.sites}
        out = {}
        for name, kept in self.tokens.items():
            s = sites.get(name)
            if s is None:
                raise PlanError(f"tokens: site {name!r} is not in this model; was the plan made for another model?")
            t = token_sites(cg)[name]
            if not t.prunable:
                raise PlanError(f"tokens: site {name!r} cannot drop key positions: {t.reason}")
            k = sorted({int(i) for i in kept})
            if not k or k[0] < 0 or k[-1] >= t.keys or len(k) != len(kept):
                raise PlanError(f"tokens: site {name!r} keeps {list(kept)[:8]}...; give distinct positions in "
                                f"0..{t.keys - 1}, at least one")
            lost = sorted(set(t.special) - set(k))
            if lost:
                raise PlanError(f"tokens: site {name!r} drops position(s) {lost}, which hold special tokens (class, "
                                f"distillation or register tokens: {t.special}); they are always kept")
            out[s.node] = TokenKeep(site=name, kept=tuple(k), keys=t.keys, operands=tuple(s.operands), fused=_fused(s))
        return out


def _fused(site) -> bool:
    """Whether q, k and v of a site come from fewer than three projections (one fused qkv)."""
    return len({site.q.node, site.k.node, site.v.node}) < 3


def fingerprint(gm) -> str:
    """A short hash of the name and shape of every parameter/buffer the graph reads: what a plan is tied to.

    Only tensors the graph uses count, so a graph torch.compile hands over (which lifts just
    those) has the fingerprint of the same model captured whole.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    items = sorted((n, tuple(t.shape)) for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if n in used)
    return hashlib.sha1(repr(items).encode()).hexdigest()[:12]
