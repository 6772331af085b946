"""Streaming: prune a Hugging Face model directory one block at a time, never holding all of its weights.

The whole-model sequence (:mod:`amgfx.sequence`) captures a model with its weights and calibrates it at
once. Here the model is built and captured on the meta device (shapes only), the graph is cut into
segments where only the residual stream is live (:mod:`amgfx.graph.segments`: found in the graph, so
any architecture), and each segment's weights are read from the directory's safetensors only while it
runs. Two passes over the segments:

1. **score**: the calibration windows run through segment k (its groups scored as the chosen criterion
   scores them) and on as the *dense* activations at its end, the inputs of segment k + 1;
2. **rewrite**: with the plan made from every segment's scores (the whole model's budget walk, on the
   meta graph), each segment is rewritten, held against the zeroing oracle, refitted on the outputs of
   the segments before it *as already pruned* (as SparseGPT does: errors do not compound), and its pruned
   weights written out in the dtype they were stored in.

A causal LM is streamed as the prefill graph of its :class:`amgfx.Decoder` (the decode step shares its
weights and takes the same plan); :func:`assemble` builds the pruned Decoder, or GraphModule, from the
pruned weights alone. Segments after the last one with groups (the final norm and LM head) are not run.

What is held at once: one segment's weights (float32), the activations at one cut for every calibration
window (dense and pruned: ``2 x windows x tokens x hidden x 4`` bytes), the refit's Gram matrices of
one layer, and the calibration statistics. Criteria that read forward statistics (``magnitude``, ``snp``,
``flap``, ``wanda``) score exactly as on the whole model; gradient criteria (``taylor``) see a segment's
own output (the default loss on it), so they are block-local here. The residual stream and token
pruning span every block, and are refused. Under a ``torch.distributed`` group each rank streams its own
windows and every sum is all-reduced (:mod:`amgfx.graph.ranks`), so every rank scores, plans and refits as
one process would on the union; rank 0 writes ``out`` (a shared directory), and such a run cannot resume.

Example (a tiny LLaMA directory, streamed as a decoder):
    >>> import tempfile, torch, transformers as tf, amgfx
    >>> from amgfx.stream import prune_streamed
    >>> d = tempfile.mkdtemp()
    >>> cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                      num_key_value_heads=2, vocab_size=60, architectures=["LlamaForCausalLM"])
    >>> tf.LlamaForCausalLM(cfg).save_pretrained(d)
    >>> calib = [torch.randint(0, 60, (1, 16)) for _ in range(4)]      # token windows
    >>> r = prune_streamed(d, amgfx.PlanConfig(method="magnitude", target_flops=0.7, scope="blocks"), calib=calib,
    ...                    progress=False)
    >>> all(s.verified for s in r.segments if s.groups), r.plan.meta["flops"]["blocks"]["planned"] <= 0.7 * r.plan.meta["flops"]["blocks"]["dense"]
    (True, True)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

import torch.utils._pytree as pytree

from .api import Scores, analyze, apply, plan_kinds, score, spend
from .decode.capture import capture_decoder
from .decode.step import decoder
from .errors import AmgfxError
from .memory import peak_mb, pin_mmap_threshold, release, rss_mb
from .graph.fx import off_meta, read_as, replace_attr, state_inputs
from .graph.meta import EXAMPLE, PLAN
from .graph.ranks import barrier, rank_world
from .graph.segments import Segment, extract, graph_inputs, segments
from .models import LazyWeights, is_causal_lm, meta_model
from .sequence import capture_module, run
from .planning.config import PlanConfig, config_from_options
from .planning.plan import Plan
from .scoring.calibrate import batch_chunks
from .weights.config import RefitConfig
from .weights.refit import refit

__all__ = ["SegmentReport", "Streamed", "prune_streamed", "STREAM_METHOD"]

STREAM_METHOD = "magnitude"     # what "auto" means here until a measured choice exists (auto refits every candidate)


@dataclass
class SegmentReport:
    """One segment as streamed: its groups, how long each pass took, memory, and the oracle's verdict."""
    index: int
    params: int                      # parameters read (dense)
    groups: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    rss_mb: float = 0.0              # resident memory when the segment was done
    peak_mb: dict = field(default_factory=dict)   # the process's peak so far after each pass over it ("score", "prune")
    verified: bool | None = None     # the rewrite against the zeroing oracle (None: nothing pruned here)
    refit_layers: int = 0


