"""``torch.compile(model, backend="amgfx", options={...})``: prune inside the compiler, then compile.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject.toml), so
installing amgfx is enough: nothing calls ``register_backend``, which would collide with it.

Dynamo hands the backend a torch-level graph whose parameters are placeholders. The backend
turns each parameter placeholder back into a ``get_attr`` at its FQN (so plan group names are
the ones ``amgfx.prune`` uses), captures that to ATen, applies the plan's passes and hands the
pruned graph to the inner compiler. Unpruned weights are shared with the model, not copied; the
compiled function ignores the dense parameters dynamo passes in.

Options:
    plan:         a :class:`amgfx.Plan` or a path to its JSON: deterministic, no calibration.
    target_flops: fraction of dense FLOPs to keep (with ``method``, ``calib`` and any other
                  :class:`amgfx.PlanConfig` field such as ``round_to``); the plan is made once
                  and replayed on recompiles. The backend runs the prune sequence every entry
                  point runs (:func:`amgfx.sequence.run`).
    reconstruct:  refit the kept weights to the dense model on ``calib`` (:func:`amgfx.reconstruct`);
                  default True when ``calib`` is given, ``False`` turns it off.
    inner:        ``"inductor"`` (default) or ``"eager"``: what compiles the pruned graph.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(384))})
    >>> fast = torch.compile(m, backend="amgfx", options={"plan": plan, "inner": "eager"}, fullgraph=True)
    >>> bool(torch.allclose(fast(x), amgfx.prune(m, x, plan=plan)(x), atol=1e-5))
    True
"""
from __future__ import annotations

import re
import weakref

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import AmgfxError

__all__ = ["amgfx_backend", "BackendError"]

# the fields of amgfx.PlanConfig (a test holds the two equal; spelt out so listing backends imports nothing)
PLANNING = ("method", "candidates", "target_flops", "target_latency", "ratios", "tokens", "kinds", "round_to", "min_keep", "protect",
            "same_head_dim", "blocks", "scope", "allocation", "rank", "runtime", "measure_latency", "seed", "score_batches",
            "massive")
KNOWN = {"plan", "inner", "reconstruct", "calib", "loss_fn", "progress"} | set(PLANNING)
INNER = ("inductor", "eager")     # the names of planning.options.RUNTIMES that run a torch graph (a test holds it)
_ATTR = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")

# pruned weights by (source storage, FQN, kept shape): a recompile (new shapes) reuses them
_PRUNED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
# plans made from target_flops, by the options' identity and the model's fingerprint
_PLANS: dict = {}


class BackendError(AmgfxError):
    """torch.compile handed amgfx something it cannot prune (a graph break, unknown options)."""


def _source(node: fx.Node) -> str:
    """Where dynamo read a placeholder from, e.g. ``L['x']`` or ``L['self']._modules['head']...``."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(src, "name", "") if src is not None else ""
    return name() if callable(name) else name


def _fqn(node: fx.Node) -> str | None:
    """``L['self']._modules['blocks']._modules['0']._parameters['weight']`` -> ``blocks.0.weight``."""
    name = _source(node)
    rest = name[len("L['self']"):] if name.startswith("L['self']") else ""
    parts = _ATTR.findall(rest)
    return ".".join(parts) if parts and _ATTR.sub("", rest) == "" else None


def _size_source(node: fx.Node, inputs: dict):
    """A SymInt placeholder that is ``x.size()[i]`` of a graph input: (input node, i), else None."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    base, idx = getattr(src, "base", None), getattr(src, "idx", None)
    if base is None or idx is None or "SIZE" not in str(getattr(src, "prop", None)):
        return None
    name = base.name() if callable(base.name) else base.name
    return (inputs[name], idx) if name in inputs else None


def lift_params(gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, list[int]]:
    """A GraphModule whose parameter placeholders are ``get_attr`` nodes at their FQNs (sharing the
    tensors), and the positions of the inputs it still takes.

    SymInt inputs that are sizes of tensor inputs are recomputed inside, so the graph takes
    tensors only and can be captured with a dynamic batch.
    """
    from .graph.fx import set_attr  # the pipeline loads at the first compile, not when torch lists backends
    root = nn.Module()
    graph = fx.Graph()
    env: dict = {}
    keep: list[int] = []
    names: dict = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, ex in zip(placeholders, example_inputs):          # parameters and buffers first: get_attr
        fqn = _fqn(n) if isinstance(ex, torch.Tensor) else None
        if fqn is not None:
            set_attr(root, fqn, ex)
            env[n] = graph.get_attr(fqn)
    for i, (n, ex) in enumerate(zip(placeholders, example_inputs)):   # then the user's tensors
        if n in env or not isinstance(ex, torch.Tensor):
            continue
        env[n] = graph.placeholder(n.name)
        env[n].meta.update(n.meta)
        names[_source(n)] = env[n]
        keep.append(i)
    for i, (n, ex) in enumerate(zip(placeholders, example_inputs)):
        if n in env:
            continue
        where = _size_source(n, names)
        if where is None:
            raise BackendError(f"graph input {n.name} ({type(ex).__name__}) is neither a parameter nor a tensor size; "
                               "amgfx cannot prune this graph")
        with graph.inserting_after(where[0]):    # Dynamo hands sizes as inputs: read them off the tensors
            env[n] = graph.call_function(torch.ops.aten.sym_size.int, (where[0], where[1]))
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    out = fx.GraphModule(root, graph)
    return out, keep


