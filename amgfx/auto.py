"""``method="auto"``: choose the criterion by measurement, on calibration data held out from scoring.

The calibration batches are split: the last quarter (at least one batch) is held out. Each candidate
method (:data:`CANDIDATES`, or ``PlanConfig.candidates``) scores and plans on the rest, the plan is rewritten
and its kept weights refitted on the rest (:func:`amgfx.weights.refit.refit`), and its output is compared
with the dense model's on the held-out batches (relative error of the first output at real tokens, averaged;
token states read with an attention mask are first mean-pooled over it, as sentence embedders read them and as
:func:`amgfx.bench.embedding_cosine`, the report's accuracy, pools them). The candidate with the lowest
error then plans again on every batch (chosen on three quarters, planned on all, as a model chosen on held-out
data is trained again on all of it), and ``plan.meta["auto"]`` records every candidate's error, the choice and
how it was made, so ``plan.json`` says why. Deterministic for a seed: ties go to the
earlier candidate. With fewer than two calibration batches nothing can be held out: the first candidate
is used (with a warning when one batch was given; without calib it is simply the default's data-free
path) and ``plan.meta["auto"]["why"]`` says so. ``auto`` is the default method of :func:`amgfx.prune`,
:func:`amgfx.plan_for`, the CLI and the compile backend.

Cost: one calibration, plan, rewrite and refit per candidate on three quarters of the data, and one more
calibration and plan on all of it (about the candidates' count plus one times a one-shot prune);
``candidates=`` bounds it.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    >>> plan = amgfx.plan_for(m, x, method="auto", target_flops=0.7, calib=calib,
    ...                       candidates=("magnitude", "snp"), progress=False)
    >>> a = plan.meta["auto"]
    >>> sorted(a["errors"]), a["chosen"] in a["errors"], a["heldout_batches"]
    (['magnitude', 'snp'], True, 1)
"""
from __future__ import annotations

import sys
import warnings

import torch

from .errors import AmgfxError
from .graph.fx import state_inputs
from .passes.rewrite import rewrite
from .planning.config import PlanConfig
from .scoring.calibrate import batch_chunks
from .scoring.readout import as_read
from .scoring.criteria import Taylor
from .weights.config import RefitConfig
from .weights.recover import first_output
from .weights.refit import refit

__all__ = ["CANDIDATES", "choose"]

# the criteria that led on the real models measured (criteria_minilm, llm_real): taylor, ranked by its raw scores
# (SmolLM2) and per layer (MiniLM: 0.860 against 0.851 after refit at half its FLOPs); obs for what it scores
# with taylor's q/k pairs; SNP, the paper's own
CANDIDATES = ("taylor", Taylor(per_layer=True), "obs+taylor", "snp")


def heldout_error(dense, pruned, batches) -> float:
    """Mean over ``batches`` of ``|pruned - dense| / |dense|`` (Frobenius) of the first output, at real tokens."""
    errs = []
    with torch.no_grad():
        for _, pieces in batch_chunks(dense, batches):
            for args, kwargs, _ in pieces:
                d = as_read(first_output(dense(*args, **kwargs)).double(), kwargs)
                p = as_read(first_output(pruned(*state_inputs(pruned, list(args)), **kwargs)).double(), kwargs)
                errs.append(float((p - d).norm() / d.norm().clamp_min(1e-30)))
    return sum(errs) / len(errs)


def choose(cg, config: PlanConfig, calib, plan_with, *, progress: bool = True):
    """The plan of the candidate with the lowest held-out error after refit (see the module docstring).
    ``plan_with(config, batches)`` scores and plans with one candidate's config."""
    batches = list(calib) if calib is not None else []
    candidates = config.candidates or CANDIDATES
    if len(batches) < 2:                             # nothing to hold out: the first candidate, said so
        first = candidates[0] if isinstance(candidates[0], str) else repr(candidates[0])
        why = (f"{len(batches)} calibration batch(es): nothing to hold out, so the first candidate ({first}); "
               "give calib= with at least 2 batches to choose by measurement")
        if batches:                                  # data was given, too little of it: say so now
            warnings.warn(f"method='auto': {why}", stacklevel=3)
        plan = plan_with(config.with_options(method=candidates[0], candidates=None), calib)
        plan.meta["auto"] = {"chosen": first, "errors": {}, "why": why}
        return plan
    n_held = max(1, len(batches) // 4)
    fit, held = batches[:-n_held], batches[-n_held:]
    errors, methods, failed = {}, {}, {}
    for method in candidates:
        name = method if isinstance(method, str) else repr(method)
        methods[name] = method
        try:
            plan = plan_with(config.with_options(method=method, candidates=None), fit)
        except AmgfxError as e:                      # this criterion cannot meet the budget: the others may
            failed[name] = str(e).splitlines()[0]
            continue
        small = refit(rewrite(cg, plan), cg, fit, RefitConfig(), progress=False)
        errors[name] = round(heldout_error(cg.gm, small, held), 6)
        if progress:
            print(f"auto: {name}: held-out error after refit {errors[name]:.4f}", file=sys.stderr, flush=True)
    if not errors:
        raise AmgfxError(f"method='auto': no candidate could plan this: {next(iter(failed.values()))}")
    chosen = min(errors, key=errors.get)           # the first of equals: the candidates' order decides ties
    # chosen on three quarters, planned on all: the held-out quarter's statistics count too
    plan = plan_with(config.with_options(method=methods[chosen], candidates=None), batches)
    plan.meta["auto"] = {"chosen": chosen, "errors": errors, **({"failed": failed} if failed else {}),
                         "heldout_batches": len(held), "fit_batches": len(fit), "planned_on": len(batches),
                         "measure": "relative error of the first output against the dense model (token states "
                                    "mean-pooled over an attention mask), after refit, on calibration batches held "
                                    "out from scoring and refit"}
    return plan