@dataclass
class Streamed:
    """What :func:`prune_streamed` made: the plan, a report per segment, the pruned weights (in memory, or in
    ``out`` one safetensors file per segment), the seconds of each stage and the peak resident memory.
    :meth:`model` assembles the pruned model from them."""
    plan: Plan
    segments: list
    weights: dict                    # pruned FQN -> tensor in its stored dtype (empty when written to ``out``)
    seconds: dict
    peak_rss_mb: float
    out: str | None = None
    captured: object = field(default=None, repr=False)      # the capture on meta the plan was made on
    buffers: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self.segments], "seconds": self.seconds,
                "peak_rss_mb": self.peak_rss_mb, "out": self.out}

    def model(self):
        """The pruned model, whole (a :class:`amgfx.Decoder` for a causal LM): :func:`assemble`."""
        release()                   # what the passes freed goes back to the OS before the whole model is built
        tensors = self.weights
        if not tensors and self.out:
            from safetensors.torch import load_file
            tensors = {}
            for s in self.segments:
                tensors.update(load_file(os.path.join(self.out, f"segment-{s.index:04d}.safetensors")))
        return assemble(self.captured, self.plan, dict(tensors), self.buffers)


def _attrs(seg: Segment, weights: LazyWeights, buffers: dict) -> dict:
    """The tensors segment ``seg`` reads: parameters from the files (float32), buffers as the model made them."""
    out = {}
    for t in seg.params:
        if t not in weights:
            raise AmgfxError(f"{t} is not in the safetensors files of {weights.path}")
        out[t] = torch.nn.Parameter(weights[t], requires_grad=False)
    for t in seg.buffers:
        if t not in buffers:
            raise AmgfxError(f"segment {seg.index} reads {t}, which is neither a stored weight nor a buffer the "
                             "model computes (a constant captured on the meta device has no value)")
        out[t] = buffers[t]
    return out


def _last_reader(segs: list) -> dict:
    """Value name -> index of the last segment that reads it (values no later segment reads are dropped)."""
    last: dict = {}
    for s in segs:
        for i in s.inputs:
            last[i] = s.index
    return last


def _advance(sg: fx.GraphModule, seg: Segment, states: list, last: dict) -> None:
    """Run ``sg`` on every window's state, in place: its outputs added, what no later segment reads dropped."""
    with torch.no_grad():
        for st in states:
            outs = sg(*state_inputs(sg, [st[i] for i in seg.inputs]))    # a pruned KV cache input is smaller
            st.update(zip(seg.outputs, outs))
            for name in [k for k in st if last.get(k, -1) <= seg.index and k not in seg.outputs]:
                del st[name]


def _inputs(seg: Segment, states: list) -> list:
    return [tuple(st[i] for i in seg.inputs) for st in states]


def _source(path: str, calib: list, example, max_new_tokens: int):
    """``(captured on meta, calibration batches of its first graph, weights, buffers by graph FQN)``: a causal
    LM as a :class:`amgfx.Decoder` (prefill + decode step; ``calib`` is ``[n, T]`` token windows), any other
    model as its forward graph (``calib``: its input dicts)."""
    import transformers as tf
    model, buffers, aliases = meta_model(path)
    causal = is_causal_lm(tf.AutoConfig.from_pretrained(path))
    prefix = "lm." if causal else ""         # what the Decoder's graph adds to the model's names
    weights = LazyWeights(path, {f"{prefix}{k}": [f"{prefix}{a}" for a in v] for k, v in aliases.items()}, prefix=prefix)
    weights.check({f"{prefix}{k}": p.shape for k, p in model.named_parameters()})   # before anything is run or written
    if causal:
        ids = [torch.as_tensor(c) for c in calib]
        if any(c.dim() != 2 or c.shape[1] != ids[0].shape[1] for c in ids):
            raise AmgfxError("a causal LM streams on token windows: calib is a list of [n, T] id tensors, one T")
        t = int(ids[0].shape[1])
        cap = capture_decoder(decoder(model, max_len=t + max_new_tokens, prompt_len=t, batch=1))
        batches = cap.batches(ids)
    else:
        ex = example if example is not None else calib[0]
        ex_args, ex_kwargs = ((), dict(ex)) if isinstance(ex, dict) else (tuple(ex), {})
        cap = capture_module(model, ex_args, ex_kwargs)
        batches = calib
    return cap, batches, weights, {f"{prefix}{k}": b for k, b in buffers.items()}


