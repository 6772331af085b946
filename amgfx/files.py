"""Files a pruned model ships as: ``.pt2`` + plan + manifest (``save``/``load``), and ONNX.

A saved directory holds:

* ``model.pt2``: ``torch.export.save`` of the pruned GraphModule, batch dim dynamic;
* ``plan.json``: the plan it was pruned by (replayable on the dense model);
* ``manifest.json``: amgfx and torch versions and the input/output spec.

``load`` never unpickles: it refuses an archive whose payload configs ask for pickled
tensors or objects before ``torch.export.load`` reads a byte of them.

Example:
    >>> import tempfile, torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = amgfx.prune(m, x, method="magnitude", ratios={"mlp": 0.5})
    >>> d = tempfile.mkdtemp()
    >>> _ = amgfx.save(small, d)
    >>> back = amgfx.load(d)
    >>> bool(torch.allclose(back(torch.ones(3, 3, 32, 32)), small(torch.ones(3, 3, 32, 32)), atol=1e-5))
    True
    >>> back.meta["amgfx_manifest"]["inputs"][0]["shape"]
    ['batch', 3, 32, 32]
"""
from __future__ import annotations

import json
import os
import zipfile

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .decode.step import Decoder
from .errors import AmgfxError, foreign_errors
from .graph.fx import tie_tensors
from .graph.meta import DYNAMIC_BATCH, EXAMPLE, PLAN
from .planning.plan import Plan
from .runtime import OrtProgram, export_program

__all__ = ["save", "load", "example_inputs", "LoadError"]

MANIFEST = "amgfx.saved/1"


class LoadError(AmgfxError):
    """A saved directory or .pt2 archive that cannot (or must not) be loaded."""


