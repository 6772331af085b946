"""Pruned decoders generate: ``amgfx.decoder`` -> ``amgfx.prune`` -> ``amgfx.generate``, token for token
the zeroed dense model's greedy decoding, with a cache smaller by what the plan keeps."""
import zipfile

import pytest
import torch

import amgfx
from amgfx.passes.oracle import zeroed

tf = pytest.importorskip("transformers")

PLAN = {"qk": .25, "v": .25, "head": .5, "mlp": .25}
PROMPTS = [[5, 17, 99, 2], [1, 2, 3, 4, 5, 6, 7]]       # two lengths: one row is left-padded


def _lm(name):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=64)
    return {"llama_gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common)),
            "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common)),
            "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **common)),
            "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                                      num_experts_per_tok=2, **common)),
            "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                                              n_positions=64)),
            }[name]().eval()


def _zeroed(dense, small):
    """The dense decoder with the removed units zeroed in both graphs: what the pruned one must equal."""
    cgs = small.meta["coupling"]
    return amgfx.Decoder(prefill=zeroed(cgs["prefill"], small.plan), decode=zeroed(cgs["decode"], small.plan),
                         batch=dense.batch, prompt_len=dense.prompt_len, max_len=dense.max_len,
                         cache_shapes=dense.cache_shapes, vocab_size=dense.vocab_size)


def _predicted_cache_bytes(dense, small):
    """Per token slot, from the plan alone: every k/v unit that outlives the rewrite keeps its share of the cache."""
    cg = small.meta["coupling"]["prefill"]
    alive = small.plan.survivors(cg)
    per_layer = sum(s[1] * s[3] for s in dense.cache_shapes) // len(dense.cache_shapes)   # one k (or v) tensor
    return 4 * sum(len(alive[g.name]) * per_layer // g.units for g in cg.groups if g.kind in ("qk", "v"))


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "mistral", "gpt2", "mixtral"])
def test_a_pruned_decoder_generates_what_the_zeroed_model_generates(name):
    dense = amgfx.decoder(_lm(name), max_len=48, prompt_len=8, batch=2)
    small = amgfx.prune(dense, method="magnitude", ratios=PLAN, progress=False)
    kinds = {k.split(":")[0] for k in small.plan.keep}
    assert kinds == {"qk", "v", "head", "mlp"}, kinds
    got = amgfx.generate(small, PROMPTS, max_new_tokens=32, eos_token_id=None)
    want = amgfx.generate(_zeroed(dense, small), PROMPTS, max_new_tokens=32, eos_token_id=None)
    assert got == want and all(len(r) == 32 for r in got)
    assert small.cache_bytes_per_token() == _predicted_cache_bytes(dense, small) < dense.cache_bytes_per_token()
    assert [tuple(t.shape) for t in small.empty_cache()] == small.cache_shapes


def test_the_dense_decoder_decodes_as_hf_generate_and_a_padded_row_as_it_would_alone():
    lm = _lm("llama_gqa")
    dense = amgfx.decoder(lm, max_len=48, prompt_len=8, batch=2)
    both = amgfx.generate(dense, PROMPTS, max_new_tokens=12, eos_token_id=None)
    alone = amgfx.generate(dense, [PROMPTS[0]], max_new_tokens=12, eos_token_id=None)
    assert both[0] == alone[0]
    hf = lm.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=12, do_sample=False)
    assert both[1] == hf[0, len(PROMPTS[1]):].tolist()


def test_sampling_is_seeded_and_eos_stops_a_row():
    dense = amgfx.decoder(_lm("llama_gqa"), max_len=48, prompt_len=8)
    a, b, c = (amgfx.generate(dense, PROMPTS, max_new_tokens=16, do_sample=True, top_k=20, seed=s, eos_token_id=None)
               for s in (1, 1, 2))
    assert a == b != c
    greedy = amgfx.generate(dense, PROMPTS, max_new_tokens=16, eos_token_id=None)
    stop = greedy[0][3]
    cut = amgfx.generate(dense, PROMPTS, max_new_tokens=16, eos_token_id=stop)
    assert cut[0] == greedy[0][:greedy[0].index(stop) + 1]
    other = greedy[1][:greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1]
    assert cut[1] == other                          # the other row decodes on until its own EOS


def test_bad_decoder_input_gets_one_clear_error():
    dense = amgfx.decoder(_lm("gpt2"), max_len=16, prompt_len=4)
    with pytest.raises(amgfx.AmgfxError, match="longer than the decoder's prompt_len=4"):
        amgfx.generate(dense, [[1, 2, 3, 4, 5]], max_new_tokens=4)
    with pytest.raises(amgfx.AmgfxError, match="do not fit the cache's max_len=16"):
        amgfx.generate(dense, [[1, 2]], max_new_tokens=20)
    with pytest.raises(amgfx.AmgfxError, match="outside the vocabulary"):
        amgfx.generate(dense, [[1, 999]], max_new_tokens=4)
    bert = tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=64))
    with pytest.raises(amgfx.ModelSpecError, match="not a decoder-only causal LM"):
        amgfx.decoder(bert)