def prune_streamed(path: str, config: PlanConfig | None = None, *, calib, example=None, reconstruct: bool = True,
                   out: str | None = None, resume: bool = False, max_new_tokens: int = 32, progress: bool = True,
                   **options) -> Streamed:
    """Prune the Hugging Face directory ``path`` segment by segment (see the module docstring).

    ``calib``: for a causal LM, token windows (``[n, T]`` id tensors, one ``T``: the prefill's prompt length; the
    result is a :class:`amgfx.Decoder` with ``T + max_new_tokens`` cache slots); for other models, a list of
    input dicts (``{"input_ids": [B, T]}``), every one the same shape, ``example`` the inputs to capture with
    (default: the first). ``config`` and ``options`` are :class:`amgfx.PlanConfig` (``method="auto"`` means
    :data:`STREAM_METHOD` here). ``reconstruct``: refit each pruned segment on the pruned stream. ``out``: a
    directory to write the plan, the pruned weights (one safetensors file per segment, in their stored dtype)
    and ``stream.json``; without it the pruned weights are returned in :attr:`Streamed.weights`. With ``out``,
    the run is checkpointed after every segment, and ``resume=True`` goes on from the last segment done by a
    run of the same model, data and settings that stopped (an error if ``out`` holds another run's).
    """
    cfg = config_from_options(config, **options)
    if cfg.method == "auto":
        cfg = config_from_options(cfg, method=STREAM_METHOD)
    ratios, kinds = plan_kinds(cfg)
    if "residual" in kinds or cfg.tokens:
        raise AmgfxError("streaming prunes block by block: residual channels and tokens span every block; "
                         "leave them out (kinds=qk,v,head,mlp) or prune the whole model")
    if cfg.target_latency is not None or cfg.allocation != "ranking" or cfg.rank == "per_ms":
        raise AmgfxError("streaming plans by FLOPs or ratios, walking the score ranking: target_latency, "
                         "allocation='error' and rank='per_ms' measure the whole model")
    calib = list(calib)
    if not calib:
        raise AmgfxError("streaming needs calibration data (calib=)")
    rank, world = rank_world()
    if world > 1 and resume:
        raise AmgfxError("resume= goes on from one process's checkpoint; a run over several ranks starts afresh")
    pin_mmap_threshold()        # freed temporaries go back to the OS, not into a heap kept whole (amgfx.memory)
    t0 = time.perf_counter()
    cap, batches, weights, buffers = _source(path, calib, example, max_new_tokens)
    run = _Run(cap, weights, buffers, cfg, kinds, progress and rank == 0)
    run.keep = not (out and rank)         # rank 0 writes ``out``; the others' weights are the same ones
    run.windows = _shared([graph_inputs(run.gm, a, k) for _, pieces in batch_chunks(run.gm, batches)
                           for a, k, _ in pieces])
    del batches                 # each batch's own empty KV cache (0.6 GB for a 1B model): the windows share one
    ck = _Checkpoint(out, _key(path, cfg, calib, reconstruct, max_new_tokens), world == 1) if out and not rank else None
    state = ck.load(resume) if ck else None
    seconds = {"capture": time.perf_counter() - t0}
    t = time.perf_counter()
    if state is None or state["phase"] == "score":
        scores = _score_pass(run, ck, state)
        seconds["score"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = spend(run.cg, cfg, scores, ratios)
        plan.meta.update({"method": cfg.method, "config": {"plan": cfg.to_dict()}, "streamed": True})
        seconds["plan"] = time.perf_counter() - t
        state = None
    else:
        plan = Plan.load(os.path.join(out, "plan.json"))
        run.cg.refuse(state["refused"])
    t = time.perf_counter()
    kept = _prune_pass(run, plan, reconstruct, ck, state)
    seconds["prune"] = time.perf_counter() - t
    result = Streamed(plan, run.reports, kept, seconds, peak_mb(), out, cap, buffers)
    if ck:
        ck.finish({"source": os.path.abspath(path), **result.to_dict()})
    barrier()                   # every rank returns once rank 0 has written ``out``
    return result


class _Run:
    """What both passes share: the capture on meta, its segments, the weights, the windows, the reports."""

    def __init__(self, cap, weights, buffers, cfg, kinds, progress):
        self.cap, self.weights, self.buffers, self.cfg, self.kinds, self.progress = cap, weights, buffers, cfg, kinds, progress
        self.cg = cap.graphs[0]
        self.gm = self.cg.gm
        self.segs = segments(self.gm, together=[{m.param for m in g.members} for g in self.cg.groups
                                                if g.kind != "residual"])
        self.reports = [SegmentReport(s.index, 0) for s in self.segs]
        with_groups = [s.index for s in self.segs if any(_holds(g, s) for g in self.cg.groups if g.kind in kinds)]
        # segments after the last one with groups change nothing the plan reads (the final norm and head): not
        # run; those before the first (the embedding) run once: pass 2 starts from pass 1's stream after them
        self.first, self.end = (min(with_groups), max(with_groups)) if with_groups else (0, -1)
        # what only the unrun segments read (every layer's KV cache, for the output) is not kept: 1.3 GB at 1B
        self.last = _last_reader(self.segs[:self.end + 1])
        self.windows: list = []

    def extract(self, s: Segment, states: list) -> fx.GraphModule:
        sg = extract(self.gm, s, _attrs(s, self.weights, self.buffers))
        sg.meta[EXAMPLE] = (_inputs(s, states[:1])[0], {})
        return sg

    def bar(self, items, desc):
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, unit="segment", disable=not self.progress)


