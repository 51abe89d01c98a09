"""The command line as a user meets it: one-line errors, exit codes, no partial files, reports."""

import json

import pytest
from click.testing import CliRunner

from converter.cli import main


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _one_line_error(result, *needles):
    assert result.exit_code != 0
    err = result.stderr if hasattr(result, "stderr") else result.output
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # progress bars may precede it
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def test_help_explains_every_option():
    out = _run("--help").output
    for option in ("--to", "--rotate", "--quant", "--wtype", "--head-type", "--act-order", "--damp", "--clip-search",
                   "--calib-samples", "--eval", "--kv-type", "--report", "--force", "--debug", "--rotations", "--rank",
                   "--wbits", "--abits", "--kvbits", "--train-steps", "--train-basis-lr-scale", "--train-rank-penalty",
                   "--resume", "--checkpoint"):
        assert option in out


def test_convert_tiny_model_writes_gguf_and_report(tiny_hf_dirs, tmp_path):
    out, report = tmp_path / "m.gguf", tmp_path / "r.json"
    result = _run(tiny_hf_dirs["qwen2"], "-o", out, "--quant", "gptq", "--calib-samples", 4, "--calib-seq-len", 32,
                  "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["invariance"]["passed"] and data["invariance"]["max_abs_logit_err"] <= 1e-3
    assert data["config"]["quant"]["method"] == "gptq" and data["file_bytes"] == out.stat().st_size
    assert data["provenance"]["calibration.tokens"] == 4 * 32
    assert data["rotations"]["R1"] == "hadamard"
    # a second run without --force refuses and leaves the file alone
    before = out.read_bytes()
    _one_line_error(_run(tiny_hf_dirs["qwen2"], "-o", out, "--quant", "rtn"), "exists", "--force")
    assert out.read_bytes() == before


@pytest.mark.parametrize("args,needles", [
    (["--wtype", "q5_9"], ["--wtype", "q5_9", "q4_0"]),
    (["--head-type", "f8"], ["--head-type", "f8"]),
    (["--rotate", "respin", "--to", "gguf"], ["respin", "llama.cpp", "skip-path"]),
    (["--abits", "4"], ["weight-only", "--abits"]),
    (["--rotate", "respin", "--rank", "lots"], ["--rank", "lots"]),
    (["--rotate", "respin", "--rank", "full", "--train-rank-penalty", "1"],
     ["--train-rank-penalty", "integer --rank"]),
    (["--to", "rotations"], [".safetensors"]),
    (["--resume", "nowhere.ckpt", "--rotate", "spinquant"], ["no checkpoint", "nowhere.ckpt"]),
    (["--rotate", "spiral"], ["spiral", "hadamard"]),
    (["--quant", "awq"], ["awq", "gptq", "rtn"]),
    (["--to", "tflite"], ["tflite", "gguf"]),
    (["--kv-type", "q3"], ["q3", "f16"]),
])
def test_bad_options_are_one_line_errors(tiny_hf_dirs, tmp_path, args, needles):
    out = tmp_path / "m.gguf"
    _one_line_error(_run(tiny_hf_dirs["llama"], "-o", out, *args), *needles)
    assert not out.exists()


def test_bad_models_are_one_line_errors(tmp_path):
    out = tmp_path / "m.gguf"
    _one_line_error(_run(tmp_path / "missing", "-o", out), "not found")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "bert"}')
    _one_line_error(_run(tmp_path / "cfg", "-o", out), "unsupported architecture 'bert'", "llama")
    truncated = tmp_path / "t.gguf"
    from converter.loading import bundled_model_path

    truncated.write_bytes(bundled_model_path().read_bytes()[:100_000])
    _one_line_error(_run(truncated, "-o", out), "GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "t.gguf"]  # no partial output


def test_nan_weights_are_one_line_error(tiny_hf_dirs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["mistral"])
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 0] = float("inf")
    src = tmp_path / "src"
    model.save_pretrained(src)
    for f in tiny_hf_dirs["mistral"].glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    _one_line_error(_run(src, "-o", tmp_path / "m.gguf"), "model.embed_tokens.weight", "NaN or inf")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_hadamard_size_never_crashes_offline(tiny_hf_dirs, tmp_path, smollm2_tokenizer):
    # hidden 156 = 4·39 has no Hadamard construction: fused rotations fall back to a seeded random orthogonal R1
    from tiny_models import tiny_model

    import torch

    src = tmp_path / "src"
    tiny_model("llama", vocab=49152, hidden=156, heads=6, kv_heads=2, dtype=torch.float32).save_pretrained(src)
    smollm2_tokenizer.save_pretrained(src)
    report = tmp_path / "r.json"
    # f32: GGUF quant blocks need multiples of 32, which 156 is not
    result = _run(src, "-o", tmp_path / "m.gguf", "--wtype", "f32", "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["rotations"]["R1"] == "random"


TRAIN_ARGS = ("--train-steps", 3, "--train-seq-len", 32, "--train-samples", 3, "--checkpoint-every", 2,
              "--calib-samples", 4, "--calib-seq-len", 32)


def test_respin_learns_saves_and_reapplies_rotations(tiny_hf_dirs, tmp_path):
    """The issue's command on a tiny model: train, save, evaluate W4A4KV4; re-apply without training."""
    out, report = tmp_path / "rot.safetensors", tmp_path / "r.json"
    args = ("--rank", 8, "--wbits", 4, "--abits", 4, "--kvbits", 4, "--eval", "--eval-tokens", 256, "--eval-ctx", 64)
    result = _run(tiny_hf_dirs["llama"], "--rotate", "respin", "-o", out, *args, *TRAIN_ARGS, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["config"]["to"] == "rotations" and data["rank"] == 8
    assert data["invariance"]["passed"] and data["online_macs_per_token"] == 4 * (2 * 64 * 8 + 64)
    v = data["validation"]
    # a random model: PPL near the vocab size either way, but quantization must change it
    assert v["tokens"] == 4 * 63 and 1 < v["fp_ppl"] < 1e6 and 1 < v["sim_ppl"] < 1e6
    assert abs(v["sim_ppl"] / v["fp_ppl"] - 1) > 1e-4
    assert (tmp_path / "rot.rotations.ckpt").exists()  # the checkpoint of the last step
    from rotations.rotations import Rotations

    rot = Rotations.load(out)
    assert rot.per_block and tuple(rot.R1.shape) == (5, 64, 64) and rot.config["train"]["steps"] == 3
    train = rot.config["train"]  # the defaults, recorded with the rotations: x8 bases, penalty at the export's rank
    assert train["basis_lr_scale"] == 8.0 and train["skip_rank"] == 8 and train["skip_rank_penalty"] == 10.0
    # re-applied without training: the same simulated model, the same perplexity
    again = tmp_path / "again.json"
    result = _run(tiny_hf_dirs["llama"], "--rotate", "respin", "--rotations", out, "-o", tmp_path / "copy.safetensors",
                  *args, "--calib-samples", 4, "--calib-seq-len", 32, "--report", again)
    assert result.exit_code == 0, result.output
    assert json.loads(again.read_text())["validation"]["sim_ppl"] == pytest.approx(v["sim_ppl"], rel=1e-5)


def test_rank_penalty_aims_at_the_export_rank(tiny_hf_dirs, tmp_path):
    out = tmp_path / "rot.safetensors"
    result = _run(tiny_hf_dirs["llama"], "--rotate", "respin", "-o", out, "--rank", 8, "--train-rank-penalty", 2,
                  *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    from rotations.rotations import Rotations

    train = Rotations.load(out).config["train"]
    assert train["skip_rank"] == 8 and train["skip_rank_penalty"] == 2.0


def test_rank_penalty_default_follows_activation_bits(tiny_hf_dirs, tmp_path):
    out = tmp_path / "rot.safetensors"
    result = _run(tiny_hf_dirs["llama"], "--rotate", "respin", "-o", out, "--rank", 8, "--abits", 3, "--kvbits", 3,
                  *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    from rotations.rotations import Rotations

    assert Rotations.load(out).config["train"]["skip_rank_penalty"] == 30.0


def test_spinquant_gguf_writes_file_and_rotations(tiny_hf_dirs, tmp_path):
    out, report = tmp_path / "m.gguf", tmp_path / "r.json"
    result = _run(tiny_hf_dirs["llama"], "--rotate", "spinquant", "-o", out, *TRAIN_ARGS, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["invariance"]["passed"] and data["provenance"]["rotation.train.steps"] == 3
    rotations = tmp_path / "m.rotations.safetensors"
    assert data["rotations_file"] == str(rotations) and rotations.exists()
    import gguf

    reader = gguf.GGUFReader(out)
    assert reader.fields["respin.rotation.kind"].contents() == "spinquant"
