"""Criteria, calibration and budgeting: exact formulas against brute force, errors, determinism."""
import os
import sys
import types

import numpy as np
import pytest
import torch

import amgfx
from amgfx.planning.budget import allocate
from amgfx.scoring.calibrate import CalibrationError, Stats, calibrate, qk_scores
from amgfx.planning.cost import measure_flops, predict
from amgfx.scoring.criteria import SNP, Magnitude, Taylor
from amgfx.scoring.criteria.amg import head_entropy

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker  # noqa: E402


@pytest.mark.parametrize("gamma", [2, 0.9])
def test_snp_qk_score_equals_brute_force(gamma):
    """The QR/SVD closed form equals the paper's cosine over flattened N x N matrices."""
    torch.manual_seed(0)
    P, H, N, d = 2, 2, 7, 4
    q, k = torch.randn(P, H, N, d, dtype=torch.float64), torch.randn(P, H, N, d, dtype=torch.float64)
    cols = torch.tensor([[0, 1, 0, 1], [2, 3, 2, 3]])          # RoPE-like: two columns per unit
    want = torch.zeros(4, dtype=torch.float64)
    for p in range(P):
        for h in range(H):
            u, s, vh = torch.linalg.svd(q[p, h] @ k[p, h].T)
            e = (s ** 2).cumsum(0) / (s ** 2).sum()
            top = gamma if isinstance(gamma, int) else int((e < gamma).sum()) + 1
            for unit in range(4):
                j = (cols[h] == unit).nonzero().flatten()
                if len(j) == 0:
                    continue
                m = q[p, h][:, j] @ k[p, h][:, j].T
                for c in range(top):
                    r = torch.outer(u[:, c], vh[c])
                    want[unit] += abs((r * m).sum() / (r.norm() * m.norm()))
    torch.testing.assert_close(qk_scores(q, k, cols, 4, gamma), want)


def test_head_entropy_uniform_is_one_and_peaked_is_zero():
    st = Stats()
    a = torch.zeros(2, 3, 5, dtype=torch.float64)
    a[0] = 1 / 5                          # head 0: uniform -> normalised entropy 1
    a[1, :, 2] = 1                        # head 1: one-hot -> 0
    st.add("attn:s", a)
    site = types.SimpleNamespace(name="s", num_heads=2, lead_heads=np.array([0, 1]))
    np.testing.assert_allclose(head_entropy(site, st), [1.0, 0.0], atol=1e-12)


def test_calibration_runs_the_graph_faithfully(analysed_model):
    """Explicit attention (q, k, scale, mask -> A) reproduces fused SDPA: the recorded run equals gm()."""
    from amgfx.scoring.calibrate import _Recorder
    from amgfx.scoring.collectors import Watch
    for name in ("vit", "bert_minilm", "llama_gqa"):
        _, args, kwargs, cg = analysed_model(name)
        from torch.fx._pytree import tree_flatten_spec
        flat = tree_flatten_spec((tuple(args), kwargs), cg.gm.graph._codegen.pytree_info.in_spec)
        sites = {s.node: s for s in cg.sites if s.supported}
        rec = _Recorder(cg, Watch(sites=sites), {}, sites)
        with torch.no_grad():
            got = rec.run(*flat)
            want = cg.gm(*args, **kwargs)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            if "attention_mask" in kwargs and g.dim() == 3:   # padded queries' outputs are don't-care
                g, w = g[kwargs["attention_mask"].bool()], w[kwargs["attention_mask"].bool()]
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert all("A" in rec.seen.sites[s.node] for s in cg.sites if s.supported), name


def test_taylor_equals_autograd(analysed_model):
    """taylor^2 = (sum over a unit of w * dL/dw)^2, checked against autograd on the captured module."""
    m, args, kwargs, cg = analysed_model("vit")
    g = cg.group("mlp:blocks.0.mlp")
    x = torch.randn(2, 3, 32, 32)
    loss_fn = lambda out, batch: (out ** 2).sum()
    st = calibrate(cg, [x], needs={"taylor"}, taylor_groups=[g], loss_fn=loss_fn, progress=False)
    params = dict(cg.gm.named_parameters())
    want = torch.zeros(g.units, dtype=torch.float64)
    for i in range(2):                     # the graph runs at its captured batch size, 1
        loss = (cg.gm(x[i:i + 1]) ** 2).sum()
        grads = torch.autograd.grad(loss, [params[mm.param] for mm in g.members])
        for mm, gr in zip(g.members, grads):
            wg = (params[mm.param].detach() * gr).double().movedim(mm.dim, 0)
            want += wg.reshape(wg.shape[0], -1).sum(1)[torch.as_tensor(mm.index)].sum(1)
    np.testing.assert_allclose(Taylor().score(cg, g, st), want.abs().numpy(), rtol=1e-3, atol=1e-5)  # fp32 grads


