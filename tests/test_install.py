"""The install is what pyproject.toml says: every installed dependency lies in its declared range."""
import os
import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_installed_version_is_in_the_declared_range(req):
    try:
        got = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is declared in pyproject.toml but not installed")
    assert req.specifier.contains(got, prereleases=True), \
        f"{req.name} {got} is installed, but pyproject.toml supports {req.specifier}; reinstall with `make clean test`"


def test_torch_range_names_both_tested_releases():
    """`make test` and `make test-matrix` run the two ends of the torch range; the Makefile pins them."""
    torch_req = next(r for r in _requirements() if r.name == "torch")
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    pinned = [line.split("torch==")[1].split()[0] for line in text.splitlines() if line.startswith("TORCH_")]
    assert len(pinned) == 2 and all(torch_req.specifier.contains(v) for v in pinned), (pinned, torch_req)
