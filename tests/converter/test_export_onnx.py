"""The ONNX decoder: same function as the torch model it came from, KV cache consistent with the
full sequence, MatMulNBits weights exact to our codes, a folder that onnxruntime-genai loads."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model

from converter.arch import ModelShape
from converter.export_onnx import OnnxGraphConfig, _matmulnbits_weight, build_decoder
from converter.onnx_runtime import OnnxDecoder
from converter.quantization.calibrate import QuantConfig, load_quantized_weights, quantize_model
from converter.quantization.grids import GridSpec
from converter.quantization.rtn import rtn_quantize
from rotations.fusion import fold_norms


def _export(tmp_path, model, qmodel=None, cfg=OnnxGraphConfig(), corrections=None):
    path = tmp_path / "model.onnx"
    build_decoder(path, model, qmodel, ModelShape.from_config(model.config), cfg, corrections, {"test": "1"})
    onnx.checker.check_model(str(path), full_check=True)
    return OnnxDecoder(tmp_path)


def _folded(family, **kw):
    model = tiny_model(family, dtype=torch.float32, **kw)
    fold_norms(model)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fp32_graph_matches_torch_and_the_cache_matches_the_full_sequence(tmp_path, family):
    model = _folded(family)  # hidden 96, 6 heads over 2 KV heads, head_dim 16, intermediate 160
    decoder = _export(tmp_path, model)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    np.testing.assert_allclose(decoder.logits(ids.numpy()), reference, rtol=0, atol=1e-4)
    first, past = decoder.step(ids[:, :8].numpy(), decoder.empty_cache(2), 0)
    for t in range(8, 13):  # one token at a time through the cache
        logits, past = decoder.step(ids[:, t:t + 1].numpy(), past, t)
        np.testing.assert_allclose(logits[:, 0], reference[:, t], rtol=0, atol=1e-4)
    assert past["past_key_values.0.key"].shape == (2, 2, 13, 16)


def test_graph_has_static_ranks_and_genai_io_names(tmp_path):
    _export(tmp_path, _folded("llama"))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False))
    inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    outputs = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output}
    assert inputs["input_ids"] == 2 and inputs["past_key_values.1.value"] == 4
    assert outputs["logits"] == 3 and outputs["present.0.key"] == 4
    # weights live in the external data file, the proto itself stays small
    assert (tmp_path / "model.onnx").stat().st_size < 100_000 < (tmp_path / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("block", [16, 32, 64])
def test_matmulnbits_weights_dequantize_exactly_to_our_codes(block):
    w = torch.randn(24, 128)
    for spec in (GridSpec("q4", bits=4, symmetric=True, group_size=block, zero_point=8, signed_max=True),
                 GridSpec("q8", bits=8, symmetric=True, group_size=block)):
        qt = rtn_quantize(w, spec)
        B, scales, attrs = _matmulnbits_weight(qt)
        codes = B.reshape(24, -1)
        if attrs["bits"] == 4:
            codes = np.stack([codes & 15, codes >> 4], -1).reshape(24, -1)
        value = (codes.astype(np.float32) - 2 ** (attrs["bits"] - 1)) * np.repeat(scales.reshape(24, -1), block, 1)
        np.testing.assert_array_equal(value[:, :128], qt.dequantize().numpy())


@pytest.mark.parametrize("wtype", ["q4_0", "q4_0_g64", "q8_0_g128"])  # 96 = 64 + a padded block of 32
def test_w4a16_graph_matches_torch_with_the_same_dequantized_weights(tmp_path, wtype):
    model = _folded("llama")
    qmodel = quantize_model(model, QuantConfig(method="rtn", wtype=wtype))
    quantized = copy.deepcopy(model)
    load_quantized_weights(quantized, qmodel)
    decoder = _export(tmp_path, model, qmodel)
    types = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in types and "MatMul" in types  # the attention's QKᵀ and PV stay float
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = quantized(ids).logits.numpy()
    np.testing.assert_allclose(decoder.logits(ids.numpy()), reference, rtol=0, atol=1e-3)


def _cli(*args):
    from converter.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_exports_w4a16_folder_that_generates_and_genai_loads(tiny_hf_dirs, tmp_path):
    out, report = tmp_path / "onnx", tmp_path / "r.json"
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "--rotate", "hadamard", "-o", out, "--calib-samples", 4,
                  "--calib-seq-len", 32, "--eval", "--eval-tokens", 128, "--eval-ctx", 64, "--report", report)
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"} <= {p.name for p in out.iterdir()}
    data = json.loads(report.read_text())
    parity = data["validation"]["parity"]["functions"]
    assert parity["max_abs_logit_err"] <= 1e-3 and parity["top1_agreement"] == 1.0
    assert data["genai_config"].startswith("ok")
    # greedy decoding through onnxruntime-genai gives the same tokens as ours
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(out))("The capital of France")["input_ids"]
    ours = OnnxDecoder(out).generate(prompt, 6)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(prompt):] == ours


def test_cli_refuses_bad_onnx_outputs(tiny_hf_dirs, tmp_path):
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "-o", tmp_path / "model.onnx")
    assert result.exit_code == 2 and "directory" in result.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "-o", full)
    assert result.exit_code == 2 and "--force" in result.output
    assert (full / "keep.txt").read_text() == "mine"