def test_snp_v_and_residual_scores(analysed_model):
    """The paper's formulas, computed by hand from the timm module's own weights."""
    m, _, _, cg = analysed_model("vit")
    v = SNP().score(cg, cg.group("v:blocks.0.attn"), None)
    C = m.embed_dim
    rows = m.blocks[0].attn.qkv.weight[2 * C:].detach().double()          # weights only, as the paper says
    want = torch.stack([sum(1 - abs(torch.nn.functional.cosine_similarity(rows[i], rows[l], dim=0))
                            for l in range(C)) for i in range(C)])
    np.testing.assert_allclose(v, want.numpy(), rtol=1e-9)           # sum_l (1 - |cos(W_i, W_l)|)
    r = SNP().score(cg, cg.group(next(g.name for g in cg.groups if g.kind == "residual")), None)
    per = []                                    # every member's channel norms, normalised to sum 1, then averaged
    for fqn, dim in cg.residual[0].members:
        t = dict(m.named_parameters())[fqn].detach().double().movedim(dim, 0).reshape(C, -1)
        n = t.norm(dim=1)
        if n.sum() > 0:
            per.append(n / n.sum())
    np.testing.assert_allclose(r, torch.stack(per).mean(0).numpy(), rtol=1e-9)


def test_same_seed_gives_byte_identical_plan(analysed_model):
    calib = _dist_worker.calib_batches()
    one = _dist_worker.make_plan(calib).to_json()
    two = _dist_worker.make_plan(calib).to_json()
    assert one == two
    _, _, _, cg = analysed_model("vit")
    t1 = amgfx.plan_for(cg, method="taylor", target_flops=0.7, calib=calib, seed=5, progress=False).to_json()
    t2 = amgfx.plan_for(cg, method="taylor", target_flops=0.7, calib=calib, seed=5, progress=False).to_json()
    t3 = amgfx.plan_for(cg, method="taylor", target_flops=0.7, calib=calib, seed=6, progress=False).to_json()
    assert t1 == t2 and t1 != t3           # the seed matters (it draws the default loss's targets)


@pytest.mark.parametrize("name", ["vit", "bert_minilm", "llama_gqa"])
def test_half_the_flops_lands_within_one_percent(analysed_model, name):
    """The bisection stops at the first plan under the target: measured, it keeps 49-50% of dense.

    Neuron kinds only: on these toys one kv head is a quarter of a layer's attention, a step too
    coarse for 1% (the main job, with heads, is checked to 1% by test_cli on the real MiniLM), and
    every width free (the default rounding takes steps of 4-16 units, coarse on a toy)."""
    m, args, kwargs, cg = analysed_model(name)
    plan = amgfx.plan_for(cg, method="magnitude", target_flops=0.5, kinds=("qk", "v", "mlp"), round_to=1,
                          same_head_dim=False, progress=False)
    kept = measure_flops(amgfx.apply(cg, plan)) / measure_flops(cg.gm)
    assert 0.49 <= kept <= 0.5, kept


@pytest.mark.parametrize("name", ["vit", "bert_minilm", "llama_gqa", "swin"])
def test_target_flops_is_met_as_measured(analysed_model, name):
    m, args, kwargs, cg = analysed_model(name)
    ex = cg.gm.meta["amgfx_example"]
    calib = [ex[1] if ex[1] else ex[0]]
    plan = amgfx.plan_for(cg, method="snp+amg", target_flops=0.6, calib=calib, round_to=4, progress=False)
    pruned = amgfx.apply(cg, plan)
    dense = measure_flops(cg.gm)
    assert measure_flops(pruned) <= 0.6 * dense
    assert measure_flops(pruned) == plan.meta["flops"]["planned"]
    for g in cg.groups:                     # per-head widths rounded to multiples of 4 (or left whole)
        if g.name in plan.keep and g.kind in ("qk", "v"):
            per_head = len(plan.keep[g.name]) // len(np.unique(g.heads))
            assert per_head % 4 == 0 or per_head == g.units // len(np.unique(g.heads))


