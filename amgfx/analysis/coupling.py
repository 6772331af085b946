"""Coupling groups and the neuron coupling graph (networkx).

A *group* is one place (an attention site, an MLP, a residual stream) and one kind
(``qk``, ``v``, ``head``, ``mlp``, ``residual``). It holds ``units`` prunable units; unit ``u``
is the set of neurons that must go together: for every member ``m``, the indices
``m.index[u]`` along dim ``m.dim`` of parameter ``m.param``. The networkx graph has one node
per neuron (per index range for residual streams) and an edge between neurons of one unit,
so the connected components of one kind's edges are exactly that kind's units.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np

from .records import AttentionSite, Structure

KINDS = ("qk", "v", "head", "mlp", "residual")


class GroupId(str):
    """A coupling group's name, ``"<kind>:<where>"``: a ``str`` (a dict key, a key of ``plan.json``) that
    knows its two parts, so nothing builds or splits names by hand.

    Example:
        >>> g = GroupId("qk", "blocks.0.attn")
        >>> g, g.kind, g.where, GroupId("mlp:blocks.1.mlp").where, g == "qk:blocks.0.attn"
        ('qk:blocks.0.attn', 'qk', 'blocks.0.attn', 'blocks.1.mlp', True)
    """
    __slots__ = ()

    def __new__(cls, kind_or_name: str, where: str | None = None):
        if where is None:
            kind, sep, rest = str(kind_or_name).partition(":")
            if not sep or not kind or not rest:
                raise ValueError(f"a group name is '<kind>:<where>', got {kind_or_name!r}")
            return super().__new__(cls, kind_or_name)
        return super().__new__(cls, f"{kind_or_name}:{where}")

    @property
    def kind(self) -> str:
        return self.partition(":")[0]

    @property
    def where(self) -> str:
        return self.partition(":")[2]


@dataclass
class Member:
    param: str
    dim: int
    index: np.ndarray        # [units, k]
    role: str                # q, k, v, proj, fc1, fc2, norm, head_tensor, residual


@dataclass
class Group:
    kind: str
    where: str               # site / MLP / stream name
    members: list
    heads: np.ndarray | None = None   # kv head of each unit: per-head counts must stay equal
    exact: bool = True       # removing a unit equals zeroing it in the dense model
    name: GroupId = field(init=False)  # "<kind>:<where>"

    def __post_init__(self):
        self.name = GroupId(self.kind, self.where)

    @property
    def units(self) -> int:
        return int(self.members[0].index.shape[0])

    def to_dict(self, with_index: bool = True) -> dict:
        d = {"name": self.name, "kind": self.kind, "where": self.where, "units": self.units, "exact": self.exact}
        if self.heads is not None:
            d["heads"] = self.heads.tolist()
        d["members"] = [{"param": m.param, "dim": m.dim, "role": m.role, "per_unit": int(m.index.shape[1]),
                         **({"index": m.index.tolist()} if with_index else {})} for m in self.members]
        return d


def _layer_members(layer, idx, role) -> list[Member]:
    return [Member(p, d, np.asarray(i), role) for p, d, i in layer.rows(idx)]


def _site_groups(s: AttentionSite) -> list[Group]:
    out = []
    if not s.supported:
        return out
    if s.qk_q is not None and "qk" not in s.disabled:
        G, U = s.qk_q.shape[:2]
        out.append(Group("qk", s.name,
                         _layer_members(s.q, s.qk_q.reshape(G * U, -1), "q") + _layer_members(s.k, s.qk_k.reshape(G * U, -1), "k"),
                         heads=np.repeat(np.arange(G), U)))
    if s.v_v is not None and "v" not in s.disabled:
        G, U = s.v_v.shape[:2]
        out.append(Group("v", s.name,
                         _layer_members(s.v, s.v_v.reshape(G * U, -1), "v")
                         + [Member(s.proj.weight, s.proj.in_dim, s.v_o.reshape(G * U, -1), "proj")],
                         heads=np.repeat(np.arange(G), U)))
    if s.head_v is not None and "head" not in s.disabled:
        members = (_layer_members(s.q, s.head_q, "q") + _layer_members(s.k, s.head_k, "k")
                   + _layer_members(s.v, s.head_v, "v") + [Member(s.proj.weight, s.proj.in_dim, s.head_o, "proj")])
        members += [Member(p, d, s.head_qheads, "head_tensor") for p, d in s.per_head]
        out.append(Group("head", s.name, members))
    return out


def build_groups(st: Structure) -> list[Group]:
    groups = [g for s in st.sites for g in _site_groups(s)]
    for m in st.mlps:
        members = [Member(m.fc2.weight, m.fc2.in_dim, np.arange(m.hidden)[:, None], "fc2")]
        for li, layer in enumerate(m.fc1):
            rows = np.array([[r for l, r in u if l == li] for u in m.units])
            if rows.size:
                members += _layer_members(layer, rows, "fc1" if li == 0 else "gate")
        members += [Member(p, d, np.arange(m.hidden)[:, None], "norm") for p, d in m.norm]
        groups.append(Group("mlp", m.name, members, exact=m.exact))
    for r in st.residual:
        if r.prunable:
            idx = np.arange(r.width)[:, None]
            groups.append(Group("residual", r.name,
                                [Member(p, d, idx, "residual") for p, d in r.members], exact=False))
    return groups


def shared_members(groups) -> dict:
    """Groups of one kind that claim the same rows of one parameter (T5's position-bias table, computed
    once and read by every layer): removing a unit from one would remove it from the others too, so
    none of them may prune on its own. Returns ``{group name: reason}``."""
    claims: dict = {}
    for g in groups:
        if g.kind != "residual":
            for m in g.members:
                claims.setdefault((g.kind, m.param, m.dim), []).append((g.name, np.unique(m.index)))
    clash: dict = {}
    for (kind, param, dim), who in claims.items():
        for a in range(len(who)):
            for b in range(a + 1, len(who)):
                if who[a][0] != who[b][0] and np.intersect1d(who[a][1], who[b][1]).size:
                    clash.setdefault(who[a][0], f"shares {param} (dim {dim}) with {who[b][0]}")
                    clash.setdefault(who[b][0], f"shares {param} (dim {dim}) with {who[a][0]}")
    return {n: f"{r}: their units would have to be removed together" for n, r in clash.items()}


def _fmt_table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(cells[0]), line(["-" * x for x in w])] + [line(r) for r in cells[1:]])


NO_ATTENTION = ("no attention found: the graph has no attention op (SDPA, or softmax between two matmuls); "
                "only MLP neurons (and residual channels) can be pruned")


class CouplingGraph:
    """What :func:`amgfx.analyze` returns: the structure found and its coupling groups.

    Attributes:
        sites: attention sites (:class:`amgfx.structure.AttentionSite`), supported or not.
        mlps: MLPs found (:class:`amgfx.structure.MLP`).
        residual: residual streams (:class:`amgfx.structure.ResidualStream`).
        groups: coupling groups (:class:`Group`), one per place and kind.
        graph: the neuron coupling graph as a ``networkx.MultiGraph`` (built on first use).
        gm: the captured GraphModule the analysis ran on.
    """

    def __init__(self, gm, structure: Structure):
        self.gm = gm
        self.structure = structure
        self.sites = structure.sites
        self.mlps = structure.mlps
        self.residual = structure.residual
        self.groups = build_groups(structure)
        self.refused: dict = {}                  # group name -> why it cannot be pruned (see refuse)
        self._graph = None
        # results other stages compute once per analysis and ask for again and again (each module fills its own)
        self.branches = None                     # analysis.branches.branches: group name -> Branch
        self.token_sites = None                  # analysis.tokens.token_sites: site name -> TokenSite
        self.live_queries = None                 # graph.liveness.live_queries: attention node -> live rows
        self.row_graphs: dict = {}               # planning.cost.row_graph: token plan -> graph with its gathers
        self.dense_ms = None                     # planning.latency: (op times, node -> dense ms)
        self.refuse(shared_members(self.groups))

    def refuse(self, reasons: dict) -> None:
        """Take groups out (``{name: reason}``): found by :func:`amgfx.passes.rewrite.probe` to break the rewrite.
        A site's kind (qk, v, head) is also marked disabled with the reason, so inspect says it."""
        sites = {s.name: s for s in self.sites}
        for name, why in reasons.items():
            kind, where = GroupId(name).kind, GroupId(name).where
            self.refused[name] = why
            if where in sites and kind in ("qk", "v", "head"):
                sites[where].disabled.setdefault(kind, why)
        self.groups = [g for g in self.groups if g.name not in self.refused]
        self._graph = None

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def graph(self) -> nx.MultiGraph:
        if self._graph is None:
            self._graph = self.to_networkx()
        return self._graph

    def to_networkx(self, where: set | None = None) -> nx.MultiGraph:
        """The neuron graph; ``where`` restricts it to some sites/MLPs/streams (for drawing)."""
        g = nx.MultiGraph()  # kinds overlap (a head contains its qk and v units): keep parallel edges
        for grp in self.groups:
            if where is not None and grp.where not in where:
                continue
            if grp.kind == "residual":          # index-aligned: one range node per member
                nodes = [f"{m.param}[{m.dim}]:0-{grp.units - 1}" for m in grp.members]
                for m, n in zip(grp.members, nodes):
                    g.add_node(n, param=m.param, dim=m.dim, role=m.role, index=f"0-{grp.units - 1}")
                g.add_edges_from(((nodes[0], n) for n in nodes[1:]), kind="residual", group=str(grp.name))
                continue
            for u in range(grp.units):
                neurons = []
                for m in grp.members:
                    for i in m.index[u]:
                        n = f"{m.param}[{m.dim}]:{int(i)}"
                        g.add_node(n, param=m.param, dim=m.dim, role=m.role, index=int(i))
                        neurons.append(n)
                g.add_edges_from(((neurons[0], n) for n in neurons[1:]), kind=grp.kind, group=str(grp.name), unit=u)
        return g

    # ----------------------------------------------------------------------------------------
    def counts(self) -> dict:
        out = {k: {"groups": 0, "units": 0} for k in KINDS}
        for g in self.groups:
            out[g.kind]["groups"] += 1
            out[g.kind]["units"] += g.units
        return out

    def summary(self) -> str:
        """A per-site table, the MLPs, the residual streams, group counts and unsupported sites."""
        rows = []
        for s in self.sites:
            if not s.supported:
                continue
            proj = "yes" if s.proj is not None else "no"
            rows.append([s.name, s.kind, s.num_heads, s.num_kv_heads, s.head_dim_qk, s.head_dim_v, s.rope or "-",
                         f"{s.scale:.4g}" + ("" if s.scale_explicit else " (default)"),
                         len(s.per_head), proj, ",".join(sorted(s.disabled)) or "-"])
        parts = [f"attention sites: {sum(s.supported for s in self.sites)} supported, "
                 f"{sum(not s.supported for s in self.sites)} unsupported" if self.sites else NO_ATTENTION,
                 _fmt_table(rows, ["site", "op", "heads", "kv", "qk_dim", "v_dim", "rope", "scale", "per_head", "proj",
                                   "disabled"])]
        mrows = [[m.name, m.hidden, m.activation.replace("aten.", ""), "yes" if m.gated else "no",
                  "yes" if m.exact else "no (norm inside)"] for m in self.mlps]
        parts += ["", f"mlps: {len(self.mlps)}", _fmt_table(mrows, ["mlp", "hidden", "activation", "gated", "exact"])]
        rrows = [[r.name, r.width, len(r.members), "yes" if r.prunable else f"no: {r.reason}"] for r in self.residual]
        parts += ["", f"residual streams: {len(self.residual)}", _fmt_table(rrows, ["stream", "width", "members", "prunable"])]
        c = self.counts()
        parts += ["", "coupling groups: " + ", ".join(f"{k} {v['groups']} ({v['units']} units)" for k, v in c.items())]
        acc = self.structure.accounting
        if acc is not None:
            parts += ["", acc.line()]
        skipped = self.structure.skipped
        if skipped:
            parts += ["", "softmax and attention-like ops that are not attention (not pruned), by rule:"]
            parts += [f"  {k.node} [{k.op}] {k.rule or '-'}: {k.what}" for k in skipped]
        if acc is not None and acc.unaccounted:
            parts += ["", "attention-like ops in no site and of no known kind (NOT pruned, NOT checked):"]
            parts += [f"  {k.node} [{k.op}]: {k.what}" for k in acc.unaccounted]
        unknown = self.structure.unknown
        if unknown:
            parts += ["", "ops with parameters amgfx has no rule for (their weights are left whole):"]
            parts += [f"  {k.node} [{k.op}]: {k.what}" for k in unknown]
        refused = [(n, r) for n, r in self.refused.items() if GroupId(n).kind in ("mlp", "residual")]
        if refused:
            parts += ["", "groups left whole (their removal would break the rewrite):"]
            parts += [f"  {n}: {r}" for n, r in refused]
        bad = [s for s in self.sites if not s.supported]
        if bad:
            parts += ["", "unsupported sites (excluded from pruning):"]
            parts += [f"  {s.name} [{s.node}]: {s.reason}" for s in bad]
        dis = [(s.name, k, r) for s in self.sites if s.supported for k, r in s.disabled.items()]
        if dis:
            parts += ["", "disabled kinds:"] + [f"  {n} {k}: {r}" for n, k, r in dis]
        return "\n".join(parts)

    def to_dict(self, with_index: bool = True) -> dict:
        def site(s):
            d = {k: v for k, v in asdict(s).items() if not isinstance(v, np.ndarray) and v is not None
                 and k not in ("q", "k", "v", "proj")}
            for k in ("q", "k", "v", "proj"):
                if getattr(s, k) is not None:
                    d[k] = getattr(s, k).weight
            d["per_head"] = [list(p) for p in s.per_head]
            return d
        return {
            "sites": [site(s) for s in self.sites],
            "mlps": [{"name": m.name, "hidden": m.hidden, "activation": m.activation, "gated": m.gated, "exact": m.exact,
                      "fc1": [l.weight for l in m.fc1], "fc2": m.fc2.weight} for m in self.mlps],
            "residual": [asdict(r) for r in self.residual],
            "groups": [g.to_dict(with_index) for g in self.groups],
            "refused": dict(self.refused),
            "not_attention": [{"node": k.node, "op": k.op, "what": k.what, "rule": k.rule}
                              for k in self.structure.skipped],
            "accounting": ({**self.structure.accounting.counts(),
                            "unaccounted_ops": [{"node": k.node, "op": k.op, "what": k.what}
                                                for k in self.structure.accounting.unaccounted]}
                           if self.structure.accounting is not None else None),
            "unknown_weights": [{"node": k.node, "op": k.op, "what": k.what} for k in self.structure.unknown],
        }

    def save(self, path, format: str = "json") -> None:
        """Write the coupling as ``json`` (groups with indices), ``graphml`` or ``dot`` (the neuron graph)."""
        if format == "json":
            with open(path, "w") as f:
                json.dump(self.to_dict(), f, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
        elif format == "graphml":
            nx.write_graphml(self.graph, path)
        elif format == "dot":
            with open(path, "w") as f:
                f.write(to_dot(self.graph))
        else:
            raise ValueError(f"unknown format {format!r}: use json, graphml or dot")


_COLORS = {"qk": "#1f77b4", "v": "#2ca02c", "head": "#9467bd", "mlp": "#ff7f0e", "residual": "#7f7f7f"}


def to_dot(g: nx.MultiGraph) -> str:
    """Graphviz DOT text for a neuron graph (written by hand: no pydot dependency)."""
    q = lambda s: '"' + str(s).replace('"', r'\"') + '"'
    lines = ["graph coupling {", "  node [shape=point];"]
    lines += [f"  {q(n)} [label={q(n)}];" for n in g.nodes]
    lines += [f"  {q(a)} -- {q(b)} [color={q(_COLORS.get(d.get('kind'), 'black'))}, kind={q(d.get('kind'))}];"
              for a, b, d in g.edges(data=True)]
    lines.append("}")
    return "\n".join(lines) + "\n"
