"""Capture a model into an ATen-level ``torch.fx.GraphModule`` with shapes on every node."""
from __future__ import annotations

import contextlib
import io
import logging
import traceback
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import CaptureError, foreign_errors
from .canonical import spell_out_shape_of
from .fold import fold_batch_norms
from .fx import nonfinite, on_meta, refresh_meta
from .meta import CAPTURED, DIMS, DYNAMIC_BATCH, EXAMPLE
from .mutation import own_written_state, refuse_stateful_outputs
from .ops import register_library_layers

__all__ = ["capture", "as_args"]


def as_args(example_inputs) -> tuple:
    """Normalise example inputs to a tuple (a lone tensor or dict becomes a 1-tuple)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """HF decoders return a KV cache object that torch.export refuses: switch it off meanwhile.

    Done through the config rather than a ``use_cache=`` kwarg, so the captured module keeps
    the user's calling convention; the config is restored afterwards.
    """
    cfg = getattr(model, "config", None)
    had = cfg is not None and hasattr(cfg, "use_cache")
    old = cfg.use_cache if had else None
    if had:
        cfg.use_cache = False
    try:
        yield
    finally:
        if had:
            cfg.use_cache = old


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Capture in eval mode (no dropout/batch-stat ops) and restore every flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def _quiet_torch_logs():
    # A failing export logs (and prints to stderr) whole graphs; CaptureError says it in one line.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _module_tracker(model: nn.Module):
    """Record which submodule is running, so a capture failure can name it.

    Uses the *global* forward hooks, so nothing is registered on the user's model.
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    seen: list[str] = []

    def pre(mod, _args):
        name = names.get(id(mod))
        if name is not None:
            stack.append(name or type(mod).__name__)
            seen.append(stack[-1])

    def post(mod, _args, _out):
        if names.get(id(mod)) is not None and stack:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield stack
    finally:
        h1.remove()
        h2.remove()


def _describe_failure(model: nn.Module, exc: BaseException, stack: list[str]) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    where = ""
    if stack:
        mod = dict(model.named_modules()).get(stack[-1])
        where = f" in module '{stack[-1]}'" + (f" ({type(mod).__name__})" if mod is not None else "")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages/torch" not in f.filename]
    line = f" at {frames[-1].filename}:{frames[-1].lineno} `{(frames[-1].line or '').strip()}`" if frames else ""
    return (f"cannot capture {type(model).__name__}{where}{line}: {type(exc).__name__}: {first}\n"
            "Try: check that the example inputs match what forward() expects; remove data-dependent "
            "Python control flow on tensor values; or capture a submodule (e.g. the encoder) instead.")


def _check_example(args: tuple, kwargs: dict) -> None:
    """NaN in the example inputs is refused here, as the example's (every later check would blame the
    calibration data, which defaults to the example)."""
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]
    for name, value in named:
        for t in pytree.tree_leaves(value):
            if nonfinite(t, inf=False):
                raise CaptureError(f"the example inputs: {name} contains NaN; give finite example values "
                                   "(only their shapes and dtypes shape the graph)")


