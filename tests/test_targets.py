"""A pruned GraphModule runs everywhere a dense one does: inductor, .pt2, ONNX + onnxruntime."""
import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from conftest import analysed

import amgfx

RATIOS = {"qk": 0.5, "v": 0.25, "head": 0.34, "mlp": 0.5}


@pytest.fixture(scope="module", params=["vit", "bert_minilm", "llama_gqa"])
def pruned(request):
    m, args, kwargs, cg = analysed(request.param)
    g = amgfx.apply(cg, amgfx.plan_for(cg, method="magnitude", ratios=RATIOS))
    with torch.no_grad():
        ref = [t for t in pytree.tree_leaves(g(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    return request.param, g, args, kwargs, ref


def _close(got, ref, tol=1e-4):
    from conftest import assert_outputs_match
    assert_outputs_match(list(got), list(ref), rtol=tol)


@pytest.mark.slow
def test_torch_compile_inductor(pruned):
    name, g, args, kwargs, ref = pruned
    torch._dynamo.reset()
    with torch.no_grad():
        got = pytree.tree_leaves(torch.compile(g, backend="inductor", fullgraph=True)(*args, **kwargs))
    _close([t for t in got if isinstance(t, torch.Tensor)], ref)


def test_export_save_load(pruned, tmp_path):
    name, g, args, kwargs, ref = pruned
    torch.export.save(torch.export.export(g, args, kwargs), tmp_path / "m.pt2")
    with torch.no_grad():
        got = pytree.tree_leaves(torch.export.load(tmp_path / "m.pt2").module()(*args, **kwargs))
    _close([t for t in got if isinstance(t, torch.Tensor)], ref)


@pytest.mark.slow
def test_onnx_opset23_onnxruntime(pruned, tmp_path):
    import onnxruntime as ort
    name, g, args, kwargs, ref = pruned
    prog = torch.onnx.export(g, args, tmp_path / "m.onnx", kwargs=kwargs, dynamo=True, opset_version=23,
                             verbose=False)
    assert prog.model.opset_imports[""] == 23
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), flat)}
    _close([np.asarray(o) for o in sess.run(None, feeds)], ref)
