"""Reconstruction: refit the kept weights so the pruned model's layers reproduce the dense ones.

Pruning a unit takes its contribution out of every layer that reads it: the attention output
projection after v or head removal, the MLP's fc2/down after neuron removal, any layer whose
*input* columns a group removes. Without retraining, the field's answer (Kwon et al. 2022's mask
tuning, K-prune, FLAP, SparseGPT/ZipLM) is a layer-wise least-squares refit on calibration data.
Here, for every such layer (a linear, ``addmm``/``mm``/``matmul`` with a parameter, or a 1x1 conv):

* ``Xp`` is what the layer reads in the pruned model, ``Xd`` what it reads in the dense one, and
  the target is the dense layer's output ``Y = Xd Wd^T + bd`` at the rows the pruned layer keeps;
  when the layer writes straight into a residual ``add`` (through reshapes only), the target is the
  dense *sum* there, ``Y + skip_d - skip_p``: the layer also makes up for what the residual stream
  lost upstream (on MiniLM at 50% FLOPs, held-out cosine 0.736 to 0.773);
* ``G = Xp^T Xp`` and ``B = Xp^T Y`` (a ones column appended for the bias) are summed over the
  calibration tokens in float64 (activations are never stored);
* the kept weights and bias solve ``(G + lam I) W^T = B + lam W0^T`` by Cholesky, with ``lam =
  damp * mean(diag G)`` on the weights (the bias is left free, so it absorbs the mean shift of what
  was removed, as FLAP's bias compensation does): ridge toward the weights the rewrite kept, so a
  layer that lost nothing keeps its weights exactly and the fitted error never rises. ``damp`` is
  chosen per layer from :data:`DAMPS` by two-fold cross-validation over calibration chunks (few
  tokens for a wide layer overfit a weak ridge; a layer with many tokens can afford a weak one);
* sequential by default: layers are fitted in graph order, each on the inputs the already refitted
  layers before it produce, so errors do not compound.

Padding tokens (an ``attention_mask`` of the batch's ``[B, N]`` shape) are left out of the fit.
q and k have no linear consumer; see :func:`amgfx.weights.qk.qk_scales` for what is done for them. This module
changes weights only, never the graph; :func:`amgfx.reconstruct` wires it after the rewrite.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x, data = torch.randn(2, 3, 32, 32), [torch.randn(8, 3, 32, 32) for _ in range(2)]
    >>> cg = amgfx.analyze(m, x)
    >>> plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))}, units={"mlp:blocks.0.mlp": 768},
    ...                   options={"dead_tokens": "off"})     # every token computed, as in the dense model
    >>> small = amgfx.apply(cg, plan)
    >>> fits = refit_layers(small, cg.gm, plan.resolve(cg).params, data, progress=False)
    >>> [(f.weight, f.columns) for f in fits], all(f.after <= f.before for f in fits)
    ([('blocks.0.mlp.fc2.weight', (384, 768))], True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx as fx

from ..analysis.records import make_layer
from ..errors import AmgfxError
from ..graph.branches import ADDS
from ..graph.fx import copy_module, get_attr, replace_attr, set_attr, state_inputs
from ..graph.indexprop import is_layer, layer_input, shape
from ..graph.ops import IDENTITY, IGNORED_USERS, LAYERS, LINEAR_LAYERS, VIEWS
from ..scoring.calibrate import batch_chunks
from .normal import Normal, downhill

__all__ = ["LayerFit", "refit_layers", "attach_bias", "chunks", "skip_add", "DAMPS"]

aten = torch.ops.aten


@dataclass
class LayerFit:
    """One refitted layer: its node and weight, kept/dense input width, tokens fitted, and the relative
    calibration output error ``||Y_pruned - Y_dense||^2 / ||Y_dense||^2`` before and after the refit; ``bias``
    is the bias refitted with the weights (None: the layer's bias, if any, is kept as it is); ``damp`` the
    ridge strength used."""
    layer: str
    weight: str
    columns: tuple
    samples: int
    before: float
    after: float
    bias: str | None
    damp: float | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "columns": list(self.columns)}


class _Reached(Exception):
    """Raised by :class:`_Upto` when the watched nodes have run: the rest of the forward is not needed."""


class _Upto(fx.Interpreter):
    """Runs ``gm`` until every node in ``want`` has its inputs, keeping ``{node: input tensor}``."""

    def __init__(self, gm, want: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.want, self.got = want, {}

    def run_node(self, n):
        if n.name in self.want:
            self.got[n.name] = self.env[self.want[n.name]]
            if len(self.got) == len(self.want):
                raise _Reached
        return super().run_node(n)


def _inputs_of(gm, want: dict, flat) -> dict:
    """``{node name: tensor}``: what each node of ``want`` (name -> the input node to keep) reads,
    running ``gm`` only as far as the last of them."""
    nodes = {x.name: x for x in gm.graph.nodes}
    run = _Upto(gm, {k: (nodes[v] if isinstance(v, str) else v) for k, v in want.items()})
    with torch.no_grad():
        try:
            run.run(*state_inputs(gm, flat))
        except _Reached:
            pass
    return run.got


class _Cursor(fx.Interpreter):
    """``gm`` run on one chunk of inputs node by node, paused before a layer: the next layer's fit
    resumes from there instead of running the graph again from its inputs (each layer costs the
    forward from the previous one, not from the start). Only live values are held, as in a forward."""

    def __init__(self, gm: fx.GraphModule, flat):
        super().__init__(gm, garbage_collect_values=True)
        self.flat, self.order = list(flat), list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self._restart()

    def _restart(self):
        self.env, self.args_iter, self.at = {}, iter(self.flat), 0

    def restart(self) -> None:
        """Drop what the cursor holds; the next :meth:`before` runs from the inputs again."""
        self._restart()

    def before(self, node: fx.Node) -> dict:
        """Run every node before ``node`` (from the start again if the cursor is past it); the values live
        there, ``{node: value}``."""
        if self.index[node] < self.at:
            self._restart()
        with torch.no_grad():
            while self.at < self.index[node]:
                n = self.order[self.at]
                self.env[n] = self.run_node(n)
                for dead in self.user_to_last_uses.get(n, []):
                    del self.env[dead]
                self.at += 1
        return self.env

    def refresh(self) -> None:
        """Read the parameters again, and recompute what was made from parameters alone (a transposed
        weight): a fit replaced some, and a held value would still be the old one."""
        const: dict = {}        # node -> its value from the current parameters
        with torch.no_grad():
            for n in self.order[:self.at]:
                if n.op == "get_attr":
                    const[n] = self.fetch_attr(n.target)
                elif n.op == "call_function" and n.all_input_nodes and all(a in const for a in n.all_input_nodes):
                    args, kwargs = fx.node.map_arg((n.args, n.kwargs), const.__getitem__)
                    const[n] = n.target(*args, **kwargs)
                if n in const and n in self.env:
                    self.env[n] = const[n]


def skip_add(gm: fx.GraphModule, node: str) -> tuple | None:
    """``(add node, skip node)`` when layer ``node``'s output reaches a residual ``add`` through
    reshapes and identities only (so its rows are the add's rows, in order), else None."""
    n = next(x for x in gm.graph.nodes if x.name == node)
    width = n.meta["val"].shape[-1]
    while True:
        users = [u for u in n.users if u.target not in IGNORED_USERS]
        if len(users) != 1:
            return None
        u = users[0]
        if u.target in ADDS and n in u.args[:2] and len(u.args) == 2 and u.kwargs.get("alpha", 1) == 1:
            other = u.args[1] if u.args[0] is n else u.args[0]
            if isinstance(other, fx.Node) and shape(other) == shape(u) and shape(u)[-1] == width:
                return u.name, other.name
            return None
        if u.target in IDENTITY or u.target in VIEWS and shape(u)[-1:] == shape(n)[-1:]:
            n = u
            continue
        return None


def chunks(gm: fx.GraphModule, calib):
    """``(flat graph inputs, token mask or None)`` per chunk of ``calib`` at the batch size ``gm`` was
    captured with (the captured shapes are static unless the batch dim stayed symbolic)."""
    from torch.fx._pytree import tree_flatten_spec

    info = getattr(gm.graph._codegen, "pytree_info", None)
    for _, pieces in batch_chunks(gm, calib):
        for a, k, _ in pieces:
            a, k = tuple(a), dict(k)
            flat = tree_flatten_spec((a, k), info.in_spec) if info and info.in_spec else list(a)
            mask = k.get("attention_mask")
            yield flat, (mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
@dataclass
class _Target:
    node: str
    weight: str
    out_dim: int
    in_dim: int
    rows: list            # kept output rows (dense ids)
    cols: list            # kept input columns (dense ids)
    bias: str | None      # a single bias parameter covering every output, refitted with the weight
    conv: bool
    new_bias: bool = False  # the layer had none: one is added (zero, then fitted) to take the mean shift


def _fittable(gm, n: fx.Node) -> bool:
    if n.target in LINEAR_LAYERS:
        # stacked expert weights (a grouped matmul) would need one fit per expert on its own tokens: not yet
        w = n.args[LAYERS[n.target][1]]
        return not isinstance(w, fx.Node) or w.meta["val"].dim() == 2
    if n.target is aten.conv2d.default or n.target is aten.conv1d.default:
        w = n.args[1].meta["val"]
        groups = n.args[6] if len(n.args) > 6 else 1
        return groups == 1 and all(s == 1 for s in w.shape[2:])
    return False


def targets(gm: fx.GraphModule, params: dict, add_bias: bool = False) -> list[_Target]:
    """The layers of ``gm`` (dense) whose input columns ``params`` (:attr:`Resolved.params`) removes; with
    ``add_bias``, a linear or conv with no bias at all is given one to fit (``new_bias``)."""
    users: dict = {}
    for n in gm.graph.nodes:
        if is_layer(n):
            users.setdefault(make_layer(gm, n).weight, []).append(n)
    out = []
    for fqn, nodes in users.items():
        n = nodes[0]
        layer = make_layer(gm, n)
        dims = params.get(fqn, {})
        if len(nodes) != 1 or layer.in_dim not in dims or not _fittable(gm, n):
            continue
        w = get_attr(gm, fqn)
        bias = None
        if len(layer.bias) == 1 and layer.bias[0][0] != "<computed>":
            b, off, size = layer.bias[0]
            bias = b if off == 0 and size == layer.out_features and b not in users else None
        new = add_bias and not layer.bias and LAYERS[n.target][2] is not None and len(n.args) <= LAYERS[n.target][2] + 1 \
            and (len(n.args) <= LAYERS[n.target][2] or n.args[LAYERS[n.target][2]] is None)
        if new:
            bias = _free_name(gm, fqn.rpartition(".")[0] + (".bias" if "." in fqn else "bias"))
        out.append(_Target(n.name, fqn, layer.out_dim, layer.in_dim,
                           dims.get(layer.out_dim, list(range(w.shape[layer.out_dim]))), list(dims[layer.in_dim]),
                           bias, n.target not in LINEAR_LAYERS, new))
    return out


def _free_name(gm, fqn: str) -> str:
    name, i = fqn, 0
    while True:
        try:
            get_attr(gm, name)
        except AttributeError:
            return name
        i += 1
        name = f"{fqn}_{i}"


def _reader(gm: fx.GraphModule, weight: str) -> fx.Node:
    """The one layer node of ``gm`` that reads ``weight``."""
    return next(n for n in gm.graph.nodes if is_layer(n) and make_layer(gm, n).weight == weight)


def out_dim(gm: fx.GraphModule, weight: str) -> int:
    """The dim of ``weight`` that indexes its layer's outputs."""
    return LAYERS[_reader(gm, weight).target][3]


def attach_bias(gm: fx.GraphModule, weight: str, bias: str) -> None:
    """Give the one layer of ``gm`` that reads ``weight`` a zero parameter ``bias`` as its bias (its output
    is unchanged until a fit writes it). The only graph edit reconstruction makes: FLAP's compensation
    of the removed channels' mean needs a bias, and LLaMA's projections have none."""
    node = _reader(gm, weight)
    spec = LAYERS[node.target]
    w = get_attr(gm, weight)
    rows = w.shape[spec[3]]
    set_attr(gm, bias, torch.nn.Parameter(torch.zeros(rows, dtype=w.dtype, device=w.device), w.requires_grad))
    with gm.graph.inserting_before(node):        # a weight edit: the layer gains the bias it reads
        b = gm.graph.get_attr(bias)
    b.meta["val"] = torch.empty(rows, dtype=w.dtype, device="meta")
    args = tuple(node.args) + (None,) * max(0, spec[2] + 1 - len(node.args))
    node.args = args[:spec[2]] + (b,) + args[spec[2] + 1:]
    gm.recompile()


def _rows2d(t: torch.Tensor, out_dim: int, conv: bool) -> torch.Tensor:
    """A layer weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``; a 1x1 conv ``[out, in, 1, 1]``)."""
    return t.reshape(t.shape[0], -1) if conv else t.movedim(out_dim, 0)


def _tokens(x: torch.Tensor, conv: bool, mask, dtype=torch.float64) -> torch.Tensor:
    """A layer input as ``[tokens, in features]`` in ``dtype``, padding tokens left out."""
    x = x.detach()
    if conv:
        x = x.movedim(1, -1)
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device) != 0]
    return x.reshape(-1, x.shape[-1]).to(dtype)


DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)    # ridge strengths tried when damp=None (relative to mean diag)
# output rows the ridge is chosen on: each row is its own problem on one Gram matrix, so an even sample
# of rows estimates the held-out error of all (and ViT-B's 768-row layers cost a sixth as much to choose)
CV_ROWS = 128


