"""Block removal: a plan that keeps no head of a site, or no neuron of an MLP, deletes that branch.

The oracle must hold exactly, the branch must be gone from the graph (its layers and its attention
op) and from the ONNX file, predicted FLOPs must equal measured ones, and .pt2/ONNX must round-trip.
"""
import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree

import amgfx
from amgfx.analysis.branches import branches
from amgfx.files import example_inputs
from amgfx.graph.ops import SDPA, SOFTMAX
from amgfx.planning.cost import measure_flops

MODELS = ["vit", "bert_minilm", "llama_gqa"]


def _attention_ops(gm) -> int:
    return sum(n.target in SDPA or n.target in SOFTMAX for n in gm.graph.nodes)


def _removal_plan(cg, extra: bool = True):
    """Every head of the last site and every neuron of the first MLP go; other units thinned too."""
    site = [s for s in cg.sites if s.supported][-1]
    mlp = cg.mlps[0]
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.25, "mlp": 0.5}, progress=False) if extra \
        else amgfx.Plan()
    plan.keep[f"head:{site.name}"] = []
    plan.keep[f"mlp:{mlp.name}"] = []
    return plan, site, mlp


@pytest.mark.parametrize("name", MODELS)
def test_removing_a_site_and_an_mlp_is_exact_and_deletes_them(name, analysed_model):
    _, _, _, cg = analysed_model(name)
    plan, site, mlp = _removal_plan(cg)
    small = amgfx.apply(cg, plan)                  # apply holds it against the oracle itself
    rep = amgfx.verify(cg, plan, pruned=small)
    assert rep.passed and rep.max_rel <= 1e-5, rep.status
    assert rep.removed == sorted([f"head:{site.name}", f"mlp:{mlp.name}"])
    assert _attention_ops(small) == _attention_ops(cg.gm) - 1
    weights = {site.q.weight, site.k.weight, site.v.weight, site.proj.weight} | {l.weight for l in (*mlp.fc1, mlp.fc2)}
    kept = dict(small.named_parameters())
    assert not weights & set(kept), sorted(weights & set(kept))          # their layers are gone with them
    assert all(b.bias[0][0] in kept for b in (site.proj, mlp.fc2) if b.bias)   # the biases still add
    narrowed = amgfx.apply(cg, amgfx.Plan(keep={k: v for k, v in plan.keep.items() if v}, units=plan.units))
    assert len(small.graph.nodes) < len(narrowed.graph.nodes)
    assert amgfx.cost.predict(cg, plan)["flops"]["pruned"] == measure_flops(small)


def test_removal_matches_the_module_zeroed_by_hand(analysed_model):
    """Independent of the analysis: zero timm's proj and fc2 weights in the module itself."""
    import copy
    m, (x,), _, cg = analysed_model("vit")
    plan = amgfx.Plan(keep={"head:blocks.1.attn": [], "mlp:blocks.0.mlp": []})
    small = amgfx.apply(cg, plan)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.blocks[1].attn.proj.weight.zero_()     # every head's columns: only the bias is left
        ref.blocks[0].mlp.fc2.weight.zero_()       # every neuron's column
    torch.testing.assert_close(small(x)[0] if isinstance(small(x), tuple) else small(x), ref(x), rtol=0, atol=1e-6)
    assert not torch.allclose(m(x), ref(x))       # the removal changes the model: the check can fail


# BERT's round trip (26 s on 2 cores) runs in `make test-slow`; its block removal is checked exact above
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "bert_minilm" else n for n in MODELS])
def test_a_removed_block_round_trips_through_pt2_and_onnx(name, analysed_model, tmp_path):
    _, _, _, cg = analysed_model(name)
    plan, _, _ = _removal_plan(cg, extra=False)
    small = amgfx.apply(cg, plan)
    amgfx.save(small, tmp_path)
    back = amgfx.load(tmp_path)
    assert back.meta["amgfx_plan"].to_json() == plan.to_json()
    dense_onnx = amgfx.export_onnx(cg.gm, tmp_path / "dense.onnx")
    path = amgfx.export_onnx(back, tmp_path / "model.onnx")
    count = lambda p: sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(p).graph.node)
    assert count(path) < count(dense_onnx)         # the branch's projections are not in the file
    for batch in (1, 2):
        args, kwargs = example_inputs(back, batch=batch, seed=batch)
        got = [t for t in pytree.tree_leaves(back(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        want = [t for t in pytree.tree_leaves(small(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
        assert amgfx.onnx_parity(path, back, args, kwargs) < 1e-4


def test_a_plan_says_why_a_group_cannot_go_to_zero(analysed_model):
    _, _, _, cg = analysed_model("cait")
    stuck = {n: b for n, b in branches(cg).items() if not b.removable}
    assert stuck, "cait's class-attention blocks read their branch output twice"
    name, b = next(iter(stuck.items()))
    with pytest.raises(amgfx.PlanError, match="cannot be removed whole") as e:
        amgfx.Plan(keep={name: []}).validate(cg)
    assert b.reason in str(e.value)
    site = next(s for s in cg.sites if s.supported)
    with pytest.raises(amgfx.PlanError, match=f'"head:{site.name}": \\[\\]'):
        amgfx.Plan(keep={f"qk:{site.name}": []}).validate(cg)


@pytest.mark.slow      # 56 s on 2 cores: two budget searches with blocks on and off
def test_the_budget_removes_a_weak_block_only_when_asked(analysed_model):
    _, _, _, cg = analysed_model("bert_minilm")
    scores = {g.name: np.linspace(0.5, 1.5, g.units) for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")}
    weak = f"mlp:{cg.mlps[2].name}"
    scores[weak] = np.full(cg.group(weak).units, 1e-3)       # every neuron of one MLP is worth little
    from amgfx.planning.budget import allocate
    narrow = allocate(cg, scores, 0.7, min_keep=0.25)
    assert all(len(v) >= int(0.25 * cg.group(k).units) for k, v in narrow.keep.items())   # min_keep, no removal
    plan = allocate(cg, scores, 0.7, min_keep=0.25, blocks=True)
    assert plan.keep[weak] == [] and plan.meta["removed"] == [weak]
    assert all(len(v) >= int(0.25 * cg.group(k).units) for k, v in plan.keep.items() if v)
    c = amgfx.cost.predict(cg, plan)["flops"]
    assert c["pruned"] <= 0.7 * c["dense"]
    small = amgfx.apply(cg, plan)
    assert amgfx.verify(cg, plan, pruned=small).passed
    protected = allocate(cg, scores, 0.7, min_keep=0.25, blocks=True, protect=[weak])
    assert weak not in protected.keep


def test_removed_blocks_survive_json_and_compose_in_survivors(analysed_model, tmp_path):
    _, _, _, cg = analysed_model("vit")
    plan, site, mlp = _removal_plan(cg)
    plan.save(tmp_path / "plan.json")
    again = amgfx.Plan.load(tmp_path / "plan.json")
    assert again.keep[f"head:{site.name}"] == [] and again.to_json() == plan.to_json()
    alive = again.survivors(cg)
    assert all(len(alive[f"{k}:{site.name}"]) == 0 for k in ("qk", "v", "head")) and len(alive[f"mlp:{mlp.name}"]) == 0


def test_inspect_lists_the_branches_that_can_go(capsys):
    from amgfx.cli import main
    assert main(["inspect", "vit_tiny_patch16_224", "--img-size", "32"]) == 0
    assert "blocks (whole branches, --remove-blocks): 24 of 24 attention/MLP branches can go" in capsys.readouterr().out