def test_a_saved_decoder_generates_the_same_from_pt2_and_from_onnxruntime(tmp_path):
    dense = amgfx.decoder(_lm("qwen2"), max_len=32, prompt_len=8, batch=2)
    small = amgfx.prune(dense, method="magnitude", ratios=PLAN, progress=False)
    manifest = amgfx.save(small, tmp_path)
    assert manifest["files"] == ["decoder.pt2", "plan.json"] and manifest["cache_shapes"] == small.cache_shapes
    with zipfile.ZipFile(tmp_path / "decoder.pt2") as z:      # both programs read one copy of each weight
        stored = sum(i.file_size for i in z.infolist() if "/weights/weight_" in i.filename)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for g in (small.prefill, small.decode) for t in g.state_dict().values()}
    assert stored == sum(storages.values())
    amgfx.export_onnx(small, tmp_path)
    want = amgfx.generate(small, PROMPTS, max_new_tokens=16, eos_token_id=None)
    back = amgfx.load(tmp_path)
    assert isinstance(back, amgfx.Decoder) and back.plan.keep == small.plan.keep
    assert amgfx.generate(back, PROMPTS, max_new_tokens=16, eos_token_id=None) == want
    assert amgfx.generate(amgfx.load(tmp_path, runtime="ort"), PROMPTS, max_new_tokens=16, eos_token_id=None) == want


def _byte_lm():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()


def test_amgfx_generate_prunes_saves_and_decodes_again_from_the_saved_directory(tmp_path, capsys, monkeypatch):
    from amgfx.cli import main
    from amgfx.decode import lm
    monkeypatch.setattr(lm, "bench_lm", lambda progress=True: _byte_lm())     # the trained LM, minus minutes
    out = tmp_path / "lm"
    assert main(["generate", "amgfx-lm", "--prompt", "Return the", "--max-new-tokens", "8", "--prompt-len", "16",
                 "--ratios", "qk=0.25,v=0.25,mlp=0.5", "--calib-samples", "4", "--out", str(out), "--json"]) == 0
    first = __import__("json").loads(capsys.readouterr().out)
    assert first["pruned"]["cache_bytes_per_token"] < first["dense"]["cache_bytes_per_token"]
    assert len(first["pruned"]["tokens"][0]) == 8
    assert main(["generate", str(out), "--prompt", "Return the", "--max-new-tokens", "8", "--json"]) == 0
    again = __import__("json").loads(capsys.readouterr().out)
    assert again["saved"]["tokens"] == first["pruned"]["tokens"]
    assert main(["generate", str(out), "--prompt", "Return the", "--max-new-tokens", "4", "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("   saved: ")


@pytest.mark.parametrize("argv, says", [
    (["--prompt", "x" * 40, "--max-new-tokens", "4"], "longer than the decoder's prompt_len=16"),
    (["--prompt", "hi", "--max-new-tokens", "40"], "do not fit the cache's max_len"),
])
def test_amgfx_generate_says_in_one_line_what_is_wrong_with_the_input(tmp_path, capsys, argv, says):
    from amgfx.cli import main
    dense = amgfx.decoder(_byte_lm(), max_len=24, prompt_len=16)
    small = amgfx.prune(dense, method="magnitude", ratios={"mlp": .5}, progress=False)
    amgfx.save(small, tmp_path)
    assert main(["generate", str(tmp_path), *argv]) == 2
    msg = capsys.readouterr().err.strip()
    assert says in msg and len(msg.splitlines()) == 1, msg


def test_amgfx_generate_refuses_a_model_that_is_not_a_decoder_in_one_line(tmp_path, capsys):
    from amgfx.cli import main
    tf.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  vocab_size=64).save_pretrained(tmp_path / "bert")
    assert main(["generate", "vit_tiny_patch16_224", "--prompt", "hi"]) == 2
    assert "is not amgfx-lm" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "bert"), "--prompt", "hi"]) == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and ("not a decoder-only causal LM" in msg or "not a causal LM" in msg), msg


def test_a_decoder_calibrated_on_token_windows_is_refit_and_both_graphs_read_the_refit_weights():
    dense = amgfx.decoder(_lm("llama_gqa"), max_len=24, prompt_len=8, batch=2)
    calib = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    small = amgfx.prune(dense, method="snp", ratios=PLAN, calib=calib, progress=False)
    fits = small.prefill.meta["amgfx_reconstruction"]["layers"]
    assert fits and all(f["after"] <= f["before"] for f in fits)
    for f in fits:                                  # the decode step runs on the same refit tensors
        assert small.decode.get_parameter(f["weight"]).data_ptr() == small.prefill.get_parameter(f["weight"]).data_ptr()
    assert len(amgfx.generate(small, PROMPTS, max_new_tokens=8, eos_token_id=None)[1]) == 8


