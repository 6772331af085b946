"""Reconstruction (amgfx.reconstruct, weights/reconstruct.py) and the OBS criterion, against the math."""
import numpy as np
import pytest
import torch

import amgfx
from amgfx.graph.fx import get_attr
from amgfx.scoring.criteria.obs import obs_scores
from amgfx.weights.reconstruct import DAMPS, _inputs_of, chunks, downhill, refit_layers, skip_add, targets

import models


def _calib(args, kwargs, n=16, seed=1):
    """``n`` random batches shaped like the example inputs (token ids within the example's range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if args:
            out.append(tuple(torch.randn(a.shape, generator=g) for a in args))
        else:
            ids = kwargs["input_ids"]
            b = dict(kwargs)
            b["input_ids"] = torch.randint(0, int(ids.max()) + 1, ids.shape, generator=g)
            out.append(b)
    return out


def _run(model, batch):
    out = model(*batch) if isinstance(batch, tuple) else model(**batch)
    return amgfx.weights.recover.first_output(out).detach()


def _error(model, dense, data) -> float:
    num = sum(float(((_run(model, b) - _run(dense, b)) ** 2).sum()) for b in data)
    return num / sum(float((_run(dense, b) ** 2).sum()) for b in data)


# swin (31 s on 2 cores) runs in `make test-slow`; windowed attention is refit the same way as the rest
@pytest.mark.parametrize("name", ["vit", "deit_distilled", "eva02", pytest.param("swin", marks=pytest.mark.slow),
                                  "bert_minilm", "gpt2", "llama_gqa"])
def test_reconstruction_fits_every_reader_and_brings_the_output_back(name):
    m, args, kwargs = models.ALL[name]()
    cg = amgfx.analyze(m, args, kwargs)
    data = _calib(args, kwargs)
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.5, "mlp": 0.5}, progress=False)
    pruned = amgfx.apply(cg, plan)
    fit = amgfx.reconstruct(pruned, cg, data, progress=False)
    rec = fit.meta["amgfx_reconstruction"]
    readers = {g.name: [mm.param for mm in g.members if mm.role in ("proj", "fc2")] for g in cg.groups
               if g.name in plan.keep and g.kind in ("v", "mlp")}
    refit = {layer["weight"] for layer in rec["layers"]}
    assert refit and all(p in refit for ps in readers.values() for p in ps), (readers, refit)
    assert all(layer["after"] <= layer["before"] + 1e-12 for layer in rec["layers"])
    assert _error(fit, cg.gm, data) < _error(pruned, cg.gm, data)
    # the graph is the rewrite's: the same parameters, shapes and nodes
    assert {k: v.shape for k, v in fit.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert [n.target for n in fit.graph.nodes] == [n.target for n in pruned.graph.nodes]
    # the user's model is left alone, and the result shares no tensor with it
    theirs = {t.data_ptr() for t in m.state_dict().values()}
    assert not any(t.data_ptr() in theirs for t in fit.state_dict().values() if t.numel())


def test_a_layer_that_loses_nothing_keeps_its_weights():
    m, args, kwargs = models.vit()
    cg = amgfx.analyze(m, args, kwargs)
    pruned = amgfx.apply(cg, amgfx.Plan())
    fc2 = "blocks.0.mlp.fc2.weight"
    params = {fc2: {1: list(range(get_attr(cg.gm, fc2).shape[1]))}}
    assert [t.weight for t in targets(cg.gm, params)] == [fc2]
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    fits = refit_layers(pruned, cg.gm, params, _calib(args, kwargs), progress=False)
    assert len(fits) == 1 and fits[0].before < 1e-12
    for k, v in pruned.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_a_plan_that_removes_nothing_changes_no_weight():
    m, args, kwargs = models.vit()
    cg = amgfx.analyze(m, args, kwargs)
    pruned = amgfx.apply(cg, amgfx.Plan())
    fit = amgfx.reconstruct(pruned, cg, _calib(args, kwargs), progress=False)
    assert fit.meta["amgfx_reconstruction"]["layers"] == []
    rewritten, ours = pruned.state_dict(), fit.state_dict()
    assert set(rewritten) == set(ours)
    for k, v in rewritten.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6)


def test_removed_neurons_that_copy_kept_ones_are_made_up_for_exactly():
    """fc1 rows 96..191 copy rows 0..95, so the removed half of the hidden layer equals the kept half on
    any data: the least-squares refit of fc2 must give back the dense output."""
    torch.manual_seed(0)
    m = models.timm_model("vit_tiny_patch16_224", img_size=32, depth=1, mlp_ratio=1.0)
    fc1 = m.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.weight[96:] = fc1.weight[:96]
        fc1.bias[96:] = fc1.bias[:96]
    x = torch.randn(1, 3, 32, 32)
    cg = amgfx.analyze(m, (x,))
    plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(96))}, units={"mlp:blocks.0.mlp": 192})
    pruned = amgfx.apply(cg, plan)
    data = [(torch.randn(1, 3, 32, 32),) for _ in range(64)]         # 5 tokens each: 320 > 97 unknowns
    fit = amgfx.reconstruct(pruned, cg, data, damp=1e-10, progress=False)
    held = [(torch.randn(1, 3, 32, 32),) for _ in range(4)]
    assert _error(pruned, cg.gm, held) > 1e-3                        # without the refit it is far off
    rel = max(float((_run(fit, b) - _run(cg.gm, b)).abs().max() / _run(cg.gm, b).abs().max()) for b in held)
    assert rel < 1e-5, rel


def test_skip_add_follows_reshapes_to_the_residual_add_only():
    for name, out, inner in [("vit", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc1.weight"),
                             ("gpt2", "h.0.mlp.c_proj.weight", "h.0.mlp.c_fc.weight")]:
        m, args, kwargs = models.ALL[name]()
        gm = amgfx.analyze(m, args, kwargs).gm
        node = {amgfx.analysis.records.make_layer(gm, n).weight: n.name for n in gm.graph.nodes
                if amgfx.graph.indexprop.is_layer(n)}
        add, skip = skip_add(gm, node[out])
        assert add.startswith("add") and skip != node[out], (name, add, skip)
        assert skip_add(gm, node[inner]) is None          # fc1 feeds the activation, not a residual add


def _sum_error(fit, dense, data, layer):
    """``||sum_p - sum_d||^2 / ||sum_d - skip_p||^2`` at the residual add after ``layer``, on ``data``."""
    by_w = lambda gm: {amgfx.analysis.records.make_layer(gm, n).weight: n.name for n in gm.graph.nodes  # noqa: E731
                       if amgfx.graph.indexprop.is_layer(n)}
    (ad, _), (ap, sp) = skip_add(dense, by_w(dense)[layer]), skip_add(fit, by_w(fit)[layer])
    num = den = 0.0
    for flat, _ in chunks(dense, data):
        nodes_p = {n.name: n for n in fit.graph.nodes}
        sd = _run_to(dense, ad, flat)
        spp = _run_to(fit, ap, flat)
        skip = _inputs_of(fit, {ap: nodes_p[sp]}, flat)[ap]
        num += float(((spp - sd) ** 2).sum())
        den += float(((sd - skip) ** 2).sum())
    return num / den


def _run_to(gm, name, flat):
    """The value of node ``name`` in ``gm`` (run only as far as its first reader)."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    reader = next(iter(node.users))
    return _inputs_of(gm, {reader.name: node}, flat)[reader.name].double()


