"""What every criterion shares: the config-dataclass interface and per-unit weight norms.

To add a criterion, write one file here: a frozen dataclass with ``name``, ``kinds``,
``collectors`` (the statistics it reads, :mod:`amgfx.scoring.collectors`) and ``score``; then
list it in ``CRITERIA`` (``criteria/__init__.py``) to give it a method name. A criterion passed
as an object (``method={"mlp": MyCriterion()}``) needs no registration at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...graph.indexprop import fetch_attr


@dataclass(frozen=True)
class Criterion:
    """A scoring method: a frozen config (like torchao's per-method configs) plus ``score``.

    ``kinds`` are the group kinds it scores; ``collectors(cg, group)`` the statistics calibration
    must gather for it (none: a weight-only criterion, no data needed); ``score`` returns one
    float per unit, higher = keep, reading those statistics from ``stats``.
    """
    name = "criterion"
    kinds = ()                   # class constants, not fields: a config holds only its knobs
    # True where a score estimates the loss a unit's removal costs: such scores rank across layers and kinds
    # as they are (the budget's normalize="none"); others are ranked against their group's mean
    loss_scale = False

    def collectors(self, cg, group) -> list:
        return []

    def score(self, cg, group, stats, seed: int = 0) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def explain(self, cg, group, stats) -> dict:
        """What the score was made of, for people (``Scores.extra``; drawn by ``amgfx inspect
        --draw-scores``): name -> array. None by default."""
        return {}


def site_of(cg, group):
    """The attention site a qk/v/head group belongs to."""
    return next(s for s in cg.sites if s.name == group.where)


def mlp_of(cg, group):
    return next(m for m in cg.mlps if m.name == group.where)


def unit_slices(cg, member):
    """``[units, k, rest]`` float64: each unit's slices of one member parameter."""
    t = fetch_attr(cg.gm, member.param).detach().double()
    t = t.movedim(member.dim, 0).reshape(t.shape[member.dim], -1).numpy()
    return t[member.index]


def unit_norms(cg, member) -> np.ndarray:
    """L2 norm of each unit's slices of one member parameter."""
    return np.sqrt((unit_slices(cg, member) ** 2).sum((1, 2)))
