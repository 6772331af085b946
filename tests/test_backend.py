"""torch.compile(backend="amgfx"): discovery, equality with amgfx.prune, recompiles, weights, errors."""
import subprocess
import sys

import pytest
import torch

import amgfx
from amgfx import backend as be

RATIOS = {"qk": 0.5, "v": 0.25, "mlp": 0.5, "head": 0.34}


def _compile(model, options, seen=None, **kw):
    """torch.compile through the registered name; ``seen`` collects what each backend call compiled."""
    torch._dynamo.reset()
    if seen is None:
        return torch.compile(model, backend="amgfx", options=options, fullgraph=True, **kw)

    def spy(gm, ex, **k):
        run = be.amgfx_backend(gm, ex, **k)
        seen.append(run.pruned)
        return run
    return torch.compile(model, backend=spy, options=options, fullgraph=True, **kw)


def test_entry_point_is_discovered_from_the_installed_package():
    # a fresh interpreter that never imports amgfx: only the installed metadata can name the backend
    code = "import torch; b = torch._dynamo.list_backends(exclude_tags=()); print('amgfx' in b)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "amgfx"]
    assert ep.load() is be.amgfx_backend


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])   # inductor: 76 s
def test_vit_matches_prune_and_recompiles_on_new_shapes(analysed_model, inner):
    m, (x,), _, cg = analysed_model("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios=RATIOS, progress=False)
    plan.tokens = {cg.sites[0].name: [0, 1, 3]}      # and static token pruning (dead tokens run by default)
    ref = amgfx.prune(cg, plan=plan)
    seen = []
    fast = _compile(m, {"plan": plan, "inner": inner}, seen)
    tol = 1e-5 if inner == "eager" else 1e-4
    for b in (1, 3, 5):                          # 1 -> 3 recompiles (dynamic), 5 reuses that graph
        xb = torch.randn(b, *x.shape[1:])
        torch.testing.assert_close(fast(xb), ref(xb), rtol=tol, atol=tol)
    assert len(seen) == 2
    dense = dict(m.named_parameters())
    for small in seen:
        for fqn, t in small.named_parameters():
            if fqn in dense and t.shape == dense[fqn].shape:     # kept whole: the model's own storage
                assert t.data_ptr() == dense[fqn].data_ptr(), fqn
    a, b2 = (dict(s.named_parameters()) for s in seen)
    shrunk = [f for f, t in a.items() if f not in dense or t.shape != dense[f].shape]
    assert shrunk and all(a[f].data_ptr() == b2[f].data_ptr() for f in shrunk)    # not made twice


@pytest.mark.slow        # 20 s on 2 cores; the ViT tests above cover the backend's path in make test
def test_bert_matches_prune_with_a_plan_file(analysed_model, tmp_path):
    m, _, kw, cg = analysed_model("bert_minilm")
    plan = amgfx.plan_for(cg, method="magnitude", ratios=RATIOS, progress=False)
    plan.save(tmp_path / "plan.json")
    ref = amgfx.prune(cg, plan=plan)
    fast = _compile(m, {"plan": str(tmp_path / "plan.json"), "inner": "eager"})
    got, want = fast(**kw)["last_hidden_state"], ref(**kw)["last_hidden_state"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_target_flops_plans_once_across_recompiles(analysed_model, monkeypatch):
    m, (x,), _, cg = analysed_model("vit")
    calls = []
    import amgfx.sequence
    real = amgfx.sequence.plan_for
    monkeypatch.setattr(amgfx.sequence, "plan_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    fast = _compile(m, {"target_flops": 0.7, "method": "magnitude", "inner": "eager", "progress": False}, seen)
    for b in (1, 2, 3):
        y = fast(torch.randn(b, *x.shape[1:]))
        assert y.shape[0] == b and torch.isfinite(y).all()
    assert len(calls) == 1
    plan = seen[0].meta["amgfx_plan"]
    assert plan.meta["flops"]["planned"] <= 0.7 * plan.meta["flops"]["dense"]
    torch.testing.assert_close(fast(x), amgfx.prune(cg, plan=plan)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reconstruct", [None, False])
def test_calibration_data_refits_the_compiled_model_unless_told(analysed_model, reconstruct):
    m, (x,), _, cg = analysed_model("vit")
    seen = []
    opts = {"target_flops": 0.7, "method": "magnitude", "inner": "eager", "progress": False,
            "calib": [torch.randn(4, *x.shape[1:]) for _ in range(2)]}
    if reconstruct is not None:
        opts["reconstruct"] = reconstruct
    fast = _compile(m, opts, seen)
    assert torch.isfinite(fast(x)).all()
    assert ("amgfx_reconstruction" in seen[0].meta) == (reconstruct is None)


class _Breaks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(x).relu()
        print("a graph break")                   # noqa: T201 - dynamo cannot trace print
        return self.b(h)


def test_a_graph_break_is_refused_with_the_reason():
    torch._dynamo.reset()
    m = _Breaks().eval()
    fast = torch.compile(m, backend="amgfx", options={"plan": amgfx.Plan()})
    with pytest.raises(Exception, match="graph break.*fullgraph=True"):
        fast(torch.randn(2, 8))


@pytest.mark.parametrize("options, msg", [
    ({"plan": amgfx.Plan(), "target": 0.5}, "unknown amgfx option"),
    ({}, "say what to prune"),
    ({"plan": amgfx.Plan(), "inner": "tvm"}, "inner must be"),
    ({"plan": amgfx.Plan(), "target_flops": 0.5}, "not both"),
])
def test_bad_options_are_named(options, msg):
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    with pytest.raises(Exception, match=msg):
        torch.compile(m, backend="amgfx", options=options, fullgraph=True)(torch.randn(2, 4))


def test_the_backend_options_name_every_plan_config_field():
    """backend.PLANNING is spelt out (listing backends imports nothing); it must be PlanConfig's fields, exactly."""
    import dataclasses

    from amgfx import backend
    assert set(backend.PLANNING) == {f.name for f in dataclasses.fields(amgfx.PlanConfig)}
