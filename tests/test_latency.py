"""Latency budgets: the op-time table, its cache and interpolation, and plans to a time target.

No test asserts a time: the planted tables below stand in for the clock where an exact figure is
needed, and the measured runs only check that what was measured is recorded.
"""
import math

import pytest
import torch

import amgfx
from amgfx.planning import latency
from amgfx.planning.budget import allocate
from amgfx.scoring.criteria import Magnitude
from amgfx.timed_plan import LATENCY_ROUNDS


def _vit(depth=2):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth).eval()


@pytest.fixture(scope="module")
def cg():
    return amgfx.analyze(_vit(), torch.randn(2, 3, 32, 32))


class Planted(latency.OpTimes):
    """A clock that is a formula of the argument shapes; it logs every shape it is asked for."""

    def __init__(self, formula):
        super().__init__(path=None)
        self.formula, self.asked = formula, []

    def time(self, target, args_spec, kwargs_spec, cold=False):
        shapes = [s[1] for s in args_spec if s[0] == "T"]
        self.asked.append((str(target), shapes))
        return self.formula(shapes)

    def measure(self, target, args_spec, kwargs_spec, cold=False):     # the same clock when times are checked
        return self.formula([s[1] for s in args_spec if s[0] == "T"])


def _numels(shapes):        # sum of argument sizes: multilinear in every width (a linear's x, weight)
    return 1e-4 * sum(math.prod(s) for s in shapes) + 1e-3


def _squares(shapes):       # not multilinear: the grid interpolation cannot be exact
    return 1e-7 * sum(math.prod(s) ** 2 for s in shapes) + 1e-3


def _mlp_plan(cg, kept):
    return amgfx.Plan(keep={g.name: list(range(kept)) for g in cg.groups if g.kind == "mlp"})


def _predicted(cg, plan, formula, monkeypatch, exact: bool):
    """Predicted ms with the planted clock; ``exact``: every width measured as it is (no grid)."""
    with monkeypatch.context() as mp:
        if exact:
            mp.setattr(latency, "GRID", 10 ** 6)
        clock = Planted(formula)
        return latency.predict_ms(cg, plan, clock)["pruned"], clock


def test_narrowed_widths_are_measured_on_the_grid_and_interpolated_exactly_where_time_is_multilinear(cg, monkeypatch):
    plan = _mlp_plan(cg, 700)                                 # 700 of 768: between the grid points 672 and 720
    linear_widths = lambda clock: {d for t, shapes in clock.asked if "linear" in t for s in shapes for d in s}
    on_grid, clock = _predicted(cg, plan, _numels, monkeypatch, exact=False)
    assert 700 not in linear_widths(clock) and {672, 720} <= linear_widths(clock)
    exact, clock = _predicted(cg, plan, _numels, monkeypatch, exact=True)
    assert 700 in linear_widths(clock)
    assert on_grid == pytest.approx(exact, rel=1e-12)
    # where time is not multilinear in the widths, the interpolation shows (so the check above can fail)
    sq_grid, _ = _predicted(cg, plan, _squares, monkeypatch, exact=False)
    sq_exact, _ = _predicted(cg, plan, _squares, monkeypatch, exact=True)
    assert sq_grid != pytest.approx(sq_exact, rel=1e-9)


def test_an_empty_plan_predicts_the_dense_time_and_narrower_plans_predict_less(cg):
    t = Planted(_numels)
    off = {"dead_tokens": "off"}       # else the plan's graph gathers the live rows: other ops than the dense one
    dense = latency.predict_ms(cg, amgfx.Plan(options=off), t)
    assert dense["pruned"] == pytest.approx(dense["dense"], rel=1e-12)
    ms = [latency.predict_ms(cg, amgfx.Plan(keep=_mlp_plan(cg, k).keep, options=off), t)["pruned"]
          for k in (768, 512, 256, 64)]
    assert all(a > b for a, b in zip(ms, ms[1:]))


