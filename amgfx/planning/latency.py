"""Latency model: a plan's milliseconds, from op times measured once on this machine and cached.

A captured graph runs its aten ops one after another, so its time is close to the sum of its
ops' times. Every op is timed in eager PyTorch on real tensors of the shapes it has (the captured
ones for the dense model; for a plan, the shapes :func:`amgfx.planning.cost.planned` gives from
the keep masks, so nothing is rewritten), and each time is stored on disk
(``$XDG_CACHE_HOME/amgfx/latency/``, one file per machine, torch release and thread count), so it
is measured once, not once per plan.

- **Ops that count FLOPs** (linears, matmuls, convolutions, attention): a width the plan narrows
  is snapped to the grid of sixteenths of its dense size and the time is interpolated between the
  grid points around it, multilinear over up to three narrowed sizes (a linear narrows two: its in
  and out features). A whole budget search then measures each op at a few grid shapes, not at
  every width it tries. These ops are timed cycling over copies of their arguments, so their
  weights come from memory as in a forward (from cache, narrowed linears timed up to 16% faster
  than they run).
- **The rest** (norms, adds, activations, data movement): their arguments hold the captured sizes
  (a reshape's target shape), so they cannot run at planned shapes; each is timed at its captured
  shape and scaled by the fraction of its output the plan keeps, never below the time of the
  cheapest op (a kernel launch costs that whatever the size).

The sum is a forecast for eager PyTorch. inductor and onnxruntime fuse the element-wise ops and
pick other GEMM kernels, so for them it ranks plans but does not forecast them;
:func:`amgfx.plan_for` with ``target_latency`` measures the plan in that runtime and corrects the
goal (see :func:`amgfx.api.plan_for`).

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    >>> times = OpTimes(path=None)                      # in memory only
    >>> t = predict_ms(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(96))}), times)
    >>> rows = predict_ms(cg, amgfx.Plan(keep={}), times)   # no unit pruned: the row edits alone
    >>> 0 < t["pruned"] < rows["pruned"]     # a narrowed op is never predicted above its dense time
    True

``rows`` is the graph's own row edits (here the last block computes only the class token's
query, so its fused qkv is split): on a 5-token toy they can cost more than they save, so the
example compares against them rather than against ``t["dense"]``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import time
import warnings

import torch
import torch.fx as fx

from ..errors import InternalError, RewriteError, foreign_errors
from ..graph.indexprop import shape, val
from .cost import attention_override, costly_nodes, node_specs, planned

__all__ = ["OpTimes", "predict_ms", "default_path"]

GRID = 16            # narrowed widths snap to sixteenths of the dense width
COLD_COPIES, COLD_BYTES = 8, 64 << 20   # FLOP-counting ops are timed cycling over this many argument copies
MAX_VARIABLES = 3    # more narrowed sizes than this in one op: measured at its exact shape
RECHECK, STALE = 3, 2.0   # the costliest ops re-timed once per graph; cached 2x slower than now: taken under load


def default_path() -> str:
    """The cache file of this machine, torch release and thread count."""
    key = "|".join([platform.machine(), platform.processor(), str(os.cpu_count()), torch.__version__,
                    str(torch.get_num_threads())])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "amgfx", "latency", f"ops-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json")


def _tensor(spec):
    shp, dtype, device = spec[1], spec[2], spec[3]
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shp, dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shp, dtype=dtype, device=device)
    return torch.zeros(shp, dtype=dtype, device=device)      # index tensors: 0 is always in range


def _real(spec):
    kind = spec[0]
    if kind == "T":
        return _tensor(spec)
    if kind == "L":
        items = [_real(x) for x in spec[2]]
        return tuple(items) if spec[1] == "tuple" else items
    return spec[1]


def _bytes(spec) -> int:
    """Bytes of the tensors an argument spec describes."""
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "T":
        return math.prod(spec[1]) * spec[2].itemsize
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "L":
        return sum(_bytes(x) for x in spec[2])
    if isinstance(spec, (tuple, list)):
        return sum(_bytes(x) for x in spec)
    return 0


def _clock(fn, runs: int = 5, least_s: float = 2e-3) -> float:
    """Median milliseconds of ``fn()``: at least ``runs`` runs and ``least_s`` seconds, after two warm-ups.

    The median, not the fastest run: on the 12 budgets of ``benchmarks.latency_budget``, run twice on
    one machine, predictions from the fastest runs missed the measured fraction by 0.053 on average,
    from the medians by 0.041. A reading inflated by another process is bounded where it is used
    (a narrowed op is never predicted above its dense time, :func:`predict_ms`).
    """
    fn()
    fn()
    ts: list = []
    while len(ts) < runs or (sum(ts) < least_s and len(ts) < 200):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


class OpTimes:
    """Measured milliseconds of aten ops at given argument specs, kept in a JSON file.

    ``path=None`` keeps them in memory only. :attr:`measured` counts the ops timed by this object
    (not read from the file), so a caller can see the cache at work.

    Example:
        >>> t = OpTimes(path=None)
        >>> spec = (("T", (64, 64), torch.float32, "cpu"), ("T", (64, 64), torch.float32, "cpu"))
        >>> ms = t.time(torch.ops.aten.mm.default, spec, ())
        >>> ms > 0, t.time(torch.ops.aten.mm.default, spec, ()) == ms, t.measured
        (True, True, 1)
    """

    def __init__(self, path: str | None = "default"):
        self.path = default_path() if path == "default" else path
        self.measured = 0
        self._dirty = False
        self._ms: dict = {}
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self._ms = json.load(f)
            except (OSError, ValueError):     # a torn or foreign file: measure again
                self._ms = {}

    def time(self, target, args_spec, kwargs_spec, cold: bool = False) -> float | None:
        """Milliseconds of one call, or None where the op cannot run on made-up tensors of these specs.

        ``cold``: the call cycles through several copies of its arguments (up to :data:`COLD_BYTES`
        in all), so its weights come from memory as they do in a forward, where each layer's weights
        are read once; repeating one call on one copy keeps them in cache and times narrowed linears
        relatively faster than a forward runs them."""
        key = f"{target}|{args_spec!r}|{kwargs_spec!r}" + ("|cold" if cold else "")
        if key not in self._ms:
            self._ms[key] = self.measure(target, args_spec, kwargs_spec, cold)
            self.measured += 1
            self._dirty = True
        return self._ms[key]

    def measure(self, target, args_spec, kwargs_spec, cold: bool = False) -> float | None:
        """Milliseconds of one call timed now, not cached (None where it cannot run); see :meth:`time`."""
        try:
            with torch.inference_mode():
                copies = max(1, min(COLD_COPIES, COLD_BYTES // max(1, _bytes(args_spec)))) if cold else 1
                sets = [([_real(s) for s in args_spec], {k: _real(s) for k, s in kwargs_spec}) for _ in range(copies)]
                turn = itertools.cycle(sets)

                def call():
                    args, kwargs = next(turn)
                    return target(*args, **kwargs)
                return _clock(call)
        except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
            return None

    def forget(self) -> None:
        """Drop every time held (and, at the next save, the file's): they are measured again as asked for."""
        self._ms, self._dirty = {}, True

    def floor(self) -> float:
        """The time of the cheapest op (an add of two scalars): what any kernel launch costs."""
        s = ("T", (), torch.float32, "cpu")
        return self.time(torch.ops.aten.add.Tensor, (s, s), ()) or 0.0

    def save(self) -> None:
        if not (self.path and self._dirty):
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._ms, f)
        os.replace(tmp, self.path)        # atomic: a parallel run reads the old file or the new one
        self._dirty = False