def _score_pass(run: _Run, ck, state) -> Scores:
    """Pass 1: every segment's groups scored on the dense stream (from a checkpoint's segment on, if given)."""
    merged = Scores()
    states, start, begin = [dict(w) for w in run.windows], [dict(w) for w in run.windows], 0
    if state is not None:
        states, start, begin = state["states"], state["start"], state["next"]
        merged = state["scores"]
        run.cg.refuse(state["refused"])
        run.reports = state["reports"]
    bar = run.bar(run.segs[begin:run.end + 1], "scoring blocks")
    for s in bar:
        bar.set_postfix(rss=f"{rss_mb():,.0f} MB", refresh=False)
        ts = time.perf_counter()
        sg = run.extract(s, states)
        run.reports[s.index].params = sum(p.numel() for p in sg.parameters())
        scg = analyze(sg)                      # real weights here: the probe refuses what cannot be pruned
        run.cg.refuse(scg.refused)
        release()                              # the probe's pruned and zeroed copies, before the scoring's
        if any(g.kind in run.kinds for g in scg.groups):
            sc = score(scg, run.cfg.method, _inputs(s, states), kinds=run.kinds, seed=run.cfg.seed, progress=False,
                       massive=run.cfg.massive)
            merged.units.update(sc.units)
            merged.massive.update(sc.massive)
            merged.extra.update(sc.extra)
            merged.criteria, merged.samples, merged.loss_scale = sc.criteria, sc.samples, sc.loss_scale
            run.reports[s.index].groups = sorted(sc.units)
        _advance(sg, s, states, run.last)
        del sg, scg
        release()
        if s.index + 1 == run.first:
            start = [dict(st) for st in states]
        run.reports[s.index].seconds["score"] = time.perf_counter() - ts
        run.reports[s.index].peak_mb["score"] = round(peak_mb())
        if ck:
            ck.save({"phase": "score", "next": s.index + 1, "states": states, "start": start, "scores": merged,
                     "refused": dict(run.cg.refused), "reports": run.reports})
    unknown = set(merged.units) - {g.name for g in run.cg.groups}
    if unknown:
        raise AmgfxError(f"segments found groups the whole graph does not have: {sorted(unknown)[:3]}")
    run.start = start
    return merged


