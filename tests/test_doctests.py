"""The passes' docstring examples run with the package's (pytest --doctest-modules over amgfx/); here, that
each pass has one, as torch.fx's own passes have."""
import doctest
import importlib

import amgfx.passes


def test_every_pass_module_has_an_example():
    """One pass per file, each with a runnable example."""
    names = sorted({p.__module__ for p in amgfx.passes.PIPELINE})
    assert len(names) == len(amgfx.passes.PIPELINE)
    bare = [n for n in names if not any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(n)))]
    assert not bare, bare