def test_a_layer_before_a_residual_add_is_fitted_to_the_dense_sum():
    """Block 0's MLP is pruned and refitted; block 1's fc2 loses nothing of its own inputs but 1 neuron,
    and with ``residual`` its target is the dense sum at the add, so what it reports is the error of that
    sum (skip input included), which the fit without ``residual`` does not minimise."""
    m, args, kwargs = models.vit()
    cg = amgfx.analyze(m, args, kwargs)
    width = get_attr(cg.gm, "blocks.0.mlp.fc2.weight").shape[1]
    plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(width // 4)), "mlp:blocks.1.mlp": list(range(width - 1))},
                      units={"mlp:blocks.0.mlp": width, "mlp:blocks.1.mlp": width},
                      options={"dead_tokens": "off"})        # the sums compared token for token
    pruned = amgfx.apply(cg, plan)
    data = _calib(args, kwargs)
    fits = {}
    for residual in (True, False):
        fit = amgfx.reconstruct(pruned, cg, data, residual=residual, damp=1e-3, progress=False)
        fits[residual] = fit
        last = next(x for x in fit.meta["amgfx_reconstruction"]["layers"] if x["weight"] == "blocks.1.mlp.fc2.weight")
        if residual:
            assert _sum_error(fit, cg.gm, data, "blocks.1.mlp.fc2.weight") == pytest.approx(last["after"], rel=1e-3)
    e = {r: _sum_error(f, cg.gm, data, "blocks.1.mlp.fc2.weight") for r, f in fits.items()}
    assert e[True] < e[False], e


def test_damp_is_chosen_per_layer_from_the_grid():
    m, args, kwargs = models.vit()
    cg = amgfx.analyze(m, args, kwargs)
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"v": 0.5, "mlp": 0.5}, progress=False)
    fit = amgfx.reconstruct(amgfx.apply(cg, plan), cg, _calib(args, kwargs), progress=False)
    rec = fit.meta["amgfx_reconstruction"]
    assert rec["damp"] is None and rec["residual"] is True
    assert rec["layers"] and all(x["damp"] in DAMPS for x in rec["layers"])


