"""Prune an :class:`amgfx.Decoder`: one plan, made on the prefill, rewrites both graphs.

The prefill and the decode step are two captures of the same module, so their coupling groups have the
same names (``<kind>:<module path>``) and one plan replays on both. A group either capture cannot prune
is refused in both, so the plan never narrows a layer in one graph that the other keeps whole; the two
pruned graphs then share their weight tensors, and the cache both read and write shrinks the same way.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import AmgfxError, ModelSpecError
from ..graph.fx import tie_tensors
from ..graph.meta import STATE

__all__ = ["capture_decoder", "prune_decoder", "lm_loss"]


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


def capture_decoder(dec, *, seed: int = 0):
    """Analyze both graphs (``(prefill cg, decode cg)``), each at a random prompt; the decode step's example
    cache holds that prompt's history, so the oracle compares real cache contents, not zeros."""
    from ..api import analyze  # decode calls back into api's prune sequence (issue 45)
    from ..graph.capture import capture
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dec.vocab_size, (dec.batch, dec.prompt_len), generator=g)
    pre_in = dec.prefill_inputs(ids)
    with torch.no_grad():
        history = dec.prefill(*pre_in)[1:]
    dec_in = dec.decode_inputs(ids[:, -1], pre_in[1][:, -1] + 1, dec.prompt_len, pre_in[3], history)
    cgs = [analyze(capture(m, x, dynamic_batch=False)) for m, x in ((dec.prefill, pre_in), (dec.decode, dec_in))]
    names = [{gr.name for gr in cg.groups} for cg in cgs]
    for cg, other, mine, theirs, where in ((*cgs, *names, "decode step"), (cgs[1], cgs[0], names[1], names[0], "prefill")):
        cg.refuse({n: f"{other.refused.get(n, 'no such group')} (in the {where})" for n in sorted(mine - theirs)})
    return cgs[0], cgs[1]


def prune_decoder(dec, *, method="snp", target_flops=None, ratios=None, calib=None, loss_fn=None, plan=None,
                  reconstruct=None, check: bool = True, **options):
    """:func:`amgfx.prune` for a :class:`Decoder`: plan on the prefill, rewrite prefill and decode step.

    ``calib`` is a list of ``[batch, prompt_len]`` token-id tensors (or ``(ids, key_mask)`` pairs, left-padded).
    Gradient criteria calibrate on :func:`lm_loss` (next-token cross-entropy) unless ``loss_fn`` says otherwise.
    """
    from ..api import apply, plan_for  # decode calls back into api's prune sequence (issue 45)
    from ..api import reconstruct as refit
    if dec.plan is not None or isinstance(dec.prefill, torch.fx.GraphModule):
        raise AmgfxError("this Decoder is already pruned; prune the dense one (amgfx.decoder(lm, ...)) again")
    if options.get("tokens"):
        raise AmgfxError("a decoder's key positions are its cache slots; token pruning (tokens=) is not for decoders")
    if options.pop("schedule", None) is not None:
        raise AmgfxError("schedule= is not supported for decoders yet; prune in one shot")
    cg_p, cg_d = capture_decoder(dec, seed=options.get("seed", 0))
    calib_in = _calib_inputs(dec, calib) if calib is not None else None
    if plan is None:
        plan = plan_for(cg_p, method=method, target_flops=target_flops, ratios=ratios, calib=calib_in,
                        loss_fn=loss_fn or lm_loss, **options)
    prefill, step = apply(cg_p, plan, check=check), apply(cg_d, plan, check=check)
    if (calib is not None if reconstruct is None else reconstruct) and plan.keep:
        prefill = refit(prefill, cg_p, calib_in, progress=options.get("progress", True))
    tie_tensors(prefill, step)                     # one set of weights (refitted ones included) for both graphs
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
