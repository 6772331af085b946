"""Extension points: an attention form, a criterion with a statistic of its own, a data-movement op,
each added in one place, and the op tables every interpreter must cover."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amgfx
from amgfx.analysis import residual
from amgfx.graph import indexprop, liveness, masks
from amgfx.graph.ops import (ADD_MATMUL, CONCAT, FUSED_ATTENTION, GETITEM, IDENTITY, LAYERS, LIKE, MOVE, NORMS, PAD, POINTWISE,
                             REDUCTIONS, SOFTMAX, STATE_WRITE, VECTOR_NORMS, VIEWS, register_fused_attention)
from amgfx.scoring.collectors import Collector, Watch
from amgfx.scoring.criteria import Criterion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# every interpreter has a rule for every op of the sets it reads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rules, must", [
    ("masks", masks.RULES, MOVE | IDENTITY | CONCAT | POINTWISE | set(NORMS) | SOFTMAX | set(REDUCTIONS) | LIKE | PAD
     | set(FUSED_ATTENTION) | VECTOR_NORMS | set(ADD_MATMUL) | set(STATE_WRITE)),
    ("liveness", liveness.RULES, MOVE | IDENTITY | CONCAT | POINTWISE | set(NORMS) | SOFTMAX | set(REDUCTIONS)
     | set(FUSED_ATTENTION) | VECTOR_NORMS),
    ("residual", residual.RULES, MOVE | VIEWS | IDENTITY | CONCAT | POINTWISE | set(NORMS) | SOFTMAX | set(REDUCTIONS)
     | LIKE | PAD | set(LAYERS) | {GETITEM} | VECTOR_NORMS),
    ("index propagation", indexprop.FOLLOWS, MOVE | IDENTITY | CONCAT | POINTWISE | set(NORMS) | set(STATE_WRITE)
     | {GETITEM}),
])
def test_every_op_of_the_tables_has_a_rule(name, rules, must):
    missing = sorted(str(op) for op in must if op not in rules)
    assert not missing, f"{name} has no rule for {missing}"


class MovedimBlock(nn.Module):
    """A residual stream that goes through movedim (channels first and back) between blocks."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.norm = nn.Linear(8, d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.out = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h.movedim(-1, 1).movedim(1, -1)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.out(h)


def test_a_stream_through_movedim_is_one_stream():
    cg = amgfx.analyze(MovedimBlock().eval(), torch.randn(1, 5, 8))
    (s,) = cg.residual
    assert s.prunable and {"inp.weight", "norm.weight", "fc1.weight", "out.weight"} <= {f for f, _ in s.members}


