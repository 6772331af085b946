"""Discovered structure vs. each model's own configuration (never constants typed here)."""
import pytest
import torch


def supported(cg):
    return [s for s in cg.sites if s.supported]


@pytest.mark.parametrize("name", ["vit", "vit_matmul", "deit_distilled"])
def test_timm_vit_family(analysed_model, name):
    m, _, _, cg = analysed_model(name)
    sites = supported(cg)
    assert [s.name for s in sites] == [f"blocks.{i}.attn" for i in range(len(m.blocks))]
    for s, blk in zip(sites, m.blocks):
        assert s.kind == ("matmul" if name == "vit_matmul" else "sdpa")
        assert (s.num_heads, s.num_kv_heads) == (blk.attn.num_heads, blk.attn.num_heads)
        assert s.head_dim_qk == s.head_dim_v == blk.attn.head_dim
        assert s.scale == pytest.approx(blk.attn.scale)
        assert s.rope is None and not s.disabled
        assert s.proj.weight == f"{s.name}.proj.weight"
    assert [mm.hidden for mm in cg.mlps] == [b.mlp.fc1.out_features for b in m.blocks]
    assert not any(mm.gated for mm in cg.mlps)
    (stream,) = cg.residual
    assert stream.width == m.embed_dim and stream.prunable
    members = {p for p, _ in stream.members}
    tokens = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"}
    if name == "deit_distilled":
        tokens |= {"dist_token", "head_dist.weight"}
    assert tokens <= members