def test_a_narrowed_op_timed_while_the_machine_was_busy_is_never_predicted_slower_than_the_dense_op(cg):
    dense_shapes = {}

    def busy(shapes):           # every shape the dense graph does not have is timed as if preempted
        key = repr(shapes)
        return dense_shapes.get(key, 1e3)

    t = Planted(busy)
    for n in latency._timed(cg.gm):         # the dense ops at their own shapes: the quiet clock
        shapes = [s[1] for s in latency.node_specs(n, latency.shape, {})[0] if s[0] == "T"]
        dense_shapes[repr(shapes)] = _numels(shapes)
    plan = amgfx.Plan(keep=_mlp_plan(cg, 384).keep, options={"dead_tokens": "off"})   # no gathers: only dense ops
    out = latency.predict_ms(cg, plan, t, per_node=True)
    narrowed = [k for k in out["nodes"]["pruned"] if "linear" in k]
    assert narrowed and all(out["nodes"]["pruned"][k] <= out["nodes"]["dense"][k] for k in narrowed)
    assert out["pruned"] <= out["dense"] < 1e3      # no preempted time reached either sum


def test_op_times_are_measured_once_and_read_back_from_the_cache_file(cg, tmp_path):
    path = str(tmp_path / "ops.json")
    first = latency.OpTimes(path=path)
    a = latency.predict_ms(cg, _mlp_plan(cg, 384), first)
    assert first.measured > 0
    again = latency.OpTimes(path=path)
    b = latency.predict_ms(cg, _mlp_plan(cg, 384), again)
    assert again.measured == 0 and a == b


def test_op_times_cached_under_load_are_measured_again(tmp_path):
    """A cache written while other work had the cores (every time 10x what the ops take now) is noticed the first
    time a graph reads it, said, and measured again."""
    cg = amgfx.analyze(_vit(depth=1), torch.randn(2, 3, 32, 32))
    path = str(tmp_path / "ops.json")
    quiet = latency.predict_ms(cg, _mlp_plan(cg, 384), latency.OpTimes(path=path))
    loaded = latency.OpTimes(path=path)
    loaded._ms = {k: None if v is None else 10 * v for k, v in loaded._ms.items()}
    cg.dense_ms = None
    with pytest.warns(UserWarning, match="taken under load"):
        again = latency.predict_ms(cg, _mlp_plan(cg, 384), loaded)
    assert loaded.measured > 0 and again["dense"] < 3 * quiet["dense"]


def test_the_default_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert latency.default_path().startswith(str(tmp_path / "amgfx" / "latency"))


def test_allocate_to_a_latency_target_keeps_the_predicted_time_within_it(cg):
    scores = {g.name: Magnitude().score(cg, g, None) for g in cg.groups if g.kind in ("qk", "v", "mlp")}
    t = Planted(_numels)
    plan = allocate(cg, scores, target_latency=0.8, times=t)
    lat = plan.meta["latency"]
    assert lat["planned_ms"] <= 0.8 * lat["dense_ms"] and plan.keep
    assert latency.predict_ms(cg, plan, t)["pruned"] == pytest.approx(lat["planned_ms"], rel=1e-3)
    assert plan.meta["flops"]["planned"] < plan.meta["flops"]["dense"]
    with pytest.raises(amgfx.AmgfxError, match="one of them"):
        allocate(cg, scores, 0.5, target_latency=0.5, times=t)
    with pytest.raises(amgfx.AmgfxError, match="cannot be reached"):
        allocate(cg, scores, target_latency=0.01, times=t)


class FlopClock:
    """Stands in for the runtime: a plan "runs" at ``slowdown`` times its FLOPs fraction, so the loop's
    corrections are the same on an idle and on a loaded machine."""

    def __init__(self, slowdown: float):
        self.slowdown, self.calls = slowdown, 0

    def runner(self, gm, runtime, workdir=None):
        return gm

    def paired(self, dense, pruned, args, kwargs, **_):
        from amgfx.planning.cost import measure_flops
        self.calls += 1
        ratio = self.slowdown * measure_flops(pruned, (args, kwargs)) / measure_flops(dense, (args, kwargs))
        return {"dense_ms": 10.0, "pruned_ms": 10.0 * ratio, "ratio": ratio}


def _clocked(monkeypatch, slowdown: float):
    from amgfx import timed_plan
    clock = FlopClock(slowdown)
    monkeypatch.setattr(timed_plan, "OpTimes", lambda: Planted(_numels))
    monkeypatch.setattr(timed_plan, "runner", clock.runner)
    monkeypatch.setattr(timed_plan, "paired", clock.paired)
    return clock