# ------------------------------------------------------------------------------------------------
# a new attention op: one registration
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("amgfx_test::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@attend.register_fake
def _(q, k, v, scale=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


class ToyAttention(nn.Module):
    """q/k/v projections, heads, a custom fused attention op, an output projection and an MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x):
        B, N, C = x.shape
        split = lambda t: t.view(B, N, self.h, C // self.h).transpose(1, 2)
        a = torch.ops.amgfx_test.attend(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_a_new_fused_attention_op_needs_one_registration():
    op = torch.ops.amgfx_test.attend.default
    x = torch.randn(2, 6, 32)
    before = amgfx.analyze(ToyAttention().eval(), x)
    assert not before.sites                                   # unknown op: not attention yet
    register_fused_attention(op, q="q", k="k", v="v", scale="scale")
    try:
        torch.manual_seed(0)
        m = ToyAttention().eval()
        cg = amgfx.analyze(m, x)
        (s,) = cg.sites
        assert (s.kind, s.num_heads, s.head_dim_qk, s.q.weight, s.proj.weight) == ("sdpa", 4, 8, "q.weight", "proj.weight")
        plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "head": 0.25, "mlp": 0.5})
        report = amgfx.verify(cg, plan)
        assert report.passed, report
        small = amgfx.apply(cg, plan)
        call = next(n for n in small.graph.nodes if n.target is op)
        assert call.kwargs["scale"] == pytest.approx(8 ** -0.5)   # the original scale survives the q/k cut
    finally:
        del FUSED_ATTENTION[op]


# ------------------------------------------------------------------------------------------------
# a criterion with a statistic of its own: one file (here, one class pair)
# ------------------------------------------------------------------------------------------------
class MeanAbsValue(Collector):
    """Mean |v| per column of one site's value operand (a statistic no built-in criterion gathers)."""

    def __init__(self, site):
        super().__init__(f"meanabs_v:{site.name}", Watch(values={site.operands[2]}))
        self.node = site.operands[2]

    def forward(self, seen, st):
        v = seen.values[self.node].detach().double()          # [B, H, N, d]
        st.add(self.key, v.abs().sum((0, 2)).flatten(), v.shape[0] * v.shape[2])


class ValueActivity(Criterion):
    """Keep the value neurons that are busiest on the calibration data."""
    name = "value_activity"
    kinds = ("v",)

    def collectors(self, cg, group):
        return [MeanAbsValue(next(s for s in cg.sites if s.name == group.where))]

    def score(self, cg, group, stats, seed=0):
        site = next(s for s in cg.sites if s.name == group.where)
        return stats.mean(MeanAbsValue(site).key)               # [heads * d]: v unit order is (head, column)


def test_a_criterion_with_its_own_statistic_is_one_class():
    from conftest import analysed
    m, args, kwargs, cg = analysed("vit")
    calib = [torch.randn(4, *args[0].shape[1:])]
    s = amgfx.score(cg, {"v": ValueActivity()}, calib, kinds=("v",), progress=False)
    site = cg.sites[0]
    seen = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == site.operands[2]:
                seen["v"] = out
            return out
    with torch.no_grad():
        Grab(cg.gm).run(calib[0])
    want = seen["v"].double().abs().mean((0, 2)).flatten().numpy()
    np.testing.assert_allclose(s.units[f"v:{site.name}"], want, rtol=1e-10)
    plan = amgfx.plan_for(cg, method={"v": ValueActivity()}, ratios={"v": 0.5}, calib=calib, progress=False)
    kept = plan.keep[f"v:{site.name}"]
    g = cg.group(f"v:{site.name}")
    for h in np.unique(g.heads):                             # per head, the busiest half is kept
        units = np.nonzero(g.heads == h)[0]
        top = units[np.argsort(-want[units])[:len(units) // 2]]
        assert sorted(set(kept) & set(units)) == sorted(top.tolist())


# ------------------------------------------------------------------------------------------------
# one place for SDPA's arguments; no broad excepts outside the wrapper
# ------------------------------------------------------------------------------------------------
def _sources():
    for top in ("amgfx",):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(d, f), ROOT), open(os.path.join(d, f)).read()


def test_sdpa_arguments_are_read_in_one_place():
    pattern = re.compile(r"""(args|kwargs)\b[^\n]*["'](attn_mask|enable_gqa|is_causal|dropout_p)["']|\.args\[:3\]""")
    hits = [f"{path}: {m.group(0)}" for path, text in _sources() if path != os.path.join("amgfx", "graph", "ops.py")
            for m in pattern.finditer(text)]
    assert not hits, hits


def test_no_broad_except_outside_the_error_wrapper():
    hits = [path for path, text in _sources() if re.search(r"except\s+(Exception|BaseException)\b|except\s*:", text)
            and path != os.path.join("amgfx", "errors.py")]
    assert not hits, hits


def test_an_unexpected_error_inside_a_pass_is_an_amgfx_error_naming_the_node(monkeypatch):
    import importlib

    from conftest import analysed
    fs = importlib.import_module("amgfx.passes.fix_shapes")    # the module (the package exports its pass)
    m, args, kwargs, cg = analysed("vit")
    plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100))})

    def broken(gm, ms, n):
        raise IndexError("list index out of range")
    monkeypatch.setitem(fs.REWRITES, torch.ops.aten.view.default, broken)
    with pytest.raises(amgfx.RewriteError, match=r"pass fix_shapes failed at node view\w* \(aten\.view\): IndexError") as e:
        amgfx.apply(cg, plan)
    assert isinstance(e.value.__cause__, IndexError)


