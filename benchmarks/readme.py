"""Copy benchmark figures into README.md and docs/: ``python -m benchmarks.readme [--check]``.

README.md and every page under docs/ hold generated blocks between ``<!-- bench:NAME -->`` and
``<!-- /bench -->``. This fills each one from the files under ``benchmarks/results``, so no figure
inside them is typed by hand, and each table names the command that made it. Links inside a
block are written relative to its page. ``--check`` changes nothing and exits 1 when a block is
out of date (``tests/test_bench.py`` runs it).

examples:
  python -m benchmarks.speed && python -m benchmarks.readme
  python -m benchmarks.readme --check
  python -m benchmarks.readme --check --readme docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ._report import RESULTS

ROOT = os.path.normpath(os.path.join(os.path.dirname(RESULTS), ".."))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")


def pages() -> list[str]:
    """README.md and every Markdown page of docs/."""
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)
TARGET = 0.9                                      # issue 8: efficiency at 50% FLOPs on DeiT-S


def _read(name: str) -> list[str]:
    with open(os.path.join(RESULTS, name)) as f:
        return f.read().splitlines()


def _command(lines: list[str]) -> str:
    """The `python -m ...` command a result file says made it."""
    return next(re.search(r"`python -m [^`]*`", l).group(0) for l in lines if "`python -m" in l)


def speed_rows(name: str = "speed.md") -> list[dict]:
    rows = []
    for l in _read(name):
        c = [x.strip() for x in l.strip().strip("|").split("|")]
        if l.startswith("| ") and len(c) == 9 and c[0] != "case":
            rows.append(dict(case=c[0], target=c[1], runtime=c[2], batch=int(c[3]), variant=c[4], kept=float(c[5]),
                             ms=float(c[6]), speedup=float(c[7]), eff=None if c[8] == "-" else float(c[8])))
    return rows


def speed_table(case: str, target: str = "50%") -> list[str]:
    rows = [r for r in speed_rows() if r["case"] == case and r["target"] == target]
    out = [f"| {case} at {target} | batch | amgfx snp | amgfx snp+amg | Torch-Pruning | "
           "amgfx snp / Torch-Pruning time |", "|---|---|---|---|---|---|"]
    for rt in dict.fromkeys(r["runtime"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows):
            sel = {r["variant"]: r for r in rows if r["runtime"] == rt and r["batch"] == b}
            cell = lambda v: f"{sel[v]['speedup']:.2f}x, eff {sel[v]['eff']:.2f}" if v in sel else "-"
            ratio = f"{sel['amgfx snp']['ms'] / sel['Torch-Pruning']['ms']:.2f}" if "Torch-Pruning" in sel else "-"
            out.append(f"| {rt} | {b} | {cell('amgfx snp')} | {cell('amgfx snp+amg')} | {cell('Torch-Pruning')} | {ratio} |")
    return [f"From [benchmarks/results/speed.md](benchmarks/results/speed.md), made by {_command(_read('speed.md'))}:", ""] + out


def speed_verdict() -> list[str]:
    """The acceptance lines of issue 8, computed: efficiency >= 0.9 and no slower than Torch-Pruning."""
    rows = [r for r in speed_rows() if r["case"] == "DeiT-S" and r["target"] == "50%"]
    by = {(r["runtime"], r["batch"], r["variant"]): r for r in rows}
    snp = {(rt, b): r for (rt, b, v), r in by.items() if v == "amgfx snp" and rt != "eager"}
    met = [k for k, r in snp.items() if r["eff"] >= TARGET]
    missed = [f"{rt} batch {b} ({snp[rt, b]['eff']:.3f})" for rt, b in snp if (rt, b) not in met]
    ratios = [by[rt, b, "amgfx snp"]["ms"] / r["ms"] for (rt, b, v), r in by.items() if v == "Torch-Pruning"]
    effs = ", ".join(f"{rt} batch {b} {r['eff']:.3f}" for (rt, b), r in snp.items())
    line = (f"**Target: efficiency >= {TARGET} for amgfx snp at 50% FLOPs on DeiT-S, in inductor and onnxruntime "
            f"at batch 1 and 8: met in {len(met)} of {len(snp)}** ({effs})" +
            (f"; missed: {', '.join(missed)}." if missed else ".") +
            f" amgfx snp takes {min(ratios):.2f}-{max(ratios):.2f} of Torch-Pruning's time at the same FLOPs"
            f" ({sum(x <= 1 for x in ratios)} of {len(ratios)} runtime and batch pairs at least as fast).")
    return [line]


def levers() -> list[str]:
    out = [f"From [benchmarks/results/levers.md](benchmarks/results/levers.md), made by {_command(_read('levers.md'))}:",
           "", "| amgfx snp, 50% FLOPs, with | runtime | batch | FLOPs kept | speedup | efficiency |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r['variant']} | {r['runtime']} | {r['batch']} | {r['kept']:.3f} | {r['speedup']:.2f}x | {r['eff']:.3f} |"
            for r in speed_rows("levers.md") if r["variant"] != "dense"]
    return out


def levers_accuracy() -> list[str]:
    """levers.md's accuracy table (the plan knobs on the trained digits ViT)."""
    lines = _read("levers.md")
    i = lines.index("## What the plan knobs cost in accuracy") + 2
    return [lines[i], ""] + [l for l in lines[i + 1:] if l.startswith("|")]


def gpu_line() -> list[str]:
    return [next(l for l in _read("speed.md") if l.startswith("GPU:"))]


def profile_table(case: str, runtime: str, batch: int) -> list[str]:
    lines = _read("profile_ops.md")
    head = f"**{case}, {runtime}, batch {batch}**"
    i = lines.index(head) + 2
    j = next(k for k in range(i, len(lines)) if not lines[k].startswith("|"))
    return [f"{head} ({_command(lines)}):", ""] + lines[i:j]


