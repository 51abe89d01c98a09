"""llama.cpp CPU emulation: each helper against the ggml arithmetic it claims to reproduce."""

from __future__ import annotations

import ctypes
import inspect
import platform
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converter.llamacpp_emulation import (
    emulate_llamacpp,
    ggml_rms_norm,
    ggml_rope_cos_sin,
    ggml_rope_rotate,
    q8_1_block_sums,
    quantize_q8_0_reference,
    quantize_q8_blocks,
    quantize_row_q8,
)


def _activations(rows: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = torch.arange(32) - 15.5  # amax 16.5: many codes close to .5
    x[2, :32] = torch.arange(32) * (127 / 31) / 2  # scaled values on exact halves
    return x


def _ggml_cpu():
    llama_cpp = pytest.importorskip("llama_cpp")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulated quantizer is ggml's x86 SIMD path")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    for name in ("quantize_row_q8_0", "quantize_row_q8_1"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


def _run_kernel(fn, x: torch.Tensor, block_bytes: int) -> np.ndarray:
    rows = []
    for row in x.numpy().astype(np.float32):
        row = np.ascontiguousarray(row)
        out = np.zeros(row.size // 32 * block_bytes, dtype=np.uint8)
        fn(row.ctypes.data, out.ctypes.data, row.size)
        rows.append(out.reshape(-1, block_bytes))
    return np.stack(rows)


def test_q8_0_codes_and_scales_match_ggml_kernel():
    lib = _ggml_cpu()
    x = _activations()
    blocks = _run_kernel(lib.quantize_row_q8_0, x, 34)
    d_ggml = blocks[..., :2].copy().view(np.float16)[..., 0]
    codes_ggml = blocks[..., 2:].view(np.int8)
    codes, d = quantize_row_q8(x)
    assert np.array_equal(codes.numpy().astype(np.int8), codes_ggml)
    assert np.array_equal(d[..., 0].half().numpy(), d_ggml)


def test_q8_1_codes_scales_and_sums_match_ggml_kernel():
    lib = _ggml_cpu()
    x = _activations(seed=1)
    blocks = _run_kernel(lib.quantize_row_q8_1, x, 36)
    d_ggml = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    s_ggml = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    codes, d = quantize_row_q8(x)
    assert np.array_equal(codes.numpy().astype(np.int8), blocks[..., 4:].view(np.int8))
    assert np.array_equal(d[..., 0].half().numpy(), d_ggml)
    assert np.array_equal(q8_1_block_sums(codes, d)[..., 0].half().numpy(), s_ggml)


def test_reference_quantizer_matches_gguf_py_bit_for_bit():
    x = _activations(seed=2)
    blocks = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    assert np.array_equal(quantize_q8_0_reference(x).numpy(), expected)


def test_simd_quantizer_rounds_halves_to_even_unlike_the_reference():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 0.5, 2.5  # amax 127 → multiplier 1
    codes, _ = quantize_row_q8(x)
    assert codes[0, 0, :3].tolist() == [127.0, 0.0, 2.0]
    ref = quantize_q8_0_reference(x)
    assert ref[0, 1:3].tolist() == [1.0, 3.0]
    # and the dequantized value the dot products see is codes * fp16(d)
    assert torch.equal(quantize_q8_blocks(x), (codes * (127.0 / 127.0)).reshape(1, 32))


def test_rms_norm_matches_ggml_loop():
    x = _activations(rows=8, k=96, seed=3)[3:]
    eps = 1e-5
    expected = []
    for row in x.numpy().astype(np.float32):
        total = 0.0
        for v in row:
            total += float(np.float32(v * v))  # float square, double sum
        mean = np.float32(total / row.size)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        expected.append(row * scale)
    assert np.array_equal(ggml_rms_norm(x, eps).numpy(), np.stack(expected))


def test_rope_matches_ggml_cache_and_fma_rotation():
    n_dims, base = 32, 100000.0
    pos = torch.arange(300)[None]
    cos, sin = ggml_rope_cos_sin(pos, n_dims, base)
    theta_scale = np.float32(np.float64(base) ** (-2.0 / n_dims))
    for p in (0, 1, 17, 299):
        theta = np.float32(p)
        for i in range(n_dims // 2):
            assert cos[0, p, i].item() == np.float32(np.cos(np.float64(theta)))
            assert sin[0, p, i].item() == np.float32(np.sin(np.float64(theta)))
            theta = np.float32(theta * theta_scale)
    x = torch.randn(1, 300, 2, n_dims)
    out = ggml_rope_rotate(x, cos[:, :, None], sin[:, :, None])
    h = n_dims // 2
    x0, x1 = x[..., :h].numpy(), x[..., h:].numpy()
    c, s = cos[:, :, None].numpy(), sin[:, :, None].numpy()
    o0 = (x0.astype(np.float64) * c - (x1 * s).astype(np.float64)).astype(np.float32)
    assert np.array_equal(out[..., :h].numpy(), o0)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is the identity
    # and it is RoPE: close to the HF rotation
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    hf, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), torch.cat([cos, cos], -1),
                                 torch.cat([sin, sin], -1))
    assert torch.allclose(out, hf.transpose(1, 2), atol=1e-5)


def _tiny():
    from tiny_models import tiny_model

    return tiny_model("llama", hidden=128, heads=4, kv_heads=2, intermediate=192, vocab=320, dtype=torch.float32)


def test_emulation_changes_tiny_model_logits_only_slightly_and_undoes():
    model = _tiny()
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        implementation = model.config._attn_implementation
        handles = emulate_llamacpp(model)
        emulated = model(input_ids=ids, use_cache=False).logits
        for h in handles:
            h.remove()
        model.set_attn_implementation(implementation)
        restored = model(input_ids=ids, use_cache=False).logits
    diff = (emulated - plain).abs()
    assert 0 < diff.max() < 0.05 * plain.std()
    assert (emulated.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9
    assert torch.equal(restored, plain)


def test_emulation_is_consistent_with_kv_cache_decoding():
    model = _tiny()
    emulate_llamacpp(model)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0, -1]
        out = model(input_ids=ids[:, :-1], use_cache=True)
        # newer transformers 5.x name the cache `cache` and deprecate `past_key_values`
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(input_ids=ids[:, -1:], use_cache=True, **{key: getattr(out, key)}).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-3)
