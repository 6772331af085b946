"""A causal LM as graphs that take their KV cache in and give it back: the prefill and the decode step.

``torch.export`` refuses a cache *object*, and a cache hidden in module buffers would be mutated in
place; so the cache is passed as plain tensors, one ``[batch, kv_heads, max_len, head_dim]`` pair per
layer, written out of place with ``index_copy`` at the step's ``slots``. Analysis then sees the cache
as graph state (``amgfx.graph.ops.STATE_WRITE``): its kv-head and head-dim axes are linked to the k/v
projections' units like any per-head tensor, and the rewrite shrinks it with the plan.

Both graphs are captured static (batch, prompt length and cache length fixed): ``slots`` has no batch
dim, and every row of a batch writes the same slots; rows of different lengths are left-padded, their
padding hidden by ``key_mask`` and their positions counted per row.

Example:
    >>> import torch, transformers as tf, amgfx
    >>> cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                      num_key_value_heads=2, vocab_size=64)
    >>> dec = amgfx.decoder(tf.LlamaForCausalLM(cfg), max_len=16, prompt_len=4)
    >>> [tuple(t.shape) for t in dec.empty_cache()]
    [(1, 2, 16, 8), (1, 2, 16, 8)]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import ModelSpecError
from ..graph.fx import on_meta

__all__ = ["Step", "Decoder", "decoder"]


def _cache_types():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class Slots(CacheLayerMixin):
        """One layer's cache: given as tensors, written out of place at the step's slots."""
        is_compileable, is_sliding = True, False

        def __init__(self, keys, values, slots):
            super().__init__()
            self.keys, self.values, self.slots, self.is_initialized = keys, values, slots, True

        def lazy_initialization(self, k, v):
            pass

        def update(self, k, v, *args, **kwargs):
            self.keys = self.keys.index_copy(2, self.slots, k.to(self.keys.dtype))
            self.values = self.values.index_copy(2, self.slots, v.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, q):
            return self.keys.shape[2], 0

        def get_seq_length(self):
            return 0

        def get_max_length(self):
            return self.keys.shape[2]

    return Cache, Slots


class Step(nn.Module):
    """``(input_ids, position_ids, slots, key_mask, *cache) -> (logits, *cache)``: one forward with the cache.

    ``input_ids``/``position_ids`` are ``[batch, T]``; ``slots`` (``[T]``) says which cache slots this
    step's tokens fill; ``key_mask`` (``[batch, max_len]``, 1 = a real token) hides left padding. A token
    sees the slots up to its own and always itself (so a padding row never has an empty softmax).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, slots, key_mask, *cache):
        Cache, Slots = _cache_types()
        c = Cache(layers=[Slots(cache[2 * i], cache[2 * i + 1], slots) for i in range(len(cache) // 2)])
        j = torch.arange(cache[0].shape[2], device=slots.device)[None, None, :]
        allowed = ((j <= slots[None, :, None]) & key_mask[:, None, :].bool()) | (j == slots[None, :, None])
        out = self.lm(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed[:, None], cache=c,
                      use_cache=True)
        return (out.logits, *[t for layer in c.layers for t in (layer.keys, layer.values)])


def _layout(lm: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a Hugging Face decoder's config."""
    cfg = getattr(lm, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers") and not hasattr(cfg, "n_layer"):
        raise ModelSpecError(f"{type(lm).__name__} is not a Hugging Face causal LM (no config with layers); "
                             "amgfx.decoder needs a *ForCausalLM / *LMHeadModel")
    if getattr(cfg, "is_encoder_decoder", False) or not type(lm).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ModelSpecError(f"{type(lm).__name__} is not a decoder-only causal LM (a *ForCausalLM or "
                             "*LMHeadModel); amgfx.decoder cannot give it a KV cache")
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return layers, kv, head_dim


@torch.no_grad()
def _check_causal(lm: nn.Module, vocab: int) -> None:
    """Refuse a model whose earlier positions see later tokens (an encoder with an LM head, e.g. BERT's
    ``BertLMHeadModel`` without ``is_decoder``): a KV cache would change what it computes."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 4), generator=g)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % vocab
    la, lb = (lm(input_ids=x, use_cache=False).logits[0, :-1] for x in (a, b))
    if not torch.allclose(la, lb, atol=1e-5, rtol=1e-4):
        raise ModelSpecError(f"{type(lm).__name__} is not a decoder-only causal LM: its earlier positions see later "
                             "tokens, so a KV cache cannot serve it")


@dataclass
class Decoder:
    """A causal LM as two static graphs over one KV cache: ``prefill`` (``prompt_len`` tokens) and
    ``decode`` (one token), for ``batch`` rows and ``max_len`` cache slots.

    ``amgfx.prune`` takes a Decoder (a capture kind: :func:`amgfx.decode.capture.capture_decoder`) and returns
    one whose both graphs keep what one plan says (the cache shrinks with it; ``plan``);
    :func:`amgfx.generate` decodes with it.
    """
    prefill: nn.Module
    decode: nn.Module
    batch: int
    prompt_len: int
    max_len: int
    cache_shapes: list                   # [batch, kv heads, max_len, head dim] per cache tensor (k, v per layer)
    vocab_size: int
    eos_token_id: int | None = None
    pad_token_id: int = 0
    plan: object = None                  # the amgfx.Plan both graphs were pruned by, when pruned
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        state = "pruned" if self.plan is not None else "dense"
        return (f"Decoder({state}, batch={self.batch}, prompt_len={self.prompt_len}, max_len={self.max_len}, "
                f"{len(self.cache_shapes) // 2} layers, cache {self.cache_bytes_per_token():,} bytes/token)")

    def perplexity(self, windows: torch.Tensor) -> float:
        """exp of the mean next-token cross-entropy over ``[n, prompt_len]`` token windows (every token real),
        run through the prefill ``batch`` rows at a time (a remainder of fewer rows is left out)."""
        from .lm import perplexity  # the byte LM's module, only when perplexity is asked
        if windows.dim() != 2 or windows.shape[1] != self.prompt_len or len(windows) < self.batch:
            raise ModelSpecError(f"perplexity takes [n >= {self.batch}, {self.prompt_len}] token windows, got "
                                 f"{list(windows.shape)}")
        return perplexity(lambda x: self.prefill(*self.prefill_inputs(x))[0], windows, self.batch)

    def empty_cache(self, device=None) -> list[torch.Tensor]:
        return [torch.zeros(s, device=device) for s in self.cache_shapes]

    def cache_bytes_per_token(self) -> int:
        """Bytes the cache holds per token slot (all layers, k and v, one row): what shrinks with the plan."""
        return sum(s[1] * s[3] for s in self.cache_shapes) * 4

    def prefill_inputs(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                       any_batch: bool = False) -> tuple:
        """The prefill's inputs for left-padded ``input_ids`` ``[batch, prompt_len]`` (``key_mask``: 1 = real).

        ``any_batch``: as many rows as ``input_ids`` has (a calibration batch, which calibration runs
        ``batch`` rows at a time), not only the captured ``batch``."""
        b, t = input_ids.shape
        if t != self.prompt_len or (b != self.batch and not any_batch):
            raise ModelSpecError(f"the prefill takes [{self.batch}, {self.prompt_len}] token ids, got [{b}, {t}]")
        if key_mask is None:
            key_mask = torch.ones(b, t, dtype=torch.long)
        full = torch.ones(b, self.max_len, dtype=torch.long)
        full[:, :t] = key_mask
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)
        cache = [torch.zeros((b, *s[1:])) for s in self.cache_shapes]
        return (input_ids, positions, torch.arange(t), full, *cache)

    def decode_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, key_mask: torch.Tensor,
                      cache) -> tuple:
        """The decode step's inputs: one token per row (``[batch]``) at ``positions``, written at cache ``slot``."""
        return (tokens.reshape(self.batch, 1), positions.reshape(self.batch, 1), torch.tensor([slot]), key_mask,
                *cache)


def decoder(lm: nn.Module, *, max_len: int = 64, prompt_len: int = 16, batch: int = 1) -> Decoder:
    """Wrap a Hugging Face causal LM as prefill + decode graphs over a static KV cache (nothing captured yet).

    ``prompt_len`` is the (left-padded) prompt the prefill takes, ``max_len`` the cache slots: a prompt
    plus its new tokens must fit in ``max_len``. The model is not modified; prune the result with
    :func:`amgfx.prune` and decode with :func:`amgfx.generate`.
    """
    if not 0 < prompt_len < max_len:
        raise ModelSpecError(f"need 0 < prompt_len < max_len, got prompt_len={prompt_len}, max_len={max_len}")
    layers, kv, hd = _layout(lm)
    if not on_meta(lm):            # a model built on the meta device (streamed) has nothing to run yet
        _check_causal(lm, lm.config.vocab_size)
    step = Step(lm).eval()
    cfg = lm.config
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    inside = (lambda t: t if t is not None and 0 <= t < cfg.vocab_size else None)    # tiny configs keep GPT-2's 50256
    eos, pad = inside(eos), inside(getattr(cfg, "pad_token_id", None))
    return Decoder(prefill=step, decode=step, batch=batch, prompt_len=prompt_len, max_len=max_len,
                   cache_shapes=[(batch, kv, max_len, hd)] * (2 * layers), vocab_size=cfg.vocab_size,
                   eos_token_id=eos, pad_token_id=pad if pad is not None else (eos if eos is not None else 0))
