"""allocation="error" (amgfx.error_budget): weights move the ranking walk; the driver keeps the better plan of two on
held-out batches and says what it measured."""
import numpy as np
import pytest
import timm
import torch

import amgfx
from amgfx.errors import AmgfxError
from amgfx.planning.budget import allocate
from amgfx.scoring.criteria import Magnitude


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    return m, amgfx.analyze(m, torch.randn(1, 3, 32, 32))


def test_a_weighed_group_keeps_more_and_the_budget_still_holds(vit):
    _, cg = vit
    scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind == "mlp"}
    plain = allocate(cg, scores, 0.6, round_to=1)
    heavy = allocate(cg, scores, 0.6, round_to=1, weights={"mlp:blocks.0.mlp": 3.0})
    kept = lambda p, g: len(p.keep.get(g, range(768)))
    assert kept(heavy, "mlp:blocks.0.mlp") > kept(plain, "mlp:blocks.0.mlp")
    assert kept(heavy, "mlp:blocks.1.mlp") < kept(plain, "mlp:blocks.1.mlp")
    f = heavy.meta["flops"]
    assert f["planned"] <= 0.6 * f["dense"]


def test_error_allocation_keeps_the_plan_with_the_lower_heldout_error_and_records_both(vit):
    m, _ = vit
    calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plan = amgfx.plan_for(m, calib[0], method="magnitude", target_flops=0.5, calib=calib, allocation="error",
                          progress=False)
    a = plan.meta["allocation"]
    assert set(a["errors"]) == {"ranking", "error"} and a["errors"][a["chosen"]] == min(a["errors"].values())
    assert a["heldout_batches"] == 1 and a["fit_batches"] == 3
    w = [v["weight"] for v in a["layers"].values()]
    assert len(w) >= 2 and all(0.25 <= x <= 4 for x in w) and np.std(w) > 0    # layers measured apart
    assert plan.meta["flops"]["planned"] <= 0.5 * plan.meta["flops"]["dense"]
    assert plan.meta["config"]["plan"]["allocation"] == "error"
    rank = amgfx.plan_for(m, calib[0], method="magnitude", target_flops=0.5, calib=calib, progress=False)
    assert (plan.keep == rank.keep) == (a["chosen"] == "ranking")     # the ranking kept: the ranking's own plan
    with pytest.warns(UserWarning, match="at least 2 calibration batches"):
        one = amgfx.plan_for(m, calib[0], method="magnitude", target_flops=0.5, calib=calib[:1], allocation="error",
                             progress=False)
    assert one.meta["allocation"]["chosen"] == "ranking"
    with pytest.raises(AmgfxError, match="allocation must be"):
        amgfx.PlanConfig(allocation="owl")


def test_the_cli_plans_by_layer_error_and_plan_json_says_what_it_measured(tmp_path, capsys):
    from amgfx.cli import main
    f = tmp_path / "m.py"
    f.write_text("import torch, timm\ntorch.manual_seed(0)\n"
                 "MODEL = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=1)\n"
                 "def build():\n    return MODEL, torch.randn(1, 3, 32, 32)\n")
    out = tmp_path / "out"
    code = main(["prune", f"{f}:build", "--method", "magnitude", "--allocation", "error", "--target-flops", "0.5",
                 "--calib", "digits", "--calib-samples", "16", "--batch-size", "4", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    plan = amgfx.Plan.load(out / "plan.json")
    a = plan.meta["allocation"]
    assert plan.meta["config"]["plan"]["allocation"] == "error" and a["heldout_batches"] == 1 and a["fit_batches"] == 3
    assert a["chosen"] in a["errors"] and a["layers"]
