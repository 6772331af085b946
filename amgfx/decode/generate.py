"""Decode with a :class:`~amgfx.decode.step.Decoder`: one prefill of the left-padded prompts, then one
decode step per new token, each writing the next cache slot.

Rows of a batch share slots; a row's positions count its own tokens only, and its padding is masked, so a
left-padded row decodes as it would alone. Rows that reach EOS emit nothing more; the loop stops when
every row has.

The cache is made here and never seen by the caller, so each step writes its new slot into the buffers it
was given (:func:`amgfx.passes.state_writes.in_place` for a graph, ``donate=True`` for onnxruntime)
instead of returning a copy of the whole cache per token.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.fx as fx

from ..errors import AmgfxError
from ..passes.state_writes import in_place
from .step import Decoder

_IN_PLACE = weakref.WeakKeyDictionary()     # graph -> its in-place copy (weights shared), built once

__all__ = ["generate", "runners"]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(float(temperature), 1e-6)
    if top_k:
        kth = logits.topk(min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _as_rows(prompts, attention_mask) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        mask = torch.ones_like(prompts) if attention_mask is None else torch.as_tensor(attention_mask)
        return [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(prompts, mask)]
    rows = [list(map(int, p)) for p in prompts]
    if rows and not isinstance(prompts[0], (list, tuple, torch.Tensor)):
        raise AmgfxError("prompts must be a [n, t] tensor or a list of token-id lists")
    return rows


def generate(dec: Decoder, prompts, *, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, eos_token_id: int | None = -1,
             attention_mask=None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt; returns the new token ids per prompt (EOS included).

    ``prompts`` is a list of token-id lists (any lengths up to ``dec.prompt_len``) or a ``[n, t]`` tensor
    (with ``attention_mask`` for its padding). ``do_sample`` samples at ``temperature`` (``top_k`` best
    only) from a generator seeded by ``seed``; otherwise decoding is greedy. ``eos_token_id`` defaults to
    the model's (``None``: never stop early). Prompts beyond ``dec.batch`` run in further batches.

    Example:
        >>> import torch, transformers as tf, amgfx
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        ...                      num_key_value_heads=2, vocab_size=64)
        >>> dec = amgfx.decoder(tf.LlamaForCausalLM(cfg).eval(), max_len=16, prompt_len=4)
        >>> small = amgfx.prune(dec, method="magnitude", ratios={"v": 0.5, "mlp": 0.5}, progress=False)
        >>> small.cache_bytes_per_token() / dec.cache_bytes_per_token()
        0.75
        >>> len(amgfx.generate(small, [[1, 2, 3]], max_new_tokens=5, eos_token_id=None)[0])
        5
    """
    if not isinstance(dec, Decoder):
        raise AmgfxError(f"amgfx.generate decodes an amgfx.Decoder, got {type(dec).__name__}: wrap the causal LM first, "
                         "dec = amgfx.decoder(lm); small = amgfx.prune(dec, ...); amgfx.generate(small, prompts)")
    rows = _as_rows(prompts, attention_mask)
    if not rows:
        return []
    if max_new_tokens < 1:
        raise AmgfxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(r) for r in rows)
    if longest > dec.prompt_len:
        raise AmgfxError(f"a prompt of {longest} tokens is longer than the decoder's prompt_len={dec.prompt_len}; "
                         "build it with a larger amgfx.decoder(..., prompt_len=)")
    if min(len(r) for r in rows) == 0:
        raise AmgfxError("an empty prompt: give at least one token per row")
    if dec.prompt_len + max_new_tokens - 1 > dec.max_len:
        raise AmgfxError(f"{dec.prompt_len} prompt slots + {max_new_tokens} new tokens do not fit the cache's "
                         f"max_len={dec.max_len}; ask for at most {dec.max_len - dec.prompt_len + 1} new tokens")
    bad = [t for r in rows for t in r if not 0 <= t < dec.vocab_size]
    if bad:
        raise AmgfxError(f"token id {bad[0]} is outside the vocabulary [0, {dec.vocab_size})")
    eos = dec.eos_token_id if eos_token_id == -1 else eos_token_id
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(rows), dec.batch):
        chunk = rows[start:start + dec.batch]
        out += _batch(dec, chunk + [chunk[0]] * (dec.batch - len(chunk)), max_new_tokens, eos,
                      lambda lg: _pick(lg, do_sample, temperature, top_k, gen))[:len(chunk)]
    return out


def runners(dec: Decoder) -> tuple:
    """``(prefill, decode)`` as :func:`generate` runs them: each writes the new slots into the cache it is
    given, so give them only a cache of your own (``dec.prefill_inputs`` makes one; the prefill's output
    cache then feeds the decode steps)."""
    return _owning(dec.prefill), _owning(dec.decode)


def _owning(fn):
    if isinstance(fn, fx.GraphModule):
        if fn not in _IN_PLACE:
            _IN_PLACE[fn] = in_place(fn)
        return _IN_PLACE[fn]
    if getattr(fn, "in_place", None):         # an amgfx.runtime.OrtProgram
        return functools.partial(fn, donate=True)
    return fn                                 # a module not captured yet (the dense Step): as it is


@torch.no_grad()
def _batch(dec: Decoder, rows, new: int, eos, pick) -> list[list[int]]:
    prefill, decode = runners(dec)
    p = dec.prompt_len
    ids = torch.full((dec.batch, p), dec.pad_token_id, dtype=torch.long)
    mask = torch.zeros(dec.batch, p, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r):], mask[i, p - len(r):] = torch.tensor(r), 1
    inputs = dec.prefill_inputs(ids, mask)
    logits, *cache = prefill(*inputs)
    key_mask, pos = inputs[3], mask.sum(1)
    tok = pick(logits[:, -1])
    got, done = [[] for _ in rows], torch.zeros(dec.batch, dtype=torch.bool)
    for i in range(new):
        for r in range(dec.batch):
            if not done[r]:
                got[r].append(int(tok[r]))
        done |= (tok == eos) if eos is not None else done
        if i == new - 1 or bool(done.all()):
            break
        logits, *cache = decode(*dec.decode_inputs(tok, pos, p + i, key_mask, cache))
        pos = pos + 1
        tok = pick(logits[:, -1])
    return got
