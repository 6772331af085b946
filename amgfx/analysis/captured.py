"""What a capture kind hands the prune sequence: the analysed graphs one plan rewrites, and how to finish.

A plain model is one graph; an :class:`amgfx.Decoder` is two (prefill and decode step) that share every
coupling group's name, so one plan, made on the first, rewrites both. A new model kind plugs into
:func:`amgfx.prune` by returning a :class:`Captured` (registered in :data:`amgfx.sequence.CAPTURES`);
nothing else in the sequence changes.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> c = Captured((amgfx.analyze(m, torch.randn(1, 3, 32, 32)),))
    >>> len(c.graphs), c.finish([m], None) is m, c.batches([1, 2])
    (1, True, [1, 2])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Captured"]


def _first(pruned: list, plan):
    return pruned[0]


def _as_given(calib):
    return calib


def _one_each(batches):
    return list(batches), 1


@dataclass
class Captured:
    """The analysed graphs of one model and what the prune sequence needs to know about its kind.

    Attributes:
        graphs: :class:`~amgfx.analysis.coupling.CouplingGraph` s; the first is calibrated, scored, planned
            on and refitted; every one is rewritten by the one plan and held against the oracle.
        finish: ``(pruned GraphModules, plan) -> what amgfx.prune returns`` (default: the first graph).
        batches: the user's ``calib`` -> calibration batches of the first graph (default: as given).
        loss_fn: the loss gradient criteria calibrate on when the user gives none (None: the criterion's).
        train_batches: batches of the first graph -> ``(the batches it trains on, how many of those make one
            given batch)``: a graph captured at one batch size trains a row at a time and a recovery step sums
            a given batch's rows (default: as given, 1).
        recover_loss: the recovery loss this kind's outputs call for (None: chosen from the output's shape).
        refuses: option name -> why this kind cannot take it (``tokens``, ``schedule``, ``recover``).
    """
    graphs: tuple
    finish: Callable = _first
    batches: Callable = _as_given
    loss_fn: Callable | None = None
    train_batches: Callable = _one_each
    recover_loss: str | None = None
    refuses: dict = field(default_factory=dict)
