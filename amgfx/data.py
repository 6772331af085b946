"""Real calibration and evaluation data that needs no download.

* ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grey images, 10 classes), with one
  fixed, stratified 75/25 train/test split (seed 0) that every benchmark shares.
* ``text``: English prose from the docstrings of standard-library modules. Calibration, evaluation and
  training (recovery's extra text) draw from *different* modules, so evaluation text is never seen before.
* ``image_folder``: every image under a directory, resized to the model's input.

Example:
    >>> x, y = digits("test")
    >>> tuple(x.shape), tuple(y.shape)
    ((450, 1, 8, 8), (450,))
    >>> len(text("calib", 8)), text("calib", 1) != text("eval", 1)
    (8, True)
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import warnings

import torch

__all__ = ["digits", "text", "halves", "views", "token_windows", "byte_bpe", "image_folder", "CALIB_MODULES",
           "EVAL_MODULES", "TRAIN_MODULES"]

CALIB_MODULES = ("collections", "functools", "itertools", "pathlib", "argparse", "json", "subprocess",
                 "threading", "logging", "unittest", "typing", "dataclasses", "string", "textwrap", "shutil")
EVAL_MODULES = ("os", "re", "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect",
                "contextlib", "inspect", "tempfile", "zipfile", "csv", "calendar")
# more prose for training (distillation), from neither list: about 3.5x the calibration split's tokens
TRAIN_MODULES = ("doctest", "pdb", "difflib", "ast", "urllib.parse", "codecs", "optparse", "urllib.request",
                 "configparser", "http.cookiejar", "ssl", "pkgutil", "fileinput", "base64", "wave", "site",
                 "socketserver", "socket", "traceback", "logging.handlers", "http.server", "xmlrpc.client",
                 "ipaddress", "uuid", "shelve", "wsgiref.simple_server", "locale", "email.message", "email.utils",
                 "http.client", "pickle", "enum", "abc", "io", "gettext", "pprint", "warnings", "weakref", "copy",
                 "types", "operator", "queue", "sched", "selectors", "smtplib", "ftplib", "tarfile", "gzip",
                 "hashlib", "hmac", "secrets", "mailbox", "mimetypes", "struct", "cmd", "shlex", "glob", "fnmatch",
                 "filecmp", "netrc", "plistlib", "trace", "timeit", "tokenize", "dis", "sysconfig", "getopt",
                 "graphlib", "numbers", "pstats", "colorsys", "html.parser", "asyncio.tasks", "asyncio.events",
                 "asyncio.streams", "asyncio.locks", "asyncio.queues", "concurrent.futures", "email.parser",
                 "collections.abc", "imaplib", "poplib", "urllib.robotparser", "xml.dom.minidom",
                 "xml.etree.ElementTree", "runpy", "zipimport", "quopri", "unittest.mock", "multiprocessing.pool",
                 "sqlite3", "getpass", "contextvars", "tomllib", "zoneinfo")
SPLITS = {"calib": CALIB_MODULES, "eval": EVAL_MODULES, "train": TRAIN_MODULES}


def digits(split: str = "train"):
    """``(images [N, 1, 8, 8] float32, standardised; labels [N] int64)`` for ``split`` in train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    mean, std = x[tr].mean(), x[tr].std()
    pick = tr if split == "train" else te
    return (x[pick] - mean) / std, y[pick]


@functools.cache     # text('train') reads the other splits' modules too, and one run asks for a split many times
def _paragraphs(module_name: str) -> tuple[str, ...]:
    mod = importlib.import_module(module_name)
    docs = [inspect.getdoc(mod) or ""]
    with warnings.catch_warnings():          # deprecated aliases (typing.io, typing.re) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module_name:
                docs.append(inspect.getdoc(obj) or "")
    out = []
    for d in docs:
        for p in re.split(r"\n\s*\n", d):
            p = " ".join(p.split())
            # prose only: long enough, mostly letters, not a code example or a table
            if len(p) >= 60 and not p.startswith((">>>", "..", "-", "*", "+", "|")) and \
                    sum(c.isalpha() or c == " " for c in p) / len(p) > 0.85:
                out.append(p)
    return tuple(out)


