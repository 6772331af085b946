"""``amgfx inspect``: what amgfx finds in a model's graph (sites, MLPs, streams, groups, tokens)."""
from __future__ import annotations

import json

from ..analysis.branches import branches
from ..analysis.tokens import token_sites
from ..api import score
from ..errors import AmgfxError
from ..graph.liveness import live_queries
from ..graph.meta import EXAMPLE
from ..planning.cost import predict
from ..planning.plan import Plan
from ._common import analysed, calibration, err


def cmd_inspect(a) -> int:
    """``amgfx inspect``: analyse, print (or write) the structure and coupling, draw what is asked."""
    calib = {}

    def prepare(loaded):
        if not a.draw_scores and a.calib == "example":
            return 0
        got = calibration(a, loaded)
        if isinstance(got, int):
            return got
        calib["batches"], calib["note"] = got
        return 0

    plan = None
    if a.plan:
        try:
            plan = Plan.load(a.plan)
        except (OSError, AmgfxError) as e:
            return err(f"cannot read the plan {a.plan}: {e}")
    got = analysed(a, prepare)
    if isinstance(got, int):
        return got
    loaded, cg, dt = got
    if plan is not None:
        try:
            plan.validate(cg)
        except AmgfxError as e:
            return err(f"{a.plan}: {str(e).splitlines()[0]}")
    if a.json:
        print(json.dumps({**cg.to_dict(with_index=False), "tokens": token_report(cg), "blocks": block_report(cg)},
                         default=str))
    elif not a.quiet:
        print(f"{a.model}: {loaded.description}, analysed in {dt:.1f}s\n")
        print(cg.summary())
        print("\n" + describe(cg))
        print(describe_blocks(cg))
    if a.format and not a.out:
        return err("--format needs --out FILE")
    if a.out:
        fmt = a.format or a.out.rsplit(".", 1)[-1]
        try:
            cg.save(a.out, fmt)
        except (OSError, ValueError) as e:
            return err(f"cannot write {a.out}: {e}")
        if not a.quiet and not a.json:
            print(f"\nwrote {fmt} to {a.out}")
    say = (lambda *x: None) if (a.quiet or a.json) else print
    if a.draw:
        code = _draw(a, cg, plan, say)
        if code:
            return code
    return _draw_scores(a, cg, plan, calib, say) if a.draw_scores else 0


def _draw(a, cg, plan, say) -> int:
    """--draw: the plan per layer (with --plan) or one block's coupling."""
    from ..draw import draw_block, draw_plan    # matplotlib loads only when a picture is asked for
    try:
        if plan is not None:
            d = draw_plan(cg, plan, a.draw, title=f"{a.model}: {a.plan}")
            say(f"drew the plan over {len(d['layers'])} layers to {a.draw}")
        else:
            say(f"drew {draw_block(cg, a.draw, a.block)} to {a.draw}")
    except (OSError, ValueError) as e:
        return err(f"cannot draw to {a.draw}: {e}")
    return 0


def _draw_scores(a, cg, plan, calib: dict, say) -> int:
    """--draw-scores: one site's scores by --method on the calibration data (the example without --calib)."""
    batches = calib["batches"]
    if batches is None:
        args, kwargs = cg.gm.meta[EXAMPLE]
        batches = [kwargs if kwargs and not args else args]
    from ..draw import draw_scores              # matplotlib loads only when a picture is asked for
    try:
        s = score(cg, a.method, batches, kinds=("qk", "v", "head", "mlp", "tokens"), progress=not a.quiet)
        d = draw_scores(cg, s, a.draw_scores, site=a.block or 0, plan=plan)
    except AmgfxError as e:
        return err(str(e).splitlines()[0], 1)
    except (OSError, ValueError) as e:
        return err(f"cannot draw to {a.draw_scores}: {e}")
    say(f"drew the {a.method} scores of {d['site']} (on {calib['note']}) to {a.draw_scores}")
    return 0


def token_report(cg) -> dict:
    """What static token pruning and dead-token elimination can do here (``amgfx inspect`` prints it)."""
    ts = token_sites(cg)
    reasons: dict = {}
    for t in ts.values():
        if t.reason:
            reasons.setdefault(t.reason, []).append(t.site)
    names = {s.node: s.name for s in cg.sites}
    flops = predict(cg, Plan())["flops"] if live_queries(cg) else None
    return {"sites": len(ts), "prunable": sum(t.prunable for t in ts.values()),
            "special": sorted({tuple(t.special) for t in ts.values() if t.prunable}),
            "refused": reasons,
            "dead": {names[n]: {"live": live, "queries": next(t.keys for t in ts.values() if t.node == n)}
                     for n, live in live_queries(cg).items()},
            "dead_saving": 1 - flops["pruned"] / flops["dense"] if flops else 0.0}


def block_report(cg) -> dict:
    """Which attention and MLP branches a plan may remove whole (``prune --remove-blocks``), and why not."""
    b = branches(cg)
    return {"removable": sorted(n for n, x in b.items() if x.removable),
            "kept": {n: x.reason for n, x in sorted(b.items()) if not x.removable}}


def describe_blocks(cg) -> str:
    """:func:`block_report` as text."""
    r = block_report(cg)
    n = len(r["removable"]) + len(r["kept"])
    line = f"blocks (whole branches, --remove-blocks): {len(r['removable'])} of {n} attention/MLP branches can go"
    if r["kept"]:
        first, why = next(iter(r["kept"].items()))
        line += f"; {len(r['kept'])} cannot ({first}{', ...' if len(r['kept']) > 1 else ''}: {why})"
    return line


def describe(cg) -> str:
    """:func:`token_report` as text."""
    r = token_report(cg)
    special = "; ".join(f"positions {list(s)}" if s else "none" for s in r["special"]) or "-"
    lines = [f"tokens (static key pruning, AMG): {r['prunable']} of {r['sites']} sites can drop key positions; "
             f"always kept (class/distillation/register tokens): {special}"]
    lines += [f"  {len(sites)} site(s) cannot ({sites[0]}{', ...' if len(sites) > 1 else ''}): {why}"
              for why, sites in r["refused"].items()]
    for site, d in r["dead"].items():
        lines.append(f"dead tokens: only query positions {d['live']} of {d['queries']} in {site} reach the outputs; "
                     f"computing just those saves {r['dead_saving']:.1%} of the FLOPs (exact, on by default)")
    return "\n".join(lines)


