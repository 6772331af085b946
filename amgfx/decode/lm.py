"""A small language model to prune for real: byte-level, LLaMA-shaped, trained here on the standard library.

No pretrained decoder ships offline, so :func:`bench_lm` trains one (about 3M parameters: 4 layers, width
256, 4 query heads over 2 kv heads, gated MLP) on the docstrings of ~70 standard-library modules, for a few
minutes on 2 CPU cores, and caches the weights under ``$XDG_CACHE_HOME/amgfx`` (``~/.cache/amgfx``); the
same seed gives the same model. Held-out text comes from the modules :data:`amgfx.data.EVAL_MODULES` names,
which training never reads. Tokens are bytes (``encode``/``decode``), so no tokenizer is needed either.

Example:
    >>> from amgfx.decode.lm import encode, decode
    >>> encode("pruned"), decode(encode("pruned"))
    ([112, 114, 117, 110, 101, 100], 'pruned')
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
import warnings

import torch

from ..data import EVAL_MODULES

__all__ = ["CONFIG", "bench_lm", "corpus", "encode", "decode", "windows", "perplexity", "train"]

NAME = "amgfx-lm"
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=0)
TRAIN = dict(steps=600, batch=16, seq=128, lr=3e-3, warmup=30, seed=0)
# pure-Python modules with long docstrings and no side effects on import; none of EVAL_MODULES
TRAIN_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "calendar", "cmd", "codecs", "collections", "colorsys",
    "concurrent.futures", "configparser", "copy", "copyreg", "dataclasses", "difflib", "dis", "doctest", "email",
    "email.message", "enum", "filecmp", "fileinput", "fnmatch", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "hmac", "html.parser", "http.client", "http.server", "imaplib", "importlib", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "poplib", "pprint", "pydoc",
    "queue", "quopri", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "string", "struct", "subprocess", "symtable", "tarfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipapp")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _docstrings(name: str) -> list[str]:
    """The module's, its classes' and functions' and methods' docstrings, each with blank lines squeezed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except ImportError:
        return []
    objs = [mod]
    for _, obj in sorted(vars(mod).items()):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
            objs.append(obj)
            if inspect.isclass(obj):
                objs += [f for _, f in sorted(vars(obj).items()) if inspect.isfunction(f)]
    out = []
    for o in objs:
        with warnings.catch_warnings():         # deprecated aliases (typing.io) warn when read
            warnings.simplefilter("ignore")
            d = inspect.getdoc(o) or ""
        if len(d) >= 40 and d.isascii():
            out.append(re.sub(r"\n\s*\n+", "\n\n", d))
    return out


def corpus(split: str = "train") -> str:
    """All docstrings of the training modules (``train``) or of :data:`EVAL_MODULES` (``eval``), one per paragraph."""
    mods = TRAIN_MODULES if split == "train" else EVAL_MODULES
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return "\n\n".join(d for m in mods for d in _docstrings(m))


def windows(split: str, seq: int, n: int | None = None, *, stride: int | None = None) -> torch.Tensor:
    """``[n, seq]`` byte windows of the split's corpus, ``stride`` apart (default: back to back)."""
    data = torch.tensor(encode(corpus(split)), dtype=torch.long)
    starts = range(0, len(data) - seq, stride or seq)
    out = torch.stack([data[s:s + seq] for s in starts])
    return out[:n] if n else out


def train(*, steps: int = TRAIN["steps"], batch: int = TRAIN["batch"], seq: int = TRAIN["seq"], lr: float = TRAIN["lr"],
          warmup: int = TRAIN["warmup"], seed: int = TRAIN["seed"], progress: bool = True):
    """Train the LM from scratch (AdamW, warmup then cosine decay) on random windows of the training corpus."""
    import transformers as tf
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG))
    data = torch.tensor(encode(corpus("train")), dtype=torch.long)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    lm.train()
    bar = tqdm(range(steps), desc=f"training {NAME}", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        loss = lm(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return lm.eval()


def _cache_dir() -> str:
    # the corpus is this Python's standard library: another Python trains (and caches) its own model
    key = hashlib.sha1(json.dumps([CONFIG, TRAIN, TRAIN_MODULES, sys.version_info[:2]], sort_keys=True).encode())
    key = key.hexdigest()[:10]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "amgfx", f"{NAME}-{key}")


def bench_lm(*, progress: bool = True):
    """The trained LM: from the cache when it is there, else trained now (a few minutes) and cached."""
    import transformers as tf
    path = _cache_dir()
    if os.path.isfile(os.path.join(path, "config.json")):
        return tf.LlamaForCausalLM.from_pretrained(path).eval()
    lm = train(progress=progress)
    os.makedirs(path, exist_ok=True)
    lm.save_pretrained(path)
    return lm


@torch.no_grad()
def perplexity(logits_of, ids: torch.Tensor, batch: int) -> float:
    """exp of the mean next-byte cross-entropy of ``logits_of(ids[i:i+batch])`` over ``ids`` (``[n, seq]``)."""
    total, count = 0.0, 0
    for i in range(0, len(ids) - batch + 1, batch):
        x = ids[i:i + batch]
        logits = logits_of(x)[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)