def _batch_spec(model: nn.Module, args: tuple, kwargs: dict):
    """Example inputs of batch >= 2 and a ``dynamic_shapes`` spec marking dim 0 of every tensor input
    as one shared ``batch`` dim, or None when the inputs disagree on their leading size.

    A batch of 1 is repeated to 2 for tracing only: export specialises sizes 0 and 1.
    """
    import inspect
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] for t in leaves if t.dim()}
    if len(sizes) != 1 or any(t.dim() == 0 for t in leaves):
        return None
    # new tensor objects either way: export marks its inputs dynamic, and those must not be the user's
    grow = (lambda t: t.repeat(2, *[1] * (t.dim() - 1))) if sizes == {1} else (lambda t: t.detach())
    args, kwargs = pytree.tree_map_only(torch.Tensor, grow, (args, kwargs))
    batch = torch.export.Dim("batch", min=1)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    spec = {name: pytree.tree_map_only(torch.Tensor, lambda t: {0: batch}, v) for name, v in bound.arguments.items()}
    return args, kwargs, spec


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool, describe):
    """``torch.export`` with a dynamic batch dim when it can be had, else with static shapes.

    Export raises many exception types; :func:`~amgfx.errors.foreign_errors` turns each into one
    :class:`CaptureError` (``describe`` names the module that was running)."""
    spec = _batch_spec(model, args, kwargs) if dynamic_batch else None
    if spec is not None:
        try:
            with foreign_errors(CaptureError, describe=describe):
                return torch.export.export(model, spec[0], spec[1], dynamic_shapes=spec[2], strict=False), True
        except CaptureError:  # the model fixes its batch somewhere: capture it static instead
            pass
    with foreign_errors(CaptureError, describe=describe):
        return torch.export.export(model, args, kwargs, strict=False), False


def _record_dims(gm: fx.GraphModule) -> None:
    """Note which output dims of every node are symbolic (see :func:`amgfx.graph.fx.dims_of`)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            dims = tuple(None if isinstance(s, int) or s.node.expr.is_number else str(s.node.expr) for s in v.shape)
            if any(dims):
                n.meta[DIMS] = dims


def capture(model: nn.Module, example_inputs=None, example_kwargs: dict | None = None, *,
            dynamic_batch: bool = True) -> fx.GraphModule:
    """Capture ``model`` into an ATen-level GraphModule via non-strict ``torch.export``.

    Parameters and buffers appear as ``get_attr`` nodes named by their FQN, and every node
    carries its shape in ``node.meta["val"]``. The user's model is left untouched: its
    parameters, buffers and ``training`` flags are bitwise the same afterwards, and a buffer that
    forward() writes is copied into the graph, so running the graph never moves the user's. A model
    whose output depends on such state (two calls on one input differ) is refused here, naming it.

    With ``dynamic_batch`` (the default) dim 0 of every input is captured symbolic, so the
    pruned graph runs, exports and lowers to ONNX at any batch size;
    ``gm.meta["amgfx_dynamic_batch"]`` says whether that worked (a model that fixes its batch
    is captured static instead).

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> gm = amgfx.capture(m, torch.randn(1, 3, 32, 32))
        >>> sum(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
        2
    """
    if isinstance(model, fx.GraphModule) and model.meta.get(CAPTURED):
        return model
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    _check_example(args, kwargs)
    if on_meta(model):    # shapes only (a model too big to load): its example goes there too, as export records it
        args, kwargs = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
    with _eval_mode(model), _no_kv_cache(model), _module_tracker(model) as stack, _quiet_torch_logs(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep, dynamic = _export(model, args, kwargs, dynamic_batch, lambda exc: _describe_failure(model, exc, stack))
    gm = ep.module()
    written = own_written_state(gm)     # a buffer forward() updates: the graph's own copy, never the user's
    register_library_layers()     # ops a library registered while the model ran (MoE grouped matmuls)
    missing = [n.name for n in gm.graph.nodes
               if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and "val" not in n.meta]
    if missing:
        raise CaptureError(f"captured graph lacks shapes on nodes {missing[:5]}; this torch version is unsupported")
    spell_out_shape_of(gm)    # x.reshape_as(y) as a reshape to y's sizes (see amgfx.graph.canonical)
    fold_batch_norms(gm)      # eval batch norms after a layer become part of it (see amgfx.graph.fold)
    gm.meta[EXAMPLE] = (args, kwargs)
    refuse_stateful_outputs(gm, written, args, kwargs)
    if dynamic:
        _record_dims(gm)
        refresh_meta(gm)      # shapes at the user's own example (export may have traced a batch of 2)
    gm.meta[CAPTURED] = True
    gm.meta[DYNAMIC_BATCH] = dynamic
    return gm