def _fit(t: _Target, source, dense, runs: list, damp: float | None, residual: bool = True, last: bool = False) -> tuple:
    """Accumulate the normal equations of ``t`` (pruned inputs read from ``source``) over ``runs`` (a
    dense and a pruned :class:`_Cursor` and the token mask, per calibration chunk) and solve; returns
    (new ``[out, in (+1)]`` weights, tokens, error before, error after, damp used).

    The target is the dense layer's output at the kept rows; with ``residual`` and a layer that writes
    straight into a residual ``add``, it is the dense *sum* at that add: the dense output plus what the
    skip input lost upstream (``skip_d - skip_p``), so the layer also makes up for earlier layers' errors.
    ``damp=None`` picks the ridge from :data:`DAMPS` by two-fold cross-validation over calibration chunks."""
    wd = _rows2d(get_attr(dense, t.weight).detach(), t.out_dim, t.conv)[t.rows]
    # the dense output is recomputed in at least float32 (the forward's own precision, half the cost of
    # float64); the Gram matrices, where the sums are long, are float64
    work = torch.promote_types(wd.dtype, torch.float32)
    wd = wd.to(work)
    bd = get_attr(dense, t.bias).detach().to(work)[t.rows] if t.bias and not t.new_bias else None
    w0 = _rows2d(get_attr(source, t.weight).detach(), t.out_dim, t.conv).to(torch.float64)
    if t.bias:
        w0 = torch.cat([w0, get_attr(source, t.bias).detach().to(torch.float64)[:, None]], 1)
    at = _pruned_node(source, t)
    skips = (skip_add(dense, t.node), skip_add(source, at)) if residual and not t.conv else (None, None)
    skips = None if None in skips else skips
    nodes_d = {x.name: x for x in dense.graph.nodes}
    nodes_p = {x.name: x for x in source.graph.nodes}
    layer_d, layer_p = nodes_d[t.node], nodes_p[at]
    folds = [Normal(), Normal()]
    # a linear whose only bias is the refitted one outputs the target itself: the dense forward, one node
    # further, has it, and the layer is not computed twice
    own = (not t.conv and layer_d.target in LINEAR_LAYERS and (shape(layer_d) or (0,))[-1] == get_attr(dense, t.weight).shape[t.out_dim]
           and (t.bias is not None or not make_layer(dense, layer_d).bias))
    for i, (run_d, run_p, mask) in enumerate(runs):
        env_d, env_p = run_d.before(layer_d), run_p.before(layer_p)
        xd = env_d[layer_input(layer_d)]
        xp = _tokens(env_p[layer_input(layer_p)], t.conv, mask)
        if own:
            y = _tokens(run_d.before(layer_d.next)[layer_d][..., t.rows], False, mask)
        else:   # a bias that is not refitted is the dense one at the kept rows: it cancels from the target
            y = torch.nn.functional.linear(_tokens(xd, t.conv, mask, work), wd, bd).to(torch.float64)
        if xp.shape[0] != y.shape[0]:      # token pruning changed the count: nothing to pair up
            raise AmgfxError(f"{t.node}: the pruned layer reads {xp.shape[0]} tokens, the dense one {y.shape[0]}; "
                             "fit a rewrite with options dead_tokens='off' (amgfx.reconstruct does)")
        if t.bias:                          # a ones column fits the bias with the weights
            xp = torch.cat([xp, torch.ones(xp.shape[0], 1, dtype=torch.float64)], 1)
        # the residual (the add's other operand) is computed before the layer in a block; if not, no correction
        skip_d, skip_p = (nodes_d[skips[0][1]], nodes_p[skips[1][1]]) if skips else (None, None)
        if skips and skip_d in env_d and skip_p in env_p:
            delta = _tokens(env_d[skip_d][..., t.rows], False, mask) - _tokens(env_p[skip_p], False, mask)
            if delta.shape == y.shape:
                y = y + delta
        folds[i % 2].add(xp, y)
        if last:           # no later layer resumes from here: hold one chunk's values at a time, not all of them
            run_d.restart()
            run_p.restart()
    for f in folds:                         # the union of every rank's data (nothing without a process group)
        f.reduce(w0.shape[1], w0.shape[0])
    if damp is None:
        damp = _cross_validated(folds, w0, bool(t.bias))
    whole = folds[0].merge(folds[1]) if folds[1].n else folds[0]
    w = whole.solve(w0, damp, bool(t.bias))
    before, after = whole.err(w0), whole.err(w)
    if not np.isfinite(after) or after > before:      # numerically worse than what the rewrite kept: keep that
        w, after = w0, before
    return w, whole.n, before, after, damp


