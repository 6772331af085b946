"""Where a pruned graph runs besides eager PyTorch: torch.export programs, ONNX and onnxruntime
sessions, and a runner per runtime for side-by-side timing (latency budgets, benchmarks).

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> small = amgfx.prune(m, x, method="magnitude", ratios={"mlp": 0.5})
    >>> r = paired(runner(small, "eager"), runner(small, "ort"), (x,), {}, runs=2)
    >>> sorted(r)
    ['dense_ms', 'pruned_ms', 'ratio']
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import AmgfxError, foreign_errors
from .graph.capture import _batch_spec, _quiet_torch_logs
from .graph.fx import copy_module
from .graph.meta import DYNAMIC_BATCH, EXAMPLE, PLAN
from .passes.lower_attention import is_lowered, unlower
from .passes.state_writes import as_scatter
from .planning.options import RUNTIMES

__all__ = ["export_program", "export_onnx", "ort_session", "OrtProgram", "onnx_parity", "runner", "register_runtime", "interleaved",
           "paired", "RUNTIMES"]


def export_program(gm: fx.GraphModule):
    """torch.export of a pruned GraphModule at its example inputs, batch dynamic when captured so."""
    args, kwargs = gm.meta[EXAMPLE]
    spec = _batch_spec(gm, args, kwargs) if gm.meta.get(DYNAMIC_BATCH) else None
    if spec is not None:
        return torch.export.export(gm, spec[0], spec[1], dynamic_shapes=spec[2], strict=False)
    return torch.export.export(gm, args, kwargs, strict=False)



def _for_onnx(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph to hand the ONNX exporter: without the q/k (or v) zero-padding ``lower_attention``
    adds for PyTorch's CPU flash kernel (``lowering="auto"``). onnxruntime's Attention takes unequal
    head dims, and ran 4-5% faster without the padding on MiniLM and DeiT-S at 50% FLOPs, batch 8.
    A decoder's cache writes become ``scatter`` (:func:`amgfx.passes.state_writes.as_scatter`): one
    ``ScatterElements`` each, which :class:`OrtProgram` runs in place."""
    plan = gm.meta.get(PLAN)
    if is_lowered(gm) and plan is not None and plan.options.get("lowering", "auto") == "auto":
        gm = unlower(copy_module(gm))
    return as_scatter(gm)


def export_onnx(program_or_gm, path, *, opset: int = 23) -> str:
    """Export a pruned GraphModule (or an ExportedProgram) to ONNX at ``opset``, batch dynamic.

    A pruned :class:`amgfx.Decoder` goes to the directory ``path`` as ``prefill.onnx`` and ``decode.onnx``
    (static shapes, as captured), which ``amgfx.load(path, runtime="ort")`` runs.

    With ``lowering="auto"`` (the default), q/k padding that only serves PyTorch's CPU attention
    kernel is left out of the ONNX graph (:func:`_for_onnx`).

    The directory of ``path`` must exist (nothing is created behind the user's back).
    """
    path = os.fspath(path)
    if hasattr(program_or_gm, "cache_shapes") and hasattr(program_or_gm, "decode"):   # an amgfx.Decoder
        if not os.path.isdir(path):
            raise AmgfxError(f"a decoder exports to a directory (prefill.onnx, decode.onnx); {path} is not one")
        for k in ("prefill", "decode"):
            export_onnx(getattr(program_or_gm, k), os.path.join(path, f"{k}.onnx"), opset=opset)
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise AmgfxError(f"cannot write {path}: directory {parent} does not exist")
    ep = program_or_gm if isinstance(program_or_gm, torch.export.ExportedProgram) else \
        program_or_gm.meta.get("amgfx_program") or export_program(_for_onnx(program_or_gm))
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
        warnings.simplefilter("ignore")       # the exporter reports every optimisation step it tries
        with foreign_errors(AmgfxError, "ONNX export"):
            torch.onnx.export(ep, (), path, dynamo=True, opset_version=opset, external_data=False, verbose=False)
    return path


