"""amgfx.save / load (.pt2 + plan + manifest), ONNX export at opset 23 with a dynamic batch, ORT parity."""
import json
import zipfile

import onnx
import pytest
import torch
import torch.utils._pytree as pytree

import amgfx
from amgfx.files import LoadError, example_inputs

RATIOS = {"qk": 0.5, "v": 0.25, "mlp": 0.5, "head": 0.25}


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", ["vit", "bert_minilm", "llama_gqa"])
def test_save_load_round_trip_and_onnx_parity(analysed_model, tmp_path, name):
    _, _, _, cg = analysed_model(name)
    plan = amgfx.plan_for(cg, method="magnitude", ratios=RATIOS, progress=False)
    small = amgfx.apply(cg, plan)
    manifest = amgfx.save(small, tmp_path)
    assert manifest["dynamic_batch"] and all(i["shape"][0] == "batch" for i in manifest["inputs"])
    back = amgfx.load(tmp_path)
    assert back.meta["amgfx_plan"].to_json() == plan.to_json()
    onnx_path = amgfx.export_onnx(back, tmp_path / "model.onnx")
    assert {o.domain or "ai.onnx": o.version for o in onnx.load(onnx_path).opset_import}["ai.onnx"] == 23
    for batch in (1, 3):                                  # one file serves every batch size
        args, kwargs = example_inputs(back, batch=batch, seed=batch)
        from conftest import assert_outputs_match
        got = _leaves(back(*args, **kwargs))
        assert all(a.shape[0] == batch for a in got)
        assert_outputs_match(got, _leaves(small(*args, **kwargs)), rtol=1e-6)
        assert amgfx.onnx_parity(onnx_path, back, args, kwargs) < 1e-4


def test_a_corrupt_pt2_is_one_clear_error(saved_vit, tmp_path):
    bad = tmp_path / "model.pt2"
    data = (saved_vit / "model.pt2").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="not a .pt2 archive"):
        amgfx.load(bad)
    with pytest.raises(LoadError, match="not found"):
        amgfx.load(tmp_path / "nothing_here")


def test_a_pickled_payload_is_refused_before_it_is_read(saved_vit, tmp_path):
    # one weight entry now claims a pickle, and its file holds one that would run `touch marker`
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    src = zipfile.ZipFile(saved_vit / "model.pt2")
    (cfg_name,) = [n for n in src.namelist() if n.endswith(".json") and "weights_config" in n]
    cfg = json.loads(src.read(cfg_name))
    fqn = next(iter(cfg["config"]))
    cfg["config"][fqn]["use_pickle"] = True
    target = cfg["config"][fqn]["path_name"]
    with zipfile.ZipFile(tmp_path / "model.pt2", "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == cfg_name:
                body = json.dumps(cfg).encode()
            elif item.filename.endswith("/" + target):
                body = payload
            dst.writestr(item, body)
    with pytest.raises(LoadError, match="never unpickles"):
        amgfx.load(tmp_path / "model.pt2")
    assert not marker.exists()
    try:                                   # the archive is a real threat: torch's own loader runs it
        torch.export.load(tmp_path / "model.pt2")
    except Exception:
        pass
    assert marker.exists()


def test_onnx_into_a_missing_directory_is_refused(saved_vit, tmp_path):
    with pytest.raises(amgfx.AmgfxError, match="does not exist"):
        amgfx.export_onnx(amgfx.load(saved_vit), tmp_path / "no" / "such" / "m.onnx")


@pytest.mark.parametrize("lowering, pads", [("auto", 0), ("pad", 4)])
def test_onnx_leaves_out_the_padding_that_serves_torch_attention(analysed_model, tmp_path, lowering, pads):
    """q/k 32 < v 48: PyTorch gets zero-padded q/k (its flash kernel); onnxruntime gets the real dims."""
    _, (x,), _, cg = analysed_model("vit")
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.5, "v": 0.25}, progress=False)
    plan.options["lowering"] = lowering
    small = amgfx.apply(cg, plan)
    assert sum(n.target is torch.ops.aten.constant_pad_nd.default for n in small.graph.nodes) == 4   # q, k x 2 sites
    path = amgfx.export_onnx(small, tmp_path / "m.onnx")
    assert sum(n.op_type == "Pad" for n in onnx.load(path).graph.node) == pads
    assert amgfx.onnx_parity(path, small, (torch.randn(3, *x.shape[1:]),), {}) < 1e-4