@pytest.mark.slow
def test_amgfx_generate_trains_the_benchmark_lm_on_first_use_and_prunes_it(tmp_path, monkeypatch):
    """From a fresh clone: amgfx-lm is trained (minutes) into an empty cache, then pruned and decoded."""
    import subprocess
    import sys
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "amgfx", "generate", "amgfx-lm", "--prompt", "Return the",
                          "--target-flops", "0.7", "--out", str(tmp_path / "lm70"), "--json"],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    out = __import__("json").loads(run.stdout)
    assert len(out["pruned"]["tokens"][0]) == 32 and (tmp_path / "lm70" / "decoder.pt2").is_file()


def test_index_work_of_a_pruned_decode_graph_runs_once_not_once_per_layer():
    """Heads that keep different q/k dims need RoPE's cos/sin gathered per head; that happens once for all
    layers (one gather per table), and the pruned decode graph has no more nodes than the dense one."""
    from amgfx.decode.capture import capture_decoder
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    dense = amgfx.decoder(tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval(), max_len=24, prompt_len=8)
    small = amgfx.prune(dense, method="magnitude", ratios={"qk": .25, "mlp": .25}, progress=False)
    captured = capture_decoder(dense).graphs[1].gm
    calls = lambda gm, op=None: sum(n.op == "call_function" and (op is None or n.target is op) for n in gm.graph.nodes)
    gather = torch.ops.aten.gather.default
    assert calls(small.decode, gather) == 2 < cfg["num_hidden_layers"]          # cos and sin, for every layer
    assert calls(small.decode) <= calls(captured)
    got = amgfx.generate(small, PROMPTS, max_new_tokens=8, eos_token_id=None)
    assert got == amgfx.generate(_zeroed(dense, small), PROMPTS, max_new_tokens=8, eos_token_id=None)


class _CountingBinding:
    """An onnxruntime IO binding that counts the tensors bound through it."""

    def __init__(self, io):
        self.io, self.bound = io, 0

    def bind_input(self, *a):
        self.bound += 1
        return self.io.bind_input(*a)

    def bind_output(self, *a):
        self.bound += 1
        return self.io.bind_output(*a)

    def __getattr__(self, name):
        return getattr(self.io, name)


def test_generate_writes_its_cache_in_place_and_a_plain_call_never_writes_its_inputs(tmp_path):
    """Each decode step writes its new slot into the cache it is given (eager: ``index_copy_``; onnxruntime:
    one ScatterElements per write, its output bound to its input's buffer), and per token only the
    token's own inputs and the logits are bound again, however many layers: nothing grows with the model."""
    import onnx
    from amgfx.decode.generate import runners
    dense = amgfx.decoder(_lm("llama_gqa"), max_len=32, prompt_len=8, batch=2)
    small = amgfx.prune(dense, method="magnitude", ratios=PLAN, progress=False)
    amgfx.save(small, tmp_path)
    amgfx.export_onnx(small, tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "decode.onnx")).graph.node]
    layers = len(small.cache_shapes) // 2
    assert ops.count("ScatterElements") == 2 * layers and "ScatterND" not in ops
    ort = amgfx.load(tmp_path, runtime="ort")
    cache = [torch.randn(s) for s in small.cache_shapes]
    args = small.decode_inputs(torch.tensor([3, 4]), torch.tensor([8, 8]), 8, torch.ones(2, 32, dtype=torch.long), cache)
    before = [t.clone() for t in args]
    want = small.decode(*args)
    for plain in (small.decode, ort.decode):
        got = plain(*args)
        assert all(torch.equal(a, b) for a, b in zip(args, before))
        assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-5
    for run in (runners(small)[1], runners(ort)[1]):
        args = small.decode_inputs(torch.tensor([3, 4]), torch.tensor([8, 8]), 8, torch.ones(2, 32, dtype=torch.long),
                                   [t.clone() for t in cache])
        got = run(*args)
        assert all(g is a for g, a in zip(got[1:], args[4:]))                 # the given buffers, written
        assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-5
    ort.decode.io = counting = _CountingBinding(ort.decode.io)
    ort.decode.bound.clear()
    want = amgfx.generate(small, PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert amgfx.generate(ort, PROMPTS, max_new_tokens=6, eos_token_id=None) == want
    first = 4 + 2 * 2 * layers + 1           # the step's 4 inputs, each layer's k and v in and out, the logits
    per_token = 3 + 1                        # token, position and slot (the key mask is one tensor), the logits
    assert counting.bound == first + (6 - 2) * per_token      # 6 new tokens: the prefill's, then 5 decode steps