def ort_session(path, *, threads: int | None = None, profile: bool = False, spinning: bool = True):
    """An onnxruntime session tuned for inference: all graph optimisations, one intra-op thread per
    available core, sequential execution, CUDA when present. ``spinning=False`` stops idle worker
    threads from busy-waiting, which would steal cores from whatever runs next (side-by-side timing).

    Example:
        >>> import tempfile, os, torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> small = amgfx.prune(m, torch.randn(1, 3, 32, 32), method="magnitude", ratios={"mlp": 0.5})
        >>> p = amgfx.export_onnx(small, os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> s = amgfx.ort_session(p)
        >>> s.run(None, {s.get_inputs()[0].name: torch.randn(4, 3, 32, 32).numpy()})[0].shape
        (4, 1000)
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    so.intra_op_num_threads = threads or cores
    so.inter_op_num_threads = 1
    so.enable_profiling = profile
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(os.fspath(path), so, providers=providers)


_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
          "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def _written_in_place(path) -> dict:
    """``{output index: input index}`` for outputs a ``ScatterElements`` writes from a graph input that
    nothing else reads: bound to that input's buffer, onnxruntime writes only the new slots."""
    import onnx
    g = onnx.load(os.fspath(path)).graph
    readers = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    inputs = {x.name: i for i, x in enumerate(g.input)}
    out = {}
    for j, o in enumerate(g.output):
        n = producer.get(o.name)
        if n is not None and n.op_type == "ScatterElements" and n.input[0] in inputs and \
                len(readers[n.input[0]]) == 1 and o.name not in {x.name for x in g.output[:j]}:
            out[j] = inputs[n.input[0]]
    return out


class OrtProgram:
    """An onnxruntime session called like the graph it was exported from: tensors in, tensors out.

    Tensors are bound by pointer (IO binding): no copy in, outputs written where they are returned, and a
    tensor bound at the last call is not bound again, so a decode step's per-token work does not grow with
    the cache. ``donate=True`` lets outputs that a ``ScatterElements`` writes from an input (a decoder's
    cache, :func:`amgfx.passes.state_writes.as_scatter`) land in that input's buffer: the given tensor is
    updated and returned, and the cache is not copied per token. :func:`amgfx.generate` donates the
    cache it made; a plain call never writes its inputs.
    """

    def __init__(self, path):
        # prefill and decode alternate, every token: a worker spinning idle in one would steal the cores
        # the other is about to run on
        self.session = ort_session(path, spinning=False)
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, o.shape, _TORCH.get(o.type)) for o in self.session.get_outputs()]
        self.static = all(d is not None and all(isinstance(s, int) for s in shape) for _, shape, d in self.outputs)
        self.in_place = _written_in_place(path) if self.static else {}
        self.io = self.session.io_binding()
        self.bound = {}                   # name -> the tensor bound there (kept alive while bound)

    def _bind(self, name, t, output=False):
        bind = self.io.bind_output if output else self.io.bind_input
        bind(name, "cpu", 0, t.numpy().dtype, list(t.shape), t.data_ptr())
        self.bound[name] = t

    def __call__(self, *args, donate: bool = False):
        if not self.static:               # shapes only known after the run: let onnxruntime allocate
            feed = {n: t.detach().cpu().numpy() for n, t in zip(self.names, args)}
            return [torch.from_numpy(a) for a in self.session.run(None, feed)]
        bound = self.bound
        # one identity test per tensor: a cache passed back unchanged costs no binding call
        for n, t in zip(self.names, args):
            if bound.get(n) is not t:
                self._bind(n, t if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad else
                           t.detach().cpu().contiguous())
        outs = []
        for j, (name, shape, dtype) in enumerate(self.outputs):
            i = self.in_place.get(j) if donate else None
            t = bound[self.names[i]] if i is not None else torch.empty(shape, dtype=dtype)
            if bound.get(name) is not t:
                self._bind(name, t, output=True)
            outs.append(t)
        self.session.run_with_iobinding(self.io)
        return outs


