"""The pictures: the plan per layer, one site's scores, one block's coupling. Each is checked for
being a PNG and for drawing the plan's numbers, read back from the figure's data (the image array
and the PNG's ``amgfx`` text chunk), against counts this file derives from the plan by hand."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import amgfx
from amgfx.analysis.tokens import token_sites
from amgfx.draw import draw_block, draw_plan, draw_scores, plan_figure
from amgfx.planning.cost import measure_flops

MODELS = ["vit", "bert_minilm", "llama_gqa"]
PNG = b"\x89PNG\r\n\x1a\n"


def _plan(cg):
    """A FLOPs plan with one head of the first site removed and the prunable sites' keys thinned."""
    plan = amgfx.plan_for(cg, method="magnitude", target_flops=0.6, progress=False)
    site = next(s for s in cg.sites if s.supported)
    head = cg.group(f"head:{site.name}")
    plan.keep[head.name] = list(range(1, head.units))
    plan.units[head.name] = head.units
    for name, t in token_sites(cg).items():
        if t.prunable:
            plan.tokens[name] = sorted(set(t.special) | set(range(t.keys - 2, t.keys)))
    for kind in ("qk", "v"):                    # keep per-head counts equal among the heads left
        g = cg.group(f"{kind}:{site.name}")
        if g.name in plan.keep:
            per = {h: [u for u in plan.keep[g.name] if g.heads[u] == h] for h in range(1, head.units)}
            n = min(len(v) for v in per.values())
            plan.keep[g.name] = sorted(u for v in per.values() for u in v[:n]) + \
                [u for u in plan.keep[g.name] if g.heads[u] == 0]
            plan.keep[g.name] = sorted(plan.keep[g.name])
    return plan


def _by_hand(cg, plan, site):
    """What one layer keeps, from the plan and the groups alone."""
    heads = cg.group(f"head:{site.name}")
    kept_heads = plan.keep.get(heads.name, list(range(heads.units)))
    out = {"head": [len(kept_heads), heads.units]}
    for kind in ("qk", "v"):
        g = cg.group(f"{kind}:{site.name}")
        kept = plan.keep.get(g.name, range(g.units))
        out[kind] = [sum(int(g.heads[u]) in kept_heads for u in kept), g.units]
    return out


@pytest.mark.parametrize("name", MODELS)
def test_the_plan_picture_draws_the_plans_counts(name, analysed_model, tmp_path):
    _, _, _, cg = analysed_model(name)
    plan = _plan(cg)
    path = tmp_path / "plan.png"
    drawn = draw_plan(cg, plan, path)
    assert path.read_bytes()[:8] == PNG
    back = json.loads(Image.open(path).text["amgfx"])
    assert back == json.loads(json.dumps(drawn))
    sites = {s.name: s for s in cg.sites if s.supported}
    assert [lay["name"] for lay in back["layers"]] == [s.name for s in cg.sites if s.supported]
    for lay in back["layers"]:
        want = _by_hand(cg, plan, sites[lay["name"]])
        assert {k: lay["kept"][k] for k in want} == want, lay["name"]
        t = token_sites(cg)[lay["name"]]
        if t.prunable:
            assert lay["kept"]["tokens"] == [len(plan.tokens[lay["name"]]), t.keys]
    mlp = {g.name: g for g in cg.groups if g.kind == "mlp"}
    assert sum(lay["kept"]["mlp"][1] for lay in back["layers"]) == sum(g.units for g in mlp.values())
    assert sum(lay["kept"]["mlp"][0] for lay in back["layers"]) == \
        sum(len(plan.keep.get(n, range(g.units))) for n, g in mlp.items())
    # the FLOPs drawn add up to what the pruned model measures, and the dense ones to the dense model
    pruned = amgfx.apply(cg, plan)
    assert sum(lay["flops"]["pruned"] for lay in back["layers"]) + back["other"]["pruned"] == measure_flops(pruned)
    assert sum(lay["flops"]["dense"] for lay in back["layers"]) + back["other"]["dense"] == measure_flops(cg.gm)
    assert all(lay["flops"]["pruned"] < lay["flops"]["dense"] for lay in back["layers"])
    # and the heat map shows kept/dense of those counts
    fig, data = plan_figure(cg, plan)
    shown = fig.axes[0].images[0].get_array()
    kinds = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    row = {"q/k pairs": "qk", "v neurons": "v", "heads": "head", "MLP neurons": "mlp", "key tokens": "tokens"}
    for i, label in enumerate(kinds):
        for j, lay in enumerate(data["layers"]):
            k, d = lay["kept"].get(row[label], (None, None))
            assert (np.ma.is_masked(shown[i, j]) if k is None else shown[i, j] == pytest.approx(k / d)), (label, j)


