"""``amgfx generate``: decode text with a causal LM, dense and (optionally) pruned, side by side."""
from __future__ import annotations

import json
import os
import time

from .. import data, files
from ..sequence import prune
from ..decode import decoder, generate, lm
from ..decode.lm import decode, encode
from ..errors import AmgfxError
from ..runtime import export_onnx
from ._common import err


def _tokenizer(spec):
    """(encode, decode, name) for ``"bytes"`` or a Hugging Face directory."""
    if spec in (None, "bytes"):
        return encode, decode, "bytes"
    import transformers as tf
    try:
        tok = tf.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AmgfxError(f"{spec} has no usable tokenizer ({type(e).__name__}); amgfx generate needs one") from None
    return (lambda t: tok(t, add_special_tokens=False)["input_ids"]), tok.decode, spec


def _source(a):
    """(dense Decoder or None, saved Decoder or None, tokenizer spec, description)."""
    if a.model == lm.NAME:
        model = lm.bench_lm(progress=not a.quiet)
        return model, None, "bytes", f"{lm.NAME}: byte-level LLaMA ({sum(p.numel() for p in model.parameters()):,} " \
                                     "params, trained on standard-library docstrings)"
    if not os.path.isdir(a.model):
        raise AmgfxError(f"{a.model!r} is not {lm.NAME}, a Hugging Face causal LM directory or a saved decoder")
    manifest = os.path.join(a.model, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            kind = json.load(f).get("format")
        if kind != files.DECODER:
            raise AmgfxError(f"{a.model} is a saved amgfx model, not a decoder (prune decoders with amgfx generate --out)")
        saved = files.load(a.model, runtime="ort" if a.ort else "eager")
        return None, saved, saved.meta.get("tokenizer"), f"saved decoder {a.model}"
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise AmgfxError(f"{a.model} is a directory without config.json or manifest.json")
    import transformers as tf
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(a.model))
    try:
        cfg = tf.AutoConfig.from_pretrained(a.model)
        model = (tf.AutoModelForCausalLM.from_pretrained(a.model) if has_weights else
                 tf.AutoModelForCausalLM.from_config(cfg)).eval()
    except (ValueError, KeyError) as e:
        raise AmgfxError(f"{a.model} is not a causal LM ({str(e).splitlines()[0][:120]})") from None
    return model, None, a.model, f"HF {type(model).__name__}" + ("" if has_weights else " (random weights)")


def _calib(enc_name, encode, prompt_len, n, batch):
    import torch

    if enc_name == "bytes":
        w = lm.windows("train", prompt_len, n, stride=997)
    else:
        rows = [encode(t)[:prompt_len] for t in data.text("calib", n)]
        rows = [r for r in rows if len(r) == prompt_len] or rows
        w = torch.tensor([r + [0] * (prompt_len - len(r)) for r in rows])
    return [w[i:i + batch] for i in range(0, len(w) - batch + 1, batch)]


def _run(dec, rows, a):
    t0 = time.perf_counter()
    out = generate(dec, rows, max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature,
                   top_k=a.top_k, seed=a.seed)
    return out, sum(len(r) for r in out) / max(time.perf_counter() - t0, 1e-9)


def cmd_generate(a) -> int:
    if a.ort and (a.target_flops or a.ratios):
        return err("--ort runs a saved decoder's ONNX files; prune without it, with --out DIR --onnx")
    try:
        dense_lm, saved, tok_spec, what = _source(a)
        if saved is None:
            dense = decoder(dense_lm, max_len=a.prompt_len + a.max_new_tokens, prompt_len=a.prompt_len)
        encode, decode_text, tok_name = _tokenizer(tok_spec)
        rows = [encode(p) for p in a.prompt]
        if saved is None:
            prompt_len = max([a.prompt_len] + [len(r) for r in rows])
            if prompt_len > a.prompt_len:
                dense = decoder(dense_lm, max_len=prompt_len + a.max_new_tokens, prompt_len=prompt_len)
            dense.meta["tokenizer"] = tok_name
        runs = {}
        if saved is not None:
            runs["saved"] = saved
        else:
            runs["dense"] = dense
        if a.target_flops or a.ratios:
            calib = _calib(tok_name, encode, dense.prompt_len, a.calib_samples, dense.batch)
            small = prune(dense, method=a.method, target_flops=a.target_flops, ratios=a.ratios, calib=calib,
                                reconstruct=not a.no_reconstruct, progress=not a.quiet)
            small.meta["tokenizer"] = tok_name
            runs["pruned"] = small
            if a.out:
                files.save(small, a.out)
                if a.onnx:
                    export_onnx(small, a.out)
        elif a.out:
            return err("--out saves a pruned decoder: give --target-flops or --ratios")
        texts = {k: _run(d, rows, a) for k, d in runs.items()}
    except AmgfxError as e:
        return err(str(e).splitlines()[0])
    if a.json:
        print(json.dumps({"model": a.model, "prompts": a.prompt,
                          **{k: {"tokens": t, "text": [decode_text(r) for r in t], "tokens_per_s": round(s, 1),
                                 "cache_bytes_per_token": runs[k].cache_bytes_per_token()}
                             for k, (t, s) in texts.items()}}))
        return 0
    if not a.quiet:
        print(what)
        if "pruned" in runs:
            flops = runs["pruned"].plan.meta.get("flops", {})
            kept = f"FLOPs {flops['planned'] / flops['dense']:.1%} of dense, " if flops else ""
            print(f"pruned: {kept}KV cache {runs['dense'].cache_bytes_per_token():,} -> "
                  f"{runs['pruned'].cache_bytes_per_token():,} bytes per token"
                  + (f"; saved to {a.out}" if a.out else ""))
    for i, p in enumerate(a.prompt):
        print(f"prompt: {p!r}")
        for k, (toks, speed) in texts.items():
            print(f"  {k:>6}: {decode_text(toks[i])!r}" + ("" if a.quiet else f"   ({speed:.0f} tokens/s)"))
    return 0


