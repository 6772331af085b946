"""The rewrite passes: exact against the zeroing oracle, predictable in size, safe for the user."""
import copy

import numpy as np
import pytest
import torch
from conftest import analysed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amgfx
from amgfx.planning.cost import count_params, measure_flops, predict

SUPPORTED = ["vit", "vit_matmul", "deit_distilled", "eva02", "swin", "bert_minilm", "gpt2", "llama_gqa", "hf_vit"]
EXACT_KINDS = ("qk", "v", "head", "mlp")


def _run(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def random_plan(cg, rng, kinds=EXACT_KINDS) -> amgfx.Plan:
    """Random counts and random surviving indices; per-head counts equal, as the Plan requires."""
    plan = amgfx.Plan()
    for g in cg.groups:
        if g.kind not in kinds or rng.random() < 0.2:
            continue
        if g.kind in ("qk", "v"):
            heads = np.unique(g.heads)
            per = g.units // len(heads)
            n = int(rng.integers(1, per + 1))
            keep = [int(u) for h in heads for u in rng.choice(np.nonzero(g.heads == h)[0], n, replace=False)]
        else:
            keep = rng.choice(g.units, int(rng.integers(1, g.units + 1)), replace=False).tolist()
        plan.keep[g.name] = sorted(keep)
        plan.units[g.name] = g.units
    return plan


@pytest.mark.parametrize("name", SUPPORTED)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])    # examples: the profile (conftest)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_plans_match_the_zeroing_oracle(name, seed):
    m, args, kwargs, cg = analysed(name)
    plan = random_plan(cg, np.random.default_rng(seed))
    report = amgfx.verify(cg, plan)
    assert report.exact
    assert report.passed, f"{name} seed={seed}\n{report}"


@pytest.mark.parametrize("name", SUPPORTED)
def test_keep_all_is_identical(name):
    m, args, kwargs, cg = analysed(name)
    plan = amgfx.Plan(keep={g.name: list(range(g.units)) for g in cg.groups})
    plan.options["dead_tokens"] = "off"              # exact, but narrower matmuls round differently
    pruned = amgfx.apply(cg, plan)
    from conftest import assert_outputs_match
    extra = {"use_cache": False} if getattr(getattr(m, "config", None), "use_cache", False) else {}
    with torch.no_grad():                               # (amgfx captures decoders without their KV cache)
        assert_outputs_match(pruned(*args, **kwargs), m(*args, **kwargs, **extra))      # bitwise, every output


@pytest.mark.parametrize("name", SUPPORTED)
def test_params_and_flops_fall_as_predicted(name):
    m, args, kwargs, cg = analysed(name)
    plan = random_plan(cg, np.random.default_rng(1), kinds=EXACT_KINDS + ("residual",))
    pruned = amgfx.apply(cg, plan)
    want = predict(cg, plan)
    assert want["flops"]["dense"] == measure_flops(cg.gm)          # the formulas agree with torch's counter
    assert want["params"]["dense"] == count_params(m)
    assert count_params(pruned) == want["params"]["pruned"] < want["params"]["dense"]
    assert measure_flops(pruned) == want["flops"]["pruned"] < want["flops"]["dense"]


def test_pruning_changes_the_function_and_the_oracle_can_fail():
    m, args, kwargs, cg = analysed("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "mlp": 0.5})
    pruned = amgfx.apply(cg, plan)
    assert not torch.allclose(_run(pruned, args, kwargs)[0], _run(m, args, kwargs)[0], rtol=1e-3)
    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        broken.get_parameter("blocks.1.mlp.fc1.weight")[0] += torch.randn(192)   # (a constant would cancel: LN output sums to 0)
    assert not amgfx.verify(cg, plan, pruned=broken).passed


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_residual_pruning_is_reported_approximate(name):
    m, args, kwargs, cg = analysed(name)
    report = amgfx.verify(cg, amgfx.plan_for(cg, method="magnitude", ratios={"residual": 0.25}))
    assert not report.exact and not report.passed
    assert "APPROXIMATE" in report.status and report.max_rel > 0


def test_qk_smaller_than_v_splits_fused_qkv_and_pads_for_the_flash_kernel():
    m, args, kwargs, cg = analysed("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25})
    pruned = amgfx.apply(cg, plan)
    names = {n for n, _ in pruned.named_parameters()}
    assert "blocks.0.attn.qkv.q_weight" in names and "blocks.0.attn.qkv.weight" not in names
    assert tuple(pruned.get_parameter("blocks.0.attn.qkv.q_weight").shape) == (3 * 32, 192)
    assert tuple(pruned.get_parameter("blocks.0.attn.qkv.v_weight").shape) == (3 * 48, 192)
    sdpa = [n for n in pruned.graph.nodes if "scaled_dot" in str(n.target)]
    assert all(n.kwargs["scale"] == 64 ** -0.5 for n in sdpa)                 # the original scale
    assert all(n.args[0].meta["val"].shape[-1] == n.args[2].meta["val"].shape[-1] == 48 for n in sdpa)
    unpadded = amgfx.apply(cg, amgfx.Plan(keep=plan.keep, options={"lowering": "none", "split_qkv": "auto"}))
    assert torch.allclose(_run(unpadded, args, kwargs)[0], _run(pruned, args, kwargs)[0], atol=1e-5)


def test_equal_head_dims_keep_the_fused_projection_unless_asked():
    m, args, kwargs, cg = analysed("vit")
    keep = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.5}).keep
    fused = amgfx.apply(cg, amgfx.Plan(keep=keep))
    split = amgfx.apply(cg, amgfx.Plan(keep=keep, options={"split_qkv": "always", "lowering": "auto"}))
    assert tuple(fused.get_parameter("blocks.0.attn.qkv.weight").shape) == (3 * 3 * 32, 192)
    assert "blocks.0.attn.qkv.weight" not in dict(split.named_parameters())
    assert torch.allclose(_run(fused, args, kwargs)[0], _run(split, args, kwargs)[0], atol=1e-5)


