"""The prune sequence (amgfx.sequence): one run for every entry point, capture kinds, configs saved and replayed."""
import dataclasses
import json

import models
import pytest
import torch

import amgfx
from amgfx.analysis.captured import Captured
from amgfx.sequence import CAPTURES, captured, run
from conftest import analysed


def test_the_configs_are_saved_into_the_plan_and_plan_again_exactly(tmp_path):
    m, (x,), _, cg = analysed("vit")
    calib = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = amgfx.PlanConfig(method="taylor", target_flops=0.7, kinds=("qk", "mlp"), round_to=8)
    small = amgfx.prune(cg, config=cfg, calib=calib, reconstruct=amgfx.RefitConfig(damp=0.1), progress=False)
    plan = small.meta["amgfx_plan"]
    plan.save(tmp_path / "plan.json")
    saved = json.loads((tmp_path / "plan.json").read_text())["meta"]["config"]
    assert amgfx.PlanConfig.from_dict(saved["plan"]) == cfg
    assert amgfx.RefitConfig.from_dict(saved["refit"]).damp == 0.1 and saved["recover"] is None
    again = amgfx.plan_for(cg, config=amgfx.PlanConfig.from_dict(saved["plan"]), calib=calib, progress=False)
    assert again.keep == plan.keep and again.keep


def test_keywords_are_a_thin_layer_over_the_config():
    _, (x,), _, cg = analysed("vit")
    a = amgfx.plan_for(cg, method="magnitude", ratios={"mlp": 0.5}, round_to=8, progress=False)
    b = amgfx.plan_for(cg, config=amgfx.PlanConfig(method="magnitude", ratios={"mlp": 0.5}, round_to=8), progress=False)
    assert a.keep == b.keep and a.meta["config"] == b.meta["config"]
    with pytest.raises(amgfx.AmgfxError, match="unknown plan option.*rounding"):
        amgfx.plan_for(cg, method="magnitude", ratios={"mlp": 0.5}, rounding=8)
    with pytest.raises(amgfx.AmgfxError, match="must be a fraction"):
        amgfx.PlanConfig(target_flops=1.5)


def test_a_new_capture_kind_plugs_into_prune_by_type(monkeypatch):
    """A model kind of several graphs is a capture kind registered by type: prune runs the same sequence on
    each graph with one plan and hands the pruned graphs to the kind's finish."""
    m, (x,), _, cg = analysed("vit")

    class Twin:                                  # a toy kind: the same model twice, as two graphs
        pass

    def capture_twin(model, example_inputs=None, example_kwargs=None, *, seed=0):
        return Captured((cg, amgfx.analyze(m, x)), finish=lambda pruned, plan: (pruned, plan))

    monkeypatch.setitem(CAPTURES, Twin, capture_twin)
    (a, b), plan = amgfx.prune(Twin(), method="magnitude", ratios={"mlp": 0.5}, progress=False)
    assert a is not b and plan.keep
    assert a.get_parameter("blocks.0.mlp.fc1.weight").shape == b.get_parameter("blocks.0.mlp.fc1.weight").shape
    torch.testing.assert_close(a(x), b(x))
    assert isinstance(captured(m, x), Captured) and len(captured(m, x).graphs) == 1


def test_the_sequence_reports_each_step_and_the_oracle():
    _, (x,), _, cg = analysed("vit")
    calib = [torch.randn(4, *x.shape[1:]) for _ in range(2)]
    r = run(Captured((cg,)), amgfx.PlanConfig(method="magnitude", ratios={"mlp": 0.5}), calib=calib,
            recover=amgfx.RecoverConfig(steps=2, lr=1e-4, heldout=None), progress=False)
    assert r.verify.passed and r.refitted is not None and r.recovered is r.model
    assert list(r.seconds) == ["plan", "rewrite", "refit", "recover"]
    assert r.plan.meta["config"]["recover"]["steps"] == 2
    assert r.model.meta["amgfx_recovery"]["loss"] == "kd"          # logits: distilled as such
    # the user's model is never touched: every tensor of the result is its own
    theirs = {t.data_ptr() for t in cg.gm.parameters()}
    assert not theirs & {t.data_ptr() for t in r.pruned[0].parameters()}


def test_a_decoder_refuses_what_its_kind_cannot_take():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    dec = amgfx.decoder(LlamaForCausalLM(cfg).eval(), max_len=16, prompt_len=8)
    with pytest.raises(amgfx.AmgfxError, match="token pruning is not for decoders"):
        amgfx.prune(dec, ratios={"mlp": 0.5}, tokens=0.5, progress=False)
    with pytest.raises(amgfx.AmgfxError, match="schedule= is not supported for decoders"):
        amgfx.prune(dec, target_flops=0.8, schedule=amgfx.Iterative(steps=2), progress=False)


