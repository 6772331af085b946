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


class LinearNorm(torch.nn.Module):
    """LeViT's layer: a linear without bias, then a batch norm over the flattened tokens."""

    def __init__(self, i, o):
        super().__init__()
        self.linear, self.bn = torch.nn.Linear(i, o, bias=False), torch.nn.BatchNorm1d(o)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.bn.weight.data.normal_()
        self.bn.bias.data.normal_()

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class NormedMLPs(torch.nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, d, 4, 4)
        self.cbn = torch.nn.BatchNorm2d(d)
        self.cbn.running_var.uniform_(0.5, 2.0)
        self.fc1, self.fc2 = LinearNorm(d, h), LinearNorm(h, d)

    def forward(self, x):
        x = self.cbn(self.conv(x)).flatten(2).transpose(1, 2)
        return x + self.fc2(torch.nn.functional.hardswish(self.fc1(x)))


def test_eval_batch_norms_fold_into_their_layers_and_the_user_model_is_untouched():
    m = NormedMLPs().eval()
    x = torch.randn(2, 3, 16, 16)
    snap = snapshot(m)
    gm = amgfx.capture(m, x)
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
    assert not any(".bn." in k or k.startswith("cbn.") for k in gm.state_dict())
    torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
    assert_same(m, snap)
    cg = amgfx.analyze(m, x)
    (mlp,) = cg.mlps
    assert mlp.hidden == 32 and mlp.exact
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"mlp": 0.25}, progress=False)
    small = amgfx.apply(cg, plan)
    rep = amgfx.verify(cg, plan, pruned=small)
    assert rep.passed and rep.max_rel <= 1e-5
    assert small.get_submodule("fc1.linear").weight.shape[0] == 24
    assert_same(m, snap)
