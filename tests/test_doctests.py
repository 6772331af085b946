"""The passes' docstring examples, run as amgfx.passes (pytest's own doctest collection would import
the passes/ folder under its directory name, which is refused: see passes/__init__.py)."""
import doctest
import importlib
import pkgutil

import pytest

import amgfx.passes

MODULES = [m.name for m in pkgutil.iter_modules(amgfx.passes.__path__, "amgfx.passes.")]


@pytest.mark.parametrize("name", ["amgfx.passes"] + MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_every_pass_module_has_an_example():
    """One pass per file, each with a runnable example, as torch.fx's own passes have."""
    bare = [n for n in MODULES if not doctest.DocTestFinder().find(importlib.import_module(n))
            or not any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(n)))]
    assert not bare, bare
