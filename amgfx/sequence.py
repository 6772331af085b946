"""The prune sequence, written once: capture -> analyze -> plan -> rewrite -> check -> refit -> recover.

:func:`amgfx.prune`, decoders, the CLI (``amgfx prune``) and the compile backend all run :func:`run`. What
differs between model kinds is only how they are captured: a kind plugs in as a function
``(model, example_inputs, example_kwargs, *, seed) -> Captured`` (:class:`amgfx.analysis.captured.Captured`)
registered in :data:`CAPTURES` by the model's type. A plain ``nn.Module``, a captured GraphModule or a
:class:`~amgfx.CouplingGraph` is one graph; an :class:`amgfx.Decoder` is two graphs that one plan rewrites.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> cap = captured(m, x)
    >>> r = run(cap, PlanConfig(method="magnitude", ratios={"mlp": 0.5}), progress=False)
    >>> r.verify.passed, tuple(r.model.get_parameter("blocks.0.mlp.fc1.weight").shape), sorted(r.seconds)
    (True, (384, 192), ['plan', 'rewrite'])
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .analysis.captured import Captured
from .analysis.coupling import CouplingGraph
from .api import analyze, apply, plan_for, reconstruct as _reconstruct
from .decode.capture import capture_decoder
from .decode.step import Decoder
from .errors import AmgfxError
from .graph.meta import EXAMPLE, PLAN, RECONSTRUCTION, VERIFIED
from .passes.rewrite import checked, rewrite
from .planning.config import PlanConfig, config_from_options
from .planning.plan import Plan, fingerprint
from .weights.config import RecoverConfig, RefitConfig
from .weights.recover import Iterative, first_output, iterative_config, recover as _recover

__all__ = ["CAPTURES", "Captured", "Result", "captured", "capture_module", "run", "prune"]


def capture_module(model, example_inputs=None, example_kwargs=None, *, seed: int = 0) -> Captured:
    """The capture kind of a plain model (an nn.Module, a captured GraphModule or a CouplingGraph): one graph."""
    if isinstance(model, CouplingGraph):
        return Captured((model,))
    return Captured((analyze(model, example_inputs, example_kwargs),))


# model type -> its capture kind; the first type the model is an instance of wins, else capture_module
CAPTURES: dict = {Decoder: capture_decoder}


def captured(model, example_inputs=None, example_kwargs=None, *, seed: int = 0) -> Captured:
    """``model`` captured and analysed by the capture kind its type is registered with (:data:`CAPTURES`)."""
    kind = next((fn for cls, fn in CAPTURES.items() if isinstance(model, cls)), capture_module)
    return kind(model, example_inputs, example_kwargs, seed=seed)


@dataclass
class Result:
    """What :func:`run` made: the plan, the model after each step that ran, the oracle's report, the seconds.

    ``model`` is the last model (the first graph's); ``pruned`` every graph as rewritten, ``refitted`` and
    ``recovered`` the first graph after those steps (None when they did not run)."""
    plan: Plan
    pruned: list
    refitted: fx.GraphModule | None = None
    recovered: fx.GraphModule | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def model(self) -> fx.GraphModule:
        return next(m for m in (self.recovered, self.refitted, self.pruned[0]) if m is not None)

    @property
    def verify(self):
        """The zeroing oracle's report on the structural rewrite (None when the sequence did not check)."""
        return self.pruned[0].meta.get(VERIFIED)

    def graphs(self) -> list:
        """Every graph as the sequence leaves it: the first after its refit and recovery, the rest as rewritten."""
        return [self.model, *self.pruned[1:]]


def _refit_config(reconstruct, calib) -> RefitConfig | None:
    """The refit to run: ``reconstruct`` True/False/None (None: when ``calib`` is given) or a RefitConfig."""
    if isinstance(reconstruct, RefitConfig):
        return reconstruct
    if reconstruct not in (None, True, False):
        raise AmgfxError(f"reconstruct must be True, False, None or an amgfx.RefitConfig, got {type(reconstruct).__name__}")
    return RefitConfig() if (calib is not None if reconstruct is None else reconstruct) else None


def _refuse(cap: Captured, **given) -> None:
    for name, value in given.items():
        if value and name in cap.refuses:
            raise AmgfxError(cap.refuses[name])


def run(cap: Captured, config: PlanConfig | None = None, *, calib=None, loss_fn=None, plan: Plan | None = None,
        reconstruct: bool | RefitConfig | None = None, recover: RecoverConfig | None = None, recover_data=None,
        teacher=None, check: bool = True, share: bool = False, progress: bool = True) -> Result:
    """Plan (unless ``plan`` is given), rewrite every graph of ``cap`` and check it against the oracle, refit the
    first on ``calib`` (see ``reconstruct``), recover it (``recover``, on ``recover_data`` or ``calib``, against
    ``teacher`` or the dense graph). The configs are written into ``plan.meta["config"]``. ``share`` leaves the
    weights the rewrite did not change shared with the captured model (the compile backend's choice); else
    the result owns every tensor, so training it cannot touch the user's model."""
    config = config or PlanConfig()
    _refuse(cap, tokens=config.tokens, recover=recover is not None and recover.steps)
    cg, refit = cap.graphs[0], _refit_config(reconstruct, calib)
    batches = cap.batches(calib) if calib is not None else None
    t, seconds = time.perf_counter(), {}
    if plan is None:
        plan = plan_for(cg, config=config, calib=batches, loss_fn=loss_fn or cap.loss_fn, progress=progress)
        seconds["plan"] = round(time.perf_counter() - t, 3)
    plan.meta["config"] = {**plan.meta.get("config", {}), "refit": refit.to_dict() if refit else None,
                           "recover": recover.to_dict() if recover else None}
    t = time.perf_counter()
    # amgfx.apply owns every tensor of its result; the backend's shared rewrite is the driver's own
    pruned = [(checked if check else rewrite)(g, plan) if share else apply(g, plan, check=check) for g in cap.graphs]
    out = Result(plan, pruned, seconds=seconds)
    seconds["rewrite"] = round(time.perf_counter() - t, 3)
    if refit is not None and plan.keep:
        t = time.perf_counter()
        out.refitted = _reconstruct(out.pruned[0], cg, batches, refit, progress=progress)
        seconds["refit"] = round(time.perf_counter() - t, 3)
    if recover is not None and recover.steps:
        t = time.perf_counter()
        data = cap.batches(recover_data) if recover_data is not None else batches
        out.recovered = _recover_step(cap, out.model, teacher or cg.gm, data, recover, progress)
        seconds["recover"] = round(time.perf_counter() - t, 3)
    return out


def _recover_step(cap: Captured, model, teacher, data, config: RecoverConfig, progress: bool):
    if data is None:
        raise AmgfxError("recovery needs data: give calib= (or the CLI's --recover-data)")
    loss = cap.recover_loss
    if loss is None:
        args, kwargs = teacher.meta[EXAMPLE] if EXAMPLE in getattr(teacher, "meta", {}) else model.meta[EXAMPLE]
        loss = "kd" if first_output(teacher(*args, **kwargs)).dim() == 2 else "cosine"  # logits, else embeddings
    rows, per = cap.train_batches(data)
    options = {**config.options(loss), "accumulate": config.accumulate * per}     # a step: whole given batches
    return _recover(model, teacher, rows, **options, progress=progress)


def prune(model, example_inputs=None, example_kwargs=None, *, config: PlanConfig | None = None, method=None,
          target_flops: float | None = None, ratios: dict | None = None, calib=None, loss_fn=None,
          plan: Plan | None = None, schedule=None, progress: bool = True,
          reconstruct: bool | RefitConfig | None = None, recover: RecoverConfig | None = None, **options):
    """Score, plan and rewrite in one call (the prune sequence, :func:`run`); the Plan is in ``result.meta[PLAN]``.

    Give ``target_flops`` (fraction of dense FLOPs kept) or ``ratios`` (``{kind: fraction removed}`` per site),
    or a ready ``plan`` to replay. ``config`` is a :class:`amgfx.PlanConfig`; ``method``, ``target_flops``,
    ``ratios`` and ``options`` (any other PlanConfig field: ``kinds``, ``round_to``, ``min_keep``, ``protect``,
    ``same_head_dim``, ``blocks``, ``tokens``, ``target_latency``, ``seed``, ...) change it. ``check=False``
    (an option) skips holding the structural rewrite against the oracle.

    With ``calib`` the kept weights are then refitted to the dense model on it (:func:`amgfx.reconstruct`;
    ``reconstruct=False`` skips that, ``reconstruct=True`` without ``calib`` fits on the example inputs, a
    :class:`amgfx.RefitConfig` sets how). ``recover=amgfx.RecoverConfig(steps=n)`` then distils the result from
    the dense model on ``calib`` (:func:`amgfx.recover`, guarded by held-out batches). The configs that ran are
    in ``plan.meta["config"]``, so ``PlanConfig.from_dict(plan.meta["config"]["plan"])`` plans again exactly.

    ``model`` may also be an :func:`amgfx.decoder` (a causal LM's prefill and decode step over a KV cache):
    then ``calib`` holds ``[batch, prompt_len]`` token ids, both graphs are rewritten by the one plan, the
    cache shrinks with it, and the result is a Decoder for :func:`amgfx.generate`.

    ``schedule=amgfx.Iterative(steps=k, recover_steps=n)`` reaches ``target_flops`` in ``k``
    steps, re-scoring the pruned model, reconstructing each step against the model it was pruned from
    (when ``calib`` is given, unless ``reconstruct=False``) and recovering it (:func:`amgfx.recover`,
    against the dense model) after each. The result's plan is then the composition of the steps, in the
    original model's unit ids (replaying it gives the same shapes, without the recovered
    weights), and ``plan.meta["schedule"]`` records every step.

    Example:
        >>> import torch, timm, amgfx
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> small = amgfx.prune(m, x, method="magnitude", ratios={"qk": 0.5, "v": 0.25, "mlp": 0.5})
        >>> n = lambda mod: sum(p.numel() for p in mod.parameters())
        >>> round(n(small) / n(m), 2), tuple(small(x).shape)
        (0.67, (1, 1000))
    """
    if plan is not None and not isinstance(plan, Plan):
        raise AmgfxError(f"plan must be an amgfx.Plan (Plan.load(path) reads a plan.json), got {type(plan).__name__}")
    check = options.pop("check", True)
    cfg = config_from_options(config, method=method, target_flops=target_flops, ratios=ratios, **options)
    cap = captured(model, example_inputs, example_kwargs, seed=cfg.seed)
    if schedule is not None:
        _refuse(cap, schedule=True)
        return _iterate(cap.graphs[0], schedule, cfg, plan=plan, calib=calib, loss_fn=loss_fn,
                        reconstruct=reconstruct, progress=progress)
    out = run(cap, cfg, calib=calib, loss_fn=loss_fn, plan=plan, reconstruct=reconstruct, recover=recover,
              check=check, progress=progress)
    return cap.finish(out.graphs(), out.plan)


def _iterate(cg0: CouplingGraph, schedule, config: PlanConfig, *, plan, calib, loss_fn, reconstruct,
             progress: bool) -> fx.GraphModule:
    """Prune toward ``config.target_flops`` in ``schedule.steps`` steps, each a :func:`run` (reconstructed
    against the model it was pruned from, recovered against the dense one); compose the plans."""
    if not isinstance(schedule, Iterative):
        raise AmgfxError(f"schedule must be an amgfx.Iterative, got {type(schedule).__name__}")
    if plan is not None or config.target_flops is None:
        raise AmgfxError("schedule= needs target_flops= (and no plan=): it plans each step toward that target")
    if config.tokens:
        raise AmgfxError("schedule= does not prune tokens yet; prune tokens in one shot (no schedule)")
    data = schedule.data if schedule.data is not None else calib
    if schedule.recover_steps and data is None:
        raise AmgfxError("Iterative(recover_steps=...) needs data: give Iterative(data=...) or calib=")
    args, kwargs = cg0.gm.meta[EXAMPLE]
    ids = {g.name: np.arange(g.units) for g in cg0.groups}     # original unit ids still alive, per group
    recover = RecoverConfig(steps=schedule.recover_steps, **{k: v for k, v in schedule.recover.items()
                                                             if k != "progress"}) if schedule.recover_steps else None
    cg, dense, history, pruned = cg0, None, [], None
    for goal in schedule.targets(config.target_flops):
        if pruned is not None:                                   # score what the last step left
            cg = analyze(pruned, args, kwargs)
        now = 1.0 if dense is None else history[-1]["flops"]
        step_cfg = config.with_options(target_flops=min(1.0, goal / now))
        r = run(Captured((cg,)), step_cfg, calib=calib, loss_fn=loss_fn, reconstruct=reconstruct, recover=recover,
                recover_data=data, teacher=cg0.gm, progress=progress)
        plan, pruned = r.plan, r.model
        dense = dense or plan.meta["flops"]["dense"]
        for name, units in plan.survivors(cg).items():
            if name in ids:
                ids[name] = ids[name][units]
        step = {"target": goal, "flops": now * plan.meta["flops"]["planned"] / plan.meta["flops"]["dense"]}
        if r.refitted is not None:
            step["reconstructed_layers"] = len(r.refitted.meta[RECONSTRUCTION]["layers"])
        if r.recovered is not None:
            step["recovery"] = pruned.meta["amgfx_recovery"]
        history.append(step)
    composed = Plan(keep={g.name: ids[g.name].tolist() for g in cg0.groups if len(ids[g.name]) < g.units},
                    units={g.name: g.units for g in cg0.groups if len(ids[g.name]) < g.units},
                    options=dict(plan.options), model={"fingerprint": fingerprint(cg0.gm)},
                    meta={**plan.meta, "target_flops": float(config.target_flops),
                          "config": {**plan.meta.get("config", {}), "plan": config.to_dict()},
                          "flops": {"dense": dense, "planned": history[-1]["flops"] * dense},
                          "schedule": {**iterative_config(schedule), "steps_taken": history}})
    pruned.meta[PLAN] = composed
    return pruned
