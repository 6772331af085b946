"""Massive units: the few MLP neurons whose output dwarfs the rest of their layer's, kept whatever they score.

Transformers grow a handful of neurons with "massive activations" (Sun et al., 2024): they write one residual
channel tens to hundreds of times harder than a typical neuron writes anything, and later LayerNorms and
attention lean on that channel. A criterion's local estimate misses what removing one does: gradient scores
see it through a LayerNorm that divides it away, and a refit cannot rebuild a channel nothing else writes.
On the real MiniLM at half its FLOPs (taylor ranked per layer, refit), one neuron of layer 0 (its output
141x its layer's median) decided the run: plans that kept it reached 0.860 held-out cosine to dense, a plan
from other noise draws that dropped it 0.738. Pinning the neurons above ``MASSIVE`` = 20x their layer's median
(six in MiniLM) lifts that plan to 0.860; the default plans already kept them (0.860 at 50%, 0.929 at 70%,
unchanged). Boosting the scores of the units above 8x (about forty) instead gave 0.859, above 20x 0.867.

A unit's output is measured as the layer that reads it sees it: the RMS of its input column over the
calibration tokens times the L2 norm of that column's weights (Wanda's score with an L2 weight norm),
summed over a unit's columns. Only ``mlp`` groups are checked; the statistics are
:class:`amgfx.scoring.collectors.InputMoments`, two vectors per layer, shared with ``flap``/``wanda``.

Example:
    >>> import numpy as np
    >>> outliers(np.array([1.0, 1.2, 0.9, 30.0, 1.1]), ratio=20.0).tolist()
    [3]
"""
from __future__ import annotations

import numpy as np

from .collectors import InputMoments
from .criteria.flap import reader_columns
from .criteria.obs import reader

__all__ = ["MASSIVE", "collectors", "massive_units", "outliers"]

MASSIVE = 20.0      # x the layer's median output; see the module docstring for how it was chosen


def outliers(output: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the units whose ``output`` exceeds ``ratio`` times the median of all of them."""
    med = float(np.median(output))
    return np.nonzero(output > ratio * med)[0] if med > 0 else np.zeros(0, dtype=np.int64)


def _checked(cg, groups) -> list:
    out = []
    for g in groups:
        if g.kind == "mlp":
            try:
                out.append((g, reader(cg, g)))
            except ValueError:          # no linear layer reads its neurons: nothing to measure them by
                pass
    return out


def collectors(cg, groups) -> list:
    """The input statistics :func:`massive_units` reads for ``groups`` (their ``mlp`` ones)."""
    return [InputMoments(cg, found[0]) for _, found in _checked(cg, groups)]


def massive_units(cg, groups, stats, ratio: float = MASSIVE) -> dict:
    """Group name -> unit ids whose output exceeds ``ratio`` x their group's median (groups with none left out)."""
    out = {}
    for g, found in _checked(cg, groups):
        w, _, sq, cols = reader_columns(cg, g, stats, found)
        if w.ndim != 2 or w.shape[1] != sq.shape[0] or cols.max() >= len(sq):    # not one [out, in] matrix (MoE)
            continue
        per = np.sqrt(sq) * np.sqrt((w ** 2).sum(0))
        big = outliers(per[cols].sum(1), ratio)
        if len(big):
            out[g.name] = [int(u) for u in big]
    return out
