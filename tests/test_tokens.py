"""Static key/value token pruning (AMG): the gather pass against the -inf oracle."""
import numpy as np
import pytest
import torch

import amgfx
from amgfx.planning.budget import select_tokens
from amgfx.analysis.tokens import token_sites
from amgfx.passes.oracle import masked_keys


def oracle(gm, kept: dict):
    """The captured model with -inf added to the logits of every key not kept (per attention node)."""
    return masked_keys(gm, kept)


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
    base = amgfx.apply(cg, amgfx.Plan())             # dead-token elimination in the last block, in both
    dense, pruned = (amgfx.cost.measure_flops(g, ((x,), {})) for g in (base, small))
    n = cg.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)[0]
    _, H, N, d = n.args[0].meta["val"].shape
    B, C = x.shape[0], H * d
    gone = N - len(kept)
    # what should be saved, counted by torch's own counter (whose attention rule depends on the release)
    count = lambda f: amgfx.cost.measure_flops(f, ((), {}))
    w = torch.randn(C, C)
    projections = 2 * count(lambda: torch.nn.functional.linear(torch.randn(B, gone, C), w))   # K and V
    sdpa = lambda keys: torch.nn.functional.scaled_dot_product_attention(
        torch.randn(B, H, N, d), torch.randn(B, H, keys, d), torch.randn(B, H, keys, d))
    attention = count(lambda: sdpa(N)) - count(lambda: sdpa(len(kept)))
    assert projections > 0
    assert dense - pruned == projections + attention


@pytest.mark.parametrize("name", ["vit", "bert_minilm"])
def test_predicted_flops_match_the_measured_count(analysed_model, name):
    """cost.predict (what the budget bisects on) counts token gathers as the rewrite does."""
    m, args, kwargs, cg = analysed_model(name)
    neurons = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "mlp": 0.5})
    plan = amgfx.Plan.from_dict({**neurons.to_dict(), "tokens": {s.name: [0, 2, 3] for s in cg.sites}})
    p = amgfx.cost.predict(cg, plan)["flops"]
    small = amgfx.apply(cg, plan)
    assert p["dense"] == amgfx.cost.measure_flops(cg.gm)
    assert p["pruned"] == amgfx.cost.measure_flops(small) < amgfx.cost.predict(cg, neurons)["flops"]["pruned"]


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


def test_bert_padding_mask_is_gathered_with_the_keys(analysed_model):
    """Padded BERT: the pruned model equals the oracle, and a padded row equals the same text run unpadded."""
    m, args, kwargs, cg = analysed_model("bert_minilm")
    sites = [s for s in cg.sites if s.supported]
    kept = [0, 1, 2, 4, 6, 9, 12]                    # the second text has 5 real tokens: keeps 0, 1, 2, 4
    small = amgfx.apply(cg, amgfx.Plan(tokens={s.name: kept for s in sites}))
    got = small(**kwargs)["last_hidden_state"]
    want = oracle(cg.gm, {s.node: kept for s in sites})(**kwargs)["last_hidden_state"]
    assert _rel(got, want) < 1e-5
    assert _rel(cg.gm(**kwargs)["last_hidden_state"], want) > 1e-3
    n = int(kwargs["attention_mask"][1].sum())
    alone = {k: v[1:, :n] for k, v in kwargs.items()}
    cg1 = amgfx.analyze(m, (), alone)
    ref1 = oracle(cg1.gm, {s.node: [i for i in kept if i < n] for s in cg1.sites if s.supported})
    assert _rel(got[1, :n], ref1(**alone)["last_hidden_state"][0]) < 1e-5


def test_token_sites_know_special_tokens_and_refuse_what_is_not_static(analysed_model):
    """Special tokens come from the graph (parameter-only pieces of the token cat); refusals say why."""
    special = {name: {t.special == [] and "none" or tuple(t.special) for t in token_sites(analysed_model(name)[-1]).values()
                      if t.prunable}
               for name in ("vit", "deit_distilled", "hf_vit", "bert_minilm")}
    assert special == {"vit": {(0,)}, "deit_distilled": {(0, 1)}, "hf_vit": {(0,)}, "bert_minilm": {"none"}}
    reasons = {name: {t.reason for t in token_sites(analysed_model(name)[-1]).values()}
               for name in ("gpt2", "llama_gqa", "swin")}
    assert reasons["gpt2"] == reasons["llama_gqa"] == {"its attention mask differs between queries (causal or "
                                                       "per-query masking)"}
    assert all("SDPA" in r for r in reasons["swin"])


def test_windowed_attention_is_refused():
    import timm
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, depths=(1, 1, 2, 1)).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = True                    # SDPA sites, windows still built by reshape
    cg = amgfx.analyze(m, torch.randn(1, 3, 56, 56))
    t = token_sites(cg)["layers.0.blocks.0.attn"]
    assert "windowed" in t.reason
    with pytest.raises(amgfx.PlanError, match="windowed"):
        amgfx.apply(cg, amgfx.Plan(tokens={t.site: [0, 1]}))


@pytest.mark.parametrize("name, tokens, words", [
    ("deit_distilled", {"blocks.0.attn": [0, 2, 3]}, r"drops position\(s\) \[1\], which hold special tokens"),
    ("gpt2", {"h.0.attn": [0, 1]}, "differs between queries"),
])
def test_special_tokens_and_causal_sites_are_refused(analysed_model, name, tokens, words):
    *_, cg = analysed_model(name)
    with pytest.raises(amgfx.PlanError, match=words):
        amgfx.apply(cg, amgfx.Plan(tokens=tokens))


