"""Every softmax accounted for (issue 46): each attention-like op is in a supported site, a refused site with
its reason, or listed as not attention with its rule; anything else is warned about (raised when strict)."""
import pytest
import torch

import amgfx
from amgfx.errors import AnalysisError


@torch.library.custom_op("amgfx_test::sharp_softmax", mutates_args=())
def sharp_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(2.0 * x, dim=-1)


@sharp_softmax.register_fake
def _(x):
    return torch.empty_like(x)


class Attn(torch.nn.Module):
    """One attention layer whose softmax is ``kind``: the ATen op, a custom op, or exp/sum written out."""

    def __init__(self, kind: str, dim: int = 16, heads: int = 2):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * 0.5
        if self.kind == "custom":
            a = sharp_softmax(logits)
        elif self.kind == "written":
            e = (logits - logits.amax(-1, keepdim=True)).exp()
            a = e / e.sum(-1, keepdim=True)
        else:
            a = logits.softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


X = torch.randn(1, 5, 16)


def test_the_aten_softmax_is_a_supported_site_and_the_counts_close():
    cg = amgfx.analyze(Attn("aten").eval(), (X,), probe=False)
    assert cg.structure.accounting.counts() == {"supported": 1, "refused": 0, "not attention": 0, "unaccounted": 0}
    assert "softmax/attention ops: 1 = 1 in supported sites" in cg.summary()


@pytest.mark.parametrize("kind", ["custom", "written"])
def test_a_novel_softmax_op_is_warned_about_listed_and_raised_when_strict(kind):
    m = Attn(kind).eval()
    with pytest.warns(UserWarning, match="attention-like op"):
        cg = amgfx.analyze(m, (X,), probe=False)
    acc = cg.structure.accounting
    assert acc.counts()["unaccounted"] == 1 and not cg.sites
    assert "UNACCOUNTED" in cg.summary() and acc.unaccounted[0].node in cg.summary()
    assert cg.to_dict()["accounting"]["unaccounted"] == 1
    with pytest.raises(AnalysisError, match="register_adapter"):
        amgfx.analyze(m, (X,), probe=False, strict=True)


def test_log_softmax_is_not_attention_by_its_rule():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return torch.log_softmax(self.fc(x), -1)

    cg = amgfx.analyze(Head().eval(), (X,), probe=False, strict=True)
    assert [k.rule for k in cg.structure.skipped] == ["log-probabilities"]
    assert cg.structure.accounting.counts()["not attention"] == 1


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name, size, form", [
    ("convit_tiny", 32, "gated or renormalised"),        # gated positional self-attention
    ("coat_tiny", 64, "factorised"),                      # softmax over k's tokens, then k^T.v
    ("volo_d1_224", 64, "outlook"),                       # weights made by a linear, over a local window
])
def test_attention_without_a_plain_qk_form_is_refused_with_the_identity_not_called_not_attention(name, size, form):
    m = timm.create_model(name, pretrained=False, img_size=size).eval()
    cg = amgfx.analyze(m, torch.randn(1, 3, size, size), probe=False, strict=True)
    acc = cg.structure.accounting
    softmaxes = [n for n in cg.gm.graph.nodes if n.op == "call_function"
                 and ("softmax" in str(n.target) or "attention" in str(n.target))]
    assert len(softmaxes) == sum(acc.counts().values()) and acc.counts()["unaccounted"] == 0
    assert acc.counts()["not attention"] == 0, cg.structure.skipped
    reasons = [s.reason for s in cg.sites if not s.supported]
    assert any(form in r for r in reasons), reasons