@dataclasses.dataclass(frozen=True)
class Smallest(amgfx.Magnitude):
    """A planted bad criterion: keeps the units of least magnitude (the MLP neurons that carry the signal go)."""
    name = "smallest"

    def score(self, cg, group, stats, seed=0):
        return -super().score(cg, group, stats, seed)


def test_held_out_error_reads_real_tokens_only_and_pools_token_states_as_an_embedding_is_read():
    from amgfx.scoring.readout import as_read as _real
    out, mask = torch.arange(12.).reshape(2, 3, 2), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(_real(out, {"attention_mask": mask}), torch.tensor([[1., 2.], [6., 7.]]))   # padding unread
    assert _real(out, {}).shape == (2, 3, 2)
    tags, mask4 = torch.arange(24.).reshape(2, 3, 2, 2), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert _real(tags, {"attention_mask": mask4}).shape == (3, 2, 2)


def _loud_mlp():
    """The test ViT with half of every MLP's neurons made ten times louder: which half a plan keeps matters."""
    m, (x,), _ = models.vit()
    with torch.no_grad():
        for blk in m.blocks:
            blk.mlp.fc1.weight[::2] *= 10
            blk.mlp.fc2.weight[:, ::2] *= 10
    return m, x


@pytest.mark.parametrize("order", [0, 1])
def test_auto_picks_the_better_of_two_planted_criteria_and_says_so(order):
    m, x = _loud_mlp()
    calib = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cands = (Smallest(), "magnitude")[::1 if order == 0 else -1]
    plans = [amgfx.plan_for(m, x, method="auto", candidates=cands, ratios={"mlp": 0.5}, calib=calib, progress=False)
             for _ in range(2)]
    a = plans[0].meta["auto"]
    assert a["chosen"] == "magnitude", a
    assert a["errors"]["magnitude"] < 0.5 * min(v for k, v in a["errors"].items() if k != "magnitude")
    assert plans[0].keep == plans[1].keep and a == plans[1].meta["auto"]          # deterministic for a seed
    kept = plans[0].keep["mlp:blocks.0.mlp"]
    assert sum(u % 2 == 0 for u in kept) == len(kept)                              # the loud half stayed
    saved = json.loads(plans[0].to_json())["meta"]
    assert saved["auto"]["chosen"] == "magnitude" and saved["config"]["plan"]["method"] == "auto"


def test_auto_without_data_to_hold_out_says_it_took_the_first_candidate():
    m, (x,), _ = models.vit()
    with pytest.warns(UserWarning, match="nothing to hold out, so the first candidate"):
        plan = amgfx.plan_for(m, x, method="auto", ratios={"mlp": 0.5}, calib=[torch.randn(4, *x.shape[1:])],
                              candidates=("magnitude", "snp"), progress=False)
    assert plan.meta["auto"]["chosen"] == "magnitude" and plan.meta["auto"]["errors"] == {}
    assert plan.meta["criteria"]["mlp"].startswith("Magnitude")
    with pytest.raises(amgfx.AmgfxError, match="not 'auto' itself"):
        amgfx.PlanConfig(method="auto", candidates=("auto",))


def test_auto_is_the_default_and_without_calib_takes_its_first_candidate_quietly():
    import warnings
    m, (x,), _ = models.vit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no calib given: nothing to warn about
        plan = amgfx.plan_for(m, x, ratios={"mlp": 0.5}, candidates=("magnitude", "snp"), progress=False)
    assert amgfx.PlanConfig().method == plan.meta["config"]["plan"]["method"] == "auto"
    assert plan.meta["auto"]["chosen"] == "magnitude" and "nothing to hold out" in plan.meta["auto"]["why"]


def test_auto_plans_its_choice_again_on_every_batch():
    """Chosen on three quarters of the batches, the plan is made on all of them: the held-out statistics count."""
    m, (x,), _ = models.vit()
    calib = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plan = lambda **kw: amgfx.plan_for(m, x, ratios={"mlp": 0.5}, progress=False, **kw)
    auto = plan(method="auto", candidates=("snp",), calib=calib)
    assert auto.meta["auto"]["planned_on"] == 4 and auto.meta["auto"]["fit_batches"] == 3
    assert auto.keep == plan(method="snp", calib=calib).keep != plan(method="snp", calib=calib[:3]).keep
