"""SmolLM2 through the ONNX exporter (slow): W4A16 on stock onnxruntime within 1e-3 of torch, and
W4A4KV4 (custom ops: function bodies and our kernels) at the float32 noise floor of the torch model
it came from, with sensible greedy text. RTN weights keep the budget (GPTQ is tested elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from converter.cli import generate, main
from converter.onnx_reference import load_reference
from converter.onnx_runtime import OnnxDecoder

pytestmark = pytest.mark.slow


def _convert(tmp_path, name, *args):
    out, report = tmp_path / name, tmp_path / f"{name}.json"
    result = CliRunner().invoke(main, ["--to", "onnx", "--quant", "rtn", "-o", str(out), "--eval", "--eval-tokens",
                                       "1024", "--report", str(report), *args])
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def test_w4a16_matmulnbits_matches_torch_and_generates(tmp_path):
    out, report = _convert(tmp_path, "w4a16", "--rotate", "hadamard", "--wbits", "4", "--abits", "16")
    parity = report["validation"]["parity"]["functions"]
    assert parity["max_abs_logit_err"] <= 1e-3
    assert parity["top1_agreement"] >= 0.999
    assert report["genai_config"].startswith("ok")
    # greedy decoding through the cache gives the torch model's tokens (rebuilt from the folder's weights)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer("The capital of France is")["input_ids"]
    reference, _ = load_reference(out)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, reference(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert OnnxDecoder(out).generate(prompt, 8) == ids[0, len(prompt):].tolist()
    text = CliRunner().invoke(generate, [str(out), "The capital of France is", "--max-new-tokens", "8"]).output
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is") + 5


def test_w4a4kv4_runs_at_the_noise_floor_with_functions_and_kernels(tmp_path):
    out, report = _convert(tmp_path, "w4a4kv4", "--rotate", "hadamard", "--wbits", "4", "--abits", "4",
                           "--kvbits", "4")
    v = report["validation"]
    floor = v["noise_floor"]["top1_agreement"]
    # on 1024 tokens this model's PPL moves by up to ~10% under a 1-ulp nudge (measured: +10.2%;
    # onnxruntime -5.3% functions, -1.5% kernels): the bound is that spread, not the 0.5%
    floor_ppl = max(abs(v["noise_floor"]["ppl_rel_diff"]), 0.10)
    for runtime in ("functions", "kernels"):
        p = v["parity"][runtime]
        # W4A4 re-quantizes every activation: a 1-ulp input change already moves top-1 (measured
        # ~56% on SmolLM2) and PPL (~2.5%); onnxruntime must be no further from torch than that
        assert p["top1_agreement"] >= floor - 0.05, (runtime, p["top1_agreement"], floor)
        assert abs(p["ppl_rel_diff"]) <= floor_ppl + 0.02, (runtime, p["ppl_rel_diff"], floor_ppl)
    assert v["parity"]["kernels"]["top1_agreement"] > 0.3
    text = CliRunner().invoke(generate, [str(out), "The capital of France is", "--max-new-tokens", "8"]).output
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is") + 5