def test_a_removed_branch_is_drawn_as_a_gap(analysed_model, tmp_path):
    """Kept 0 of a kind is hatched, not drawn as a small number (block removal shows as gaps)."""
    from amgfx.planning.layers import Layer, PlanLayers
    import amgfx.draw.plan as dp
    _, _, _, cg = analysed_model("vit")
    rep = dp.layers(cg, amgfx.Plan())
    rep.layers[0].kept["mlp"] = (0, rep.layers[0].kept["mlp"][1])
    real = dp.layers
    dp.layers = lambda cg, plan: rep
    try:
        fig, _ = plan_figure(cg, amgfx.Plan())
    finally:
        dp.layers = real
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1 and isinstance(rep, PlanLayers) and isinstance(rep.layers[0], Layer)


@pytest.mark.parametrize("name", MODELS)
def test_the_scores_picture_draws_the_scores_and_the_kept_units(name, analysed_model, tmp_path):
    _, args, kwargs, cg = analysed_model(name)
    batch = kwargs if kwargs and not args else args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = amgfx.score(cg, "snp+amg", [batch], kinds=("qk", "v", "head", "mlp", "tokens"), progress=False)
    plan = _plan(cg)
    path = tmp_path / "scores.png"
    drawn = draw_scores(cg, s, path, site=0, plan=plan)
    assert path.read_bytes()[:8] == PNG
    back = json.loads(Image.open(path).text["amgfx"])
    site = next(x for x in cg.sites if x.supported)
    assert back["site"] == drawn["site"] == site.name
    for kind in ("qk", "v"):
        g = cg.group(f"{kind}:{site.name}")
        by_head = [np.asarray(s.units[g.name])[g.heads == h] for h in range(site.num_kv_heads)]
        np.testing.assert_allclose(back[kind]["scores"], by_head)
        assert sum(map(sum, back[kind]["kept"])) == len(plan.keep.get(g.name, range(g.units)))
    assert back["head"]["kept"] == [int(h in plan.keep[f"head:{site.name}"]) for h in range(site.num_kv_heads)]
    assert len(back["head"]["entropy"]) == site.num_heads and all(0 <= e <= 1 for e in back["head"]["entropy"])
    t = token_sites(cg)[site.name]
    if t.prunable:
        assert len(back["tokens"]["scores"]) == t.keys and back["tokens"]["special"] == list(t.special)


@pytest.mark.parametrize("name,why", [("llama_gqa", "RoPE"), ("vit", "fused qkv"), ("bert_minilm", "")])
def test_the_coupling_picture_picks_a_site_worth_drawing(name, why, analysed_model, tmp_path):
    _, _, _, cg = analysed_model(name)
    path = tmp_path / "b.png"
    draw_block(cg, path)
    got = json.loads(Image.open(path).text["amgfx"])["why"]
    assert got.startswith(why) if why else got == ""
    draw_block(cg, path, block=1)                         # asked for: that site, no reason given
    assert json.loads(Image.open(path).text["amgfx"]) == {"site": [s for s in cg.sites if s.supported][1].name,
                                                          "why": ""}


def test_prune_draws_its_plan_and_inspect_redraws_it_from_plan_json(tmp_path, capsys):
    from amgfx.cli import main
    png, out = tmp_path / "p.png", tmp_path / "out"
    assert main(["prune", "vit_tiny_patch16_224", "--img-size", "32", "--target-flops", "0.6", "--method",
                 "magnitude", "--draw", str(png), "--out", str(out), "-q"]) == 0
    first = json.loads(Image.open(png).text["amgfx"])
    again = tmp_path / "again.png"
    assert main(["inspect", "vit_tiny_patch16_224", "--img-size", "32", "--plan", str(out / "plan.json"),
                 "--draw", str(again)]) == 0
    assert f"drew the plan over 12 layers to {again}" in capsys.readouterr().out
    assert json.loads(Image.open(again).text["amgfx"]) == first
    assert first["target"] == 0.6 and abs(first["total"]["pruned"] / first["total"]["dense"] - 0.6) < 0.02


def test_inspect_refuses_a_plan_made_for_another_model(tmp_path, capsys):
    from amgfx.cli import main
    plan = amgfx.Plan(keep={"mlp:nowhere": [0]})
    plan.save(tmp_path / "plan.json")
    assert main(["inspect", "vit_tiny_patch16_224", "--img-size", "32", "--plan", str(tmp_path / "plan.json"),
                 "--draw", str(tmp_path / "x.png")]) == 2
    assert "not in this model" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command,own,foreign", [("prune", "amgfx prune", "amgfx inspect"),
                                                  ("inspect", "amgfx inspect", "amgfx prune"),
                                                  ("verify", "amgfx verify", "amgfx prune")])
def test_each_commands_help_lists_its_own_examples_only(command, own, foreign, capsys):
    from amgfx.cli import main
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    examples = text.split("examples:", 1)[1]
    assert own in examples and foreign not in examples


def test_drawing_leaves_the_model_unchanged(analysed_model, tmp_path):
    m, _, _, cg = analysed_model("vit")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    draw_plan(cg, _plan(cg), tmp_path / "p.png")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
