"""W4A4KV4 ONNX graphs (custom `respin` ops run through their function bodies on stock onnxruntime)
against the simulated-quant torch model they were exported from: logits, greedy tokens, 4-bit cache."""

import numpy as np
import onnx
import pytest
import torch
from tiny_models import near_hadamard_bases

from converter.loading import load_model
from converter.onnx_folder import write_onnx_folder
from converter.onnx_reference import load_reference, sim_metadata
from converter.onnx_runtime import OnnxDecoder, uses_custom_ops
from converter.pipeline_onnx import graph_config, onnx_sim_spec
from converter.simquant import SimSpec, build_simquant
from rotations.hadamard import random_orthogonal
from rotations.rotations import Rotations, hadamard_rotations


def _ids(n, t, seed):
    return torch.randint(0, 49152, (n, t), generator=torch.Generator().manual_seed(seed))


def _export(tmp_path, loaded, rotations, spec):
    spec = onnx_sim_spec(spec)
    sim = build_simquant(loaded, rotations, spec, _ids(1, 16, 0), _ids(4, 32, 1))
    out = tmp_path / "onnx"
    write_onnx_folder(out, loaded, sim.model, sim.qmodel, graph_config(spec), sim.corrections, sim_metadata(spec),
                      force=False)
    return sim, out


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


def _assert_same_quantized_model(got, reference, exact: bool):
    """Same codes, same activation/KV quantization: only float32 summation order differs, which can
    move an activation across a rounding boundary (ReSpinQuant's skip transitions run as hooks in
    torch and as `RC(x) + block(x)` in the graph; even a transposed copy of Q changes torch's sums)."""
    assert (reference.argmax(-1) == got.argmax(-1)).mean() >= 0.99
    assert np.abs(got - reference).mean() < 2e-3
    if exact:
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def kernels():
    """The kernel library (built here when missing: a build failure fails these tests)."""
    from runtime_ops.library import available, build

    if not available():
        build()


@pytest.fixture(scope="module")
def tiny_llama(tiny_hf_dirs):
    return load_model(tiny_hf_dirs["llama"])  # hidden 64, 4 heads over 2 KV heads, intermediate 128


@pytest.mark.parametrize("rotate,rank", [("hadamard", None), ("respin", 8), ("respin", "full")])
def test_w4a4kv4_graph_matches_the_simulated_quant_model(tmp_path, tiny_llama, kernels, rotate, rank):
    shape = tiny_llama.shape
    if rotate == "hadamard":
        rotations = hadamard_rotations(shape)
    else:
        R2 = torch.stack([random_orthogonal(shape.head_dim, seed=i) for i in range(shape.n_layers)])
        rotations = Rotations("respin", near_hadamard_bases(shape, 0.05), R2)
    sim, out = _export(tmp_path, tiny_llama, rotations, SimSpec(wbits=4, abits=4, kvbits=4, rank=rank or 32))
    assert uses_custom_ops(out)
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    expected = {"Hadamard", "DynamicQuantize", "QMatMul", "QuantizeKV", "DequantizeKV"}
    assert expected <= ops and (("ResidualCorrection" in ops) == (rotate == "respin"))
    # the online ops are fused where the graph allows: R3 on K into the cache's QuantizeKV, R4 into
    # down_proj's DynamicQuantize, the skip corrections with the residual adds; only R3 on Q stands alone
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    L = shape.n_layers
    assert sum(n.op_type == "Hadamard" for n in nodes) == L
    assert sum(n.op_type == "QuantizeKV" and a.get("hadamard") == shape.head_dim for n, a in zip(nodes, attrs)) == L
    assert sum(n.op_type == "DynamicQuantize" and a.get("hadamard") == shape.intermediate
               for n, a in zip(nodes, attrs)) == L
    corrections = [n for n in nodes if n.op_type == "ResidualCorrection"]
    assert len(corrections) == (2 * L if rotate == "respin" else 0) and all(len(n.input) == 4 for n in corrections)
    decoder = OnnxDecoder(out)
    ids = _ids(2, 24, 2)
    reference, got = _torch_logits(sim.model, ids), decoder.logits(ids.numpy())
    _assert_same_quantized_model(got, reference, exact=rotate == "hadamard")
    # our kernels replace the function bodies: same codes, float32 sums in another order
    with_kernels = OnnxDecoder(out, use_kernels=True).logits(ids.numpy())
    np.testing.assert_allclose(with_kernels, got, rtol=0, atol=1e-4)
    # the torch reference rebuilt from the folder alone (`respin-export parity`) is the same model
    rebuilt, _ = load_reference(out)
    _assert_same_quantized_model(_torch_logits(rebuilt, ids), reference, exact=rotate == "hadamard")
    # the 4-bit cache: two codes per byte, one scale and zero point per token and head
    _, past = decoder.step(ids[:, :5].numpy(), decoder.empty_cache(2), 0)
    assert past["past_key_values.0.key"].dtype == np.uint8
    assert past["past_key_values.0.key"].shape == (2, shape.n_kv_heads, 5, shape.head_dim // 2)
    assert past["past_key_values.0.value_scale"].shape == (2, shape.n_kv_heads, 5, 1)


def test_w4a4kv4_greedy_tokens_through_the_cache_equal_torch(tmp_path, tiny_llama):
    sim, out = _export(tmp_path, tiny_llama, hadamard_rotations(tiny_llama.shape), SimSpec(wbits=4, abits=4, kvbits=4))
    prompt = _ids(1, 7, 3)
    expected = prompt
    for _ in range(10):  # torch: the whole sequence again each step (per-token quantization: same result)
        next_id = _torch_logits(sim.model, expected)[0, -1].argmax()
        expected = torch.cat([expected, torch.tensor([[next_id]])], dim=1)
    got = OnnxDecoder(out).generate(prompt[0].tolist(), 10)
    assert got == expected[0, 7:].tolist()


def test_onnx_spec_maps_a16_to_matmulnbits_blocks_and_lowbit_to_per_channel():
    a16 = onnx_sim_spec(SimSpec(wbits=4, abits=16, kvbits=16))
    assert a16.wtype == "q4_0" and not a16.r4 and not a16.r3
    assert onnx_sim_spec(SimSpec(wbits=4, abits=16, kvbits=4)).r3  # a quantized cache gets R3
    a4 = onnx_sim_spec(SimSpec(wbits=4, abits=4, kvbits=4))
    assert a4.wtype == "int4" and a4.r3 and a4.r4


def test_parity_command_compares_torch_functions_and_kernels(tmp_path, tiny_llama, kernels):
    import json

    from click.testing import CliRunner

    from converter.cli import parity

    _, out = _export(tmp_path, tiny_llama, hadamard_rotations(tiny_llama.shape), SimSpec(wbits=4, abits=4, kvbits=4))
    report = tmp_path / "parity.json"
    result = CliRunner().invoke(parity, [str(out), "--eval-tokens", "128", "--eval-ctx", "64", "--report", str(report)])
    assert result.exit_code == 0, result.output
    v = json.loads(report.read_text())["validation"]
    assert set(v["parity"]) == {"functions", "kernels"}
    for p in v["parity"].values():
        assert p["top1_agreement"] == 1.0 and p["max_abs_logit_err"] < 1e-4
    missing = CliRunner().invoke(parity, [str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no model.onnx" in missing.output