def tool_cost() -> list[str]:
    lines = _read("tool_cost.md")
    return [f"From [benchmarks/results/tool_cost.md](benchmarks/results/tool_cost.md) ({_command(lines)}):", ""] + \
        [l for l in lines if l.startswith("|")]


def zoo() -> list[str]:
    """The architecture sweep's outcome counts, with the command that made them."""
    lines = _read("zoo.md")
    counts = next(l for l in lines if l.startswith("**Outcomes:"))
    return [f"{counts} ({_command(lines)}, random weights, tiny configs; per model in "
            "[benchmarks/results/zoo.md](benchmarks/results/zoo.md))"]


def latency_budget() -> list[str]:
    """How many latency plans ran within the target, with the command that timed them."""
    lines = _read("latency_budget.md")
    counts = next(l for l in lines if l.startswith("**Within"))
    return [f"{counts} ({_command(lines)}; DeiT-S and MiniLM, eager / onnxruntime / inductor, batch 1 and 8; "
            "per row in [benchmarks/results/latency_budget.md](benchmarks/results/latency_budget.md))"]


def llm_real() -> list[str]:
    """The real LLM's table and its verdict per target (llm_real.md less the greedy text)."""
    lines = _read("llm_real.md")
    i = next(k for k, l in enumerate(lines) if l.startswith("|"))
    j = next(k for k in range(i, len(lines)) if not lines[k].startswith("|"))
    verdicts = [l for l in lines if l.startswith("- ") and "of block FLOPs" in l]     # and the distillation's
    about = next(l for l in lines if "`python -m benchmarks.llm_real" in l)
    cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines[i + 2:j]]
    dense = next(c for c in cells if c[0] == "dense")
    best: dict = {}                          # target -> plan -> (best perplexity, x dense, blocks kept)
    for c in cells:
        if c[0] != "dense" and "distillation" not in c[0]:      # no training in this table: the file has it
            name = c[0].split(" (")[0] if not c[0].startswith("amgfx") else "amgfx (best criterion)"
            got = (float(c[7]) if c[7] not in ("", "-") else float(c[6]), c[8], c[2]) if c[8] else None
            if got is not None and (name not in best.setdefault(c[1], {}) or got[0] < best[c[1]][name][0]):
                best[c[1]][name] = got
            elif got is None:
                best.setdefault(c[1], {}).setdefault(name, None)
    names = list(dict.fromkeys(n for t in best.values() for n in t))
    out = ["| target (block FLOPs) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t, got in best.items():
        out.append(f"| {t} | " + " | ".join("did not run (see the file)" if got.get(n) is None else
                                             f"{got[n][0]:.2f} ({got[n][1]}×, {got[n][2]})" for n in names) + " |")
    return ([about, "", f"Perplexity on held-out text after refit (× dense {dense[6]}, blocks' FLOPs kept); every row "
             "in [benchmarks/results/llm_real.md](benchmarks/results/llm_real.md):", ""] + out + [""] + verdicts)


def copy(name: str) -> list[str]:
    """A result file as it is, less its title: for the README sections that show one whole."""
    body = _read(f"{name}.md")
    body = body[1:] if body and body[0].startswith("# ") else body
    while body and not body[0].strip():
        body = body[1:]
    while body and not body[-1].strip():
        body = body[:-1]
    return body


def block(name: str) -> list[str]:
    kind, _, arg = name.partition(".")
    if kind == "copy":
        return copy(arg)
    if kind == "speed":
        return speed_table(arg)
    if kind == "profile":
        case, runtime, b = arg.rsplit("-", 2)
        return profile_table(case, runtime, int(b))
    return {"verdict": speed_verdict, "gpu": gpu_line, "tool_cost": tool_cost, "levers": levers,
            "levers_accuracy": levers_accuracy, "zoo": zoo, "latency_budget": latency_budget, "llm_real": llm_real}[kind]()


def render(text: str, prefix: str = "") -> str:
    """``text`` with every generated block filled; ``prefix`` leads from the page to the repository root."""
    def fill(m):
        body = "\n".join(block(m.group("name"))).replace("](benchmarks/", f"]({prefix}benchmarks/")
        return m.group(1) + body + "\n" + m.group(4)
    return BLOCK.sub(fill, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n\n")[1],
                                 epilog="examples:" + __doc__.split("examples:")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is out of date; write nothing")
    ap.add_argument("--readme", default=None, help="one page only (outside the repository, links are as from its root)")
    a = ap.parse_args(argv)
    stale_pages = 0
    for page in [a.readme] if a.readme else pages():
        inside = os.path.abspath(page).startswith(ROOT + os.sep)
        prefix = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(page))).replace(os.sep, "/") + "/" if inside else ""
        prefix = "" if prefix == "./" else prefix
        with open(page) as f:
            text = f.read()
        new = render(text, prefix)
        names = [m.group("name") for m in BLOCK.finditer(text)]
        label = os.path.relpath(page, ROOT) if inside else page
        if a.check:
            stale = [n for n, old, fresh in zip(names, BLOCK.finditer(text), BLOCK.finditer(new))
                     if old.group("body") != fresh.group("body")]
            print(f"{label}: {len(names)} generated blocks" + (f", out of date: {', '.join(stale)}" if stale else
                                                                ", up to date"))
            stale_pages += bool(stale)
            continue
        if new != text:
            with open(page, "w") as f:
                f.write(new)
        print(f"{label}: {len(names)} generated blocks written")
    return 1 if stale_pages else 0


if __name__ == "__main__":
    sys.exit(main())
