"""``amgfx verify``: prune by a plan and check the result against the zeroing oracle."""
from __future__ import annotations

import json

from ..api import apply, plan_for
from ..errors import AmgfxError
from ..planning.cost import predict
from ..planning.plan import Plan
from ..api import verify
from ._common import analysed, err


def cmd_verify(a) -> int:
    got = analysed(a)
    if isinstance(got, int):
        return got
    loaded, cg, _ = got
    try:
        plan = Plan.load(a.plan) if a.plan else plan_for(cg, method=a.method, ratios=a.ratios, seed=a.seed)
        if a.save_plan:
            plan.save(a.save_plan)
        pruned = apply(cg, plan)
        cost = predict(cg, plan)
        report = verify(cg, plan, pruned=pruned, tol=a.tol)
    except OSError as e:
        return err(f"cannot read or write the plan: {e}")
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    code = 0 if report.passed else 3 if not report.exact else 1
    if a.json:
        print(json.dumps({"model": a.model, **cost, "verify": report.to_dict(), "status": report.status}))
    elif not a.quiet:
        p, f = cost["params"], cost["flops"]
        print(f"{a.model}: {loaded.description}")
        print(f"params {p['dense']:,} -> {p['pruned']:,} ({p['pruned'] / p['dense']:.1%}),  "
              f"FLOPs {f['dense']:,} -> {f['pruned']:,} ({f['pruned'] / f['dense']:.1%})")
        print(report)
        if a.save_plan:
            print(f"wrote plan to {a.save_plan}")
    return code


