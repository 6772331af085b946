"""What every criterion shares: the config-dataclass interface and per-unit weight norms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...graph.indexprop import fetch_attr


@dataclass(frozen=True)
class Criterion:
    """A scoring method: a frozen config (like torchao's per-method configs) plus ``score``.

    ``kinds`` are the group kinds it scores; ``needs(kind)`` the calibration statistics it
    reads (see :mod:`amgfx.calibrate`); ``score`` returns one float per unit, higher = keep.
    """
    name = "criterion"
    kinds = ()                   # class constants, not fields: a config holds only its knobs

    def needs(self, kind: str) -> set:
        return set()

    def score(self, cg, group, stats, seed: int = 0) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def unit_slices(cg, member):
    """``[units, k, rest]`` float64: each unit's slices of one member parameter."""
    t = fetch_attr(cg.gm, member.param).detach().double()
    t = t.movedim(member.dim, 0).reshape(t.shape[member.dim], -1).numpy()
    return t[member.index]


def unit_norms(cg, member) -> np.ndarray:
    """L2 norm of each unit's slices of one member parameter."""
    return np.sqrt((unit_slices(cg, member) ** 2).sum((1, 2)))
