"""GGUF files in llama.cpp's K mixtures (Q4_K_M & co.): the same tensor types as llama-quantize
writes, GPTQ blocks that dequantize bit for bit, and a file llama.cpp runs."""

import copy
import ctypes

import gguf
import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from converter import gguf_mixture
from converter.export_gguf import GGUFExportConfig, gguf_tensor_name, rope_permute_rows, write_gguf
from converter.loading import load_model
from converter.pipeline import rotate_model
from converter.quantization.calibrate import QuantConfig, load_quantized_weights, quantize_model
from converter.quantization.gptq import GPTQConfig
from rotations.rotations import make_rotations

PROMPT = "The quick brown fox jumps over the lazy dog. Alabama is a state in the United States; 12345 apples."


@pytest.fixture(scope="module")
def k_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny llama whose hidden (256) and intermediate (768) take K-quants, 8 layers so the
    mixtures' per-layer rules (first/last eighth, every third ffn_down) bite."""
    path = tmp_path_factory.mktemp("tiny-k")
    model = tiny_model("llama", vocab=49152, hidden=256, heads=4, kv_heads=2, intermediate=768, layers=8,
                       dtype=torch.float32)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _write(loaded, fused, quant, path, calib=None):
    qmodel = quantize_model(fused, quant, calib)
    write_gguf(fused, qmodel, loaded.adapter, loaded.shape, loaded.source, path,
               GGUFExportConfig(name="tiny-k", provenance={"rotation.kind": "hadamard"}))
    return qmodel


def _llama_cpp_types(src, dst, ftype: str) -> dict[str, str]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs the 'llama' extra (llama-cpp-python)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_K_S", "Q3_K_M", "Q5_K_M", "Q2_K"])
def test_mixture_file_equals_llama_quantize_types_and_blocks_are_exact(k_model_dir, tmp_path, ftype):
    loaded = load_model(k_model_dir)
    fused = rotate_model(loaded, make_rotations("hadamard", loaded.shape))
    calib = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    _write(loaded, fused, QuantConfig(wtype="f32"), tmp_path / "f32.gguf")
    theirs = _llama_cpp_types(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", ftype)

    quant = gguf_mixture.resolve(QuantConfig(method="gptq", wtype=ftype.lower(), gptq=GPTQConfig()), fused,
                                 loaded.shape)
    qmodel = _write(loaded, fused, quant, tmp_path / "ours.gguf", calib)
    reader = gguf.GGUFReader(tmp_path / "ours.gguf")
    ours = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ours == theirs
    assert len({v for k, v in ours.items() if k.startswith("blk.")}) >= 2  # a real mixture
    assert any(v.endswith("_K") for v in ours.values())
    assert reader.fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType, f"MOSTLY_{ftype}"))

    tensors = {t.name: t for t in reader.tensors}
    for hf_name, qt in qmodel.tensors.items():
        t = tensors[gguf_tensor_name(hf_name)]
        expected = qt.dequantize()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            expected = rope_permute_rows(expected, 4 if "q_proj" in hf_name else 2)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert np.array_equal(got, expected.numpy()), hf_name


@pytest.mark.llamacpp
def test_llama_cpp_runs_our_q4_k_m_file(k_model_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the 'llama' extra (llama-cpp-python)")
    from converter.llamacpp import LlamaCppConfig, LlamaCppModel

    loaded = load_model(k_model_dir)
    fused = rotate_model(loaded, make_rotations("hadamard", loaded.shape))
    quant = gguf_mixture.resolve(QuantConfig(method="rtn", wtype="q4_k_m"), fused, loaded.shape)
    qmodel = _write(loaded, fused, quant, tmp_path / "m.gguf")
    quantized = copy.deepcopy(fused)
    load_quantized_weights(quantized, qmodel)
    runtime = LlamaCppModel(tmp_path / "m.gguf", LlamaCppConfig(n_ctx=64))
    try:
        ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        rt = torch.from_numpy(runtime.logits(ids))
        with torch.no_grad():
            ref = quantized(input_ids=torch.tensor([ids])).logits[0]
        # llama.cpp rounds activations to 8-bit blocks for K-quant dot products: close, not equal
        assert (rt - ref).abs().max() < 0.05 * ref.abs().max()
        assert (rt.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    finally:
        runtime.close()


def test_tensor_type_overrides_and_plain_types(k_model_dir):
    loaded = load_model(k_model_dir)
    fused = rotate_model(loaded, make_rotations("none", loaded.shape))
    quant = gguf_mixture.resolve(QuantConfig(method="rtn", wtype="q4_0"), fused, loaded.shape,
                                 overrides=(("ffn_down", "Q6_K"), ("blk\\.0\\.", "Q8_0")))
    grids = quant.tensor_grids
    assert grids["model.layers.1.mlp.down_proj.weight"] == "q6_k"
    assert grids["model.layers.0.mlp.down_proj.weight"] == "q6_k"  # first match wins
    assert grids["model.layers.0.self_attn.q_proj.weight"] == "q8_0"
    assert grids["model.layers.3.self_attn.q_proj.weight"] == "q4_0"
    assert grids["lm_head.weight"] == "q8_0" and grids["model.embed_tokens.weight"] == "q8_0"  # head_type
    assert gguf_mixture.resolve(QuantConfig(wtype="q4_0"), fused, loaded.shape).tensor_grids == {}


@pytest.mark.parametrize("wtype, head_type, expected", [("q4_k_m", "q8_0", "mixture"), ("q3_k_s", "q4_0", "mixture"),
                                                        ("q4_0", "q8_0", "q8_0")])
def test_provenance_names_the_head_type_a_mixture_ignores(wtype, head_type, expected):
    from types import SimpleNamespace

    from converter.pipeline import _provenance

    cfg = SimpleNamespace(quant=QuantConfig(method="rtn", wtype=wtype, head_type=head_type), rotate="hadamard", seed=0,
                          rotations_path=None)
    corpus = SimpleNamespace(source="wiki", rule="every 10th article", calibration_sha256="0" * 64)
    prov = _provenance(cfg, None, SimpleNamespace(n_calibration_tokens=0), corpus)
    assert prov["quant.head_type"] == expected and prov["quant.wtype"] == wtype
