"""Grids, RTN and GGUF block packing, differential against llama.cpp's gguf.quants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import quants

from converter.quantization.gguf_blocks import from_gguf_blocks, gguf_qtype, to_gguf_blocks
from converter.quantization.grids import (GridSpec, QuantizedTensor, dequantize_codes, fit_group_params, grid,
                                          quantize_with_params)
from converter.quantization.rtn import rtn_quantize

GGUF_GRIDS = ["q4_0", "q4_1", "q8_0", "q5_0", "q5_1"]
K_GRIDS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]  # super-blocks of 256
SHAPES = [(7, 64), (3, 96), (33, 256)]


def weights(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian rows of different scales, with outliers, a zero row and a zero group."""
    g = torch.Generator().manual_seed(seed)
    out, n_in = shape
    w = torch.randn(shape, generator=g) * torch.rand(out, 1, generator=g) * 0.05
    outliers = torch.rand(shape, generator=g) < 0.02
    w[outliers] *= 25
    w[1 % out] = 0
    w[0, 32:64] = 0
    if out > 2:
        w[2, :32] = w[2, :32].abs() + 0.3  # all-positive group: the Q4_1 min is far from zero
    return w


def unrounded(spec: GridSpec) -> GridSpec:
    return dataclasses.replace(spec, fp16_params=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("name", GGUF_GRIDS)
def test_blocks_dequantize_bit_exact_and_round_trip(name: str, clip_search: bool, shape: tuple[int, int]) -> None:
    qt = rtn_quantize(weights(shape, seed=shape[0]), grid(name), clip_search=clip_search)
    qtype = gguf_qtype(qt.spec)
    blocks = to_gguf_blocks(qt)
    assert blocks.dtype == np.uint8
    assert blocks.shape == quants.quant_shape_to_byte_shape(shape, qtype)
    assert np.array_equal(quants.dequantize(blocks, qtype), qt.dequantize().numpy())

    back = from_gguf_blocks(blocks, qtype, shape)
    assert back.spec == qt.spec
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.scale, qt.scale)
    assert (back.offset is None) == (qt.offset is None)
    if qt.offset is not None:
        assert torch.equal(back.offset, qt.offset)


@pytest.mark.parametrize("name", GGUF_GRIDS)
def test_codes_and_bytes_equal_llama_cpp_reference(name: str) -> None:
    """With unrounded d (as llama.cpp rounds), codes and file bytes equal gguf.quants.quantize."""
    w = weights((64, 256), seed=1)
    qtype = gguf_qtype(grid(name))
    ref_bytes = quants.quantize(w.numpy(), qtype)
    ref = from_gguf_blocks(ref_bytes, qtype, w.shape)

    raw = rtn_quantize(w, unrounded(grid(name)))
    assert torch.equal(raw.codes, ref.codes)
    as_stored = QuantizedTensor(raw.codes, raw.scale.half().float(),
                                None if raw.offset is None else raw.offset.half().float(), grid(name))
    assert np.array_equal(to_gguf_blocks(as_stored), ref_bytes)


@pytest.mark.parametrize("name", GGUF_GRIDS)
def test_fp16_first_rounding_is_never_worse_than_reference(name: str) -> None:
    """Rounding onto the fp16 grid that is stored: same params as llama.cpp, error per weight <= its error
    (up to float32 near-ties of trunc(x * id + 8.5))."""
    w = weights((64, 256), seed=2)
    qtype = gguf_qtype(grid(name))
    ref = from_gguf_blocks(quants.quantize(w.numpy(), qtype), qtype, w.shape)
    ours = rtn_quantize(w, grid(name))
    assert torch.equal(ours.scale, ref.scale)
    if ref.offset is not None:
        assert torch.equal(ours.offset, ref.offset)
    assert (ours.codes != ref.codes).float().mean() < 0.02
    err, ref_err = (w - ours.dequantize()).abs(), (w - ref.dequantize()).abs()
    d = ours.scale.abs().repeat_interleave(32, dim=1)
    assert torch.all(err <= ref_err + 1e-5 * d)
    assert err.pow(2).sum() <= ref_err.pow(2).sum()


