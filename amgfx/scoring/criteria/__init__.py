"""Scoring criteria, one module each, and how a ``method`` maps kinds to criteria.

A method is a criterion name (``"snp"``), several joined by ``+`` (``"snp+amg"``: the first
that scores a kind wins, so SNP takes qk/v/mlp/residual and AMG the heads), a
:class:`Criterion` config (``SNP(gamma=8)``), a list of those, or a dict ``{kind: criterion}``.
A config's repr is a method string too (``"Taylor(per_layer=True)"``, any case, literal values only), so what
``plan.json`` and the report name (``auto``'s choice, say) can be given back to ``--method``.
Kinds no criterion of the method scores are not pruned.

Example:
    >>> from amgfx.scoring.criteria import resolve_method
    >>> {k: c.name for k, c in resolve_method("snp+amg").items()}
    {'qk': 'snp', 'v': 'snp', 'mlp': 'snp', 'residual': 'snp', 'head': 'amg'}
    >>> resolve_method("obs+Taylor(per_layer=True)")["qk"]
    Taylor(per_layer=True)
"""
from __future__ import annotations

import ast
import re

from ...errors import AmgfxError
from ._base import Criterion
from .amg import AMG, token_scores
from .flap import FLAP, Wanda
from .magnitude import Magnitude
from .obs import OBS
from .random import Random
from .snp import SNP
from .taylor import Taylor

__all__ = ["Criterion", "SNP", "AMG", "Taylor", "OBS", "FLAP", "Wanda", "Magnitude", "Random", "CRITERIA",
           "resolve_method", "token_scores"]

CRITERIA = {c.name: c for c in (SNP, AMG, Taylor, OBS, FLAP, Wanda, Magnitude, Random)}


def _configured(text: str) -> Criterion | None:
    """``"name(knob=literal, ...)"`` -> that criterion config; None when ``text`` is not of that form."""
    m = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", text, re.S)
    if not m or m.group(1).lower() not in CRITERIA:
        return None
    try:        # keywords with literal values only: a method string is data, never code to run
        call = ast.parse(f"f({m.group(2)})", mode="eval").body
        if call.args:
            raise ValueError("give knobs by name")
        knobs = {}
        for k in call.keywords:
            try:
                knobs[k.arg] = ast.literal_eval(k.value)
            except ValueError:
                raise ValueError(f"{k.arg or '**'}= is not a literal") from None
        return CRITERIA[m.group(1).lower()](**knobs)
    except (SyntaxError, ValueError, TypeError) as e:
        raise AmgfxError(f"method {text.strip()!r}: {e}; knobs are name=literal, e.g. 'taylor(per_layer=True)'") from None


def _one(c) -> Criterion:
    if isinstance(c, Criterion):
        return c
    if isinstance(c, str) and c.strip().lower() in CRITERIA:
        return CRITERIA[c.strip().lower()]()
    if isinstance(c, str) and (got := _configured(c)) is not None:
        return got
    raise AmgfxError(f"unknown method {c!r}; choose from {', '.join(CRITERIA)} (join with '+', e.g. 'snp+amg')")


def resolve_method(method) -> dict:
    """``method`` -> ``{kind: Criterion}``."""
    if isinstance(method, dict):
        return {k: _one(c) for k, c in method.items()}
    parts = method.split("+") if isinstance(method, str) else list(method) if isinstance(method, (list, tuple)) else [method]
    out = {}
    for c in map(_one, parts):
        for k in c.kinds:
            out.setdefault(k, c)
    return out