def test_eva02_rope_and_swiglu(analysed_model):
    m, _, _, cg = analysed_model("eva02")
    sites = supported(cg)
    assert len(sites) == len(m.blocks)
    for s, blk in zip(sites, m.blocks):
        assert s.num_heads == blk.attn.num_heads and s.head_dim_qk == blk.attn.head_dim
        assert s.rope in ("interleaved", "rotate_half")
        # RoPE couples dims in pairs: every qk unit holds two q rows and two k rows
        assert s.qk_q.shape == (s.num_kv_heads, s.head_dim_qk // 2, 2)
        assert s.qk_k.shape == (s.num_kv_heads, s.head_dim_qk // 2, 2)
    for mm, blk in zip(cg.mlps, m.blocks):
        assert mm.gated and "silu" in mm.activation
        assert mm.hidden == blk.mlp.fc2.in_features
    # EVA's qkv bias is cat(q_bias, k_bias buffer, v_bias): each piece is sliced on its own
    qk = cg.group(f"qk:{sites[0].name}")
    assert {mb.param for mb in qk.members} >= {f"{sites[0].name}.q_bias", f"{sites[0].name}.k_bias"}


def test_eva02_rope_pairs_match_the_rotation(analysed_model):
    """The pairing found in the graph is the one the RoPE rotation applies, checked numerically: nudge
    one q projection row and see which columns of the attention's q operand move."""
    m, args, _, cg = analysed_model("eva02")
    s = supported(cg)[0]
    d = s.head_dim_qk

    def q_operand(row):
        got = {}

        class Nudge(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name == s.q.node and row is not None:
                    out = out.clone()
                    out[..., row] += 1.0
                if n.name == s.operands[0]:
                    got["q"] = out
                return out
        with torch.no_grad():
            Nudge(cg.gm).run(*args)
        return got["q"]
    base = q_operand(None)
    for unit in s.qk_q[0][:6]:
        a, b = sorted(int(r) for r in unit)
        moved = (q_operand(a) - base).abs().amax(dim=(0, 2))          # [heads, d]
        cols = {int(c) for c in torch.nonzero(moved[0] > 1e-6).flatten()}
        assert cols == {a % d, b % d}, (a, b, cols)                     # the row and its rotation partner
        assert (b - a) == (1 if s.rope == "interleaved" else d // 2)


def test_swin_explicit_attention_with_relative_bias(analysed_model):
    m, _, _, cg = analysed_model("swin")
    sites = supported(cg)
    blocks = [b for layer in m.layers for b in layer.blocks]
    assert len(sites) == len(blocks)
    for s, blk in zip(sites, blocks):
        assert s.kind == "matmul"
        assert s.num_heads == blk.attn.num_heads
        assert s.head_dim_qk == s.head_dim_v == blk.attn.qkv.out_features // 3 // blk.attn.num_heads
        assert s.scale == pytest.approx(blk.attn.scale)
        table = blk.attn.relative_position_bias_table
        assert [tuple(p) for p in s.per_head] == [(f"{s.name}.relative_position_bias_table", 1)]
        assert table.shape[1] == s.num_heads
    assert [mm.hidden for mm in cg.mlps] == [b.mlp.fc1.out_features for b in blocks]
    assert [r.width for r in cg.residual] == [layer.blocks[0].norm1.normalized_shape[0] for layer in m.layers]
    # patch merging folds 2x2 neighbours into the channel dim: those streams are reported, not pruned
    assert not cg.residual[0].prunable and "merged" in cg.residual[0].reason
    assert cg.residual[-1].prunable


def test_cait_talking_heads_reported_and_class_attention_found(analysed_model):
    m, _, _, cg = analysed_model("cait")
    bad = [s for s in cg.sites if not s.supported]
    assert len(bad) == len(m.blocks) and all("talking heads" in s.reason for s in bad)
    good = supported(cg)
    assert [s.name for s in good] == [f"blocks_token_only.{i}.attn" for i in range(len(m.blocks_token_only))]
    for s, blk in zip(good, m.blocks_token_only):
        assert s.num_heads == blk.attn.num_heads
    assert not any(g.where.startswith("blocks.") and g.kind in ("qk", "v", "head") for g in cg.groups)


def test_xcit_cross_covariance_reported_and_class_attention_found(analysed_model):
    m, _, _, cg = analysed_model("xcit")
    bad = [s for s in cg.sites if not s.supported]
    assert len(bad) == len(m.blocks) and all("cross-covariance" in s.reason for s in bad)
    good = supported(cg)
    assert len(good) == len(m.cls_attn_blocks)
    for s, blk in zip(good, m.cls_attn_blocks):
        assert s.num_heads == blk.attn.num_heads


def test_bert_minilm(analysed_model):
    m, _, _, cg = analysed_model("bert_minilm")
    c = m.config
    sites = supported(cg)
    assert len(sites) == c.num_hidden_layers
    for s in sites:
        assert (s.num_heads, s.num_kv_heads) == (c.num_attention_heads, c.num_attention_heads)
        assert s.head_dim_qk == s.head_dim_v == c.hidden_size // c.num_attention_heads
        assert s.scale_explicit and s.scale == pytest.approx((c.hidden_size // c.num_attention_heads) ** -0.5)
        assert s.per_head == []      # the padding mask is the same for every head
    assert [mm.hidden for mm in cg.mlps] == [c.intermediate_size] * c.num_hidden_layers
    (stream,) = cg.residual
    assert stream.width == c.hidden_size
    assert ("embeddings.word_embeddings.weight", 1) in stream.members


def test_gpt2_conv1d(analysed_model):
    m, _, _, cg = analysed_model("gpt2")
    c = m.config
    sites = supported(cg)
    assert len(sites) == c.n_layer
    for s in sites:
        assert s.num_heads == c.n_head and s.head_dim_qk == c.n_embd // c.n_head
        assert s.q.weight == s.k.weight == s.v.weight == f"{s.name}.c_attn.weight"
        assert s.q.out_dim == 1      # Conv1D stores W as [in, out]
    assert [mm.hidden for mm in cg.mlps] == [c.n_inner or 4 * c.n_embd] * c.n_layer
    assert [r.width for r in cg.residual] == [c.n_embd]


def test_llama_gqa_rope_swiglu(analysed_model):
    m, _, _, cg = analysed_model("llama_gqa")
    c = m.config
    sites = supported(cg)
    assert len(sites) == c.num_hidden_layers
    for s in sites:
        assert s.num_heads == c.num_attention_heads
        assert s.num_kv_heads == c.num_key_value_heads < c.num_attention_heads
        assert s.head_dim_qk == c.hidden_size // c.num_attention_heads
        assert s.rope == "rotate_half"
        rep = c.num_attention_heads // c.num_key_value_heads
        # a qk unit: the RoPE pair, in every query head of the kv group, and the shared key pair
        assert s.qk_q.shape == (c.num_key_value_heads, s.head_dim_qk // 2, 2 * rep)
        assert s.qk_k.shape == (c.num_key_value_heads, s.head_dim_qk // 2, 2)
        assert s.v_o.shape == (c.num_key_value_heads, s.head_dim_v, rep)
    for mm in cg.mlps:
        assert mm.gated and mm.hidden == c.intermediate_size and len(mm.fc1) == 2
    assert [r.width for r in cg.residual] == [c.hidden_size]


def test_hf_vit(analysed_model):
    m, _, _, cg = analysed_model("hf_vit")
    c = m.config
    sites = supported(cg)
    assert len(sites) == c.num_hidden_layers
    assert all(s.num_heads == c.num_attention_heads and s.head_dim_qk == c.hidden_size // c.num_attention_heads
               for s in sites)
    assert [mm.hidden for mm in cg.mlps] == [c.intermediate_size] * c.num_hidden_layers
    assert [r.width for r in cg.residual] == [c.hidden_size]


def test_no_module_names_needed():
    """A transformer whose classes and attributes mean nothing (``Z``, ``a``, ``b``...) is found as
    well as one written with the usual names: detection reads the graph, not the names."""
    import torch.nn as nn
    import torch.nn.functional as F

    import amgfx

    class Z(nn.Module):
        def __init__(self, c=48, h=4):
            super().__init__()
            self.h = h
            self.a, self.b, self.c, self.d = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c), nn.LayerNorm(c)
            self.e, self.f = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

        def forward(self, x):
            B, N, C = x.shape
            t = self.b(self.a(x)).view(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(t[0], t[1], t[2]).transpose(1, 2).reshape(B, N, C)
            x = x + self.c(y)
            return x + self.f(F.silu(self.e(self.d(x))))

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q, self.r = nn.Linear(10, 48), nn.Sequential(Z(), Z()), nn.Linear(48, 3)

        def forward(self, x):
            return self.r(self.q(self.p(x)).mean(1))

    cg = amgfx.analyze(Q().eval(), torch.randn(1, 7, 10))
    assert [(s.num_heads, s.head_dim_qk, s.head_dim_v, s.q.weight) for s in cg.sites] == \
        [(4, 12, 12, "q.0.b.weight"), (4, 12, 12, "q.1.b.weight")]
    assert [(m.hidden, m.fc2.weight) for m in cg.mlps] == [(96, "q.0.f.weight"), (96, "q.1.f.weight")]
    (r,) = cg.residual
    assert r.prunable and r.width == 48 and ("p.weight", 0) in r.members and ("r.weight", 1) in r.members


class ConvMLP(torch.nn.Module):
    """An MLP of convs over NCHW maps: 1x1 fc1, a depthwise 3x3 mixing positions, GELU, 1x1 fc2."""

    def __init__(self, c=8, h=24):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 2, 2)
        self.fc1, self.fc2 = torch.nn.Conv2d(c, h, 1), torch.nn.Conv2d(h, c, 1)
        self.dw = torch.nn.Conv2d(h, h, 3, padding=1, groups=h)
        self.head = torch.nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.fc2(torch.nn.functional.gelu(self.dw(self.fc1(x))))
        return self.head(x.mean((2, 3)))


def test_an_mlp_of_convs_with_a_depthwise_conv_inside_prunes_exactly():
    import amgfx
    m, x = ConvMLP().eval(), torch.randn(2, 3, 16, 16)
    cg = amgfx.analyze(m, x)
    (mlp,) = cg.mlps
    assert mlp.hidden == 24 and mlp.fc1[0].weight == "fc1.weight" and mlp.fc2.weight == "fc2.weight"
    assert {f for f, _, _ in mlp.fc1[0].channelwise} == {"dw.weight", "dw.bias"}
    keep = [0, 2, 3, 5, 7, 11, 12, 13, 17, 19, 20, 23]
    plan = amgfx.Plan(keep={f"mlp:{mlp.name}": keep})
    small = amgfx.apply(cg, plan)
    assert small.get_submodule("dw").weight.shape == (12, 1, 3, 3)
    # the same neurons zeroed by hand in the nn.Module: fc1 rows (and bias), dw channels, fc2 columns
    ref = ConvMLP().eval()
    ref.load_state_dict(m.state_dict())
    drop = [c for c in range(24) if c not in keep]
    with torch.no_grad():
        ref.fc1.weight[drop] = 0
        ref.fc1.bias[drop] = 0
        ref.dw.bias[drop] = 0
        ref.fc2.weight[:, drop] = 0
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-6)


class PooledQueries(torch.nn.Module):
    """Hiera's query pooling: q is max-pooled over a stride of positions before attention."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        q = q.view(B, self.h, 2, N // 2, C // self.h).amax(dim=2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, N // 2, C))


def test_pooled_queries_are_still_the_projections_rows():
    import amgfx
    m, x = PooledQueries().eval(), torch.randn(1, 8, 32)
    cg = amgfx.analyze(m, x)
    (s,) = cg.sites
    assert s.supported and s.q.weight == "qkv.weight" and not s.disabled
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.25, "v": 0.25, "head": 0.25}, progress=False)
    assert {k.split(":")[0] for k in plan.keep} == {"qk", "v", "head"}
    rep = amgfx.verify(cg, plan, pruned=amgfx.apply(cg, plan))
    assert rep.passed and rep.max_rel <= 1e-5, rep.status


class DepthwiseQ(torch.nn.Module):
    """EfficientViT-MSRA's layout: q/k/v from one 1x1 conv over an NCHW map, q mixed over positions by a
    depthwise conv, logits q^T k, output v @ attn^T, a 1x1-conv projection."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.h = heads
        self.qkv, self.proj = torch.nn.Conv2d(c, 3 * c, 1), torch.nn.Conv2d(c, c, 1)
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).split(C, dim=1)
        q, k, v = (t.reshape(B, self.h, C // self.h, H * W) for t in (self.dw(q), k, v))
        attn = (q.transpose(-2, -1) @ k * 0.3).softmax(-1)
        return x + self.proj((v @ attn.transpose(-2, -1)).reshape(B, C, H, W))


def test_a_depthwise_conv_on_q_prunes_with_the_q_rows():
    import amgfx
    m, x = DepthwiseQ().eval(), torch.randn(2, 16, 4, 4)
    cg = amgfx.analyze(m, x)
    (s,) = cg.sites
    assert s.supported and not s.disabled.keys() - {"tokens"}, s.disabled
    for kind in ("qk", "head"):
        roles = {(mb.param, mb.role) for mb in cg.group(f"{kind}:{s.name}").members}
        assert {("dw.weight", "q"), ("dw.bias", "q")} <= roles
    plan = amgfx.plan_for(cg, method="magnitude", ratios={"qk": 0.25, "v": 0.25}, progress=False)
    small = amgfx.apply(cg, plan)
    assert small.get_submodule("dw").weight.shape[0] == 12
    rep = amgfx.verify(cg, plan, pruned=small)
    assert rep.passed and rep.max_rel <= 1e-5, rep.status