def test_verify_uses_the_token_oracle(analysed_model):
    m, args, kwargs, cg = analysed_model("deit_distilled")
    plan = amgfx.Plan(tokens={s.name: [0, 1, 3] for s in cg.sites})
    assert amgfx.verify(cg, plan).passed


def test_select_tokens_ranks_globally_after_per_layer_normalisation(analysed_model):
    *_, cg = analysed_model("deit_distilled")
    rng = np.random.default_rng(0)
    scores = {s.name: rng.random(6) * 10.0 ** i for i, s in enumerate(cg.sites)}   # layers on other scales
    kept = select_tokens(cg, scores, 0.4)
    sites = token_sites(cg)
    assert sum(t.keys - len(kept.get(n, range(t.keys))) for n, t in sites.items()) == round(0.4 * 12)
    norm = {n: s / s.mean() for n, s in scores.items()}
    dropped = [norm[n][j] for n, k in kept.items() for j in range(6) if j not in k]
    survivors = [norm[n][j] for n, t in sites.items() for j in kept.get(n, range(6)) if j not in t.special]
    assert max(dropped) < min(survivors)
    assert all(set(t.special) <= set(kept.get(n, t.special)) for n, t in sites.items())
    floor = select_tokens(cg, scores, 0.9, min_keep=0.5)
    assert all(len(k) == 3 for k in floor.values()) and len(floor) == 2


def test_prune_tokens_alone_and_inside_a_flops_budget(analysed_model):
    m, args, kwargs, cg = analysed_model("deit_distilled")
    calib = [torch.randn(4, *args[0].shape[1:]) for _ in range(2)]
    small = amgfx.prune(cg, method="amg", tokens=0.4, calib=calib, progress=False)
    plan = small.meta["amgfx_plan"]
    assert plan.keep == {} and sum(len(k) for k in plan.tokens.values()) == 12 - round(0.4 * 12)
    assert amgfx.verify(cg, plan, pruned=small).passed
    assert amgfx.cost.measure_flops(small) == amgfx.cost.predict(cg, plan)["flops"]["pruned"]
    both = amgfx.plan_for(cg, method="snp+amg", tokens=0.4, target_flops=0.6, calib=calib, progress=False)
    assert both.tokens == plan.tokens and both.keep
    assert amgfx.cost.measure_flops(amgfx.apply(cg, both)) == both.meta["flops"]["planned"] <= 0.6 * both.meta["flops"]["dense"]


@pytest.mark.parametrize("name, live", [("vit", [0]), ("deit_distilled", [0, 1]), ("eva02", [1, 2, 3, 4])])
def test_dead_token_elimination_is_exact_and_cuts_flops(analysed_model, name, live):
    """Class-token (and EVA's patch-mean) classifiers: the last block computes only the positions read."""
    m, args, kwargs, cg = analysed_model(name)
    small = amgfx.apply(cg, amgfx.Plan())
    assert list(small.meta["amgfx_dead_tokens"]["live"].values()) == [live]
    for batch in (1, 3):
        x = torch.randn(batch, *args[0].shape[1:])
        with torch.no_grad():
            assert _rel(small(x), m(x)) < 1e-5
    dense = amgfx.cost.measure_flops(cg.gm)
    assert amgfx.cost.measure_flops(small) == amgfx.cost.predict(cg, amgfx.Plan())["flops"]["pruned"] < dense
    off = amgfx.Plan(options={"dead_tokens": "off"})
    assert amgfx.cost.measure_flops(amgfx.apply(cg, off)) == amgfx.cost.predict(cg, off)["flops"]["pruned"] == dense


def test_dead_tokens_with_residual_channels_pruned(analysed_model):
    """The residual keeps every row but fewer channels; its partner, narrowed to the live rows,
    keeps the same channels: the residual is gathered to those rows (it used to be refused)."""
    m, args, kwargs, cg = analysed_model("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"residual": 0.25, "mlp": 0.5})
    small = amgfx.apply(cg, plan)
    assert small.meta["amgfx_dead_tokens"]["applied"]
    off = amgfx.apply(cg, amgfx.Plan.from_dict({**plan.to_dict(), "options": {**plan.options, "dead_tokens": "off"}}))
    x = torch.randn(3, *args[0].shape[1:])
    with torch.no_grad():
        assert _rel(small(x), off(x)) < 1e-5 and _rel(off(x), m(x)) > 1e-3     # residual pruning is not exact
    assert amgfx.cost.measure_flops(small) == amgfx.cost.predict(cg, plan)["flops"]["pruned"] < \
        amgfx.cost.measure_flops(off)


def test_dead_tokens_leave_sequence_outputs_alone(analysed_model):
    *_, cg = analysed_model("bert_minilm")            # last_hidden_state: every position is read
    assert amgfx.apply(cg, amgfx.Plan()).meta.get("amgfx_dead_tokens") is None


def test_everything_together_exports_to_onnx(analysed_model, tmp_path):
    """Neurons, tokens and dead tokens at once: the oracle holds and onnxruntime agrees."""
    m, args, kwargs, cg = analysed_model("deit_distilled")
    neurons = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "head": 0.34, "mlp": 0.5})
    plan = amgfx.Plan.from_dict({**neurons.to_dict(), "tokens": {s.name: [0, 1, 4] for s in cg.sites}})
    small = amgfx.apply(cg, plan)
    assert small.meta["amgfx_dead_tokens"]["applied"] and amgfx.verify(cg, plan, pruned=small).passed
    x = torch.randn(2, *args[0].shape[1:])
    path = amgfx.export_onnx(small, str(tmp_path / "all.onnx"))
    assert amgfx.onnx_parity(path, small, (x,), {}) < 1e-4
