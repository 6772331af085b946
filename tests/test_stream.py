"""Models bigger than memory: what runs on the meta device (shapes only) and, block by block, with weights read
lazily. A tiny LLaMA (GQA, RoPE) stands in for the 1B-8B models the path is for."""
import numpy as np
import pytest
import torch

import amgfx
from amgfx.planning.budget import allocate

tf = pytest.importorskip("transformers")


def _llama(device="cpu"):
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    with torch.device(device):
        return tf.LlamaModel(cfg).eval()


def test_a_plan_and_its_rewrite_come_out_of_a_model_on_the_meta_device_as_they_do_from_real_weights():
    ids = torch.randint(0, 100, (1, 16))
    real, meta = (amgfx.analyze(_llama(d), (), {"input_ids": ids}) for d in ("cpu", "meta"))
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.units) for g in real.groups if g.kind in ("qk", "v", "head", "mlp")}
    p_real, p_meta = allocate(real, scores, 0.5), allocate(meta, scores, 0.5)
    assert p_meta.keep == p_real.keep and p_meta.meta["flops"] == p_real.meta["flops"]
    small_real, small_meta = amgfx.apply(real.gm, p_real), amgfx.apply(meta.gm, p_meta, check=False)
    shapes = lambda gm: {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    assert shapes(small_meta) == shapes(small_real)
    assert all(t.device.type == "meta" for t in small_meta.parameters())
    with pytest.raises(amgfx.RewriteError, match="meta device"):
        amgfx.apply(meta.gm, p_meta)             # the oracle needs real weights, and says so


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "llama"])
def test_the_graph_cut_where_only_the_residual_stream_is_live_runs_segment_by_segment_to_the_same_output(name):
    import timm
    from amgfx.graph.segments import run_segments, segments
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 50, (1, 8))}
    model, args, kwargs, layers = {
        "vit": lambda: (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3),
                        (torch.randn(1, 3, 32, 32),), {}, 3),
        "bert": lambda: (tf.BertModel(tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, vocab_size=50)), (), ids, 2),
        "gpt2": lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                          bos_token_id=0, eos_token_id=0)), (), ids, 2),
        "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50, tie_word_embeddings=True)), (), ids, 2)}[name]()
    gm = amgfx.capture(model.eval(), args, kwargs)
    segs = segments(gm)
    # at least an attention and an MLP segment per layer: no segment holds two layers' weights
    assert len(segs) >= 2 * layers
    got = [t for t in torch.utils._pytree.tree_leaves(run_segments(gm, segs, args, kwargs)) if torch.is_tensor(t)]
    want = [t for t in torch.utils._pytree.tree_leaves(gm(*args, **kwargs)) if torch.is_tensor(t)]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA directory as a user brings one: bf16 safetensors, GQA, tied embeddings."""
    d = tmp_path_factory.mktemp("llama")
    cfg = tf.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=60, architectures=["LlamaForCausalLM"],
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("method", [pytest.param("magnitude", marks=pytest.mark.slow), "snp"])   # the suite's budget
def test_a_streamed_prune_gives_the_whole_model_path_s_plan_and_refitted_weights(llama_dir, method):
    from amgfx.stream import _source, assemble, prune_streamed
    model = tf.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    calib = [torch.randint(0, 60, (2, 16)) for _ in range(6)]
    cfg = amgfx.PlanConfig(method=method, target_flops=0.6, scope="blocks")
    streamed = prune_streamed(llama_dir, cfg, calib=calib, max_new_tokens=8, progress=False)
    whole = amgfx.prune(amgfx.decoder(model, max_len=24, prompt_len=16), config=cfg, calib=calib, reconstruct=True,
                        progress=False)
    assert streamed.plan.keep == whole.plan.keep and streamed.plan.keep
    assert all(s.verified for s in streamed.segments if s.groups) and sum(s.refit_layers for s in streamed.segments)
    for fqn, w in whole.prefill.named_parameters():
        got = streamed.weights[fqn]
        assert got.dtype == torch.bfloat16                      # written back as stored
        assert torch.allclose(got.float(), w.to(torch.bfloat16).float(), rtol=0, atol=1e-5), fqn
        w.data = w.data.to(torch.bfloat16).float()              # the whole path's weights as they would be stored
    # the streamed weights assembled into the whole pruned decoder compute what the whole path's does
    cap, _, _, buffers = _source(llama_dir, calib, None, 8)
    small = assemble(cap, streamed.plan, streamed.weights, buffers)
    x = small.prefill_inputs(calib[0][:1])
    with torch.no_grad():
        got, want = small.prefill(*x)[0], whole.prefill(*x)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert small.cache_shapes == whole.cache_shapes


def test_amgfx_prune_stream_writes_a_decoder_that_generate_runs_and_says_how_each_block_went(tmp_path, capsys):
    import json
    import os
    from amgfx import data
    from amgfx.cli import main
    d = tmp_path / "lm"
    fast = data.byte_bpe(str(d), 300)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    m = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():                 # one massive MLP neuron (about 900x its layer's others): pinned
        m.model.layers[0].mlp.up_proj.weight[5] *= 30
        m.model.layers[0].mlp.down_proj.weight[:, 5] *= 30
    m.to(torch.bfloat16).save_pretrained(d)
    out = tmp_path / "lm50"
    code = main(["prune", str(d), "--stream", "--target-flops", "0.5", "--calib", "text", "--calib-samples", "8",
                 "--seq-len", "16", "--batch-size", "2", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["streamed"] and report["verified"]
    b = report["flops"]["blocks"]
    assert b["planned"] <= 0.5 * b["dense"] and report["perplexity"]["pruned"] > 1
    assert sum(1 for s in report["segments"] if s["groups"]) == 4     # attention and MLP of each layer
    assert report["pinned"].startswith("massive neurons: 1 MLP neuron(s) in 1 layer(s)")
    assert json.loads((out / "plan.json").read_text())["meta"]["pinned"] == {"mlp:lm.model.layers.0.mlp": [5]}
    assert {"decoder.pt2", "plan.json", "manifest.json", "report.json", "tokenizer.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out / "stream") if f.endswith(".safetensors")]   # decoder.pt2 holds them
    assert main(["generate", str(out), "--prompt", "Return the", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["saved"]["tokens"][0]) == 4


@pytest.mark.slow       # three streamed prunes, about 20 s
def test_an_interrupted_streamed_prune_resumes_from_the_block_it_stopped_at(llama_dir, tmp_path, monkeypatch):
    import amgfx.stream as stream
    from safetensors.torch import load_file
    torch.manual_seed(2)
    calib = [torch.randint(0, 60, (2, 16)) for _ in range(4)]
    cfg = amgfx.PlanConfig(method="snp", target_flops=0.6, scope="blocks")
    whole = stream.prune_streamed(llama_dir, cfg, calib=calib, out=str(tmp_path / "a"), progress=False)
    real, calls = stream._advance, []

    def stop_in_pass_2(sg, s, states, last):
        calls.append(s.index)
        if len(calls) == 2 * whole.segments[-1].index:          # in the middle of pass 2
            raise KeyboardInterrupt
        return real(sg, s, states, last)
    monkeypatch.setattr(stream, "_advance", stop_in_pass_2)
    with pytest.raises(KeyboardInterrupt):
        stream.prune_streamed(llama_dir, cfg, calib=calib, out=str(tmp_path / "b"), progress=False)
    monkeypatch.setattr(stream, "_advance", real)
    assert not (tmp_path / "b" / "stream.json").exists()                 # nothing says it finished
    stopped_at = calls[-1]
    redone, extract = [], stream.extract
    monkeypatch.setattr(stream, "extract", lambda gm, s, attrs: redone.append(s.index) or extract(gm, s, attrs))
    resumed = stream.prune_streamed(llama_dir, cfg, calib=calib, out=str(tmp_path / "b"), resume=True, progress=False)
    assert redone and min(redone) == stopped_at          # neither pass 1 nor the blocks done before are run again
    assert resumed.plan.keep == whole.plan.keep
    for s in whole.segments:
        a, b = (load_file(str(tmp_path / d / f"segment-{s.index:04d}.safetensors")) for d in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(amgfx.AmgfxError, match="another model, data or settings"):
        stream._Checkpoint(str(tmp_path / "c"), "k1").save({"phase": "prune", "next": 1})
        stream._Checkpoint(str(tmp_path / "c"), "k2").load(resume=True)


def test_an_encoder_directory_streams_to_the_whole_model_path_s_plan_and_weights(tmp_path):
    from amgfx.stream import prune_streamed
    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=80, architectures=["BertModel"])
    tf.BertModel(cfg).eval().save_pretrained(tmp_path)
    model = tf.AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    calib = [{"input_ids": torch.randint(0, 80, (2, 12)), "attention_mask": mask} for _ in range(4)]
    plan_cfg = amgfx.PlanConfig(method="snp", target_flops=0.6)
    streamed = prune_streamed(str(tmp_path), plan_cfg, calib=calib, progress=False)
    whole = amgfx.prune(model, (), calib[0], config=plan_cfg, calib=calib, reconstruct=True, progress=False)
    assert streamed.plan.keep == whole.meta["amgfx_plan"].keep and streamed.plan.keep
    for fqn, w in whole.named_parameters():
        assert torch.allclose(streamed.weights[fqn], w, rtol=0, atol=1e-5), fqn
    small = streamed.model()
    with torch.no_grad():
        got, want = small(**calib[0]), whole(**calib[0])
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)


def test_a_stored_dtype_weight_read_by_a_wide_linear_is_cast_block_by_block_to_the_same_output(monkeypatch):
    from amgfx.graph import fx as gfx
    from amgfx.graph.capture import capture

    class Head(torch.nn.Module):               # a tied embedding and LM head, the case that needs it
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 32)
            self.bias = torch.nn.Parameter(torch.randn(1000))

        def forward(self, ids):
            return torch.nn.functional.linear(self.emb(ids), self.emb.weight, self.bias)

    torch.manual_seed(0)
    m, ids = Head().eval(), torch.randint(0, 1000, (2, 5))
    gm = capture(m, (ids,))
    for fqn, t in list(gm.named_parameters()):
        gfx.replace_attr(gm, fqn, torch.nn.Parameter(t.detach().bfloat16(), requires_grad=False), t)
    want = torch.nn.functional.linear(m.emb(ids).bfloat16().float(), m.emb.weight.bfloat16().float(),
                                      m.bias.bfloat16().float())
    monkeypatch.setattr(gfx, "READ_CHUNK_BYTES", 300 * 32 * 4)         # 300 rows a block: 4 blocks
    gfx.read_as(gm, {k for k, _ in gm.named_parameters()})
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 4 and all(n.meta["val"].shape[-1] <= 300 for n in linears)
    out = gm(ids)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, want)


def _broken(kind: str, d) -> str:
    """A copy of a tiny sharded LLaMA directory broken one way."""
    import json

    from safetensors.torch import load_file, save_file
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=60, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(p for p in d.iterdir() if p.suffix == ".safetensors")
    if kind == "missing shard":
        shards[1].unlink()
    elif kind == "quantised":
        t = load_file(shards[0])
        k = next(iter(t))
        t[k] = torch.zeros(t[k].shape, dtype=torch.int8)
        save_file(t, shards[0], metadata={"format": "pt"})
    else:                                          # config.json says another width than the files hold
        c = json.loads((d / "config.json").read_text())
        c["intermediate_size"] = 96
        (d / "config.json").write_text(json.dumps(c))
    return str(d)


@pytest.mark.parametrize("kind,says", [("missing shard", "shard"), ("quantised", "stored as I8"),
                                       ("config", "does not match the weights")])
def test_a_broken_directory_is_refused_in_one_sentence_before_anything_is_written(kind, says, tmp_path):
    from amgfx.errors import ModelSpecError
    from amgfx.stream import prune_streamed
    d = _broken(kind, tmp_path / "model")
    out = tmp_path / "out"
    with pytest.raises(ModelSpecError, match=says) as e:
        prune_streamed(d, calib=[torch.randint(0, 60, (1, 8))], out=str(out), method="magnitude", target_flops=0.7,
                       progress=False)
    assert len(str(e.value).splitlines()) == 1 and not out.exists()


def test_a_stream_over_two_ranks_gives_one_process_s_plan_and_weights(llama_dir, tmp_path):
    """2 gloo ranks, each streaming half the windows: every sum (scores, the refit's normal equations) reduced,
    so the plan and the written weights are those of one process on all of them; rank 0 alone writes."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    import _dist_worker
    from amgfx.stream import prune_streamed
    mp.spawn(_dist_worker.stream_main, args=(2, str(tmp_path / "store"), str(tmp_path), llama_dir), nprocs=2, join=True)
    single = prune_streamed(llama_dir, amgfx.PlanConfig(**_dist_worker.STREAM_CONFIG), calib=_dist_worker.stream_windows(),
                            max_new_tokens=4, progress=False)
    plans = [amgfx.Plan.load(tmp_path / f"rank{r}.json") for r in range(2)]
    assert plans[0].keep == plans[1].keep == single.plan.keep and single.plan.keep
    assert plans[0].meta["calibration_samples"] == single.plan.meta["calibration_samples"]
    out = tmp_path / "stream"
    written = {k: v for f in sorted(out.glob("segment-*.safetensors")) for k, v in load_file(f).items()}
    assert set(written) == set(single.weights)
    for k, w in single.weights.items():
        assert torch.allclose(written[k].float(), w.float(), rtol=0, atol=1e-5), k
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["kept"] for r in ranks] == [0, 0] and all(r["out"] == str(out) for r in ranks)
    assert (out / "stream.json").exists() and not (out / "checkpoint.pt").exists()