def _cross_validated(folds: list, w0: torch.Tensor, bias: bool) -> float:
    """The ridge of :data:`DAMPS` with the least held-out error: fit on one fold, judge on the other, both ways
    (1.0 when one fold is empty)."""
    if not folds[1].n:
        return 1.0
    rows = torch.linspace(0, w0.shape[0] - 1, min(CV_ROWS, w0.shape[0])).round().long().unique()

    def held_out(d):
        return sum(b.err(a.solve(w0[rows], d, bias, rows), rows) * float(b.yy[rows].sum()) for a, b in (folds, folds[::-1]))
    return downhill(DAMPS, held_out)


def _pruned_node(pruned, t: _Target) -> str:
    found = [n.name for n in pruned.graph.nodes if is_layer(n) and make_layer(pruned, n).weight == t.weight]
    if len(found) != 1:
        raise AmgfxError(f"{t.weight}: found {len(found)} layers reading it in the pruned model, expected one")
    return found[0]


def _write(pruned, t: _Target, w: torch.Tensor) -> None:
    old = get_attr(pruned, t.weight)
    k = old.shape[1] if t.conv else old.shape[t.in_dim]
    new = w[:, :k].to(old.dtype)
    new = new.reshape(old.shape) if t.conv else new.movedim(0, t.out_dim)
    replace_attr(pruned, t.weight, new.contiguous().to(old.device), old)
    if t.bias:
        ob = get_attr(pruned, t.bias)
        replace_attr(pruned, t.bias, w[:, k].to(ob.dtype).to(ob.device).contiguous(), ob)


