"""Pass: split a fused q/k/v projection into one projection per operand, when it must.

timm computes ``qkv = linear(x)`` and reshapes it to ``(B, N, 3, H, d)``. Once q/k keep
fewer dims than v, no single ``d`` fits, so that reshape cannot be rewritten. This pass
gives each operand its own projection, ``linear(x, W[rows_q])``, followed by the view and
permute that put its rows where the old chain put them. The layout is read from index
propagation (which rows and which tokens land where), not from the op sequence, so the
same code serves any fused layout. The row slices of ``W`` are folded into new parameters
(``qkv.q_weight``, ...) by ``cleanup``; the fused weight is then freed.

``options["split_qkv"]``: ``"auto"`` splits only where the fused chain would not pack
densely; ``"always"`` splits every fused site; ``"never"`` raises instead.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from amgfx.errors import RewriteError
from amgfx.indexprop import activation_taint, propagate, seed, shape, trace_back
from amgfx.masks import compact_shape, propagate_masks
from amgfx.ops import LAYERS, opname

from ._graph import call, constant, dims_of, size_args

aten = torch.ops.aten


def _lanes(gm, prod, node, tainted, values_along):
    """Propagate ids laid along one dim of ``prod``'s output to ``node``."""
    region = trace_back(node, tainted).nodes | {node}
    dim, values = values_along
    env, _ = propagate(gm, {prod: seed(prod, values, dim)}, region)
    return env.get(node)


def _cut(gm, prod, operand, tainted):
    """The first node on the way from ``prod`` to ``operand`` that holds only this operand's rows."""
    n_out = shape(prod)[-1]
    region = trace_back(operand, tainted).nodes | {operand}
    env, _ = propagate(gm, {prod: seed(prod, torch.arange(n_out))}, region)
    mine = set(torch.unique(env[operand][0]).tolist())
    best = operand
    for n in gm.graph.nodes:                         # topological: the first pure node wins
        if n in region and n in env and n is not prod and len(env[n]) == 1 and isinstance(env[n][0], torch.Tensor):
            ids = set(torch.unique(env[n][0]).tolist())
            if ids <= mine and _feeds(n, operand):
                best = n
                break
    return best, env


def _feeds(n, target, budget=64):
    todo, seen = [n], set()
    while todo and len(seen) < budget:
        a = todo.pop()
        if a is target:
            return True
        if a in seen:
            continue
        seen.add(a)
        todo.extend(a.users)
    return False


def _layout(R, T, forced=None):
    """From row ids ``R`` and token ids ``T[i]`` (one per producer lead dim) at the cut: the rebuild.

    ``forced`` maps cut axes to producer lead dims that must be kept even at size 1 (a dynamic
    batch that the example happens to give as 1).
    Returns (rows in packed order, feature sizes, permutation of [lead>1 dims, feature dims]).
    """
    shp = R.shape
    feat, tok, order = [], dict(forced or {}), []
    for a in range(len(shp)):
        if shp[a] == 1 or a in tok:
            continue
        varies = lambda t: not bool((t == t.narrow(a, 0, 1)).all())
        ti = [i for i, t in enumerate(T) if varies(t)]
        if varies(R) and not ti:
            feat.append(a)
        elif len(ti) == 1 and not varies(R):
            tok[a] = ti[0]
        else:
            return None
    R0 = R
    for a in range(len(shp)):
        if a not in feat:
            R0 = R0.narrow(a, 0, 1)
    if not bool((R0.expand(shp) == R).all()):
        return None
    rows = R0.reshape([shp[a] for a in feat]).flatten()
    lead = sorted(set(tok.values()))
    for a in range(len(shp)):
        if a in tok:
            order.append(lead.index(tok[a]))
        elif a in feat:
            order.append(len(lead) + feat.index(a))
    return rows, [shp[a] for a in feat], order, lead