def _prune_pass(run: _Run, plan: Plan, reconstruct: bool, ck, state) -> dict:
    """Pass 2: each segment rewritten by its part of ``plan``, checked, refitted on the pruned stream, and its
    weights written (to the checkpoint's directory, else returned)."""
    weights = run.weights
    if state is None:
        dense, pruned, done, begin = [dict(w) for w in run.start], [dict(w) for w in run.start], set(), 0
        if ck:
            plan.save(os.path.join(ck.out, "plan.json"))
    else:
        dense, pruned, done, begin = state["dense"], state["pruned"], state["done"], state["next"]
        run.reports = state["reports"]
    kept: dict = {}
    bar = run.bar(run.segs[begin:], "pruning blocks")
    for s in bar:
        bar.set_postfix(rss=f"{rss_mb():,.0f} MB", refresh=False)
        ts = time.perf_counter()
        mine = set(run.reports[s.index].groups)
        sub = Plan(keep={k: v for k, v in plan.keep.items() if k in mine},
                   units={k: v for k, v in plan.units.items() if k in mine}, options=dict(plan.options))
        if s.index > run.end or s.index < run.first:      # the embedding and the head: their weights as stored
            written = {k: weights.stored(k) for k in s.params if k not in done and not _alias_done(weights, k, done)}
        else:
            sg = run.extract(s, pruned)
            small = sg
            if sub.keep:
                scg = analyze(sg, probe=False)
                small = apply(scg, sub)          # held against the zeroing oracle on this segment's inputs; raises if wrong
                run.reports[s.index].verified = True
                release()                        # the oracle's zeroed copy of the segment, before the refit's Grams
                if reconstruct:
                    small.meta[PLAN] = sub
                    small = refit(small, scg, _inputs(s, dense), RefitConfig(), progress=False,
                                  pruned_calib=_inputs(s, pruned))
                    run.reports[s.index].refit_layers = len(small.meta["amgfx_reconstruction"]["layers"])
            if s.index < run.end:
                _advance(sg, s, dense, run.last)
                _advance(small, s, pruned, run.last)
            written = {k: _as_stored(weights, k, v) for k, v in small.named_parameters()
                       if k not in done and not _alias_done(weights, k, done)}
            del sg, small
        done |= set(written)
        if ck:
            ck.write(f"segment-{s.index:04d}.safetensors", written)
        elif run.keep:
            kept.update(written)
        del written
        release()
        run.reports[s.index].seconds["prune"] = time.perf_counter() - ts
        run.reports[s.index].rss_mb = rss_mb()
        run.reports[s.index].peak_mb["prune"] = round(peak_mb())
        if ck:
            ck.save({"phase": "prune", "next": s.index + 1, "dense": dense, "pruned": pruned, "done": done,
                     "refused": dict(run.cg.refused), "reports": run.reports})
    return kept


