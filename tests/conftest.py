import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

import amgfx  # noqa: E402


@functools.lru_cache(None)
def analysed(name):
    """(model, args, kwargs, CouplingGraph) for a model of tests/models.py, built once per session."""
    m, args, kwargs = models.ALL[name]()
    return m, args, kwargs, amgfx.analyze(m, args, kwargs)


@pytest.fixture
def analysed_model():
    return analysed