def refit_layers(pruned: fx.GraphModule, dense: fx.GraphModule, params: dict, calib, *, damp: float | None = None,
                 sequential: bool = True, residual: bool = True, add_bias: bool = False,
                 progress: bool = True, pruned_calib=None) -> list[LayerFit]:
    """Refit, in ``pruned`` (its tensors replaced, never written into), every layer whose input columns
    ``params`` (:attr:`Resolved.params`) removes, so that its output matches ``dense``'s on ``calib``;
    see the module docstring. ``sequential=False`` fits each layer on the inputs of the model as the
    rewrite left it (independently, as Kwon et al.'s mask tuning does), so errors compound.
    ``pruned_calib`` (one item per item of ``calib``) is what ``pruned`` reads instead, where the two differ:
    a block refitted on the outputs of the blocks before it as already pruned (:mod:`amgfx.stream`).
    """
    from tqdm.auto import tqdm

    todo = targets(dense, params, add_bias)
    for t in todo:
        if t.new_bias:
            attach_bias(pruned, t.weight, t.bias)
    source = pruned if sequential else copy_module(pruned)    # the copy keeps the rewrite's tensors
    theirs = chunks(dense, calib if pruned_calib is None else pruned_calib)
    runs = [(_Cursor(dense, state_inputs(dense, flat)), _Cursor(source, state_inputs(source, flat_p)), mask)
            for (flat, mask), (flat_p, _) in zip(chunks(dense, calib), theirs)]
    fits = []
    for t in tqdm(todo, desc="reconstructing", unit="layer", disable=not progress, leave=False):
        w, n, before, after, used = _fit(t, source, dense, runs, damp, residual, last=t is todo[-1])
        _write(pruned, t, w)
        if source is pruned:
            for _, run_p, _ in runs:
                run_p.refresh()
        w_dense = get_attr(dense, t.weight)
        fits.append(LayerFit(t.node, t.weight, (len(t.cols), w_dense.shape[1 if t.conv else t.in_dim]), n, before,
                             after, t.bias, used))
    return fits