# ------------------------------------------------------------------------------------------ plans
def test_plan_json_round_trip_replays(tmp_path):
    m, args, kwargs, cg = analysed("llama_gqa")
    plan = amgfx.plan_for(cg, method="random", ratios={"qk": 0.5, "v": 0.25, "head": 0.5, "mlp": 0.5}, seed=3)
    plan.save(tmp_path / "plan.json")
    again = amgfx.Plan.load(tmp_path / "plan.json")
    assert again.keep == plan.keep and again.units == plan.units and again.meta["method"] == "random"
    a, b = (_run(amgfx.apply(cg, p), args, kwargs)[0] for p in (plan, again))
    assert torch.equal(a, b)


def test_plan_from_another_model_names_the_group():
    _, _, _, vit = analysed("vit")
    _, _, _, deit = analysed("deit_distilled")
    _, _, _, gpt2 = analysed("gpt2")
    plan = amgfx.plan_for(gpt2, method="magnitude", ratios={"mlp": 0.5})
    with pytest.raises(amgfx.PlanError, match=r"mlp:h\.0\.mlp.*another model"):
        amgfx.apply(vit, plan)
    plan = amgfx.plan_for(vit, method="magnitude", ratios={"mlp": 0.5})
    deit_units = {g.name: g.units for g in deit.groups}
    assert all(deit_units.get(n) == u for n, u in plan.units.items())   # same groups, same sizes...
    with pytest.raises(amgfx.PlanError, match=r"another model: group 'mlp:blocks\.0\.mlp'"):
        amgfx.apply(deit, plan)                                         # ...but not the same parameters
    plan.units["mlp:blocks.0.mlp"] = 999
    with pytest.raises(amgfx.PlanError, match=r"mlp:blocks\.0\.mlp.*999"):
        amgfx.apply(vit, plan)


@pytest.mark.parametrize("edit,match", [
    (lambda k: k["qk:blocks.0.attn"].append(10_000), r"qk:blocks\.0\.attn.*unit 10000 is out of range"),
    (lambda k: k["qk:blocks.0.attn"].pop(0), r"qk:blocks\.0\.attn.*per head differ"),
    (lambda k: k["mlp:blocks.1.mlp"].append(k["mlp:blocks.1.mlp"][0]), r"mlp:blocks\.1\.mlp.*twice"),
    (lambda k: k.__setitem__("qk:blocks.1.attn", []), r"qk:blocks\.1\.attn.*keeps no unit.*head:blocks\.1\.attn"),
])
def test_hand_edited_plan_errors_name_the_group(edit, match):
    _, _, _, cg = analysed("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "mlp": 0.5})
    edit(plan.keep)
    with pytest.raises(amgfx.PlanError, match=match):
        plan.validate(cg)


def test_bad_plan_file(tmp_path):
    (tmp_path / "p.json").write_text('{"keep": {}}')
    with pytest.raises(amgfx.PlanError, match="not an amgfx plan"):
        amgfx.Plan.load(tmp_path / "p.json")


# --------------------------------------------------------------------------------- the user's model
def test_the_users_model_is_never_modified():
    from models import llama_gqa
    m, args, kwargs = llama_gqa()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    pruned = amgfx.prune(m, args, kwargs, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "head": 0.5, "mlp": 0.5, "residual": 0.25})
    amgfx.verify(m, pruned.meta["amgfx_plan"], args, kwargs)
    with torch.no_grad():                            # training the result must not reach the original
        for p in pruned.parameters():
            p.add_(1.0)
    assert m.training and all(x.training for x in m.modules())
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["vit", "eva02", "swin", "bert_minilm", "gpt2", "llama_gqa"])
def test_a_pruned_module_can_be_analysed_and_pruned_again(name):
    m, args, kwargs, cg = analysed(name)
    first = amgfx.apply(cg, amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "head": 0.5, "mlp": 0.5}))
    again = amgfx.analyze(first)
    r = first.meta["amgfx_plan"].resolve(cg).attention
    want = sorted((a.heads, a.qk_dim, a.v_dim) for a in r.values())
    assert sorted((s.num_heads, s.head_dim_qk, s.head_dim_v) for s in again.sites if s.supported) == want
    second = amgfx.plan_for(again, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "mlp": 0.5})
    assert amgfx.verify(again, second).passed


def test_the_row_edits_have_one_order_for_the_passes_and_the_cost_model():
    """ROW_EDITS is the order: the pipeline follows it (check_order refuses another), the cost model replays it."""
    import amgfx.passes as P
    from amgfx.graph.rows import ROW_EDITS
    from amgfx.planning import cost
    assert [p.name for p in P.PIPELINE if p.name in ROW_EDITS] == list(ROW_EDITS)
    assert list(cost._ROW_EDIT) == list(ROW_EDITS)

    @P.graph_pass(requires=(), ensures=())
    def token_gather(gm, plan):
        return gm

    @P.graph_pass(requires=(), ensures=())
    def dead_tokens(gm, plan):
        return gm

    P.check_order([token_gather, dead_tokens])
    with pytest.raises(P.PassOrderError, match="ROW_EDITS"):       # no requires broken: the order alone
        P.check_order([dead_tokens, token_gather])
