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
from converter.errors import RespinError
from converter.export_onnx import OnnxGraphConfig, _matmulnbits_weight, build_decoder
from converter.onnx_reference import load_reference
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


def _matmulnbits_values(B, scales, zero_points, attrs, N):
    """float32 [N, blocks·block] as the MatMulNBits spec defines it: (q − zero point) · scale."""
    bits, block = attrs["bits"], attrs["block_size"]
    unpack = lambda b: np.stack([b & 15, b >> 4], -1).reshape(N, -1) if bits == 4 else b.reshape(N, -1)  # noqa: E731
    codes = unpack(B.reshape(N, -1))
    blocks = codes.shape[1] // block
    z = np.full((N, blocks), 2 ** (bits - 1)) if zero_points is None else unpack(zero_points.reshape(N, -1))[:, :blocks]
    return (codes.astype(np.float32) - np.repeat(z, block, 1)) * np.repeat(scales.reshape(N, -1), block, 1)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_matmulnbits_weights_dequantize_exactly_to_our_codes(block):
    w = torch.randn(24, 128)
    w[3] = w[3].abs()  # an all-positive row: its zero point is 0
    for spec in (GridSpec("q4", bits=4, symmetric=True, group_size=block, zero_point=8, signed_max=True),
                 GridSpec("q8", bits=8, symmetric=True, group_size=block),
                 GridSpec("q4zp", bits=4, symmetric=False, group_size=block, integer_zero_point=True)):
        qt = rtn_quantize(w, spec, clip_search=True)
        B, scales, zero_points, attrs = _matmulnbits_weight(qt)
        assert (zero_points is None) == spec.symmetric
        value = _matmulnbits_values(B, scales, zero_points, attrs, 24)
        np.testing.assert_array_equal(value[:, :128], qt.dequantize().numpy())


def test_matmulnbits_zero_points_pad_a_short_last_block_and_odd_block_counts():
    w = torch.randn(5, 96)  # block 64: one full block + a padded one; 2 blocks per row, packed in 1 byte
    qt = rtn_quantize(w, GridSpec("q4zp", bits=4, symmetric=False, group_size=64, integer_zero_point=True))
    B, scales, zero_points, attrs = _matmulnbits_weight(qt)
    assert zero_points.shape == (5,) and B.shape == (5, 2, 32)
    value = _matmulnbits_values(B, scales, zero_points, attrs, 5)
    np.testing.assert_array_equal(value[:, :96], qt.dequantize().numpy())
    assert np.all(value[:, 96:] == 0)  # the padding dequantizes to zero
    # three blocks per row: zero points padded to whole bytes per row (N·ceil(3·4/8) = 10 bytes)
    qt = rtn_quantize(torch.randn(5, 48), GridSpec("z", bits=4, symmetric=False, group_size=16, integer_zero_point=True))
    B, scales, zero_points, attrs = _matmulnbits_weight(qt)
    assert zero_points.shape == (10,)
    np.testing.assert_array_equal(_matmulnbits_values(B, scales, zero_points, attrs, 5), qt.dequantize().numpy())


def test_q4_1_has_no_exact_matmulnbits_form():
    qt = rtn_quantize(torch.randn(4, 64), GridSpec("q4_1", bits=4, symmetric=False))
    with pytest.raises(RespinError, match="float min"):
        _matmulnbits_weight(qt)


@pytest.mark.parametrize("wtype", ["q4_0", "q4_0_g64", "q8_0_g128", "q4_zp", "q4_zp_g64"])  # 96 = 64 + a padded 32
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


@pytest.mark.parametrize("grid_args", [(), ("--asym", "--group-size", 64)], ids=["q4_0", "asym-g64"])
def test_cli_exports_w4a16_folder_that_generates_and_genai_loads(tiny_hf_dirs, tmp_path, grid_args):
    out, report = tmp_path / "onnx", tmp_path / "r.json"
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "--rotate", "hadamard", "-o", out, "--calib-samples", 4,
                  "--calib-seq-len", 32, "--eval", "--eval-tokens", 128, "--eval-ctx", 64, "--report", report, *grid_args)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all((len(n.input) == 4) == bool(grid_args) for n in nbits)  # zero points iff --asym
    # the torch reference rebuilt from the folder's initializers is the model that was exported
    rebuilt, _ = load_reference(out)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(OnnxDecoder(out).logits(ids.numpy()), rebuilt(ids).logits.numpy(), rtol=0, atol=1e-3)
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
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "--asym", "--wbits", "8", "-o", tmp_path / "o8")
    assert result.exit_code == 2 and "--asym" in result.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    result = _cli(tiny_hf_dirs["llama"], "--to", "onnx", "-o", full)
    assert result.exit_code == 2 and "--force" in result.output
    assert (full / "keep.txt").read_text() == "mine"