def test_plan_for_a_latency_target_records_prediction_and_every_measured_round(monkeypatch):
    m, x = _vit(2), torch.randn(4, 3, 32, 32)
    clock = _clocked(monkeypatch, slowdown=1.2)     # the "runtime" disagrees with the planted table: corrections
    plan = amgfx.plan_for(m, x, method="magnitude", target_latency=0.7, progress=False)
    lat = plan.meta["latency"]
    # every measured round is recorded; how many it takes depends on the weights (it stops within tolerance)
    assert lat["runtime"] == "eager" and 2 <= len(lat["rounds"]) == clock.calls <= LATENCY_ROUNDS
    first, second = lat["rounds"][:2]                                    # corrected by target / measured, damped
    assert second["goal"] == pytest.approx(min(1.0, first["goal"] * min(1.5, max(2 / 3, 0.7 / first["measured"]))),
                                           abs=1e-3)
    assert lat["measured"] in [r["measured"] for r in lat["rounds"]] and lat["measured"] <= 0.7 + 0.01
    assert plan.keep and plan.meta["target_latency"] == 0.7
    assert amgfx.verify(m, plan, x).passed
    quick = amgfx.plan_for(m, x, method="magnitude", target_latency=0.7, measure_latency=False, progress=False)
    assert "rounds" not in quick.meta["latency"] and quick.meta["latency"]["predicted"] <= 0.7


def test_a_target_no_plan_reaches_keeps_the_fastest_plan_and_warns(monkeypatch):
    m, x = _vit(2), torch.randn(4, 3, 32, 32)
    _clocked(monkeypatch, slowdown=10.0)             # every plan measures above the target
    with pytest.warns(UserWarning, match="was not reached"):
        plan = amgfx.plan_for(m, x, method="magnitude", target_latency=0.7, progress=False)
    rounds = plan.meta["latency"]["rounds"]
    assert plan.keep and plan.meta["latency"]["measured"] == min(r["measured"] for r in rounds)


@pytest.mark.slow      # measured on this machine's clock: what it measures moves with the load, so not in make test
def test_plan_for_a_latency_target_measured_for_real(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    x = torch.randn(4, 3, 64, 64)
    plan = amgfx.plan_for(m, x, method="magnitude", target_latency=0.7, progress=False)
    lat = plan.meta["latency"]
    assert 1 <= len(lat["rounds"]) <= LATENCY_ROUNDS and lat["measured"] > 0
    assert all(r["pruned_ms"] > 0 and r["dense_ms"] > 0 for r in lat["rounds"])
    assert amgfx.verify(m, plan, x).passed


def test_bad_latency_requests_are_one_line_errors():
    m, x = _vit(1), torch.randn(1, 3, 32, 32)
    with pytest.raises(amgfx.AmgfxError, match="runtime must be one of"):
        amgfx.plan_for(m, x, method="magnitude", target_latency=0.5, runtime="tensorrt", progress=False)
    with pytest.raises(amgfx.AmgfxError, match="one of target_flops, target_latency or ratios"):
        amgfx.plan_for(m, x, method="magnitude", target_latency=0.5, target_flops=0.5, progress=False)
    with pytest.raises(amgfx.AmgfxError, match="target_latency must be a fraction"):
        amgfx.plan_for(m, x, method="magnitude", target_latency=1.5, progress=False)


@pytest.mark.slow      # 35 s on 2 cores: a whole prune with timed rounds; plan_for's rounds are tested above
def test_cli_prints_predicted_beside_measured_latency(tmp_path, monkeypatch, capsys):
    from amgfx.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = main(["prune", "vit_tiny_patch16_224", "--img-size", "32", "--target-latency", "0.7", "--method",
                 "magnitude", "-q", "--json"])
    import json
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["target_latency"]["target"] == 0.7
    assert {"predicted", "measured", "rounds", "runtime"} <= set(report["target_latency"])


def test_cli_refuses_a_latency_target_with_ratios(capsys):
    from amgfx.cli import main
    assert main(["prune", "vit_tiny_patch16_224", "--img-size", "32", "--target-latency", "0.7",
                 "--ratios", "mlp=0.5"]) == 2
    assert "cannot be used with --ratios" in capsys.readouterr().err