def _options(options: dict | None) -> dict:
    opts = dict(options or {})
    unknown = set(opts) - KNOWN
    if unknown:
        raise BackendError(f"unknown amgfx option(s) {sorted(unknown)}; use {', '.join(sorted(KNOWN))}")
    if "plan" in opts and "target_flops" in opts:
        raise BackendError("give options plan= or target_flops=, not both")
    if "plan" not in opts and "target_flops" not in opts and "ratios" not in opts:
        raise BackendError("say what to prune: options={'plan': plan_or_json_path} or {'target_flops': 0.5, ...}")
    if opts.get("inner", "inductor") not in INNER:
        raise BackendError(f"inner must be one of {', '.join(INNER)} (the runtimes a compile backend hands a graph "
                           f"to), got {opts['inner']!r}")
    return opts


def _check_whole(gm: fx.GraphModule) -> None:
    """A graph break would prune each fragment on its own: refuse, and say where it broke."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    stack = getattr(reason, "user_stack", None) or []
    resumed = any(f.name.startswith("torch_dynamo_resume_in_") for f in stack)
    if (reason is not None and reason.graph_break) or resumed:
        where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
        why = f" ({str(reason.reason).splitlines()[0][:160]})" if reason is not None and reason.graph_break else ""
        raise BackendError(f"torch.compile split the model at a graph break{where}{why}; amgfx must see the whole "
                           "model to prune it: compile with fullgraph=True and remove the break, or prune first with "
                           "amgfx.prune() and compile the result")


def _given_plan(opts: dict):
    p = opts.get("plan")
    if p is None or not (isinstance(p, (str, bytes)) or hasattr(p, "__fspath__")):
        return p
    from .planning.plan import Plan  # the pipeline loads at the first compile, not when torch lists backends
    return Plan.load(p)


def _prune(cg, opts: dict):
    """The prune sequence on the captured graph, its plan made once per model and options (recompiles replay it);
    unpruned weights stay shared with the model."""
    from .analysis.captured import Captured  # the pipeline loads at the first compile, not when torch lists backends
    from .planning.config import PlanConfig
    from .planning.plan import fingerprint
    from .sequence import run
    plan = _given_plan(opts)
    key = (fingerprint(cg.gm), repr(sorted((k, repr(v)) for k, v in opts.items() if k != "calib")), id(opts.get("calib")))
    if plan is None and key in _PLANS:
        plan = _PLANS[key]
    config = PlanConfig(**{k: v for k, v in opts.items() if k in PLANNING}) if plan is None else None
    out = run(Captured((cg,)), config, calib=opts.get("calib"), loss_fn=opts.get("loss_fn"), plan=plan,
              reconstruct=opts.get("reconstruct"), share=True, progress=bool(opts.get("progress", False)))
    if "plan" not in opts and key not in _PLANS:
        _PLANS.clear()           # one model at a time: calibration data is not kept alive
        _PLANS[key] = out.plan
    return out.model


def _share_pruned(pruned: fx.GraphModule, dense: fx.GraphModule) -> None:
    """Reuse the pruned weights an earlier compile of the same model made (recompiles on new shapes)."""
    from .graph.fx import get_attr, replace_attr  # the pipeline loads at the first compile, not when torch lists backen
    ptr = {n: t.untyped_storage().data_ptr() for n, t in list(dense.named_parameters()) + list(dense.named_buffers())}
    model = hash(tuple(sorted(ptr.items())))     # the dense weights identify the model
    for fqn, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        if fqn in ptr and t.untyped_storage().data_ptr() == ptr[fqn]:
            continue                             # shared with the model already
        key = (model, fqn, tuple(t.shape), t.dtype)
        old = _PRUNED.get(key)
        if old is not None and torch.equal(old, t):
            replace_attr(pruned, fqn, old.data if isinstance(old, nn.Parameter) else old, t)
            # the entry must live as long as *this* graph uses the storage, not as long as the first one
            _PRUNED[key] = get_attr(pruned, fqn)
        else:
            _PRUNED[key] = t


def amgfx_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """The torch.compile backend (see the module docstring)."""
    from .api import analyze  # the pipeline loads at the first compile, not when torch lists backends
    from .graph.capture import capture
    from .graph.fx import drop_export_guards
    opts = _options(options)
    _check_whole(gm)
    lifted, keep = lift_params(gm, example_inputs)
    user = [example_inputs[i] for i in keep]
    dynamic = any(isinstance(x, torch.SymInt) or (not isinstance(x, torch.Tensor)) for x in example_inputs)
    with torch._guards.tracing(None):    # export in its own fake mode, not in dynamo's shape env
        captured = capture(lifted, tuple(user), dynamic_batch=dynamic)
    pruned = _prune(analyze(captured), opts)      # checked against the oracle: never compile a wrong model
    _share_pruned(pruned, captured)
    drop_export_guards(pruned)      # dynamo guards the inputs; inductor cannot cache-key the check's closure
    if opts.get("inner", "inductor") == "inductor":
        from torch._inductor.compile_fx import compile_fx
        inner = compile_fx(pruned, list(user))
    else:
        inner = pruned

    def run(*args):
        return inner(*[args[i] for i in keep])

    run.pruned = pruned            # for inspection: the GraphModule that was compiled
    return run