class InPlaceBlock(nn.Module):
    """Written with in-place ops, which export keeps: ReLU(inplace=True) in the MLP, Dropout(inplace=True) on
    the attention probabilities (TNT, NextViT)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.h = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 32), nn.ReLU(inplace=True), nn.Linear(32, d)
        self.drop = nn.Dropout(0.1, inplace=True)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.drop((q @ k.transpose(-2, -1) * 0.25).softmax(-1)) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(self.act(self.fc1(x)))


def test_in_place_twins_of_table_ops_follow_their_rules():
    assert torch.ops.aten.relu_.default in POINTWISE and torch.ops.aten.dropout_.default in IDENTITY
    m, x = InPlaceBlock().eval(), torch.randn(1, 6, 16)
    cg = amgfx.analyze(m, x)
    assert [s.supported for s in cg.sites] == [True] and len(cg.mlps) == 1, cg.summary()
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.25, "v": 0.25, "mlp": 0.25}, progress=False)
    rep = amgfx.verify(cg, plan, pruned=amgfx.apply(cg, plan))
    assert rep.passed and rep.max_rel <= 1e-5, rep.status


def test_runtimes_have_one_set_of_names():
    """planning.options.RUNTIMES is the table: the runners, the CLI's --runtime, the backend's inner and
    amgfx.load all spell runtimes from it (a new runtime is one entry there and one runner)."""
    import argparse

    from amgfx import backend, runtime
    from amgfx.cli import build_parser
    from amgfx.planning.options import RUNTIMES
    assert set(runtime.RUNNERS) == set(RUNTIMES)
    assert set(backend.INNER) <= set(RUNTIMES)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flag = next(a for a in sub.choices["prune"]._actions if "--runtime" in a.option_strings)
    assert list(flag.choices) == list(RUNTIMES)


def test_a_new_pass_is_one_file_and_one_place_in_the_pipeline(monkeypatch):
    """CONTRIBUTING's pass recipe with a toy: declared with graph_pass, put in PIPELINE (its one registration),
    it runs in every rewrite; placed before what it requires it is refused; declaring a property it does not
    make true fails under the debug checks the suite runs with."""
    from conftest import analysed

    import amgfx.passes as passes
    from amgfx.passes.pipeline import PassContractError, PassOrderError, check_order, graph_pass
    seen = []

    @graph_pass(requires=("shapes_fixed",), ensures=())
    def count_nodes(gm, resolved):
        seen.append(len(gm.graph.nodes))
        return gm

    at = passes.PIPELINE.index(passes.fix_shapes) + 1
    monkeypatch.setattr(passes, "PIPELINE", passes.PIPELINE[:at] + [count_nodes] + passes.PIPELINE[at:])
    _, (x,), _, cg = analysed("vit")
    plan = amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100))})
    small = amgfx.apply(cg, plan)
    assert seen and tuple(small.get_parameter("blocks.0.mlp.fc1.weight").shape)[0] == 100
    with pytest.raises(PassOrderError, match="count_nodes requires shapes_fixed"):
        check_order([count_nodes] + passes.PIPELINE)

    @graph_pass(requires=(), ensures=("branches_removed", "params_shrunk"))
    def claims_too_much(gm, resolved):          # stands in for remove_branch, and claims shrink_params' work too
        return gm

    monkeypatch.setattr(passes, "PIPELINE", [claims_too_much] + passes.PIPELINE[1:])
    assert os.environ.get("AMGFX_DEBUG") == "1"
    with pytest.raises(amgfx.RewriteError, match="claims_too_much does not ensure what it declares: params_shrunk") as e:
        amgfx.apply(cg, plan)
    assert isinstance(e.value.__cause__, PassContractError)


def test_a_new_runtime_is_one_runner_and_one_registration(monkeypatch):
    """CONTRIBUTING's runtime recipe with a toy: register_runtime fills the names and the runners at once; a
    latency budget then accepts it and runner() runs a pruned graph there."""
    from amgfx import runtime
    from amgfx.planning.options import RUNTIMES
    monkeypatch.setattr(runtime, "RUNNERS", dict(runtime.RUNNERS))
    monkeypatch.setitem(RUNTIMES, "toy", "placeholder")           # undone after the test, as RUNNERS is
    del RUNTIMES["toy"]
    with pytest.raises(amgfx.AmgfxError, match="runtime must be one of"):
        amgfx.PlanConfig(target_latency=0.5, runtime="toy")
    calls = []

    def toy(gm, workdir):
        return lambda a, kw: calls.append(1) or gm(*a, **kw)

    runtime.register_runtime("toy", "a toy that counts its calls", toy)
    assert amgfx.PlanConfig(target_latency=0.5, runtime="toy").runtime == "toy"
    from conftest import analysed
    _, (x,), _, cg = analysed("vit")
    small = amgfx.apply(cg, amgfx.Plan(keep={"mlp:blocks.0.mlp": list(range(100))}))
    torch.testing.assert_close(runtime.runner(small, "toy")((x,), {}), small(x))
    assert calls == [1]
