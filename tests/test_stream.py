"""Models bigger than memory: what runs on the meta device (shapes only) and, block by block, with weights read
lazily. A tiny LLaMA (GQA, RoPE) stands in for the 1B-8B models the path is for."""
import numpy as np
import pytest
import torch

import amgfx
from amgfx.planning.budget import allocate

tf = pytest.importorskip("transformers")


def _llama(device="cpu"):
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    with torch.device(device):
        return tf.LlamaModel(cfg).eval()


def test_a_plan_and_its_rewrite_come_out_of_a_model_on_the_meta_device_as_they_do_from_real_weights():
    ids = torch.randint(0, 100, (1, 16))
    real, meta = (amgfx.analyze(_llama(d), (), {"input_ids": ids}) for d in ("cpu", "meta"))
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.units) for g in real.groups if g.kind in ("qk", "v", "head", "mlp")}
    p_real, p_meta = allocate(real, scores, 0.5), allocate(meta, scores, 0.5)
    assert p_meta.keep == p_real.keep and p_meta.meta["flops"] == p_real.meta["flops"]
    small_real, small_meta = amgfx.apply(real.gm, p_real), amgfx.apply(meta.gm, p_meta, check=False)
    shapes = lambda gm: {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    assert shapes(small_meta) == shapes(small_real)
    assert all(t.device.type == "meta" for t in small_meta.parameters())
    with pytest.raises(amgfx.RewriteError, match="meta device"):
        amgfx.apply(meta.gm, p_meta)             # the oracle needs real weights, and says so