def _spec(ep) -> dict:
    """Names, shapes (``"batch"`` where dynamic) and dtypes of the program's inputs and outputs."""
    def one(node):
        v = node.meta.get("val")
        shape = [s if isinstance(s, int) else "batch" for s in v.shape]
        return {"name": node.name, "shape": shape, "dtype": str(v.dtype).replace("torch.", "")}
    nodes = {n.name: n for n in ep.graph.nodes}
    outs = [a for a in pytree.tree_leaves(next(n for n in ep.graph.nodes if n.op == "output").args)
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    return {"inputs": [one(nodes[n]) for n in ep.graph_signature.user_inputs if isinstance(nodes[n].meta.get("val"), torch.Tensor)],
            "outputs": [one(a) for a in outs]}


def save(pruned: fx.GraphModule, directory) -> dict:
    """Write ``model.pt2``, ``plan.json`` and ``manifest.json`` to ``directory``; returns the manifest.

    A pruned :class:`amgfx.Decoder` is written as ``decoder.pt2`` holding both its programs (``prefill`` and
    ``decode``), with its cache layout in the manifest (:func:`_save_decoder`)."""
    from importlib.metadata import version
    if hasattr(pruned, "cache_shapes") and hasattr(pruned, "decode"):
        return _save_decoder(pruned, directory)
    if not isinstance(pruned, fx.GraphModule) or EXAMPLE not in pruned.meta:
        raise AmgfxError("amgfx.save takes the GraphModule amgfx.prune/apply returned")
    os.makedirs(directory, exist_ok=True)
    ep = export_program(pruned)
    torch.export.save(ep, os.path.join(directory, "model.pt2"))
    plan = pruned.meta.get(PLAN)
    if plan is not None:
        plan.save(os.path.join(directory, "plan.json"))
    manifest = {"format": MANIFEST, "amgfx": version("amgfx"), "torch": torch.__version__,
                "dynamic_batch": bool(pruned.meta.get(DYNAMIC_BATCH)), **_spec(ep),
                "files": ["model.pt2"] + (["plan.json"] if plan is not None else [])}
    if "amgfx_recovery" in pruned.meta:     # the weights were trained after the plan: say how
        manifest["recovery"] = pruned.meta["amgfx_recovery"]
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


DECODER = "amgfx.decoder/1"
DECODER_FIELDS = ("batch", "prompt_len", "max_len", "cache_shapes", "vocab_size", "eos_token_id", "pad_token_id")


def _save_decoder(dec, directory) -> dict:
    """``decoder.pt2`` (programs ``prefill`` and ``decode``, each exported at its static example), plan, manifest."""
    from importlib.metadata import version

    if not all(isinstance(m, fx.GraphModule) and EXAMPLE in m.meta for m in (dec.prefill, dec.decode)):
        raise AmgfxError("amgfx.save takes a Decoder that amgfx.prune returned (its graphs are captured)")
    os.makedirs(directory, exist_ok=True)
    with foreign_errors(AmgfxError, "export of the decoder"):
        eps = {"prefill": export_program(dec.prefill), "decode": export_program(dec.decode)}
        package_shared(os.path.join(directory, "decoder.pt2"), eps)
    if dec.plan is not None:
        dec.plan.save(os.path.join(directory, "plan.json"))
    tok, copied = _copy_tokenizer(dec.meta.get("tokenizer"), directory)
    manifest = {"format": DECODER, "amgfx": version("amgfx"), "torch": torch.__version__,
                **{k: getattr(dec, k) for k in DECODER_FIELDS}, "tokenizer": tok,
                "programs": {k: _spec(ep) for k, ep in eps.items()},
                "files": ["decoder.pt2"] + (["plan.json"] if dec.plan is not None else []) + copied}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def package_shared(path: str, eps: dict) -> None:
    """``torch.export``'s ``package_pt2`` for programs that share their weights (a decoder's prefill and decode
    step): each storage is written once, both programs' weight configs name its record, and it is written from
    the tensor's own memory. ``package_pt2`` writes every program's weights apart, each through a ``bytes``
    copy: a pruned 1B-shaped decoder.pt2 held its weights twice (1.30 GB for 0.62 GB on the 2-layer shape) and
    saving copied its 525 MB embedding once more in memory. ``load_pt2`` reads the archive as its own."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import serialize, serialize_tensor_meta
    from torch.export.pt2_archive import _package as pt2
    from torch.export.pt2_archive import constants as c
    written: dict = {}                  # (storage address, bytes) -> its record
    with pt2.PT2ArchiveWriter(path) as w:
        for name, ep in eps.items():
            config = {}
            for fqn, t in ep.state_dict.items():
                st = t.untyped_storage()
                key = (st.data_ptr(), st.nbytes()) if st.nbytes() else id(t)     # empty ones have no address
                if key not in written:
                    written[key] = f"{c.WEIGHT_FILENAME_PREFIX}{len(written)}"
                    w.archive_file.write_record(os.path.join(c.WEIGHTS_DIR, written[key]), st.cpu(), st.nbytes())
                config[fqn] = schema.PayloadMeta(path_name=written[key], is_param=isinstance(t, torch.nn.Parameter),
                                                 use_pickle=False, tensor_meta=serialize_tensor_meta(t))
            pt2._package_payload_config(w, schema.PayloadConfig(config=config), c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(name))
            pt2._package_payload_config(w, pt2._package_constants(name, ep, w), c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(name))
            art = serialize(ep, None, pt2.DEFAULT_PICKLE_PROTOCOL, serialize_state_dict=False, serialize_constants=False)
            w.write_bytes(c.MODELS_FILENAME_FORMAT.format(name), art.exported_program)
            w.write_bytes(c.SAMPLE_INPUTS_FILENAME_FORMAT.format(name), art.example_inputs)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")


def _copy_tokenizer(spec, directory: str) -> tuple:
    """A tokenizer directory's files copied beside the decoder, so the saved directory stands alone:
    (the manifest's tokenizer entry, the files copied). ``"."`` is the saved directory itself."""
    import shutil
    if not spec or spec == "bytes" or not os.path.isdir(spec):
        return spec, []
    copied = []
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(spec, f)):
            if os.path.abspath(os.path.join(spec, f)) != os.path.abspath(os.path.join(directory, f)):
                shutil.copyfile(os.path.join(spec, f), os.path.join(directory, f))
            copied.append(f)
    return (".", copied) if copied else (spec, [])


def _load_decoder(directory: str, manifest: dict, runtime: str = "eager"):
    from torch.export.pt2_archive._package import load_pt2

    pt2 = os.path.join(directory, "decoder.pt2")
    if not os.path.isfile(pt2):
        raise LoadError(f"{pt2} not found; the manifest says this directory holds a decoder")
    _refuse_pickles(pt2)
    if runtime == "ort":
        paths = [os.path.join(directory, f"{k}.onnx") for k in ("prefill", "decode")]
        if not all(os.path.isfile(p) for p in paths):
            raise LoadError(f"{directory} has no prefill.onnx and decode.onnx; write them with "
                            "amgfx.export_onnx(decoder, directory) or amgfx prune ... --onnx")
        prefill, step = (OrtProgram(p) for p in paths)
    elif runtime == "eager":
        with foreign_errors(LoadError, describe=lambda e: f"{pt2}: cannot load ({type(e).__name__})"):
            eps = load_pt2(pt2).exported_programs
            prefill, step = eps["prefill"].module(), eps["decode"].module()
        tie_tensors(prefill, step)             # the archive holds each program's weights; run on one copy
    else:
        raise LoadError(f"runtime must be 'eager' or 'ort', got {runtime!r}")
    plan_path = os.path.join(directory, "plan.json")
    fields = {k: manifest[k] for k in DECODER_FIELDS}
    fields["cache_shapes"] = [tuple(s) for s in fields["cache_shapes"]]
    return Decoder(prefill=prefill, decode=step, **fields,
                   plan=Plan.load(plan_path) if os.path.isfile(plan_path) else None,
                   meta={"tokenizer": directory if manifest.get("tokenizer") == "." else manifest.get("tokenizer"),
                         "manifest": manifest, "path": directory})


def _refuse_pickles(path: str) -> None:
    """Read the archive's payload configs and refuse anything ``torch.export.load`` would unpickle."""
    from torch.export.pt2_archive import constants as c
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise LoadError(f"{path}: not a .pt2 archive ({e}); save it again with amgfx.save") from None
    with z:
        names = z.namelist()
        configs = [n for n in names if n.endswith(".json") and ("weights_config" in n or "constants_config" in n)]
        if not configs or any(n.endswith((".pt", ".pkl")) for n in names if c.WEIGHTS_DIR in n or c.CONSTANTS_DIR in n):
            raise LoadError(f"{path}: not an archive amgfx can load without unpickling (legacy or foreign layout)")
        for name in configs:
            try:
                entries = json.loads(z.read(name)).get("config", {})
            except (ValueError, KeyError, zipfile.BadZipFile) as e:
                raise LoadError(f"{path}: corrupt payload config {name} ({e})") from None
            for fqn, meta in entries.items():
                p = str(meta.get("path_name", ""))
                if meta.get("use_pickle") or p.startswith((c.CUSTOM_OBJ_FILENAME_PREFIX, c.OPAQUE_OBJ_FILENAME_PREFIX)):
                    raise LoadError(f"{path}: {fqn!r} is stored as a pickle; amgfx never unpickles (it could run code)")


def load(path, *, runtime: str = "eager") -> fx.GraphModule:
    """Load what :func:`save` wrote (a directory, or its ``model.pt2``) as a GraphModule.

    A saved decoder directory loads as an :class:`amgfx.Decoder` for :func:`amgfx.generate`; with
    ``runtime="ort"`` its two graphs run in onnxruntime, from the ``prefill.onnx`` and ``decode.onnx``
    that :func:`export_onnx` wrote beside it.

    ``runtime`` is a name of :data:`amgfx.planning.options.RUNTIMES` (``"torch"``, the old spelling of
    ``"eager"``, is still read).

    ``result.meta`` holds ``amgfx_plan`` (a :class:`amgfx.Plan`, when saved) and ``amgfx_manifest``.
    """
    runtime = {"torch": "eager"}.get(runtime, runtime)
    path = os.fspath(path)
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.isdir(path) and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            try:
                manifest = json.load(f)
            except ValueError as e:
                raise LoadError(f"{manifest_path}: not JSON ({e})") from None
        if manifest.get("format") == DECODER:
            return _load_decoder(path, manifest, runtime)
    directory, pt2 = (path, os.path.join(path, "model.pt2")) if os.path.isdir(path) else (os.path.dirname(path), path)
    if not os.path.isfile(pt2):
        raise LoadError(f"{pt2} not found; give a directory written by amgfx.save or amgfx prune --out")
    _refuse_pickles(pt2)
    # a truncated or edited archive fails in many ways; one line says so
    with foreign_errors(LoadError, describe=lambda e: f"{pt2}: cannot load ({type(e).__name__}: "
                                                     f"{str(e).splitlines()[0][:200] if str(e) else ''})"):
        ep = torch.export.load(pt2)
    gm = ep.module()
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    plan_path = os.path.join(directory, "plan.json")
    if os.path.isfile(plan_path):
        gm.meta[PLAN] = Plan.load(plan_path)
    gm.meta["amgfx_manifest"] = manifest
    gm.meta["amgfx_program"] = ep
    return gm


def example_inputs(gm: fx.GraphModule, batch: int = 1, seed: int = 0, vocab: int = 100):
    """Random ``(args, kwargs)`` fitting a loaded model's manifest: floats ~ N(0, 1), integer ids in
    ``[0, vocab)``, masks of ones."""
    ep, manifest = gm.meta["amgfx_program"], gm.meta["amgfx_manifest"]
    g = torch.Generator().manual_seed(seed)
    leaves = []
    for i in manifest["inputs"]:
        shape = [batch if s == "batch" else s for s in i["shape"]]
        dtype = getattr(torch, i["dtype"])
        if dtype.is_floating_point:
            leaves.append(torch.randn(shape, generator=g, dtype=dtype))
        elif "mask" in i["name"]:
            leaves.append(torch.ones(shape, dtype=dtype))
        else:
            leaves.append(torch.randint(0, vocab, shape, generator=g, dtype=dtype))
    return pytree.tree_unflatten(leaves, ep.call_spec.in_spec)
