"""The tree shows the pipeline: one folder per stage, imports that only run forward, short modules."""
import ast
import os
import pkgutil

import networkx as nx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# model -> graph -> structure -> scores -> plan -> passes -> GraphModule (-> weights); the surface last
STAGES = ["amgfx.errors", "amgfx.graph", "amgfx.analysis", "amgfx.scoring", "amgfx.planning", "amgfx.passes",
          "amgfx.weights"]


def _modules():
    """Every module of the installed package, with its source file (passes/ installs as amgfx.passes)."""
    import importlib.util

    import amgfx.passes
    names = ["amgfx", "amgfx.passes"] + [m.name for m in pkgutil.walk_packages(amgfx.__path__, "amgfx.")]
    names += [m.name for m in pkgutil.iter_modules(amgfx.passes.__path__, "amgfx.passes.")]
    return {n: importlib.util.find_spec(n).origin for n in names}


MODULES = _modules()


def stage(module: str) -> int:
    for i, s in enumerate(STAGES):
        if module == s or module.startswith(s + "."):
            return i
    return len(STAGES)                                 # the surface: api, verify, backend, files, cli, ...


def _imports(name: str, path: str) -> set:
    """amgfx modules ``name`` imports, anywhere in the file (function-level imports count too)."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "amgfx"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "amgfx":
                continue
            for a in node.names:                       # `from . import data` names a module
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return out - {name}


GRAPH = nx.DiGraph([(m, i) for m, p in MODULES.items() for i in _imports(m, p)])


def test_the_stages_are_folders():
    dirs = {d for d in os.listdir(os.path.join(ROOT, "amgfx")) if os.path.isdir(os.path.join(ROOT, "amgfx", d))
            and not d.startswith("__")}
    assert {"graph", "analysis", "scoring", "planning", "weights", "cli"} <= dirs
    assert os.path.isfile(os.path.join(ROOT, "passes", "__init__.py"))
    for s in STAGES[1:]:
        doc = ast.get_docstring(ast.parse(open(MODULES[s]).read())) or ""
        assert "May import" in doc, f"{s}/__init__ must say what it holds and what it may import"


def test_the_import_walk_sees_real_edges():
    """The walk below is not vacuous: it sees relative, nested and package-level imports."""
    assert {("amgfx.planning.cost", "amgfx.graph.rows"), ("amgfx.passes.split_qkv", "amgfx.graph.rows"),
            ("amgfx.cli.prune", "amgfx.api"), ("amgfx.rewrite", "amgfx.passes")} <= set(GRAPH.edges)
    assert stage("amgfx.graph.ops") < stage("amgfx.analysis.attention") < stage("amgfx.passes.fix_shapes")


def test_imports_only_run_forward():
    backward = sorted(f"{a} (stage {stage(a)}) imports {b} (stage {stage(b)})" for a, b in GRAPH.edges
                      if stage(b) > stage(a) and b != "amgfx")
    assert not backward, "\n".join(backward)


def test_no_import_circle():
    # a package's __init__ importing its own modules is how packages work; a module importing back is a circle
    g = GRAPH.copy()
    g.remove_edges_from([(a, b) for a, b in GRAPH.edges if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


def test_modules_are_short():
    long = {m: n for m, p in MODULES.items() if not p.endswith("__init__.py")
            and (n := sum(1 for _ in open(p))) > 500}
    assert not long, long


def test_import_passes_is_refused_and_amgfx_passes_works():
    import subprocess
    import sys
    code = "import amgfx.passes as p; print(len(p.PIPELINE))\ntry:\n import passes\nexcept ImportError as e: print('refused')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "refused" and int(out[0]) > 0


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                  if f.endswith(".md")])
def test_links_between_pages_resolve(page):
    import re
    text = open(os.path.join(ROOT, page)).read()
    here = os.path.dirname(os.path.join(ROOT, page))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and full.endswith(".md"):
            heads = re.findall(r"^#+ (.+)$", open(full).read(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
            if anchor not in slugs:
                bad.append(target)
    assert not bad, f"{page}: broken links {bad}"


def test_no_undefined_or_unused_name():
    """pyflakes' rules over the package, passes, tests and benchmarks: a name a refactor deleted but a
    caller still uses (``_iterate`` once) fails here in seconds instead of deep inside one slow test."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F", "--output-format",
                          "concise", "amgfx", "passes", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
