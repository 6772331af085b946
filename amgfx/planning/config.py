"""What to plan, as one config: a frozen dataclass, validated once, saved into ``plan.json``.

In the manner of torchao's ``quantize_(model, config)``: :func:`amgfx.plan_for` and :func:`amgfx.prune`
take a :class:`PlanConfig` (their keywords are a thin layer that builds one), so a run's options are one
value that can be printed, compared, written beside the plan (``plan.meta["config"]["plan"]``) and read
back to plan again exactly.

Example:
    >>> cfg = PlanConfig(method="taylor", target_flops=0.5, kinds=("qk", "mlp"))
    >>> PlanConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.with_options(round_to=8).round_to, cfg.round_to
    (8, 'auto')
    >>> PlanConfig(target_flops=0.5, ratios={"mlp": 0.5})
    Traceback (most recent call last):
    ...
    amgfx.errors.AmgfxError: give one of target_flops, target_latency or ratios
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import AmgfxError
from ..scoring.massive import MASSIVE
from .options import check_options

__all__ = ["PlanConfig", "config_from_options"]


@dataclass(frozen=True)
class PlanConfig:
    """The options of a plan (see :func:`amgfx.plan_for` for what each does).

    Attributes:
        method: criterion name (``"snp"``, ``"taylor"``, ``"snp+amg"``, ...), a criterion object or
            ``{kind: criterion}`` (then saved by its repr, and not replayable from the file), or ``"auto"``:
            the candidate with the lowest held-out output error after refit (:mod:`amgfx.auto`), the
            default. With fewer than two calibration batches it takes its first candidate (``taylor``).
        candidates: the methods ``"auto"`` tries (None: :data:`amgfx.auto.CANDIDATES`).
        target_flops, target_latency, ratios: the budget, one of them (none: :data:`DEFAULT_RATIOS`).
        tokens: fraction of key positions AMG removes per site (``None``: none).
        kinds: what is pruned (``None``: qk, v, head, mlp; residual channels are opt-in).
        round_to, same_head_dim, min_keep, protect, blocks, scope: how the budget is spent.
        allocation: how a FLOPs budget is shared among layers: ``"ranking"`` (one score ranking walked to the
            target) or ``"error"`` (each layer's step importance weighed by its measured error after refit,
            and the better of the two plans on held-out calibration data kept: :mod:`amgfx.error_budget`).
        rank: how a FLOPs or latency budget orders removal steps: ``"score"`` (importance alone), ``"per_ms"``
            (importance per millisecond a unit saves, from this machine's op times: :mod:`amgfx.planning.per_ms`)
            or ``"auto"`` (the default): ``per_ms`` for a latency budget, where it measured better, ``score``
            otherwise.
        runtime, measure_latency: where a latency budget is measured.
        seed: the seed of sampled criteria and calibration order.
        massive: MLP neurons whose output exceeds this many times their layer's median are kept whatever
            they score (:mod:`amgfx.scoring.massive`; 0 or None: no such guard).
        score_batches: score on the first this many calibration batches (None: all of them); a refit still
            reads every batch: it runs forward only, so it affords more data than a gradient criterion's
            scoring (SmolLM2 at 50% of block FLOPs: scored on 64 windows, refit on 128, perplexity 55.9
            against 61.8 refit on the same 64).
    """
    method: object = "auto"
    candidates: tuple | None = None
    target_flops: float | None = None
    target_latency: float | None = None
    ratios: dict | None = None
    tokens: float | None = None
    kinds: tuple | None = None
    round_to: int | str = "auto"
    min_keep: float = 0.1
    protect: tuple = ()
    same_head_dim: bool = True
    blocks: bool = False
    scope: str = "model"
    allocation: str = "ranking"
    rank: str = "auto"
    runtime: str = "eager"
    measure_latency: bool = True
    seed: int = 0
    score_batches: int | None = None
    massive: float | None = MASSIVE

    def __post_init__(self):
        # normalise the sequences so that equal configs compare equal and hash
        for name in ("kinds", "protect", "candidates"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        for m in self.candidates or ():
            if m == "auto":
                raise AmgfxError("candidates of method='auto' are methods, not 'auto' itself")
            check_options(m)
        check_options(self.method, self.target_flops, self.ratios, self.target_latency, tokens=self.tokens,
                      kinds=self.kinds, runtime=self.runtime)
        if self.scope not in ("model", "blocks"):
            raise AmgfxError(f"scope must be 'model' or 'blocks', got {self.scope!r}")
        if self.allocation not in ("ranking", "error"):
            raise AmgfxError(f"allocation must be 'ranking' or 'error', got {self.allocation!r}")
        if self.rank not in ("auto", "score", "per_ms"):
            raise AmgfxError(f"rank must be 'auto', 'score' or 'per_ms', got {self.rank!r}")
        if self.rank == "per_ms" and self.target_flops is None and self.target_latency is None:
            raise AmgfxError("rank='per_ms' orders a budget's steps: give target_flops or target_latency")
        if not (self.round_to == "auto" or (isinstance(self.round_to, int) and self.round_to >= 1)):
            raise AmgfxError(f"round_to must be 'auto' or a positive integer, got {self.round_to!r}")
        if self.massive and not (isinstance(self.massive, (int, float)) and self.massive > 1):
            raise AmgfxError(f"massive must be a ratio above 1, or 0 for no guard; got {self.massive!r}")
        if self.score_batches is not None and not (isinstance(self.score_batches, int) and self.score_batches >= 1):
            raise AmgfxError(f"score_batches must be None or a positive integer, got {self.score_batches!r}")

    @property
    def per_ms(self) -> bool:
        """Whether the budget ranks steps per millisecond saved (``rank``, ``"auto"`` resolved)."""
        return self.rank == "per_ms" or (self.rank == "auto" and self.target_latency is not None)

    def with_options(self, **options) -> "PlanConfig":
        """A copy with ``options`` changed (validated again); an unknown name is refused with the known ones."""
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise AmgfxError(f"unknown plan option(s) {sorted(unknown)}; PlanConfig has "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **options) if options else self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method if isinstance(self.method, str) else repr(self.method)
        d["candidates"] = None if self.candidates is None else [c if isinstance(c, str) else repr(c)
                                                                for c in self.candidates]
        for name in ("kinds", "protect"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanConfig":
        return cls().with_options(**d)


def config_from_options(config: PlanConfig | None, **options) -> PlanConfig:
    """``config`` (default: :class:`PlanConfig`) with the keyword options that were given (not ``None``)."""
    if config is not None and not isinstance(config, PlanConfig):
        raise AmgfxError(f"config must be an amgfx.PlanConfig, got {type(config).__name__}")
    given = {k: v for k, v in options.items() if v is not None}
    return (config or PlanConfig()).with_options(**given)