def _split_operand(gm, prod, operand, part, tainted):
    cut, rows_env = _cut(gm, prod, operand, tainted)
    lead_shape = shape(prod)[:-1]
    R = rows_env.get(cut)
    T = [_lanes(gm, prod, cut, tainted, (i, torch.arange(s))) for i, s in enumerate(lead_shape)]
    if R is None or len(R) != 1 or any(t is None or len(t) != 1 for t in T):
        raise RewriteError(f"{cut.name}: cannot read the layout of the fused projection {prod.name}")
    sym = dims_of(prod)[:-1]
    forced = {a: sym.index(d) for a, d in enumerate(dims_of(cut)) if d is not None and d in sym}
    lay = _layout(R[0], [t[0] for t in T], forced)
    if lay is None:
        raise RewriteError(f"{cut.name}: the fused projection {prod.name} is laid out in a way the split cannot rebuild")
    rows, fsizes, order, lead = lay
    spec = LAYERS[prod.target]
    w, b = prod.args[spec[1]], prod.args[spec[2]] if spec[2] is not None and len(prod.args) > spec[2] else None
    idx = constant(gm, cut, rows.clone(), "rows")
    args = list(prod.args)
    wn = call(gm, cut, aten.index_select.default, [w, spec[3], idx])
    wn.meta.update(amgfx_fold=True, amgfx_name=_name(w, part, "weight"))
    args[spec[1]] = wn
    if isinstance(b, fx.Node):
        b, bidx = _bias_piece(gm, b, rows, cut, idx)
        bn = call(gm, cut, aten.index_select.default, [b, 0, bidx])
        bn.meta.update(amgfx_fold=True, amgfx_name=_name(w, part, "bias"))
        args[spec[2]] = bn
    y = call(gm, cut, prod.target, args, dict(prod.kwargs))
    x = prod.args[0]                                 # lead dims of prod = those of its input
    lead_dims = dims_of(prod)[:-1] or [None] * len(lead_shape)
    z = call(gm, cut, aten.view.default,
             [y, size_args(gm, cut, [lead_shape[i] for i in lead], [lead_dims[i] for i in lead], [x]) + fsizes])
    if order != sorted(order):
        z = call(gm, cut, aten.permute.default, [z, order])
    z = call(gm, cut, aten.reshape.default, [z, size_args(gm, cut, shape(cut), dims_of(cut), [x])])
    _check(rows, lead_shape, lead, fsizes, order, shape(cut), R[0])
    cut.replace_all_uses_with(z)


def _bias_piece(gm, b, rows, before, idx):
    """A bias built by ``cat`` (EVA: q_bias, a zero k_bias buffer, v_bias): slice the one piece
    the rows fall in, so a buffer stays a buffer and a parameter a parameter."""
    if b.target is not aten.cat.default or (len(b.args) > 1 and b.args[1] not in (0, -1)):
        return b, idx
    off = 0
    for piece in b.args[0]:
        n = shape(piece)[0]
        if int(rows.min()) >= off and int(rows.max()) < off + n:
            return piece, constant(gm, before, (rows - off).clone(), "rows")
        off += n
    return b, idx


def _check(rows, lead_shape, lead, fsizes, order, out_shape, R):
    """Run the rebuild on row ids and compare with what the fused chain delivered."""
    y = rows.expand(*lead_shape, rows.numel())
    z = y.reshape([lead_shape[i] for i in lead] + fsizes).permute(order).reshape(out_shape)
    if not torch.equal(z, R):
        raise RewriteError("split_qkv: the rebuilt projection does not reproduce the fused layout")


def _name(w: fx.Node, part: str, leaf: str) -> str:
    base = w.target.rpartition(".")[0] if w.op == "get_attr" else w.name
    return f"{base}.{part}_{leaf}" if base else f"{part}_{leaf}"


def _irregular(gm, ms, prod, operands) -> bool:
    region = set()
    tainted = activation_taint(gm.graph)
    for o in operands:
        region |= trace_back(o, tainted).nodes
    return any(isinstance(ms.get(n), torch.Tensor) and compact_shape(ms.get(n)) is None for n in region)


def split_qkv(gm: fx.GraphModule, plan) -> fx.GraphModule:
    mode = plan.options.get("split_qkv", "auto")
    nodes = {n.name: n for n in gm.graph.nodes}
    tainted = activation_taint(gm.graph)
    # masks of the graph as captured: a split only adds nodes, so other sites' masks stay valid
    ms = propagate_masks(gm, plan.params) if mode == "auto" and any(a.get("fused") for a in plan.attention.values()) else None
    rows = {**plan.dead, **plan.tokens}              # sites whose queries and keys keep different positions
    sites = dict(plan.attention)
    sites.update({k: v for k, v in rows.items() if k not in sites})
    for node, site in sites.items():
        gather = node in rows                            # q must stand alone
        if not site.get("fused") or not gather and mode == "never" and site["qk_dim"] == site["v_dim"]:
            continue
        ops = [nodes[o] for o in site["operands"]]
        prods = [trace_back(o, tainted).producers for o in ops]
        if any(len(p) != 1 for p in prods):
            continue
        by_prod: dict = {}
        for part, o, p in zip("qkv", ops, prods):
            by_prod.setdefault(p[0], []).append((part, o))
        for prod, parts in by_prod.items():
            if len(parts) < 2:
                continue
            if not gather and mode == "auto" and not _irregular(gm, ms, prod, [o for _, o in parts]):
                continue
            if mode == "never" and not gather:
                raise RewriteError(f"{site['site']}: q/k and v keep different head dims in the fused projection "
                                   f"{prod.name} ({opname(prod.target)}); allow options['split_qkv']='auto'")
            for part, o in parts:
                _split_operand(gm, prod, o, part, tainted)
            tainted = activation_taint(gm.graph)
    gm.graph.eliminate_dead_code(is_impure_node=_keep)
    return gm


def _keep(n: fx.Node) -> bool:
    return n.op in ("placeholder", "output", "call_module") or n.is_impure()