@pytest.mark.parametrize("name", GGUF_GRIDS)
def test_clip_search_never_increases_group_error(name: str) -> None:
    spec, norm = grid(name), 2.4
    groups = weights((48, 256), seed=3).reshape(-1, 32)

    def group_error(d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        d, m = d[:, None], None if m is None else m[:, None]
        return (groups - dequantize_codes(quantize_with_params(groups, d, m, spec), d, m, spec)).abs().pow(norm).sum(1)

    plain = group_error(*fit_group_params(groups, spec))
    clipped = group_error(*fit_group_params(groups, spec, clip_search=True, norm=norm))
    assert torch.all(clipped <= plain)
    assert torch.any(clipped < plain)


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("name", GGUF_GRIDS)
def test_params_fp16_representable_and_zero_groups(name: str, clip_search: bool) -> None:
    qt = rtn_quantize(weights((7, 64), seed=4), grid(name), clip_search=clip_search)
    assert torch.equal(qt.scale.half().float(), qt.scale)
    if qt.offset is not None:
        assert torch.equal(qt.offset.half().float(), qt.offset)
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[1] == 0) and torch.all(deq[0, 32:64] == 0)
    assert torch.all(qt.codes[1] == qt.spec.zero_point)  # d = 0: the code of 0 (Q4_1: m = 0, q = 0)
    assert qt.codes.min() >= qt.spec.qmin and qt.codes.max() <= qt.spec.qmax


def test_generic_grid_rtn_and_no_gguf_type() -> None:
    spec = GridSpec("int4_g64", bits=4, symmetric=True, group_size=64)
    w = weights((5, 128), seed=5)
    qt = rtn_quantize(w, spec, clip_search=True)
    assert qt.codes.min() >= -8 and qt.codes.max() <= 7
    assert (w - qt.dequantize()).abs().max() <= qt.scale.abs().max() * 8
    with pytest.raises(ValueError, match="q4_0, q4_1, q8_0"):
        gguf_qtype(spec)
    with pytest.raises(ValueError, match="group_size"):
        gguf_qtype(dataclasses.replace(grid("q4_0"), group_size=64))


def test_registry_and_validation_errors() -> None:
    assert grid("Q4_1") is grid("q4_1")
    with pytest.raises(ValueError, match="supported: q4_0, q4_1, q8_0"):
        grid("q7_k")
    with pytest.raises(ValueError, match="multiple of 32"):  # a shorter last group has no GGUF block
        to_gguf_blocks(rtn_quantize(torch.zeros(4, 48), grid("q4_0")))
    raw = rtn_quantize(weights((4, 64), seed=6), unrounded(grid("q8_0")))
    with pytest.raises(ValueError, match="fp16"):
        to_gguf_blocks(QuantizedTensor(raw.codes, raw.scale, None, grid("q8_0")))


