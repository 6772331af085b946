"""Static key/value token pruning (AMG): the gather pass against the -inf oracle."""
import pytest
import torch

import amgfx
from passes._graph import constant, copy_module


def oracle(gm, kept: dict):
    """The captured model with -inf added to the logits of every key not kept (per attention node)."""
    ref = copy_module(gm)
    for node in list(ref.graph.nodes):
        if node.name in kept:
            n = node.args[1].meta["val"].shape[-2]
            bias = torch.full((1, n), float("-inf"))
            bias[0, kept[node.name]] = 0.0
            node.kwargs = {**node.kwargs, "attn_mask": constant(ref, node, bias, "oracle")}
    ref.recompile()
    return ref


def _rel(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("name, keep", [
    ("vit", {0: [0, 1, 3, 4], 1: [0, 2]}),                 # CLS + a few patches per block
    ("deit_distilled", {0: [0, 1, 2, 5], 1: [0, 1, 4]}),   # CLS and distillation token kept
])
def test_gather_equals_the_minus_inf_oracle(analysed_model, name, keep):
    m, args, kwargs, cg = analysed_model(name)
    sites = [s for s in cg.sites if s.supported]
    plan = amgfx.Plan(tokens={sites[i].name: k for i, k in keep.items()})
    small = amgfx.apply(cg, plan)
    ref = oracle(cg.gm, {sites[i].node: k for i, k in keep.items()})
    for batch in (1, 3):
        x = torch.randn(batch, *args[0].shape[1:])
        got, want = small(x), ref(x)
        assert _rel(got, want) < 1e-5
        assert _rel(cg.gm(x), want) > 1e-3          # the oracle differs from dense: the test can fail


def test_gather_composes_with_neuron_pruning(analysed_model):
    """Tokens on top of a q/k, v and MLP plan equal that plan's model under the -inf oracle."""
    m, args, kwargs, cg = analysed_model("vit")
    s = next(s for s in cg.sites if s.supported)
    neurons = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "mlp": 0.5})
    both = amgfx.Plan.from_dict({**neurons.to_dict(), "tokens": {s.name: [0, 1, 3]}})
    base, small = amgfx.apply(cg, neurons), amgfx.apply(cg, both)
    sdpa = [n.name for n in base.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    ref = oracle(base, {sdpa[0]: [0, 1, 3]})
    x = torch.randn(2, *args[0].shape[1:])
    assert _rel(small(x), ref(x)) < 1e-5 and _rel(base(x), ref(x)) > 1e-3


def test_flops_saved_include_the_kv_projections(analysed_model):
    m, args, kwargs, cg = analysed_model("vit")
    s = next(s for s in cg.sites if s.supported)
    kept = [0, 1, 2]
    small = amgfx.apply(cg, amgfx.Plan(tokens={s.name: kept}))
    x = torch.randn(2, *args[0].shape[1:])
    dense, pruned = (amgfx.cost.measure_flops(g, ((x,), {})) for g in (cg.gm, small))
    n = cg.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)[0]
    _, H, N, d = n.args[0].meta["val"].shape
    B, C = x.shape[0], H * d
    gone = N - len(kept)
    projections = 2 * 2 * B * gone * C * C            # K and V: 2 FLOPs per MAC, [B, gone, C] x [C, C]
    attention = 2 * 2 * B * H * N * gone * d          # q k^T and A v each lose `gone` keys
    assert dense - pruned == projections + attention


def test_exports_to_onnx(analysed_model, tmp_path):
    m, args, kwargs, cg = analysed_model("vit")
    s = next(s for s in cg.sites if s.supported)
    small = amgfx.apply(cg, amgfx.Plan(tokens={s.name: [0, 2, 4]}, keep={}))
    x = torch.randn(3, *args[0].shape[1:])
    path = amgfx.export_onnx(small, str(tmp_path / "t.onnx"))
    assert amgfx.onnx_parity(path, small, (x,), {}) < 1e-4


@pytest.mark.parametrize("tokens, words", [
    ({"blocks.9.attn": [0]}, "not in this model"),
    ({"blocks.0.attn": [0, 99]}, "distinct positions in 0..4"),
    ({"blocks.0.attn": []}, "at least one"),
])
def test_bad_token_plans_are_refused(analysed_model, tokens, words):
    *_, cg = analysed_model("vit")
    with pytest.raises(amgfx.PlanError, match=words):
        amgfx.apply(cg, amgfx.Plan(tokens=tokens))


def test_sites_with_an_attention_mask_are_refused_for_now(analysed_model):
    *_, cg = analysed_model("bert_minilm")
    s = next(s for s in cg.sites if s.supported)
    with pytest.raises(amgfx.RewriteError, match="attention mask"):
        amgfx.apply(cg, amgfx.Plan(tokens={s.name: [0, 1]}))