def _snap(dense: int, width: int) -> tuple[int, int]:
    """The grid points around ``width`` (equal when it is on the grid)."""
    step = max(1, -(-dense // GRID))
    lo = max(1, (width // step) * step)
    if lo == width:
        return lo, lo
    return lo, min(dense, lo + step)


def _swap(spec, dense_spec, corner: dict):
    """``spec`` with every size that differs from ``dense_spec`` replaced by ``corner[(dense, planned)]``."""
    if spec[0] == "T":
        return ("T", tuple(corner.get((d, s), s) if d != s else s for s, d in zip(spec[1], dense_spec[1])),
                spec[2], spec[3])
    if spec[0] == "L":
        return ("L", spec[1], tuple(_swap(a, b, corner) for a, b in zip(spec[2], dense_spec[2])))
    return spec


def _narrowed(spec, dense_spec, out: set) -> None:
    if spec[0] == "T" and len(spec[1]) == len(dense_spec[1]):
        out.update((d, s) for s, d in zip(spec[1], dense_spec[1]) if d != s)
    elif spec[0] == "L" and len(spec[2]) == len(dense_spec[2]):
        for a, b in zip(spec[2], dense_spec[2]):
            _narrowed(a, b, out)


def _interpolated(times: OpTimes, n: fx.Node, spec, dense_spec) -> float | None:
    """Time of a FLOP-counting op at planned ``spec``: multilinear between grid shapes around it."""
    sizes: set = set()
    for a, b in zip(spec[0], dense_spec[0]):
        _narrowed(a, b, sizes)
    for (_, a), (_, b) in zip(spec[1], dense_spec[1]):
        _narrowed(a, b, sizes)
    sizes = sorted(sizes)
    if not sizes or len(sizes) > MAX_VARIABLES:
        return times.time(n.target, *spec, cold=True)
    grid = [_snap(d, s) for d, s in sizes]
    total = 0.0
    for pick in itertools.product((0, 1), repeat=len(sizes)):
        w, corner = 1.0, {}
        for (d, s), (lo, hi), p in zip(sizes, grid, pick):
            x = 0.0 if hi == lo else (s - lo) / (hi - lo)
            w *= x if p else 1.0 - x
            corner[(d, s)] = hi if p else lo
        if w == 0.0:
            continue
        args = tuple(_swap(a, b, corner) for a, b in zip(spec[0], dense_spec[0]))
        kwargs = tuple((k, _swap(a, b, corner)) for (k, a), (_, b) in zip(spec[1], dense_spec[1]))
        t = times.time(n.target, args, kwargs, cold=True)
        if t is None:
            return None
        total += w * t
    return total


def _timed(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and not n.name.startswith("_guards")]


def _numel(s) -> int:
    return math.prod(s) if s is not None else 1


def _dense_ms(times: OpTimes, n: fx.Node, cold: bool) -> float:
    return times.time(n.target, *node_specs(n, shape, {}), cold=cold) or 0.0


def _stale(times: OpTimes, gm: fx.GraphModule, dense: dict, heavy: set) -> bool:
    """Whether ``times`` holds this graph's op times from a busier moment: its :data:`RECHECK` costliest ops,
    timed again now, run :data:`STALE` x faster (median) than cached. A run beside other work (two processes
    sharing two cores, an onnxruntime session's spinning threads) times ops up to 12x slow, and a cached time
    is never measured again: MiniLM's dense forward was predicted at 957 ms against the 79 it runs in."""
    nodes = {n.name: n for n in _timed(gm)}
    top = sorted((n for n in dense if dense[n] and n in nodes), key=dense.get, reverse=True)[:RECHECK]
    ratios = []
    for name in top:
        now = times.measure(nodes[name].target, *node_specs(nodes[name], shape, {}), cold=nodes[name] in heavy)
        if now:
            ratios.append(dense[name] / now)
    if not ratios or statistics.median(ratios) <= STALE:
        return False
    warnings.warn(f"the cached op times of this machine ({times.path or 'in memory'}) were taken under load: the "
                  f"costliest ops of this graph run {statistics.median(ratios):.1f}x faster now; measuring again",
                  stacklevel=4)
    return True


def predict_ms(cg, plan, times: OpTimes | None = None, *, per_node: bool = False) -> dict:
    """Milliseconds of one forward at the example inputs, dense and after ``plan`` (eager PyTorch).

    Returns ``{"dense": ms, "pruned": ms}`` (and ``"nodes"``: ``{"dense": {node: ms}, "pruned": {...}}``
    with ``per_node``). ``times`` defaults to this machine's cache file, which is written back.
    """
    times = times if times is not None else OpTimes()
    with foreign_errors(InternalError, "latency prediction"):
        out = _predict_ms(cg, plan, times, per_node)
    times.save()
    return out


def _predict_ms(cg, plan, times: OpTimes, per_node: bool) -> dict:
    cached = cg.dense_ms                               # the budget asks again and again
    if cached is None or cached[0] is not times:
        heavy = set(costly_nodes(cg.gm))
        dense = lambda: {n.name: _dense_ms(times, n, n in heavy) for n in _timed(cg.gm)}
        cached_any = bool(times._ms)         # an empty cache is measured now: nothing to check it against
        first = dense()
        if cached_any and _stale(times, cg.gm, first, heavy):   # once per graph and cache: loaded times taken again
            times.forget()
            first = dense()
        cached = cg.dense_ms = (times, first)
    floor = times.floor()
    dense = cached[1]
    r, gm, ms = planned(cg, plan)
    costly = set(costly_nodes(gm))
    pruned = {}
    for n in _timed(gm):
        base = dense.get(n.name)
        if base is None:                        # a gather the row passes inserted: timed as it is captured
            base = _dense_ms(times, n, n in costly)
        try:
            new = ms.new_shape(n) if isinstance(val(n), torch.Tensor) else None
        except RewriteError:                    # an unpacked intermediate of an unsplit fused qkv
            new = shape(n)
        if n in costly:
            t = _interpolated(times, n, node_specs(n, ms.new_shape, attention_override(n, r, ms)), node_specs(n, shape, {}))
            # an op on narrower operands timed slower than the dense one was timed while the machine was busy
            pruned[n.name] = min(base, t) if t is not None else base * _numel(new) / max(1, _numel(shape(n)))
        else:
            frac = _numel(new) / max(1, _numel(shape(n))) if isinstance(val(n), torch.Tensor) else 1.0
            pruned[n.name] = max(min(floor, base), base * frac)
    out = {"dense": sum(dense.values()), "pruned": sum(pruned.values())}
    if per_node:
        out["nodes"] = {"dense": dense, "pruned": pruned}
    return out