def test_obs_score_is_the_error_left_after_refitting_the_rest():
    """Brute force: remove one unit's columns, refit the others by least squares, measure the output error."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))           # correlated inputs
    W = rng.normal(size=(5, 8))
    units = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])                 # two columns per unit, as in a GQA v unit
    got = obs_scores(W, X.T @ X, units, damp=0.0)
    want = []
    for cols in units:
        keep = np.setdiff1d(np.arange(8), cols)
        Y = X @ W.T
        sol, *_ = np.linalg.lstsq(X[:, keep], Y, rcond=None)
        want.append(float(((X[:, keep] @ sol - Y) ** 2).sum()))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_obs_composes_with_snp_and_prunes():
    m, args, kwargs = models.vit()
    data = _calib(args, kwargs, n=8)
    small = amgfx.prune(m, args, method="obs+snp", target_flops=0.6, calib=data, progress=False)
    crit = small.meta["amgfx_plan"].meta["criteria"]
    assert crit["mlp"].startswith("OBS") and crit["qk"].startswith("SNP")
    assert small.meta["amgfx_reconstruction"]["layers"]                # calib given: refitted by default


def test_prune_reconstructs_only_with_data_unless_told():
    m, args, kwargs = models.vit()
    r = {"v": 0.5, "mlp": 0.5}
    assert "amgfx_reconstruction" not in amgfx.prune(m, args, method="magnitude", ratios=r).meta
    data = _calib(args, kwargs, n=4)
    assert "amgfx_reconstruction" not in amgfx.prune(m, args, method="magnitude", ratios=r, calib=data,
                                                    reconstruct=False, progress=False).meta
    assert amgfx.prune(m, args, method="magnitude", ratios=r, reconstruct=True).meta["amgfx_reconstruction"]["layers"]


def test_the_cursor_sees_a_refit_weight_even_where_it_was_transposed_before_the_layer():
    # the sequential refit resumes a paused forward: a value made from the old weight alone (here its
    # transpose, computed before the matmul that reads it) must be the new weight's after refresh()
    from amgfx.graph.fx import replace_attr
    from amgfx.weights.reconstruct import _Cursor

    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    wt = g.call_function(torch.ops.aten.permute.default, (w, [1, 0]))
    y = g.call_function(torch.ops.aten.mm.default, (x, wt))
    g.output(y)
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    gm = torch.fx.GraphModule(root, g)
    run = _Cursor(gm, [torch.randn(2, 4)])
    run.before(y)
    new = torch.randn(3, 4)
    replace_attr(gm, "w", new, gm.w)
    run.refresh()
    assert torch.equal(run.env[wt], new.T)
    assert torch.equal(run.before(y)[wt], new.T)


def test_downhill_finds_the_minimum_of_a_unimodal_error_in_fewer_evaluations():
    """The damp walk lands on the grid's minimum wherever it is, and costs less than the whole grid
    when the minimum is near the start."""
    for best in range(len(DAMPS)):
        calls = []

        def f(d):
            calls.append(d)
            return abs(DAMPS.index(d) - best)
        assert downhill(DAMPS, f) == DAMPS[best]
        assert len(set(calls)) <= len(DAMPS)
        if abs(best - len(DAMPS) // 2) <= 1:
            assert len(set(calls)) < len(DAMPS)


def test_residual_channels_refit_where_dead_tokens_split_the_last_qkv():
    """A ViT read at its class token computes only that query in its last block, so the rewrite splits that
    block's qkv; the refit runs on every token with qkv whole and adds biases (residual channels gone, the
    stream's mean shifts). The fitted rows reach the split layers: the result computes what the same fit
    computes with dead-token elimination off."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cg = amgfx.analyze(m, x)
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plan = amgfx.plan_for(cg, calib=calib, method="magnitude", kinds=("qk", "v", "mlp", "residual"),
                          ratios={"qk": .25, "v": .25, "mlp": .5, "residual": .25}, progress=False)
    live = amgfx.reconstruct(amgfx.apply(cg, plan, check=False), cg, calib, progress=False)
    assert live.meta["amgfx_dead_tokens"]["applied"]
    assert any(n.endswith("qkv.q_weight") for n, _ in live.named_parameters())
    every = amgfx.Plan.from_dict({**plan.to_dict(), "options": {**plan.options, "dead_tokens": "off"}})
    whole = amgfx.reconstruct(amgfx.apply(cg, every, check=False), cg, calib, progress=False)
    assert any(layer["bias"] for layer in whole.meta["amgfx_reconstruction"]["layers"])
    with torch.no_grad():
        assert torch.allclose(live(x), whole(x), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(live(x), amgfx.apply(cg, plan, check=False)(x), atol=1e-3)