@pytest.mark.parametrize("n_in,group", [(100, 32), (96, 64), (37, 16)])
def test_a_group_size_that_does_not_divide_the_row_leaves_a_shorter_last_group(n_in, group):
    from converter.quantization.gptq import GPTQConfig, gptq_quantize
    from converter.quantization.rtn import rtn_quantize

    spec = grid(f"q4_0_g{group}")
    assert spec.group_size == group and spec.zero_point == 8
    w = torch.randn(6, n_in)
    for qt in (rtn_quantize(w, spec), gptq_quantize(w, torch.eye(n_in), spec, GPTQConfig(block_size=128, clip_search=False))):
        assert qt.scale.shape == (6, -(-n_in // group))
        tail = w[:, n_in // group * group:]
        # the last group's scale is fitted on its own columns only (Q4_0 rule: largest |w| / -8)
        signed_max = torch.gather(tail, 1, tail.abs().argmax(1, keepdim=True))[:, 0]
        torch.testing.assert_close(qt.scale[:, -1], (signed_max / -8).half().float())
        assert (qt.dequantize() - w).abs().max() <= qt.scale.abs().max() + 1e-6  # Q4_0 clips one side by a step


@pytest.mark.parametrize("clip_search", [False, True])
def test_integer_zero_point_grid_holds_zero_and_its_range(clip_search: bool) -> None:
    """q4_zp (MatMulNBits with zero points): value = d·(q − z), z an integer in [0, 15] per group."""
    spec = grid("q4_zp")
    w = weights((33, 256), seed=7)
    qt = rtn_quantize(w, spec, clip_search=clip_search)
    z = qt.offset
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    assert qt.codes.min() >= 0 and qt.codes.max() <= 15
    assert torch.all(qt.dequantize()[1] == 0) and torch.all(qt.dequantize()[0, 32:64] == 0)
    assert torch.all(z[2, 0] == 0)  # an all-positive group: the range is widened to hold 0, z = 0
    # 0 is always on the grid: quantizing exact zeros gives back exact zeros in every group
    zeros = torch.zeros(33, 256)
    scale = qt.scale.repeat_interleave(32, dim=1)
    offset = z.repeat_interleave(32, dim=1)
    assert torch.all(dequantize_codes(quantize_with_params(zeros, scale, offset, spec), scale, offset, spec) == 0)
    if not clip_search:  # without clipping every weight lies within half a step of its grid value
        err = (w - qt.dequantize()).abs()
        assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-9)


@pytest.mark.parametrize("method", ["rtn", "rtn-clip", "gptq"])
@pytest.mark.parametrize("name", K_GRIDS)
def test_k_quant_blocks_dequantize_bit_exact_and_round_trip(name: str, method: str) -> None:
    """K-quants: GPTQ/RTN codes + integer sub-block scales under fp16 super-scales, packed into
    llama.cpp's super-block bytes, dequantize with gguf.quants exactly to our values."""
    from converter.quantization.gptq import GPTQConfig, gptq_quantize

    w = weights((9, 512), seed=11)
    w[3, 256:] = -w[3, 256:].abs()  # an all-negative super-block
    w[4, :256] = 0  # an all-zero super-block
    spec = grid(name)
    if method == "gptq":
        X = torch.randn(600, 512, generator=torch.Generator().manual_seed(0))
        qt = gptq_quantize(w, X.T @ X, spec, GPTQConfig())
    else:
        qt = rtn_quantize(w, spec, clip_search=method == "rtn-clip")
    s, t = qt.scale_codes()
    lo, hi = spec.scale_code_range
    assert s.min() >= lo and s.max() <= hi and qt.codes.min() >= spec.qmin and qt.codes.max() <= spec.qmax
    assert torch.equal(qt.scale, qt.super_scale.repeat_interleave(spec.groups_per_super_block, dim=1) * s)
    assert torch.all(qt.dequantize()[4, :256] == 0)
    qtype = gguf_qtype(spec)
    blocks = to_gguf_blocks(qt)
    assert blocks.shape == quants.quant_shape_to_byte_shape((9, 512), qtype)
    assert np.array_equal(quants.dequantize(blocks, qtype), qt.dequantize().numpy())
    back = from_gguf_blocks(blocks, qtype, (9, 512))
    for field in ("codes", "scale", "offset", "super_scale", "super_min"):
        a, b = getattr(back, field), getattr(qt, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def test_k_quants_need_rows_of_256_and_refit_helps() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        rtn_quantize(torch.randn(4, 288), grid("q4_k"))
    with pytest.raises(ValueError, match="unknown weight grid"):
        grid("q4_k_g64")  # a K-quant's group size is its format's
    # the fitted K grid is close to the unconstrained per-group grid of the same bits
    w = weights((64, 256), seed=12)
    k = (w - rtn_quantize(w, grid("q4_k")).dequantize()).pow(2).sum()
    free = (w - rtn_quantize(w, dataclasses.replace(grid("q4_1"), fp16_params=False)).dequantize()).pow(2).sum()
    assert k < 1.2 * free
