"""The benchmark pipeline in CI size (``python -m benchmarks --quick``): it runs, and its numbers are sane.

No timing is asserted: machines are noisy. What must hold is that every variant ran in every
runtime, the FLOPs landed where the plans put them, and Torch-Pruning was matched to amgfx's FLOPs.
"""
import math
import os

import pytest


@pytest.mark.slow
def test_quick_speed_suite_runs_and_is_sane(tmp_path):
    from benchmarks import speed
    out = tmp_path / "speed.md"
    rows = speed.main(["--quick", "--runs", "2", "--out", str(out)])   # raises if a sanity check fails
    assert {(r["variant"], r["runtime"], r["batch"]) for r in rows} == {
        (v, rt, b) for v in ("dense", "amgfx snp", "amgfx snp+amg", "Torch-Pruning")
        for rt in ("eager", "onnxruntime", "inductor") for b in (1, 8)}
    assert all(math.isfinite(r["efficiency"]) and r["efficiency"] > 0 for r in rows)
    assert all(r["flops_kept"] <= 0.5 for r in rows if r["variant"].startswith("amgfx"))
    text = out.read_text()
    assert "| DeiT-tiny 64px x4 | 50% | inductor | 8 | Torch-Pruning |" in text and "Checks: all numbers finite" in text
    assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_readme_figures_come_from_the_result_files(tmp_path):
    """Every generated block of README.md and docs/ equals what benchmarks/readme.py makes from the results."""
    from benchmarks import readme
    assert readme.main(["--check"]) == 0
    texts = {p: open(p).read() for p in readme.pages()}
    assert "<!-- bench:copy.main_job -->" in texts[readme.README]
    assert sum(t.count("<!-- bench:") for t in texts.values()) >= 10
    page = os.path.join(readme.DOCS, "benchmarks.md")
    stale = tmp_path / "benchmarks.md"
    stale.write_text(texts[page].replace("](../benchmarks/", "](benchmarks/").replace("eff ", "eff 9", 1))
    assert readme.main(["--check", "--readme", str(stale)]) == 1       # one figure typed by hand
    stale.write_text(texts[page].replace("](../benchmarks/", "](benchmarks/"))
    assert readme.main(["--check", "--readme", str(stale)]) == 0       # ...and only that made it stale


def test_levers_each_change_what_they_name(monkeypatch):
    """benchmarks.levers' plans: all meet 50% FLOPs from one scoring, and each differs from the speed plan as named."""
    import numpy as np
    from conftest import analysed, skewed_scores

    from amgfx.planning import budget
    from benchmarks import levers, speed
    _, args, _, cg = analysed("vit")
    units = skewed_scores(cg, levers.ALL)
    calls, real = [], budget.allocate
    monkeypatch.setattr(budget, "allocate", lambda cg, s, t, **kw: calls.append((sorted({cg.group(g).kind for g in s}),
                                                                                  kw)) or real(cg, s, t, **kw))
    plans = levers.plans(cg, units)
    assert list(plans) == list(levers.LEVERS)
    got = dict(zip(plans, calls))
    base = next(iter(plans))
    assert got[base] == (sorted(levers.DEFAULT), speed.PLAN)
    assert got["+residual"][0] == sorted(levers.ALL) and got["round_to=8"][1]["round_to"] == 8
    assert got["same_head_dim off"][1] == {**speed.PLAN, "same_head_dim": False}
    assert got["+blocks"][1] == {**speed.PLAN, "blocks": True} and "blocks" not in got[base][1]
    dims = {name: [(a.qk_dim, a.v_dim) for a in p.resolve(cg).attention.values()] for name, p in plans.items()}
    assert all(q == v for q, v in dims[base]) and any(q != v for q, v in dims["same_head_dim off, round_to=8"])
    for name, p in plans.items():
        assert p.meta["flops"]["planned"] <= 0.5 * p.meta["flops"]["dense"], name
        per = lambda g, n: n // len(np.unique(cg.group(g).heads)) if cg.group(g).kind in ("qk", "v") else n
        widths = [(per(g, len(k)), per(g, cg.group(g).units)) for g, k in p.keep.items() if cg.group(g).kind != "head"]
        step = p.meta["round_to"]
        assert all(w % (budget.kernel_multiple(w0) if step == "auto" else step) == 0
                   for w, w0 in widths), name
    assert plans["split_qkv=always"].options == {**plans[base].options, "split_qkv": "always"} != plans[base].options


def test_repeat_summary_puts_repeats_side_by_side():
    from benchmarks.repeat import summary
    row = lambda v, e: {"runtime": "inductor", "batch": 1, "variant": v, "efficiency": e}
    lines = summary([row("dense", 1.0), row("amgfx snp", 0.88), row("dense", 1.0), row("amgfx snp", 0.93),
                     row("amgfx snp", 0.90)])
    assert lines[2:] == ["| inductor | 1 | amgfx snp | 0.880, 0.930, 0.900 | 0.900 | 0.050 |"]


def test_repeat_verdict_says_by_how_much_the_default_plan_misses_the_goal():
    from benchmarks.repeat import GOAL, verdict
    row = lambda b, v, e: {"runtime": "onnxruntime", "batch": b, "variant": v, "efficiency": e}
    lines = verdict([row(1, "amgfx snp", GOAL - 0.05), row(1, "amgfx snp", GOAL - 0.03), row(1, "amgfx snp", GOAL),
                     row(8, "amgfx snp", GOAL + 0.01), row(8, "Torch-Pruning", 0.1)])
    assert f"- onnxruntime, batch 1: {GOAL - 0.03:.3f}, short by 0.030" in lines
    assert f"- onnxruntime, batch 8: {GOAL + 0.01:.3f}, met" in lines
    assert any("profile_ops.md" in x for x in lines)
    assert not any("profile_ops.md" in x for x in verdict([row(8, "amgfx snp", GOAL)]))


def test_llm_real_table_reads_each_row_and_says_when_a_baseline_failed():
    """benchmarks.llm_real's table: × dense from the best perplexity of a row (after refit where there is one),
    a failed baseline as a row saying why, not a missing one."""
    from types import SimpleNamespace

    from benchmarks.llm_real import table
    b = SimpleNamespace(kv=46080)
    rows = [{"name": "amgfx taylor", "target": 0.5, "blocks": 0.5, "whole": 0.6, "params": 0.59, "kv": 35328,
             "ppl": 122.3, "ppl_refit": 61.8, "seconds": 440, "peak_mb": 4971},
            {"name": "Torch-Pruning", "target": 0.5, "failed": True, "why": "did not finish in 300 s"}]
    out = table(b, rows, 22.7)
    assert out[2].startswith("| dense |") and "22.70" in out[2]
    assert "| 61.82 |" not in out[3] and "| 61.80 | 2.72 |" in out[3]
    assert "did not finish in 300 s" in out[4]
