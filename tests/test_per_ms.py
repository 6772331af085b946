"""rank="per_ms" (amgfx.planning.per_ms): steps weighed by the milliseconds a unit saves; the budget still holds."""
import pytest
import timm
import torch

import amgfx
from amgfx.errors import AmgfxError
from amgfx.planning import per_ms
from amgfx.planning.latency import OpTimes
from amgfx.scoring.criteria import Magnitude


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    # 17 tokens, not 5: on a handful of tokens a linear's time is its weights' reading, whatever the rows
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    return m, amgfx.analyze(m, torch.randn(1, 3, 64, 64))


def test_weights_follow_the_milliseconds_a_unit_saves(vit):
    _, cg = vit
    scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")}
    times = OpTimes(path=None)
    ms = per_ms.unit_ms(cg, scores, times)
    w = per_ms.time_weights(cg, scores, times)
    assert set(w) == set(scores) and all(1 / per_ms.CLIP <= x <= per_ms.CLIP for x in w.values())
    # the last block computes the class token only: its MLP units save less, so they weigh more
    assert ms["mlp:blocks.1.mlp"] < ms["mlp:blocks.0.mlp"] and w["mlp:blocks.1.mlp"] > w["mlp:blocks.0.mlp"]
    # among the neuron kinds, more time saved per unit is always less weight (heads are weighed apart)
    neurons = sorted((ms[n], w[n]) for n in w if not n.startswith("head:"))
    assert all(a[1] >= b[1] for a, b in zip(neurons, neurons[1:]))


def test_plan_for_ranks_per_ms_within_the_budget_and_records_the_weights(vit):
    _, cg = vit
    calib = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    opts = dict(method="magnitude", target_flops=0.6, calib=calib, round_to=1, progress=False)
    score = amgfx.plan_for(cg, **opts)
    fast = amgfx.plan_for(cg, rank="per_ms", **opts)
    w = fast.meta["rank"]["per_ms"]
    assert fast.meta["flops"]["planned"] <= 0.6 * fast.meta["flops"]["dense"]
    assert fast.meta["config"]["plan"]["rank"] == "per_ms" and "rank" not in score.meta    # auto: score for FLOPs
    kept = lambda p, g: len(p.keep.get(g, range(768)))
    # the group that weighs more keeps at least as much as the score ranking gave it
    heavy = max((n for n in w if n.startswith("mlp:")), key=w.get)
    assert kept(fast, heavy) >= kept(score, heavy) and fast.keep != score.keep


def test_rank_auto_ranks_a_latency_budget_per_ms_and_a_flops_budget_by_score():
    assert amgfx.PlanConfig(target_latency=0.5).per_ms and not amgfx.PlanConfig(target_flops=0.5).per_ms
    assert not amgfx.PlanConfig(target_latency=0.5, rank="score").per_ms
    assert amgfx.PlanConfig(target_flops=0.5, rank="per_ms").per_ms


def test_per_ms_needs_a_budget_and_is_refused_while_streaming():
    with pytest.raises(AmgfxError, match="rank must be"):
        amgfx.PlanConfig(rank="fast")
    with pytest.raises(AmgfxError, match="target_flops or target_latency"):
        amgfx.PlanConfig(rank="per_ms", ratios={"mlp": 0.5})
    from amgfx.stream import prune_streamed
    with pytest.raises(AmgfxError, match="rank='per_ms'"):
        prune_streamed("no-such-dir", rank="per_ms", target_flops=0.5, calib=[torch.zeros(1, 8, dtype=torch.long)])
