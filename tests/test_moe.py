"""Mixture-of-experts MLPs: experts stacked in ``[E, out, in]`` weights and run by a grouped matmul
(``transformers.grouped_mm_fallback``) prune as one MLP whose neuron j is hidden channel j of every
expert; the router is left whole and reported as what it is, and FLOPs count the experts."""
import pytest
import torch

import amgfx

tf = pytest.importorskip("transformers")

COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)


def _moe(name):
    torch.manual_seed(0)
    make = {
        "mixtral": lambda: (tf.MixtralModel(tf.MixtralConfig(intermediate_size=48, num_key_value_heads=2,
                                                             num_local_experts=4, num_experts_per_tok=2, **COMMON)), 48),
        "qwen2_moe": lambda: (tf.Qwen2MoeModel(tf.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, **COMMON)), 24),
        "olmoe": lambda: (tf.OlmoeModel(tf.OlmoeConfig(intermediate_size=48, num_key_value_heads=4, num_experts=4,
                                                       num_experts_per_tok=2, **COMMON)), 48),
    }[name]
    m, hidden = make()
    return m.eval(), hidden, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_expert_mlps_are_found_pruned_in_every_expert_and_exact(name):
    m, hidden, kw = _moe(name)
    cg = amgfx.analyze(m, (), kw)
    experts = [x for x in cg.mlps if x.name.endswith(".experts")]
    assert len(experts) == 2 and all(x.hidden == hidden and x.gated for x in experts), cg.summary()
    text = cg.summary()
    assert "a router or a gate" in text                         # the router's softmax, named for what it is
    assert "experts.gate_up_proj, and amgfx has no rule" not in text
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"mlp": .5})
    small = amgfx.apply(cg, plan)                               # held against the oracle before it returns
    assert amgfx.verify(cg, plan, pruned=small).passed
    e = m.config.num_local_experts if name == "mixtral" else m.config.num_experts
    h = m.config.hidden_size
    for i in range(2):
        assert tuple(small.get_parameter(f"layers.{i}.mlp.experts.gate_up_proj").shape) == (e, hidden, h)
        assert tuple(small.get_parameter(f"layers.{i}.mlp.experts.down_proj").shape) == (e, h, hidden // 2)
    assert tuple(small.get_parameter("layers.0.mlp.gate.weight").shape) == (e, h)      # the router stays whole


def test_flops_count_the_experts_and_fall_by_what_their_pruning_removes():
    m, hidden, kw = _moe("mixtral")
    cg = amgfx.analyze(m, (), kw)
    small = amgfx.prune(cg, method="magnitude", ratios={"mlp": .5})
    tokens = kw["input_ids"].numel() * m.config.num_experts_per_tok         # every token meets top-k experts
    gone = hidden // 2
    h = m.config.hidden_size
    per_layer = 2 * tokens * (h * 2 * gone + gone * h)                       # gate+up rows and down columns removed
    assert amgfx.cost.measure_flops(cg.gm) - amgfx.cost.measure_flops(small) == 2 * per_layer


def test_a_flops_target_on_an_moe_model_is_met_as_measured_and_the_experts_are_not_refit():
    m, _, kw = _moe("qwen2_moe")
    calib = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    cg = amgfx.analyze(m, (), kw)
    small = amgfx.prune(cg, method="snp", target_flops=0.7, calib=calib, progress=False)
    f = small.meta["amgfx_plan"].meta["flops"]
    assert f["planned"] <= 0.7 * f["dense"] and amgfx.cost.measure_flops(small) == f["planned"]
    assert any("experts" in k for k in small.meta["amgfx_plan"].keep)
    refit = [layer["weight"] for layer in small.meta["amgfx_reconstruction"]["layers"]]
    assert refit and not any("experts" in w for w in refit)    # one fit per expert is not done yet
