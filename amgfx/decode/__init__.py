"""Decoder LMs that generate after pruning: prefill + decode graphs over a KV cache passed as tensors.

``step`` wraps a causal LM so its cache is graph state, ``capture`` hands both graphs to the prune sequence,
``generate`` decodes with them (greedy or seeded sampling, EOS, left-padded batches).
"""
from .step import Decoder, Step, decoder
from .generate import generate

__all__ = ["Decoder", "Step", "decoder", "generate"]
