"""What the weight steps do after the rewrite, as configs: :class:`RefitConfig` (``amgfx.reconstruct``) and
:class:`RecoverConfig` (``amgfx.recover``). Frozen, validated once, saved into ``plan.json`` beside the
:class:`~amgfx.planning.config.PlanConfig` (``plan.meta["config"]``), so a run can be replayed exactly.

Example:
    >>> RecoverConfig(steps=100, lr=1e-4).to_dict()["lr"]
    0.0001
    >>> RefitConfig(damp=-1.0)
    Traceback (most recent call last):
    ...
    amgfx.errors.AmgfxError: RefitConfig(damp=) must be None (cross-validated) or >= 0, got -1.0
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import AmgfxError

__all__ = ["RefitConfig", "RecoverConfig"]

LOSSES = ("kd", "cosine", "mse")


@dataclass(frozen=True)
class RefitConfig:
    """Options of :func:`amgfx.reconstruct` (see there): the q/k logit rescale, the ridge ``damp`` (None:
    per layer by cross-validation), layer-by-layer fitting, residual targets, an added bias."""
    qk: bool = False
    damp: float | None = None
    sequential: bool = True
    residual: bool = True
    add_bias: bool = False

    def __post_init__(self):
        if self.damp is not None and not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise AmgfxError(f"RefitConfig(damp=) must be None (cross-validated) or >= 0, got {self.damp!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RefitConfig":
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class RecoverConfig:
    """Options of :func:`amgfx.recover` (see there): ``steps`` of distillation (0: none) at peak ``lr``,
    the ``loss`` (None: ``"kd"`` for logits, ``"cosine"`` for embeddings, chosen from the output), its
    temperature and weight, the schedule, the held-out guard (``heldout="split"`` or None), and the batches each
    step's gradient sums (``accumulate``)."""
    steps: int = 0
    lr: float = 5e-4
    loss: str | None = None
    temperature: float = 2.0
    alpha: float = 1.0
    weight_decay: float = 0.01
    warmup: float = 0.05
    clip: float = 1.0
    seed: int = 0
    heldout: str | None = "split"
    check_every: int | None = None
    accumulate: int = 1

    def __post_init__(self):
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise AmgfxError(f"RecoverConfig(accumulate=) must be a positive integer, got {self.accumulate!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise AmgfxError(f"RecoverConfig(steps=) must be a non-negative integer, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise AmgfxError(f"RecoverConfig(lr=) must be > 0, got {self.lr!r}")
        if self.loss is not None and self.loss not in LOSSES:
            raise AmgfxError(f"RecoverConfig(loss=) must be one of {', '.join(LOSSES)} or None, got {self.loss!r}")
        if self.heldout not in ("split", None):
            raise AmgfxError(f"RecoverConfig(heldout=) must be 'split' or None, got {self.heldout!r}")

    def options(self, loss: str) -> dict:
        """The keywords of :func:`amgfx.recover` (``loss`` fills in when the config leaves it to the output)."""
        return {**self.to_dict(), "loss": self.loss or loss}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecoverConfig":
        return cls(**_known(cls, d))


def _known(cls, d: dict) -> dict:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise AmgfxError(f"unknown {cls.__name__} option(s) {sorted(unknown)}; it has "
                         f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    return dict(d)
