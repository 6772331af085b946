"""An :class:`amgfx.Decoder` as a capture kind of the prune sequence: two graphs, one plan.

The prefill and the decode step are two captures of the same module, so their coupling groups have the
same names (``<kind>:<module path>``) and one plan replays on both. A group either capture cannot prune
is refused in both, so the plan never narrows a layer in one graph that the other keeps whole; the two
pruned graphs then share their weight tensors, and the cache both read and write shrinks the same way.
:func:`capture_decoder` hands :func:`amgfx.prune` (:mod:`amgfx.sequence`) both graphs, how to turn token ids
into prefill batches, the loss gradient criteria calibrate on (:func:`lm_loss`), and how to assemble the
pruned Decoder; the sequence itself (plan, rewrite, check, refit) is the one every model runs.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..analysis import analyze
from ..analysis.captured import Captured
from ..errors import AmgfxError, ModelSpecError
from ..graph.capture import capture
from ..graph.fx import on_meta, tie_tensors
from ..graph.meta import STATE
from ..passes.rewrite import probe
from .step import Decoder

__all__ = ["capture_decoder", "lm_loss"]


def _calib_inputs(dec, calib) -> list[tuple]:
    """Calibration batches as prefill inputs: each item is ``[n, prompt_len]`` ids, or ``(ids, key_mask)``; ``n``
    a multiple of the decoder's batch (calibration runs a batch in rows of the captured size and sums its
    gradients over them before any per-batch statistic, so a batch means the same whatever was captured)."""
    out = []
    for item in calib:
        ids, mask = (item if isinstance(item, (tuple, list)) else (item, None))
        ids = torch.as_tensor(ids)
        if ids.dim() != 2 or ids.shape[0] % dec.batch:
            raise AmgfxError(f"a calibration batch of a decoder is [n, {dec.prompt_len}] token ids with n a multiple "
                             f"of its batch {dec.batch}, got {list(ids.shape)}")
        out.append(dec.prefill_inputs(ids, None if mask is None else torch.as_tensor(mask), any_batch=True))
    return out


def _rows(dec, batches: list) -> tuple[list, int]:
    """Prefill batches of ``n`` rows as ``n / batch`` batches of the captured size (the graph trains at that size
    only), and how many make one given batch. The slots (input 2) are one per position, not per row."""
    rows = [tuple(t if i == 2 else t[r:r + dec.batch] for i, t in enumerate(x))
            for x in batches for r in range(0, x[0].shape[0], dec.batch)]
    return rows, (batches[0][0].shape[0] // dec.batch if batches else 1)


def lm_loss(outputs, batch) -> torch.Tensor:
    """Next-token cross-entropy of the prefill's logits on the calibration text itself, padding left out:
    the loss a causal LM was trained on, and what gradient criteria (``taylor``) calibrate a decoder on
    by default (LLM-Pruner's choice; on SmolLM2 at 80% of block FLOPs it left a lower perplexity after
    refit than the model's own sampled targets, 36.8 against 40.4)."""
    logits, ids, key_mask = outputs[0], batch[0], batch[3]
    t = ids.shape[1]
    real = key_mask[:, :t].bool()
    pairs = (real[:, :-1] & real[:, 1:]).reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat[pairs], ids[:, 1:].reshape(-1)[pairs], reduction="sum")


def _graphs(dec: Decoder, seed: int):
    """Analyze both graphs (``(prefill cg, decode cg)``), each at a random prompt; the decode step's example
    cache holds that prompt's history, so the oracle compares real cache contents, not zeros. A group either
    capture refuses is refused in the other too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dec.vocab_size, (dec.batch, dec.prompt_len), generator=g)
    pre_in = dec.prefill_inputs(ids)
    if on_meta(dec.prefill):          # run below on meta; capture() takes any example there by itself
        pre_in = tuple(t.to("meta") for t in pre_in)
    with torch.no_grad():
        history = dec.prefill(*pre_in)[1:]
    dec_in = dec.decode_inputs(ids[:, -1], pre_in[1][:, -1] + 1, dec.prompt_len, pre_in[3], history)
    cgs = []
    for m, x in ((dec.prefill, pre_in), (dec.decode, dec_in)):
        cg = analyze.analyze(capture(m, x, dynamic_batch=False))
        probe(cg)
        cgs.append(cg)
    names = [{gr.name for gr in cg.groups} for cg in cgs]
    for cg, other, mine, theirs, where in ((*cgs, *names, "decode step"), (cgs[1], cgs[0], names[1], names[0], "prefill")):
        cg.refuse({n: f"{other.refused.get(n, 'no such group')} (in the {where})" for n in sorted(mine - theirs)})
    return cgs[0], cgs[1]


def capture_decoder(dec: Decoder, example_inputs=None, example_kwargs=None, *, seed: int = 0) -> Captured:
    """The capture kind of a :class:`Decoder` (the example inputs are its own: a random prompt of its shape).

    ``calib`` for it is a list of ``[batch, prompt_len]`` token-id tensors (or ``(ids, key_mask)`` pairs,
    left-padded); gradient criteria calibrate on :func:`lm_loss` unless the user gives a loss. Recovery
    (``recover=``) distils the prefill's logits (KL) a captured row at a time, each step summing a given batch's
    rows; the decode step then reads the trained weights.
    """
    if dec.plan is not None or isinstance(dec.prefill, torch.fx.GraphModule):
        raise AmgfxError("this Decoder is already pruned; prune the dense one (amgfx.decoder(lm, ...)) again")
    if example_inputs is not None or example_kwargs is not None:
        raise AmgfxError("a Decoder makes its own example inputs (a prompt of its shape); give none")
    cg_p, cg_d = _graphs(dec, seed)
    return Captured(graphs=(cg_p, cg_d), finish=functools.partial(_finish, dec, cg_p, cg_d),
                    batches=functools.partial(_calib_inputs, dec), loss_fn=lm_loss,
                    train_batches=functools.partial(_rows, dec), recover_loss="kd", refuses={
                        "tokens": "a decoder's key positions are its cache slots; token pruning is not for decoders",
                        "schedule": "schedule= is not supported for decoders yet; prune in one shot"})


def _finish(dec: Decoder, cg_p, cg_d, pruned: list, plan) -> Decoder:
    """The pruned Decoder: one set of weights (refitted and recovered ones included) for both graphs, the cache
    shrunk."""
    prefill, step = pruned
    tie_tensors(prefill, step)
    states = [(prefill.meta.get(STATE) or {}).get("inputs", {}), (step.meta.get(STATE) or {}).get("inputs", {})]
    shapes = list(dec.cache_shapes)
    places = [n for n in prefill.graph.nodes if n.op == "placeholder"]
    for i in states[0]:
        shapes[i - 4] = tuple(places[i].meta["val"].shape)
    want = [tuple(n.meta["val"].shape) for n in step.graph.nodes if n.op == "placeholder"][4:]
    if want != shapes:
        raise ModelSpecError(f"the prefill and decode step disagree on the pruned cache ({shapes} vs {want})")
    return dataclasses.replace(dec, prefill=prefill, decode=step, cache_shapes=shapes, plan=plan,
                               meta={**dec.meta, "coupling": {"prefill": cg_p, "decode": cg_d}, "cache_masks": states[0]})
