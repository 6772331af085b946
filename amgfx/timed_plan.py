"""Latency budgets that hold in the runtime: plan by the op-time model, time the plan, correct, repeat.

:func:`amgfx.planning.budget.allocate` plans a ``target_latency`` from measured eager op times;
fused runtimes and noisy machines run a plan faster or slower than that sum predicts. This loop
times each plan side by side with the dense model (:func:`amgfx.runtime.paired`) and plans again
toward a corrected goal. :func:`amgfx.plan_for` calls it for ``target_latency=``.
"""
from __future__ import annotations

import sys
import tempfile
import warnings

from .errors import AmgfxError
from .graph.meta import EXAMPLE
from .planning.budget import allocate
from .planning.latency import OpTimes
from .planning.plan import Plan
from .runtime import paired, runner

__all__ = ["timed_plan", "LATENCY_ROUNDS", "LATENCY_TOLERANCE"]

LATENCY_ROUNDS = 4        # plans measured at most, per target_latency
LATENCY_TOLERANCE = 0.01  # a measured fraction this close to the target is on it


def timed_plan(cg, units: dict, target: float, runtime: str, build, measure: bool, progress: bool,
               options: dict) -> Plan:
    """The plan of :func:`amgfx.planning.budget.allocate` at ``target_latency``, measured in ``runtime``.

    The prediction sums eager op times; a runtime that fuses ops (or a noisy machine) runs the plan
    faster or slower than predicted, so the goal is scaled by target / measured and planned again
    until the measured fraction is within :data:`LATENCY_TOLERANCE` of the target. Of the plans
    measured, the slowest one within target + tolerance is returned (the least pruned that meets it).
    ``build(plan)`` rewrites the model a plan describes (``amgfx.apply`` without the oracle check).
    """
    times = OpTimes()
    goal, rounds, plans = target, [], []
    plan = allocate(cg, units, target_latency=goal, times=times, **options)
    lat = plan.meta["latency"]
    predicted = lambda p: p.meta["latency"]["planned_ms"] / p.meta["latency"]["dense_ms"]
    if not measure:
        lat.update({"runtime": runtime, "predicted": round(predicted(plan), 4)})
        return plan
    args, kwargs = cg.gm.meta[EXAMPLE]
    work = tempfile.mkdtemp(prefix="amgfx-latency-")
    dense = runner(cg.gm, runtime, work)
    say = (lambda *x: print(*x, file=sys.stderr, flush=True)) if progress else (lambda *x: None)
    for i in range(LATENCY_ROUNDS):
        if i:
            try:
                plan = allocate(cg, units, target_latency=goal, times=times, **options)
            except AmgfxError:        # the corrected goal is below the smallest plan: keep what was measured
                break
        m = paired(dense, runner(build(plan), runtime, work), args, kwargs)
        rounds.append({"goal": round(goal, 4), "predicted": round(predicted(plan), 4), "measured": round(m["ratio"], 4),
                       "dense_ms": round(m["dense_ms"], 3), "pruned_ms": round(m["pruned_ms"], 3)})
        plans.append(plan)
        say(f"latency round {i + 1}: goal {goal:.3f} of predicted time, measured {m['ratio']:.3f} of dense in {runtime}")
        if abs(m["ratio"] - target) <= LATENCY_TOLERANCE:
            break
        # damped: one noisy measurement must not throw the goal to 1 (or to 0)
        goal = min(1.0, max(0.02, goal * min(1.5, max(2 / 3, target / m["ratio"]))))
    within = [i for i, r in enumerate(rounds) if r["measured"] <= target + LATENCY_TOLERANCE]
    pick = max(within, key=lambda i: rounds[i]["measured"]) if within else min(
        range(len(rounds)), key=lambda i: rounds[i]["measured"])
    if not within:
        warnings.warn(f"target_latency={target} in {runtime} was not reached: the fastest plan measured runs at "
                      f"{rounds[pick]['measured']:.3f} of dense", stacklevel=3)
    plan = plans[pick]
    plan.meta["target_latency"] = target         # allocate recorded the corrected goal it was given
    plan.meta["latency"].update({"runtime": runtime, "goal": rounds[pick]["goal"], "predicted": rounds[pick]["predicted"],
                                 "measured": rounds[pick]["measured"], "rounds": rounds})
    return plan
