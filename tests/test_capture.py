import pytest
import torch

import amgfx
import models


def snapshot(m):
    return ({k: v.detach().clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()])


def assert_same(m, snap):
    sd, flags = snap
    now = m.state_dict()
    assert sd.keys() == now.keys()
    assert all(torch.equal(sd[k], now[k]) for k in sd)
    assert [x.training for x in m.modules()] == flags


@pytest.mark.parametrize("name", ["vit", "bert_minilm", "llama_gqa"])
def test_model_bitwise_unchanged(name):
    m, args, kwargs = models.ALL[name]()
    m.train()                                    # capture runs in eval mode, then restores the flags
    snap = snapshot(m)
    gm = amgfx.capture(m, args, kwargs)
    amgfx.analyze(m, args, kwargs)
    assert_same(m, snap)
    assert all(n.op != "call_module" or n.target == "_guards_fn" for n in gm.graph.nodes)


def test_shapes_on_every_node():
    m, args, _ = models.vit()
    gm = amgfx.capture(m, args)
    for n in gm.graph.nodes:
        if n.op in ("call_function", "get_attr", "placeholder"):
            assert "val" in n.meta, n.name


def test_params_are_get_attr_by_fqn():
    m, args, _ = models.vit()
    gm = amgfx.capture(m, args)
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert set(dict(m.named_parameters())) <= targets


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_decoders_capture_without_kv_cache(name):
    m, args, kwargs = models.ALL[name]()
    gm = amgfx.capture(m, args, kwargs)
    out = gm(*args, **kwargs)
    ref = m(*args, **kwargs, use_cache=False)
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.lin(x))


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:                          # data-dependent control flow: not capturable
            return x
        return -x


def test_capture_error_names_the_module():
    with pytest.raises(amgfx.CaptureError) as e:
        amgfx.capture(Branchy(), torch.randn(2, 4))
    msg = str(e.value)
    assert "'gate' (Gate)" in msg and "Try:" in msg
    assert "Traceback" not in msg


def test_capture_rejects_non_modules():
    with pytest.raises(amgfx.CaptureError):
        amgfx.capture(lambda x: x, torch.randn(2))
