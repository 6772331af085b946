"""Recovery: distil the dense model into the pruned one, and prune-recover schedules.

Both papers recover accuracy after pruning: SNP by fine-tuning, AMG by knowledge distillation
from the dense model between pruning steps. :func:`recover` trains the pruned GraphModule's
parameters (they stay ``nn.Parameter`` through the passes) to match the dense teacher:

==========  ==============================================================================
``loss``    what the student matches (on the first tensor output of both models)
==========  ==============================================================================
``kd``      the teacher's softened class distribution: ``T^2 * KL(p_T || q_T)`` over the
            last dim (classifier logits, or LM logits per token)
``cosine``  the direction of every output vector: ``1 - cos`` over the last dim, per token
            (encoders: ``last_hidden_state``); padded tokens are left out
``mse``     the values: mean squared error, per token, padded tokens left out
==========  ==============================================================================

With ``alpha < 1`` a task loss joins in: ``alpha * distil + (1 - alpha) * task``. The task loss
defaults to cross-entropy against the labels that ride along in each batch (``(x, y)`` tuples,
or a ``"labels"`` key). Training uses AdamW with a short linear warm-up then cosine decay, and
clips the gradient norm. It is seeded: the same call gives the same weights.

Example:
    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.prune(m, x, method="magnitude", ratios={"mlp": 0.75})
    >>> data = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    >>> before = amgfx.distill_loss(small, m, data)
    >>> tuned = amgfx.recover(small, m, data, steps=20, lr=1e-3, progress=False)
    >>> amgfx.distill_loss(tuned, m, data) < before, tuned is not small
    (True, True)
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

import torch.utils._pytree as pytree

from ..errors import AmgfxError
from ..graph.fx import state_inputs
from ..graph.capture import capture
from ..graph.meta import CAPTURED, DYNAMIC_BATCH, EXAMPLE

__all__ = ["recover", "distill_loss", "Iterative", "LOSSES"]

LOSSES = ("kd", "cosine", "mse")


def first_output(out) -> torch.Tensor:
    """The first tensor of a model output (``last_hidden_state`` of a Hugging Face encoder, logits...)."""
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


@dataclass
class Iterative:
    """Prune in ``steps`` equal FLOPs steps toward the target, recovering after each (AMG's schedule).

    Step *i* of *k* plans to ``1 - (1 - target) * i / k`` of the dense FLOPs, scoring the
    current (recovered) model; then :func:`recover` trains it for ``recover_steps`` against the
    dense model on ``data`` (default: the calibration data). ``recover`` holds any other
    :func:`recover` keyword (``lr``, ``loss``, ``temperature``, ``alpha``, ...).

    Example:
        >>> import amgfx
        >>> amgfx.Iterative(steps=3, recover_steps=100, recover={"lr": 5e-4}).targets(0.4)
        [0.8, 0.6, 0.4]
    """
    steps: int = 2
    recover_steps: int = 0
    data: object = None
    recover: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise AmgfxError(f"Iterative(steps=) must be a positive integer, got {self.steps!r}")
        if not isinstance(self.recover_steps, int) or self.recover_steps < 0:
            raise AmgfxError(f"Iterative(recover_steps=) must be a non-negative integer, got {self.recover_steps!r}")
        bad = set(self.recover) - set(_RECOVER_OPTIONS)
        if bad:
            raise AmgfxError(f"unknown recover option(s) {sorted(bad)}; use {', '.join(_RECOVER_OPTIONS)}")

    def targets(self, target: float) -> list[float]:
        """The fraction of dense FLOPs each step plans to."""
        return [round(1.0 - (1.0 - target) * (i + 1) / self.steps, 6) for i in range(self.steps)]


# ----------------------------------------------------------------------------------- data
def _parts(batch, n_args: int):
    """A batch -> (args, kwargs, labels or None); labels follow the inputs in a tuple, or sit under "labels"."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (list, tuple)):
        n = max(n_args, 1)
        return tuple(batch[:n]), {}, (batch[n] if len(batch) > n else None)
    raise AmgfxError(f"a recovery batch must be a tensor, a tuple (inputs..., labels) or a dict, got "
                     f"{type(batch).__name__}")


def _check_batch(student, args, kwargs) -> None:
    """A model captured with a static batch only runs at that batch: say so rather than fail inside the graph."""
    meta = getattr(student, "meta", {})
    if meta.get(DYNAMIC_BATCH, True) or EXAMPLE not in meta:
        return
    first = lambda a, k: next((t for t in list(a) + list(k.values()) if isinstance(t, torch.Tensor)), None)
    want, got = first(*meta[EXAMPLE]), first(args, kwargs)
    if want is not None and got is not None and want.shape[0] != got.shape[0]:
        raise AmgfxError(f"this pruned model was captured with a static batch of {want.shape[0]}, but a recovery "
                         f"batch has {got.shape[0]}; use batches of {want.shape[0]}")


def _own(student, args) -> tuple:
    """The student's positional inputs: a state input (KV cache) it reads smaller is cut to its kept elements."""
    return tuple(state_inputs(student, list(args))) if isinstance(student, fx.GraphModule) else args


def _n_args(student) -> int:
    example = getattr(student, "meta", {}).get(EXAMPLE)
    return len(example[0]) if example else 1


def _cycle(data, seed: int):
    """Batches forever: a sequence in a fresh seeded order each pass, any other iterable re-read."""
    g = torch.Generator().manual_seed(seed)
    while True:
        if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            if len(data) == 0:
                raise AmgfxError("the recovery data is empty")
            for i in torch.randperm(len(data), generator=g).tolist():
                yield data[i]
        else:
            got = False
            for b in data:
                got = True
                yield b
            if not got:
                raise AmgfxError("the recovery data is empty")


# ----------------------------------------------------------------------------------- losses
def _token_mean(per: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Mean of per-vector losses [B, T] (or [B]); padded tokens (attention_mask 0) do not count."""
    m = kwargs.get("attention_mask")
    if per.dim() == 2 and isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(per.shape):
        w = m.to(per.dtype)
        return (per * w).sum() / w.sum().clamp_min(1)
    return per.mean()


def _distil(kind: str, s: torch.Tensor, t: torch.Tensor, temperature: float, kwargs: dict) -> torch.Tensor:
    if s.shape != t.shape:
        raise AmgfxError(f"student output {list(s.shape)} and teacher output {list(t.shape)} differ; recovery "
                         "needs the pruned model to answer like the dense one")
    s, t = s.float(), t.float()
    if kind == "kd":
        log_q = F.log_softmax(s / temperature, -1)
        log_p = F.log_softmax(t / temperature, -1)
        per = (log_p.exp() * (log_p - log_q)).sum(-1)
        return temperature ** 2 * _token_mean(per, kwargs)
    if kind == "cosine":
        return _token_mean(1.0 - F.cosine_similarity(s, t, dim=-1), kwargs)
    return _token_mean((s - t).pow(2).mean(-1), kwargs)


def _check_loss(loss: str, temperature: float, alpha: float) -> None:
    if loss not in LOSSES:
        raise AmgfxError(f"unknown recovery loss {loss!r}; use {', '.join(LOSSES)}")
    if not temperature > 0:
        raise AmgfxError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise AmgfxError(f"alpha (the weight of the distillation loss) must be in [0, 1], got {alpha}")


def _set_mode(model, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:    # torch.export's modules refuse train()/eval(): their mode is fixed
        pass


@contextlib.contextmanager
def _eval(model):
    """Run ``model`` in eval mode, then put its flag back: the teacher is the user's model."""
    was = model.training
    _set_mode(model, False)
    try:
        yield model
    finally:
        _set_mode(model, was)


def _graph_of(teacher, student):
    """The teacher to run: its captured graph (which owns any state its forward writes), never the user's
    module itself; a module amgfx cannot capture at the student's example runs with its buffers restored."""
    if getattr(teacher, "meta", {}).get(CAPTURED) or EXAMPLE not in getattr(student, "meta", {}):
        return teacher
    args, kwargs = student.meta[EXAMPLE]
    try:
        return capture(teacher, args, kwargs)
    except AmgfxError:
        return _Restoring(teacher)


class _Restoring(torch.nn.Module):
    """Runs ``inner`` and puts every buffer back afterwards (a forward that counts its calls, say)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        saved = [(b, b.detach().clone()) for b in self.inner.buffers()]
        try:
            return self.inner(*args, **kwargs)
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)


@torch.no_grad()
def distill_loss(student, teacher, data, *, loss: str = "kd", temperature: float = 2.0) -> float:
    """The mean distillation loss of ``student`` against ``teacher`` over ``data`` (both in eval mode).

    This is what :func:`recover` lowers; measure it on held-out data to see that it did.
    """
    _check_loss(loss, temperature, 1.0)
    teacher = _graph_of(teacher, student)
    n_args, total, n = _n_args(student), 0.0, 0
    with _eval(teacher), _eval(student):
        for b in data:
            args, kwargs, _ = _parts(b, n_args)
            s, t = first_output(student(*_own(student, args), **kwargs)), first_output(teacher(*args, **kwargs))
            total += float(_distil(loss, s, t, temperature, kwargs)) * s.shape[0]
            n += s.shape[0]
    if not n:
        raise AmgfxError("the evaluation data is empty")
    return total / n


# ----------------------------------------------------------------------------------- training
_RECOVER_OPTIONS = ("lr", "loss", "temperature", "alpha", "task_loss", "weight_decay", "warmup", "clip", "seed",
                    "progress")


def _trainable(model) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AmgfxError("the pruned model has no trainable parameters (every parameter has requires_grad=False); "
                         "nothing to recover")
    return params


def _detach_inference(model) -> None:
    """Parameters made under ``torch.inference_mode`` cannot be trained; give them ordinary storage."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.clone(), p.requires_grad)


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: the LR multiplier at ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def recover(pruned, teacher, data, *, steps: int, lr: float = 5e-4, loss: str = "kd", temperature: float = 2.0,
            alpha: float = 1.0, task_loss=None, weight_decay: float = 0.01, warmup: float = 0.05, clip: float = 1.0,
            seed: int = 0, inplace: bool = False, progress: bool = True, heldout="split", check_every: int | None = None,
            accumulate: int = 1):
    """Train ``pruned`` for ``steps`` batches of ``data`` to answer like ``teacher``; returns the trained model.

    Args:
        pruned: the pruned GraphModule (any nn.Module works). Copied first unless ``inplace``.
        teacher: the dense model; run in eval mode under ``no_grad`` and never changed.
        data: batches like the calibration data: tensors, ``(inputs..., labels)`` tuples or dicts
            (a ``"labels"`` key is held back from the model). A sequence is reshuffled (seeded)
            each pass; any other iterable is re-read. ``steps`` may exceed one pass.
        steps: optimiser steps. lr: peak AdamW learning rate.
        loss: ``"kd"``, ``"cosine"`` or ``"mse"`` (see the module docstring).
        temperature: softening of ``"kd"``. alpha: weight of the distillation loss; the rest
            goes to ``task_loss(outputs, labels)`` (default cross-entropy on the labels).
        weight_decay, warmup (fraction of steps), clip (max gradient norm), seed: as named.
        heldout: the guard. ``"split"`` (default) holds out every eighth batch of a sequence of at
            least 8 (fewer: unguarded, and the record says so); a list of batches is used as given;
            None trains unguarded. Every ``check_every`` steps (default a tenth of them) the
            distillation loss on the held-out batches is measured; the weights of the best check
            are returned, and the model as it came when no step beat it (with a warning).
        accumulate: batches whose gradients each step sums (their losses averaged): more tokens a step where
            the graph runs at one batch size only (a decoder's prefill, captured at batch 1).

    The result's ``meta["amgfx_recovery"]`` records the settings, the time taken, the loss of the
    first and last tenth of the steps, and the guard's checks (``heldout``).
    """
    from tqdm.auto import tqdm
    _check_loss(loss, temperature, alpha)
    if not isinstance(steps, int) or steps < 1:
        raise AmgfxError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise AmgfxError(f"lr must be > 0, got {lr}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise AmgfxError(f"accumulate must be a positive integer, got {accumulate!r}")
    data, held = _split_heldout(data, heldout)
    every = check_every or max(1, steps // 10)
    student = pruned if inplace else copy.deepcopy(pruned)
    teacher = _graph_of(teacher, student)
    _detach_inference(student)
    params = _trainable(student)
    n_args = _n_args(student)
    t0 = time.perf_counter()
    losses = []
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(), _eval(teacher):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        n_warm = max(1, int(warmup * steps)) if warmup else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, steps, n_warm))
        _set_mode(student, True)
        batches = _cycle(data, seed)
        judge = _Guard(student, teacher, held, n_args, lambda s, t, kw: _distil(loss, s, t, temperature, kw))
        bar = tqdm(range(steps), desc="recovering", unit="step", disable=not progress, leave=False)
        def objective(out, t, kwargs, labels):
            value = alpha * _distil(loss, first_output(out), t, temperature, kwargs) if alpha else 0.0
            return value + (1.0 - alpha) * _task(task_loss, out, labels) if alpha < 1.0 else value
        for step in bar:
            opt.zero_grad(set_to_none=True)
            value = _step(student, teacher, batches, n_args, accumulate, objective, first=not losses)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            losses.append(value)
            if not math.isfinite(losses[-1]):
                raise AmgfxError(f"recovery diverged at step {len(losses)} (loss {losses[-1]}); lower lr (now {lr})")
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if (step + 1) % every == 0 or step + 1 == steps:
                judge.check(step + 1)
    _set_mode(student, False)
    guard = judge.finish()
    tenth = max(1, steps // 10)
    student.meta = dict(getattr(student, "meta", {}))
    student.meta["amgfx_recovery"] = {
        "steps": steps, "lr": lr, "loss": loss, "temperature": temperature, "alpha": alpha,
        "weight_decay": weight_decay, "warmup": warmup, "clip": clip, "seed": seed, "accumulate": accumulate,
        "seconds": round(time.perf_counter() - t0, 2),
        "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
        "heldout": guard}
    return student


def _step(student, teacher, batches, n_args: int, accumulate: int, objective, first: bool) -> float:
    """One step's gradients, summed over ``accumulate`` batches (each loss divided by it); returns their mean loss."""
    value = 0.0
    for i in range(accumulate):
        args, kwargs, labels = _parts(next(batches), n_args)
        if first and not i:
            _check_batch(student, args, kwargs)
        out, t = _forward(student, teacher, args, kwargs)
        part = objective(out, t, kwargs, labels)
        (part / accumulate).backward()
        value += float(part.detach()) / accumulate
    return value


def _split_heldout(data, heldout):
    """(training batches, held-out batches or None)."""
    if heldout is None:
        return data, None
    if isinstance(heldout, str):
        if heldout != "split":
            raise AmgfxError(f'heldout must be "split", a list of batches or None, got {heldout!r}')
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or len(data) < 8:
            return data, None
        data = list(data)
        return [b for i, b in enumerate(data) if i % 8 != 7], [b for i, b in enumerate(data) if i % 8 == 7]
    held = list(heldout)
    if not held:
        raise AmgfxError("heldout is an empty list; give batches, \"split\" or None")
    return data, held


def _forward(student, teacher, args, kwargs):
    """(the student's outputs, the teacher's first output, without gradients): one batch of distillation."""
    with torch.no_grad():
        t = first_output(teacher(*args, **kwargs))
    return student(*_own(student, args), **kwargs), t


class _Guard:
    """Held-out distillation loss at the start and at each check; keeps the best weights."""

    def __init__(self, student, teacher, held, n_args, loss):
        self.student, self.teacher, self.held, self.n_args, self.loss = student, teacher, held, n_args, loss
        self.checks, self.best, self.best_state = [], None, None
        if held is not None:
            self.check(0)

    def _measure(self) -> float:
        _set_mode(self.student, False)
        total = 0.0
        with torch.no_grad():
            for b in self.held:
                args, kwargs, _ = _parts(b, self.n_args)
                out, t = _forward(self.student, self.teacher, args, kwargs)
                total += float(self.loss(first_output(out), t, kwargs))
        _set_mode(self.student, True)
        return total / len(self.held)

    def check(self, step: int) -> None:
        if self.held is None:
            return
        value = self._measure()
        self.checks.append([step, round(value, 6)])
        if self.best is None or value < self.best[1]:
            self.best = (step, value)
            self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def finish(self) -> dict:
        if self.held is None:
            return {"guarded": False, "why": "fewer than 8 batches to hold some out, or heldout=None"}
        step, value = self.best
        if step != self.checks[-1][0]:                  # a later step was worse: the best weights come back
            self.student.load_state_dict(self.best_state)
        if step == 0:
            warnings.warn(f"recovery did not lower the held-out distillation loss ({self.checks[0][1]:.4g} at the "
                          "start); the model is returned as it came. Try a lower lr or more data", stacklevel=3)
        return {"guarded": True, "batches": len(self.held), "checks": self.checks, "kept_step": step,
                "start": self.checks[0][1], "kept": round(value, 6)}


def _task(task_loss, out, labels) -> torch.Tensor:
    if labels is None:
        raise AmgfxError("alpha < 1 needs a task loss, but the recovery batches carry no labels; pass (inputs, labels) "
                         "tuples or a 'labels' key, or use alpha=1")
    if task_loss is not None:
        return task_loss(out, labels)
    logits = first_output(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def iterative_config(schedule: Iterative) -> dict:
    """The schedule as plain data (for the plan's meta)."""
    d = asdict(schedule)
    d.pop("data")
    d["recover"] = {k: v for k, v in d["recover"].items() if k != "task_loss"}
    return d