@pytest.mark.parametrize("name", ["vit", "bert_minilm", "llama_gqa", "gpt2", "swin", "eva02"])
def test_region_flops_equal_the_whole_graph_count_for_any_plan(analysed_model, name):
    """The budget's fast count (each region of the graph re-propagated alone) against the whole-graph
    prediction, on random plans that mix every kind in every layer, heads included."""
    from amgfx.planning.regions import RegionCost
    _, _, _, cg = analysed_model(name)
    groups = [g for g in cg.groups if g.kind in ("qk", "v", "head", "mlp")]
    rc = RegionCost.build(cg, groups)
    assert rc is not None and sum(len(r.groups) for r in rc.regions) == len(groups)
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(4):
        keep = {}
        for g in groups:
            if rng.random() < 0.3:
                continue
            if g.kind in ("qk", "v"):
                heads = [np.nonzero(g.heads == h)[0] for h in np.unique(g.heads)]
                n = int(rng.integers(1, len(heads[0]) + 1))
                keep[g.name] = sorted(int(u) for h in heads for u in rng.choice(h, n, replace=False))
            else:
                keep[g.name] = sorted(rng.choice(g.units, int(rng.integers(1, g.units + 1)), replace=False).tolist())
        plan = amgfx.Plan(keep=keep)
        try:
            want = predict(cg, plan)["flops"]["pruned"]
        except amgfx.AmgfxError:             # a mix this model cannot rewrite (no plan of allocate's looks so)
            continue
        assert rc.flops(plan) == want
        compared += 1
    assert compared >= 2


def test_budget_options(analysed_model):
    _, _, _, cg = analysed_model("vit")
    scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind in ("qk", "v", "mlp", "head")}
    plan = allocate(cg, scores, 0.75, protect=["blocks.0.*"], min_keep=0.25)
    assert not any(k.endswith("blocks.0.attn") or k.endswith("blocks.0.mlp") for k in plan.keep)
    for name, kept in plan.keep.items():
        assert len(kept) >= 0.25 * cg.group(name).units
    assert predict(cg, plan)["flops"]["pruned"] <= 0.75 * predict(cg, plan)["flops"]["dense"]
    with pytest.raises(amgfx.AmgfxError, match="cannot be reached"):
        allocate(cg, scores, 0.05, min_keep=0.5)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(amgfx.AmgfxError, match=r"target_flops must be .* \(0, 1\]"):
            amgfx.plan_for(cg, method="magnitude", target_flops=bad)


def test_scores_beat_random_at_preserving_the_output(analysed_model):
    """On the real MiniLM, SNP keeps the embedding closer to dense than random does at equal FLOPs."""
    m, args, kwargs, cg = analysed_model("bert_minilm")
    calib = [kwargs]
    out = {}
    for method in ("snp", "random"):
        plan = amgfx.plan_for(cg, method=method, target_flops=0.7, calib=calib, progress=False)
        pruned = amgfx.apply(cg, plan)
        a = cg.gm(**kwargs)["last_hidden_state"].mean(1)
        b = pruned(**kwargs)["last_hidden_state"].mean(1)
        out[method] = torch.nn.functional.cosine_similarity(a, b).mean().item()
    assert out["snp"] > out["random"], out


def test_bad_calibration_data_fails_before_any_work(analysed_model, monkeypatch):
    from amgfx.scoring import calibrate as cal
    _, args, kwargs, cg = analysed_model("vit")
    monkeypatch.setattr(cal._Recorder, "run", lambda *a, **k: pytest.fail("ran the model on bad data"))
    good = torch.randn(2, 3, 32, 32)
    nan = good.clone()
    nan[1, 0, 0, 0] = float("nan")
    cases = [([good, nan], "batch 1: input 0 contains NaN or Inf"),
             ([good, torch.full((1, 3, 32, 32), float("inf"))], "NaN or Inf"),
             ([torch.randn(2, 3, 64, 64)], r"shape \[2, 3, 64, 64\], but the example inputs have \[1, 3, 32, 32\]"),
             ([], "empty"),
             ([{"x": good}], "dicts but the model takes positional inputs")]
    for data, msg in cases:
        with pytest.raises(CalibrationError, match=msg):
            calibrate(cg, data, needs={"qk"}, progress=False)
    model, _, kw, bert = analysed_model("bert_minilm")
    with pytest.raises(CalibrationError, match="'attention_mask' is missing"):
        calibrate(bert, [{"input_ids": kw["input_ids"]}], needs={"qk"}, progress=False)
    static = amgfx.analyze(amgfx.capture(model, (), kw, dynamic_batch=False))    # runs at its captured batch only
    with pytest.raises(CalibrationError, match="not a multiple of the example inputs' batch size 2"):
        calibrate(static, [{k: v[:1] for k, v in kw.items()}], needs={"qk"}, progress=False)


@pytest.mark.slow
def test_distributed_calibration_equals_single_process(tmp_path):
    """2 gloo ranks, each on half the batches, end with the plan of one process on all of them."""
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker.rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    single = _dist_worker.make_plan(_dist_worker.calib_batches()).to_json()
    ranks = [(tmp_path / f"rank{r}.json").read_text() for r in range(2)]
    assert ranks[0] == ranks[1] == single


