"""Row surgery: split a fused projection per operand, and gather rows (token positions) before a layer.

These are the graph edits behind three passes (``split_qkv``, ``token_gather``, ``dead_tokens``),
kept here because the cost model makes the same edits on a copy of the graph to predict what
those passes save (:func:`amgfx.planning.cost.predict`); a pass decides *where*, this module does it.

A row gather keeps its input's *original* shape in ``meta["val"]`` and its kept rows in
``meta[TOKEN_ROWS]``: :mod:`amgfx.graph.masks` seeds a keep mask there, so ``fix_shapes`` rewrites
every size downstream as it does for pruned neurons.

Example (gather the K/V rows of a timm ViT's one attention site, as static token pruning does):
    >>> import torch, timm, amgfx
    >>> from amgfx.graph.fx import copy_module
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> gm = copy_module(amgfx.capture(m, torch.randn(1, 3, 32, 32)))
    >>> sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    >>> a = sdpa_args(sdpa)
    >>> split_site(gm, (a.q, a.k, a.v))      # timm's fused qkv: one projection per operand
    >>> from amgfx.planning.resolved import TokenKeep
    >>> _ = insert_token_gathers(gm, {sdpa.name: TokenKeep("blocks.0.attn", (0, 2), 5, (), True)})
    >>> [n.meta[TOKEN_ROWS] for n in gm.graph.nodes if TOKEN_ROWS in n.meta]   # one gather for K and V
    [(1, [0, 2])]
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import RewriteError
from .fx import call, constant, dims_of, eliminate_dead_code, size_args
from .indexprop import activation_taint, propagate, seed, shape, trace_back
from .liveness import frontier
from .masks import propagate_masks
from .meta import DIMS, FOLD, FOLD_NAME, TOKEN_ROWS
from .ops import LAYERS, sdpa_args

aten = torch.ops.aten
__all__ = ["ROW_EDITS", "gather_rows", "projection", "split_operand", "split_site", "insert_token_gathers", "insert_live_gathers"]


# The passes that change which rows (token positions) or which nodes the graph computes, in the one order
# both the rewrite (amgfx.passes.PIPELINE, checked by check_order) and the cost model
# (amgfx.planning.cost.row_graph, which replays them on a copy) follow, so prediction and rewrite cannot drift.
ROW_EDITS = ("remove_branch", "split_qkv", "token_gather", "dead_tokens")


def gather_rows(gm: fx.GraphModule, x: fx.Node, user: fx.Node, dim: int, kept: list, name: str) -> fx.Node:
    """Feed ``user`` the kept positions of ``x`` along ``dim`` instead of all of them."""
    idx = constant(gm, user, torch.tensor(kept, dtype=torch.long), "tokens")
    with gm.graph.inserting_before(user):
        g = gm.graph.call_function(aten.index_select.default, (x, dim, idx))
    g.name = gm.graph._graph_namespace.create_name(name, None)
    g.meta["val"] = x.meta["val"]                    # the original shape: masks say what survives
    g.meta[TOKEN_ROWS] = (dim, list(kept))
    if DIMS in x.meta:
        g.meta[DIMS] = x.meta[DIMS]
    user.replace_input_with(x, g)
    return g


def projection(operand: fx.Node, tainted: set) -> fx.Node | None:
    """The one layer that produced an attention operand (through views, permutes, RoPE), or None."""
    path = trace_back(operand, tainted)
    found = path.producers + [b for b in path.blockers if b.target in LAYERS]   # split_qkv's sliced weights
    return found[0] if len(found) == 1 and len(path.producers) + len(path.blockers) == 1 else None


# ------------------------------------------------------------------------------------------------
# splitting a fused projection
# ------------------------------------------------------------------------------------------------
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


def _layout(R, T, lead_shape, forced=None):
    """From row ids ``R`` and token ids ``T[i]`` (one per producer lead dim) at the cut: the rebuild.

    Every cut axis holds either features (rows vary, tokens do not) or tokens: one producer lead dim,
    or several flattened in row-major order (Twins' window grid). ``forced`` maps cut axes to producer
    lead dims that must be kept even at size 1 (a dynamic batch that the example gives as 1).
    Returns (rows in packed order, feature sizes, permutation of [lead dims, feature dims], lead dims).
    """
    shp = R.shape
    feat, tok = [], {a: [i] for a, i in (forced or {}).items()}
    for a in range(len(shp)):
        if shp[a] == 1 or a in tok:
            continue
        varies = lambda t: not bool((t == t.narrow(a, 0, 1)).all())
        ti = [i for i, t in enumerate(T) if varies(t) and lead_shape[i] > 1]
        if varies(R) and not ti:
            feat.append(a)
            continue
        if not ti or varies(R):
            return None
        pos = torch.zeros_like(T[ti[0]])
        for i in ti:                                 # row-major: the first lead dim is the slowest
            pos = pos * lead_shape[i] + T[i]
        along = torch.arange(shp[a]).reshape([-1 if b == a else 1 for b in range(len(shp))]).expand(shp)
        if not torch.equal(pos, along):
            return None
        tok[a] = ti
    used = [i for a in sorted(tok) for i in tok[a]]
    if len(used) != len(set(used)) or any(s > 1 and i not in used for i, s in enumerate(lead_shape)):
        return None
    R0 = R
    for a in range(len(shp)):
        if a not in feat:
            R0 = R0.narrow(a, 0, 1)
    if not bool((R0.expand(shp) == R).all()):
        return None
    rows = R0.reshape([shp[a] for a in feat]).flatten()
    lead = sorted(used)
    order = []
    for a in range(len(shp)):
        if a in tok:
            order += [lead.index(i) for i in tok[a]]
        elif a in feat:
            order.append(len(lead) + feat.index(a))
    return rows, [shp[a] for a in feat], order, lead


def split_operand(gm, prod, operand, part, tainted) -> None:
    """Give ``operand`` its own projection ``linear(x, W[rows])`` (+ the view/permute that put its rows
    where the fused chain put them), read from index propagation rather than from the op sequence."""
    cut, rows_env = _cut(gm, prod, operand, tainted)
    lead_shape = shape(prod)[:-1]
    R = rows_env.get(cut)
    T = [_lanes(gm, prod, cut, tainted, (i, torch.arange(s))) for i, s in enumerate(lead_shape)]
    if R is None or len(R) != 1 or any(t is None or len(t) != 1 for t in T):
        raise RewriteError(f"{cut.name}: cannot read the layout of the fused projection {prod.name}")
    sym = dims_of(prod)[:-1]
    forced = {a: sym.index(d) for a, d in enumerate(dims_of(cut)) if d is not None and d in sym}
    lay = _layout(R[0], [t[0] for t in T], lead_shape, forced)
    if lay is None:
        raise RewriteError(f"{cut.name}: the fused projection {prod.name} is laid out in a way the split cannot rebuild")
    rows, fsizes, order, lead = lay
    spec = LAYERS[prod.target]
    w, b = prod.args[spec[1]], prod.args[spec[2]] if spec[2] is not None and len(prod.args) > spec[2] else None
    idx = constant(gm, cut, rows.clone(), "rows")
    args = list(prod.args)
    wn = call(gm, cut, aten.index_select.default, [w, spec[3], idx])
    wn.meta.update({FOLD: True, FOLD_NAME: _name(w, part, "weight")})
    args[spec[1]] = wn
    if isinstance(b, fx.Node):
        b, bidx = _bias_piece(gm, b, rows, cut, idx)
        bn = call(gm, cut, aten.index_select.default, [b, 0, bidx])
        bn.meta.update({FOLD: True, FOLD_NAME: _name(w, part, "bias")})
        args[spec[2]] = bn
    y = call(gm, cut, prod.target, args, dict(prod.kwargs))
    x = prod.args[0]                                 # lead dims of prod = those of its input
    lead_dims = dims_of(prod)[:-1] or [None] * len(lead_shape)
    z = call(gm, cut, aten.view.default,
             [y, size_args(gm, cut, [lead_shape[i] for i in lead], [lead_dims[i] for i in lead], [x]) + fsizes])
    if order != sorted(order):
        z = call(gm, cut, aten.permute.default, [z, order])
    z = call(gm, cut, aten.reshape.default, [z, size_args(gm, cut, shape(cut), dims_of(cut), [x])])
    _check(rows, lead_shape, lead, fsizes, order, shape(cut), R[0], [t[0] for t in T])
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


def _check(rows, lead_shape, lead, fsizes, order, out_shape, R, T):
    """Run the rebuild on row ids and on each lead dim's positions, and compare with what the fused
    chain delivered: every element must come from the same row and the same token."""
    n = rows.numel()
    rebuild = lambda y: y.reshape([lead_shape[i] for i in lead] + fsizes).permute(order).reshape(out_shape)
    ok = torch.equal(rebuild(rows.expand(*lead_shape, n)), R)
    for i in lead:
        ids = torch.arange(lead_shape[i]).reshape([-1 if j == i else 1 for j in range(len(lead_shape))] + [1])
        ok = ok and torch.equal(rebuild(ids.expand(*lead_shape, n)), T[i])
    if not ok:
        raise RewriteError("split_qkv: the rebuilt projection does not reproduce the fused layout")


def _name(w: fx.Node, part: str, leaf: str) -> str:
    base = w.target.rpartition(".")[0] if w.op == "get_attr" else w.name
    return f"{base}.{part}_{leaf}" if base else f"{part}_{leaf}"


def fused_producers(gm: fx.GraphModule, operands) -> dict:
    """producer -> [(part, operand)] for every projection that serves two or more of (q, k, v)."""
    tainted = activation_taint(gm.graph)
    by_prod: dict = {}
    for part, o in zip("qkv", operands):
        p = trace_back(o, tainted).producers
        if len(p) != 1:
            return {}
        by_prod.setdefault(p[0], []).append((part, o))
    return {p: parts for p, parts in by_prod.items() if len(parts) > 1}


def split_site(gm: fx.GraphModule, operands, producers: dict | None = None) -> None:
    """Split every fused projection that serves two or more of one site's (q, k, v) ``operands``."""
    for prod, parts in (fused_producers(gm, operands) if producers is None else producers).items():
        tainted = activation_taint(gm.graph)
        for part, o in parts:
            split_operand(gm, prod, o, part, tainted)
    eliminate_dead_code(gm)                          # the fused projection, now read by nobody


# ------------------------------------------------------------------------------------------------
# row gathers
# ------------------------------------------------------------------------------------------------
def insert_token_gathers(gm: fx.GraphModule, tokens: dict) -> fx.GraphModule:
    """For each attention node ``{name: TokenKeep}`` (site, kept, keys): gather the kept key positions
    before its K and V projections (once, where they read the same input), and from its mask."""
    nodes = {n.name: n for n in gm.graph.nodes}
    tainted = activation_taint(gm.graph)
    for node, t in tokens.items():
        attn = nodes[node]
        a = sdpa_args(attn)
        projs = {projection(o, tainted) for o in (a.k, a.v)}
        if None in projs or projection(a.q, tainted) in projs:
            raise RewriteError(f"{t.site}: cannot find K/V projections separate from the query's")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        done: dict = {}
        for p in sorted(projs, key=order.get):
            x = p.args[0]
            if len(shape(x)) != 3 or shape(x)[1] != t.keys:
                raise RewriteError(f"{t.site}: the K/V projection input {x.name} {list(shape(x))} has no token "
                                   f"axis 1 of size {t.keys}")
            if x in done:                            # K and V read the same rows: gather them once
                p.replace_input_with(x, done[x])
            else:
                done[x] = gather_rows(gm, x, p, 1, list(t.kept), f"tokens_{p.name}")
        if isinstance(a.mask, fx.Node) and shape(a.mask)[-1] == t.keys:     # the same keys leave the mask
            gather_rows(gm, a.mask, attn, len(shape(a.mask)) - 1, list(t.kept), f"tokens_mask_{attn.name}")
    return gm


def insert_live_gathers(gm: fx.GraphModule, params: dict) -> dict:
    """Gather the live positions before every linear whose output is read only there (dead tokens).

    Where the narrowing cannot flow through everything downstream (checked with the keep masks of
    ``params``), the gathers are taken out again. Returns what was done, for ``gm.meta[DEAD_TOKENS]``.
    """
    cut = frontier(gm)
    added = [gather_rows(gm, n.args[0], n, 1, live, f"live_{n.name}") for n, live in cut]
    try:
        propagate_masks(gm, params)
    except RewriteError as e:
        for g in added:
            g.replace_all_uses_with(g.args[0])
            gm.graph.erase_node(g)
        return {"applied": False, "reason": str(e)}
    return {"applied": bool(cut), "gathered_before": [n.name for n, _ in cut]}