def text(split: str = "calib", n: int | None = None) -> list[str]:
    """Deterministic English paragraphs: ``calib``, ``eval`` and ``train`` come from disjoint modules."""
    if split not in SPLITS:
        raise ValueError(f"text splits are {', '.join(SPLITS)}, got {split!r}")
    out = [p for m in SPLITS[split] for p in _paragraphs(m)]
    if split == "train":        # a docstring inherited from a class of another split is that split's text
        other = {p for k in ("calib", "eval") for m in SPLITS[k] for p in _paragraphs(m)}
        out = [p for p in out if p not in other]
    return out[:n] if n else out


def halves(paragraph: str) -> tuple:
    """(first half, second half) of a paragraph's words."""
    w = paragraph.split()
    return " ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2:])


def views(paragraphs: list, kind: str = "halves") -> list:
    """Calibration texts for an encoder: each paragraph ``whole``, or (``halves``) whole and also split into its
    two :func:`halves`. Sentence encoders embed fragments as often as paragraphs; calibrating on both lengths
    raised MiniLM's held-out cosine after refit at 50% FLOPs from 0.787 to 0.855 (taylor,
    ``benchmarks/results/criteria_minilm*.md``), so ``--calib text`` uses ``halves`` for encoders.

    A paragraph's views stay together, so the batches ``auto`` and the recovery guard hold out (the last
    ones) are paragraphs nothing before them read, not halves of paragraphs the fit read whole.

    Example:
        >>> views(["one two three four", "five six"])
        ['one two three four', 'one two', 'three four', 'five six', 'five', 'six']
    """
    if kind not in ("whole", "halves"):
        raise ValueError(f"views are 'whole' or 'halves', got {kind!r}")
    if kind == "whole":
        return list(paragraphs)
    return [v for p in paragraphs for v in (p, *halves(p))]


def token_windows(encode, split: str, seq: int, n: int | None = None) -> torch.Tensor:
    """``[n, seq]`` token ids for language models: the split's paragraphs (:func:`text`) joined by blank
    lines, encoded once by ``encode`` (text -> ids) and cut back to back; every row is whole text.

    ``calib`` and ``eval`` windows come from disjoint modules (about 18.9k and 13.7k tokens with
    SmolLM2's tokenizer: 147 and 107 windows of 128), so perplexity is measured on text the
    calibration never read.
    """
    ids = torch.tensor(list(encode("\n\n".join(text(split)))), dtype=torch.long)
    count = len(ids) // seq
    if n is not None and n > count:
        raise ValueError(f"the {split} text has {count} windows of {seq} tokens, fewer than the {n} asked for")
    return ids[:count * seq].reshape(count, seq)[:n]


def distill_windows(encode, seq: int, *, seed: int = 0) -> torch.Tensor:
    """The windows a causal LM is distilled on: the calibration and training splits' (:func:`token_windows`,
    never the evaluation's), shuffled (seeded) so a step mixes both (634 of 128 tokens with SmolLM2's tokenizer).
    """
    w = torch.cat([token_windows(encode, split, seq) for split in ("calib", "train")])
    return w[torch.randperm(len(w), generator=torch.Generator().manual_seed(seed))]


def byte_bpe(directory: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on the calibration text and saved into ``directory`` as a Hugging Face
    one (``<unk>``, ``<s>``, ``</s>`` are ids 0-2): what a model directory made here (tests, benchmarks) ships
    instead of a downloaded tokenizer. Returns the ``PreTrainedTokenizerFast``.

    Example:
        >>> import tempfile
        >>> tok = byte_bpe(tempfile.mkdtemp(), 300)
        >>> len(tok), tok.decode(tok("Return the value.")["input_ids"])
        (300, 'Return the value.')
    """
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text("calib"), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def image_folder(path: str, size: int, channels: int = 3, n: int | None = None) -> torch.Tensor:
    """Every image under ``path`` (sorted), resized to ``size`` x ``size``, ImageNet-normalised."""
    from PIL import Image
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) under {path}")
    files = files[:n] if n else files
    mean = torch.tensor([0.485, 0.456, 0.406][:channels] or [0.5]).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225][:channels] or [0.25]).view(-1, 1, 1)
    out = []
    for f in files:
        im = Image.open(f).convert("RGB" if channels == 3 else "L").resize((size, size))
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255.0
        out.append((t.view(size, size, channels).permute(2, 0, 1) - mean) / std)
    return torch.stack(out)
