"""A decoder's KV cache as graph state: a decode step that takes the cache and returns it updated
(``index_copy`` at the written slots) prunes with the plan, its cache shrinking with the kv heads, q/k
pairs and v units removed, and decodes the same tokens as the zeroed dense model."""
import pytest
import torch
import torch.nn as nn

import amgfx
from amgfx.graph.meta import EXAMPLE, STATE
from amgfx.passes.oracle import zeroed

tf = pytest.importorskip("transformers")
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

L = 16


class _Slots(CacheLayerMixin):
    """One layer's cache, given as tensors and written out of place at the step's slots."""
    is_compileable, is_sliding = True, False

    def __init__(self, keys, values, slots):
        super().__init__()
        self.keys, self.values, self.slots, self.is_initialized = keys, values, slots, True

    def lazy_initialization(self, k, v):
        pass

    def update(self, k, v, *args, **kwargs):
        self.keys = self.keys.index_copy(2, self.slots, k)
        self.values = self.values.index_copy(2, self.slots, v)
        return self.keys, self.values

    def get_mask_sizes(self, q):
        return self.keys.shape[2], 0

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return self.keys.shape[2]


class Step(nn.Module):
    """(ids, positions, slots, key mask, *caches) -> (logits, *caches): one decode step, cache in and out."""
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, slots, key_mask, *cache):
        c = Cache(layers=[_Slots(cache[2 * i], cache[2 * i + 1], slots) for i in range(len(cache) // 2)])
        allowed = (torch.arange(cache[0].shape[2])[None, None, :] <= slots[None, :, None]) & key_mask[:, None, :].bool()
        out = self.lm(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed[:, None], cache=c,
                      use_cache=True)
        return (out.logits, *[t for layer in c.layers for t in (layer.keys, layer.values)])


def _lm(name):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=64)
    lm = {"llama_gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common)),
          "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))}[name]().eval()
    cfg = lm.config
    return lm, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads


def _step_inputs(tok, pos, cache):
    return (torch.tensor([[tok]]), torch.tensor([[pos]]), torch.tensor([pos]), torch.ones(1, L, dtype=torch.long),
            *cache)


def _greedy(gm, prompt, cache, new):
    """Feed the prompt one token at a time, then decode ``new`` tokens greedily."""
    toks, nxt = list(prompt), None
    with torch.no_grad():
        for pos in range(len(prompt) + new - 1):
            tok = toks[pos] if pos < len(prompt) else nxt
            if pos >= len(prompt):
                toks.append(nxt)
            logits, *cache = gm(*_step_inputs(tok, pos, cache))
            nxt = int(logits[0, -1].argmax())
    return toks[len(prompt):] + [nxt], cache


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_a_pruned_decode_step_reads_and_writes_a_smaller_cache_and_decodes_like_the_zeroed_model(name):
    lm, kv, hd = _lm(name)
    step = Step(lm).eval()
    zeros = [torch.zeros(1, kv, L, hd) for _ in range(4)]
    with torch.no_grad():                            # a real history in the example cache, not zeros
        history = step(torch.randint(0, 128, (1, 5)), torch.arange(5)[None], torch.arange(5),
                       torch.ones(1, L, dtype=torch.long), *zeros)[1:]
    cg = amgfx.analyze(step, _step_inputs(3, 5, history))
    assert cg.counts()["qk"]["groups"] == 2 and cg.counts()["head"]["groups"] == 2, cg.summary()
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": .25, "v": .25, "head": .5, "mlp": .25})
    pruned = amgfx.apply(cg, plan)                   # checked against the zeroed model, cache included
    rep = amgfx.verify(cg, plan, pruned)
    assert rep.passed, str(rep)
    assert len(rep.outputs) == 5                     # logits and four caches compared
    caches = [tuple(n.meta["val"].shape) for n in pruned.graph.nodes if n.op == "placeholder"][4:]
    masks = pruned.meta[STATE]["inputs"]
    for shp, m in zip(caches, masks.values()):
        assert shp[0] == 1 and shp[2] == L           # batch and slots stay
        assert shp[1] * shp[3] == int(m.sum()) // L < kv * hd     # smaller by what the plan keeps
    assert [tuple(t.shape) for t in pruned.meta[EXAMPLE][0][4:]] == caches

    ref = zeroed(cg, plan)
    prompt = [5, 17, 99, 2]
    got, cache = _greedy(pruned, prompt, [torch.zeros(s) for s in caches], 8)
    want, ref_cache = _greedy(ref, prompt, zeros, 8)
    assert got == want
    for a, b, m in zip(cache, ref_cache, masks.values()):
        torch.testing.assert_close(a, b[m].reshape(a.shape), atol=1e-5, rtol=1e-4)


def test_a_cache_written_from_an_unpruned_source_is_left_alone():
    """Only the MLPs pruned: the cache keeps its size, and no state is recorded."""
    lm, kv, hd = _lm("llama_gqa")
    step = Step(lm).eval()
    cg = amgfx.analyze(step, _step_inputs(3, 0, [torch.zeros(1, kv, L, hd) for _ in range(4)]))
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"mlp": .5})
    pruned = amgfx.apply(cg, plan)
    assert STATE not in pruned.meta
    assert [tuple(n.meta["val"].shape) for n in pruned.graph.nodes if n.op == "placeholder"][4:] == [(1, kv, L, hd)] * 4