def onnx_parity(onnx_path, gm, args=(), kwargs=None) -> float:
    """Largest error of onnxruntime against ``gm(*args, **kwargs)``, relative to the largest output magnitude."""
    sess = ort_session(onnx_path)
    leaves = [t for t in pytree.tree_leaves((tuple(args), dict(kwargs or {}))) if isinstance(t, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(leaves):
        raise AmgfxError(f"the ONNX model takes {len(names)} inputs, the torch model {len(leaves)}")
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, leaves)})
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(gm(*args, **(kwargs or {}))) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise AmgfxError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    err = 0.0
    for a, b in zip(got, want):
        b = b.numpy()
        err = max(err, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    return err


def runner(gm, runtime: str, workdir: str | None = None):
    """``f(args, kwargs)`` running ``gm`` in ``runtime``: eager PyTorch, ``torch.compile`` (inductor, static
    shapes, compiled at the first call) or onnxruntime (exported to ``workdir``, a temporary folder by default)."""
    if runtime not in RUNNERS:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return RUNNERS[runtime](gm, workdir)


def _eager(gm, workdir):
    return lambda a, kw: gm(*a, **kw)


def _inductor(gm, workdir):
    c = torch.compile(gm, dynamic=False)
    return lambda a, kw: c(*a, **kw)


def _ort(gm, workdir):
    import tempfile
    d = workdir or tempfile.mkdtemp(prefix="amgfx-latency-")
    sess = ort_session(export_onnx(gm, os.path.join(d, f"m{len(os.listdir(d))}.onnx")), spinning=False)
    names = [i.name for i in sess.get_inputs()]
    return lambda a, kw: sess.run(None, {n: t.numpy() for n, t in zip(
        names, [t for t in pytree.tree_leaves((tuple(a), dict(kw))) if isinstance(t, torch.Tensor)])})


RUNNERS = {"eager": _eager, "inductor": _inductor, "ort": _ort}    # one per name of RUNTIMES (a test holds it)


def register_runtime(name: str, description: str, run) -> None:
    """Make ``name`` a runtime: ``run(gm, workdir) -> f(args, kwargs)`` runs a static-shape GraphModule there.
    Latency budgets (``target_latency=..., runtime=name``) and :func:`runner` then take it (one registration,
    both tables: the runners here and the names in :data:`amgfx.planning.options.RUNTIMES`)."""
    if not name.isidentifier():
        raise AmgfxError(f"a runtime's name is an identifier, got {name!r}")
    RUNNERS[name] = run
    RUNTIMES[name] = description


def interleaved(fns: dict, args, kwargs, *, runs: int = 20, block: int = 3, warm: int = 2) -> dict:
    """``{name: [seconds per round]}`` for callables ``f(args, kwargs)``, timed in interleaved rounds.

    After ``warm`` untimed rounds, each round runs every callable ``block`` times in a row and keeps
    the median: a deployed model runs back to back, and the first run after another model's is
    slower (onnxruntime's spinning threads, caches). Rounds pair the callables in time, so a ratio
    per round cancels the machine's drift.
    """
    t = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warm):
            for f in fns.values():
                f(args, kwargs)
        for _ in range(runs):
            for k, f in fns.items():
                ts = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    f(args, kwargs)
                    ts.append(time.perf_counter() - t0)
                t[k].append(statistics.median(ts))
    return t


def paired(dense, pruned, args, kwargs, *, runs: int = 20, block: int = 3) -> dict:
    """Median milliseconds of two ``f(args, kwargs)`` and the median over rounds of pruned / dense time
    (:func:`interleaved` rounds)."""
    t = interleaved({"dense": dense, "pruned": pruned}, args, kwargs, runs=runs, block=block)
    return {"dense_ms": 1e3 * statistics.median(t["dense"]), "pruned_ms": 1e3 * statistics.median(t["pruned"]),
            "ratio": statistics.median([p / d for p, d in zip(t["pruned"], t["dense"])])}
