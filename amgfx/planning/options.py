"""The options of a plan, checked once before anything is captured or calibrated.

A wrong fraction or a misspelt kind found after a capture (minutes on a large model) wastes the user's
time; :func:`check_options` refuses it first, in one line.

Example:
    >>> check_options("snp", target_flops=1.5)
    Traceback (most recent call last):
    ...
    amgfx.errors.AmgfxError: target_flops must be a fraction in (0, 1], got 1.5
"""
from __future__ import annotations

from ..errors import AmgfxError
from ..scoring.criteria import resolve_method

__all__ = ["KINDS", "DEFAULT_KINDS", "DEFAULT_RATIOS", "RUNTIMES", "check_options"]

KINDS = ("qk", "v", "head", "mlp", "residual")
DEFAULT_KINDS = ("qk", "v", "head", "mlp")   # residual channels are opt-in: pruning them is never exact
DEFAULT_RATIOS = {"qk": 0.25, "v": 0.25, "head": 0.0, "mlp": 0.5, "residual": 0.0}
# The one table of runtimes (name: what it is): latency budgets measure in them, amgfx.runtime.runner runs them,
# the compile backend hands its graph to the torch ones, amgfx.load loads into eager or ort, the CLI spells them so.
RUNTIMES = {"eager": "eager PyTorch", "inductor": "torch.compile (inductor)", "ort": "onnxruntime"}


def _fraction(name: str, value, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < float(value) <= 1.0 if low_open else 0.0 <= float(value) < 1.0)
    if not ok:
        raise AmgfxError(f"{name} must be a fraction in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")


def check_options(method, target_flops=None, ratios=None, target_latency=None, *, tokens=None, kinds=None,
                  runtime: str = "eager") -> None:
    """Refuse what is wrong with the options before anything is captured or calibrated (seconds to
    minutes on a large model): one of the targets, each in range, a known method, kinds and runtime."""
    if sum(x is not None for x in (target_flops, ratios, target_latency)) > 1:
        raise AmgfxError("give one of target_flops, target_latency or ratios")
    if method != "auto":                     # auto: its candidates are checked by PlanConfig
        resolve_method(method)
    if target_flops is not None:
        _fraction("target_flops", target_flops)
    if target_latency is not None:
        _fraction("target_latency", target_latency)
        if runtime not in RUNTIMES:
            raise AmgfxError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if ratios is not None:
        if not isinstance(ratios, dict):
            raise AmgfxError(f"ratios must be a dict {{kind: fraction removed}}, got {type(ratios).__name__}")
        unknown = set(ratios) - set(KINDS)
        if unknown:
            raise AmgfxError(f"unknown kind(s) {sorted(unknown)} in ratios; use qk, v, head, mlp, residual")
        for k, r in ratios.items():
            _fraction(f"ratio for {k!r}", r, low_open=False)
    if tokens is not None and tokens:
        _fraction("tokens", tokens, low_open=False)
    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise AmgfxError(f"unknown kind(s) {sorted(unknown)}; use {', '.join(KINDS)}")
