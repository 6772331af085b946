"""Every benchmark in one command: ``python -m benchmarks [--quick] [NAME ...]``.

Each benchmark writes ``benchmarks/results/NAME.md`` (and a ``.png`` where a picture helps);
README.md shows them. Without NAMEs the whole suite runs, one after another (never two at once:
they time things). ``--quick`` runs the CI-sized speed check: one small model in eager,
inductor and onnxruntime, numbers checked for sanity, never for time.

examples:
  python -m benchmarks --quick
  python -m benchmarks speed tokens_latency
  python -m benchmarks speed -- --cases DeiT-S --runs 40    (arguments after -- go to the named benchmarks)
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

SUITE = ["speed", "tokens_latency", "attention_lowering", "analysis_scaling", "calibration_cost", "compile_cost",
         "profile_ops", "levers", "repeat", "tool_cost", "criteria_digits", "criteria_minilm", "accuracy_sweep",
         "reconstruction_ceiling", "recovery_digits", "recovery_minilm", "decoder_lm", "decode_speed", "latency_budget"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                 epilog="examples:" + __doc__.split("examples:")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CI-sized speed check only")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {', '.join(SUITE)}")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    unknown = [n for n in a.names if n not in SUITE]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(SUITE)}")
    if a.quick:
        importlib.import_module("benchmarks.speed").main(["--quick", *extra])
        return 0
    for name in a.names or SUITE:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(extra if a.names else [])
        print(f"== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