def _key(path, cfg, calib, reconstruct, max_new_tokens) -> str:
    """What makes two runs the same run: the model, the settings and the calibration data."""
    import hashlib
    h = hashlib.sha256(json.dumps([os.path.abspath(path), cfg.to_dict(), reconstruct, max_new_tokens],
                                  sort_keys=True, default=str).encode())
    for c in calib:
        for t in (c.values() if isinstance(c, dict) else c if isinstance(c, (list, tuple)) else [c]):
            h.update(torch.as_tensor(t).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Checkpoint:
    """``out/checkpoint.pt`` (the streams and what is done, after every segment, replaced atomically) and
    ``out/progress.json``; an interrupted run resumes from them, a finished one removes the checkpoint."""

    def __init__(self, out: str, key: str, state: bool = True):
        self.out, self.key, self.state = out, key, state     # state=False: progress only (one rank of several)
        os.makedirs(out, exist_ok=True)

    def _path(self, name):
        return os.path.join(self.out, name)

    def load(self, resume: bool):
        """The saved state to go on from (None: start afresh)."""
        try:
            with open(self._path("progress.json")) as f:
                progress = json.load(f)
        except (OSError, ValueError):
            progress = None
        if not resume:
            return None
        if progress is None or progress.get("phase") == "done" or not os.path.isfile(self._path("checkpoint.pt")):
            return None                         # nothing unfinished there: a fresh run
        if progress.get("key") != self.key:
            raise AmgfxError(f"{self.out} holds an unfinished run of another model, data or settings; resume it with "
                             "those, or give another output directory")
        return torch.load(self._path("checkpoint.pt"), weights_only=False)

    def save(self, state: dict) -> None:
        if self.state:
            tmp = self._path("checkpoint.pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, self._path("checkpoint.pt"))
        self._progress({"key": self.key, "phase": state["phase"], "next": state["next"]})

    def write(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file
        save_file(tensors, self._path(name + ".tmp"))
        os.replace(self._path(name + ".tmp"), self._path(name))

    def finish(self, summary: dict) -> None:
        with open(self._path("stream.json"), "w") as f:
            json.dump(summary, f, indent=1)
        self._progress({"key": self.key, "phase": "done"})
        if os.path.exists(self._path("checkpoint.pt")):
            os.remove(self._path("checkpoint.pt"))

    def _progress(self, d: dict) -> None:
        tmp = self._path("progress.json.tmp")
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, self._path("progress.json"))


def _shared(windows: list) -> list:
    """Inputs equal in every window (a decoder's empty KV cache, its slots and positions) held once: a row cut
    from a batch keeps the whole batch's storage alive, and 64 windows of a 1B model's empty cache are 0.7 GB."""
    for name, first in windows[0].items():
        if isinstance(first, torch.Tensor) and all(torch.equal(w[name], first) for w in windows[1:]):
            one = first.clone()
            for w in windows:
                w[name] = one
    return windows


def _holds(g, s: Segment) -> bool:
    return {m.param for m in g.members} <= set(s.params)


def _alias_done(weights: LazyWeights, k: str, done: set) -> bool:
    """A tied weight is written once, under the first of its names."""
    return any(a in done for a in weights.aliases.get(k, ()))


def _as_stored(weights: LazyWeights, k: str, v: torch.Tensor) -> torch.Tensor:
    return v.detach().to(weights.dtype(k) if v.is_floating_point() else v.dtype).contiguous()


def assemble(cap, plan: Plan, tensors: dict, buffers: dict, *, stored: bool = True):
    """The pruned model, whole: every graph of ``cap`` (captured on meta) rewritten by ``plan`` and its tensors
    filled from ``tensors`` (pruned FQN -> tensor, any dtype) and ``buffers``; what :func:`amgfx.prune` returns
    for the same capture (a Decoder for a causal LM), computing in float32. ``stored`` keeps each weight in the
    dtype it came in (bf16: half the memory of float32), cast where the graph reads it
    (:func:`amgfx.graph.fx.read_as`; the same outputs); else every weight is converted to float32 up front."""
    r = run(cap, plan=plan, check=False, reconstruct=False, progress=False)
    graphs = r.graphs()
    made: dict = {}                  # meta tensor -> its real one (tied names and both graphs share it)
    by_name: dict = {}
    for g in graphs:
        for fqn, t in list(g.named_parameters(remove_duplicate=False)) + list(g.named_buffers(remove_duplicate=False)):
            if t.device.type != "meta":
                continue
            if id(t) not in made and fqn in by_name:          # the same weight in the other graph
                made[id(t)] = (t, by_name[fqn])
            if id(t) not in made:
                src = tensors.pop(fqn, None) if fqn in tensors else buffers.get(fqn)   # each source dropped once read
                if src is None:
                    raise AmgfxError(f"the streamed weights have no {fqn}: the rewrite of the whole graph made a tensor "
                                     "the segments did not (report it)")
                if tuple(src.shape) != tuple(t.shape):
                    raise AmgfxError(f"{fqn}: streamed {list(src.shape)}, the rewritten graph wants {list(t.shape)}")
                keep = not src.is_floating_point() or (stored and src.dtype in (torch.bfloat16, torch.float16))
                made[id(t)] = (t, src if keep else src.float())
            by_name[fqn] = made[id(t)][1]
            replace_attr(g, fqn, made[id(t)][1], t)
        low = {fqn for fqn, v in list(g.named_parameters(remove_duplicate=False)) + list(g.named_buffers(
            remove_duplicate=False)) if v.dtype in (torch.bfloat16, torch.float16)}
        read_as(g, low)
        off_meta(g.graph)
        g.recompile()
        g.meta[EXAMPLE] = pytree.tree_map(
            lambda x: torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) and x.is_meta else x,
            g.meta[EXAMPLE])
    return cap.finish(graphs, plan)