@pytest.mark.parametrize("name", ["vit", "llama_gqa"])   # a RoPE q/k unit is a column pair, a v unit one column
def test_same_head_dim_keeps_qk_and_v_at_one_width(analysed_model, name):
    """Each site's q/k and v end with one head dim (the larger), so nothing is padded or split at run time."""
    from conftest import skewed_scores
    _, args, kwargs, cg = analysed_model(name)
    scores = skewed_scores(cg)
    dims = lambda plan: [(a.qk_dim, a.v_dim) for a in plan.resolve(cg).attention.values()]
    free = allocate(cg, scores, 0.5, round_to=4, same_head_dim=False)
    assert any(q != v for q, v in dims(free))           # the test means something only if they differ without it
    same = allocate(cg, scores, 0.5, round_to=4)        # same_head_dim is the default
    assert dims(same) and all(q == v for q, v in dims(same))
    assert same.meta["flops"]["planned"] <= 0.5 * same.meta["flops"]["dense"]
    g = amgfx.apply(cg, same)
    assert not any("constant_pad_nd" in str(n.target) for n in g.graph.nodes)
    with torch.no_grad():
        out = torch.utils._pytree.tree_leaves(g(*args, **kwargs))
        assert out and all(torch.isfinite(t).all() for t in out if isinstance(t, torch.Tensor))


def test_taylor_per_layer_ranks_against_the_group_mean(analysed_model):
    """Taylor() ranks its raw scores across layers; Taylor(per_layer=True) ranks each unit over its group's mean:
    each plan is the budget's walk with that normalisation on the same scores, and the two differ."""
    _, _, _, cg = analysed_model("vit")
    calib = _dist_worker.calib_batches()
    s = amgfx.score(cg, "taylor", calib, progress=False)
    plans = {}
    for crit, normalize in ((Taylor(), "none"), (Taylor(per_layer=True), "group")):
        got = amgfx.plan_for(cg, method=crit, target_flops=0.6, calib=calib, progress=False)
        want = allocate(cg, s.units, 0.6, normalize=normalize)
        assert got.keep == want.keep, normalize
        plans[normalize] = got.keep
    assert plans["none"] != plans["group"]


def test_a_config_repr_is_a_method_string():
    """What plan.json names (auto's choice is a config's repr) can be given back as a method; only literals."""
    from amgfx.errors import AmgfxError
    from amgfx.scoring.criteria import resolve_method
    for c in (Taylor(per_layer=True), SNP(gamma=8.0), Magnitude()):
        assert resolve_method(repr(c))[c.kinds[0]] == c
    assert resolve_method("obs+taylor(per_layer=True)")["mlp"].name == "obs"
    for bad in ("taylor(per_layer=open('x'))", "taylor(nope=1)", "taylor(True)", "nothing(x=1)"):
        with pytest.raises(AmgfxError):
            resolve_method(bad)


def test_a_massive_neuron_is_kept_whatever_it_scores():
    """A planted neuron whose output is far above its layer's (massive activations) survives a criterion that
    ranks it last, under a FLOPs budget and under per-kind ratios; with ``massive=0`` it goes."""
    import dataclasses

    import timm
    from amgfx.scoring.criteria import SNP

    @dataclasses.dataclass(frozen=True)
    class LastIsFive(SNP):          # SNP's statistics (so calibration runs), a score that ranks neuron 5 last
        def score(self, cg, group, stats, seed=0):
            s = np.arange(group.units, dtype=float) + 1.0
            s[5] = 0.0
            return s

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    with torch.no_grad():          # (in block 0: the last block computes only the class token that is read)
        m.blocks[0].mlp.fc1.weight[5] *= 30
        m.blocks[0].mlp.fc1.bias[5] = 30.0
        m.blocks[0].mlp.fc2.weight[:, 5] *= 30
    cg = amgfx.analyze(m, torch.randn(1, 3, 32, 32))
    calib = [torch.randn(4, 3, 32, 32)]
    name = "mlp:blocks.0.mlp"
    for budget in ({"target_flops": 0.6}, {"ratios": {"mlp": 0.5}}):
        kept = amgfx.plan_for(cg, method={"mlp": LastIsFive()}, calib=calib, progress=False, **budget)
        gone = amgfx.plan_for(cg, method={"mlp": LastIsFive()}, calib=calib, progress=False, massive=0, **budget)
        assert 5 in kept.keep[name] and 5 not in gone.keep[name], budget
        assert kept.meta["pinned"] == {name: [5]} and not gone.meta["pinned"], budget
        assert len(kept.keep[name]) <= len(gone.keep[name]) + 16       # the same budget, one neuron apart
    assert kept.meta["config"]["plan"]["massive"] == 20.0
    assert amgfx.score(cg, LastIsFive(), calib, kinds=("mlp",), progress=False).massive == {name: [5]}
    assert amgfx.score(cg, LastIsFive(), calib, kinds=("mlp",), progress=False, massive=0).massive == {}
