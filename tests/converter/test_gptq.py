"""GPTQ against RTN on a correlated toy layer; exactness of the grid it returns; the Hessian."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import quants

from converter.quantization.gguf_blocks import gguf_qtype, to_gguf_blocks
from converter.quantization.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from converter.quantization.grids import QuantizedTensor, grid, quantize_with_params
from converter.quantization.rtn import rtn_quantize

GGUF_GRIDS = ["q4_0", "q4_1", "q8_0"]
ALL_GRIDS = GGUF_GRIDS + ["q4_zp"]  # q4_zp: onnxruntime MatMulNBits with zero points, no GGUF type


def layer(seed: int = 0, dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """W [64, 128] and correlated inputs X [2048, 128] = Z A with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 128, generator=g) * 0.05
    X = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) / 128**0.5
    X[:, [3, 50, 101]] *= 12
    X[:, list(dead)] = 0
    return W, X


def hessian(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return 2 / X.shape[0] * X.T @ X


def output_error(X: torch.Tensor, W: torch.Tensor, qt: QuantizedTensor) -> float:
    return float(((X.double() @ (W.double() - qt.dequantize().double()).T) ** 2).sum())


def assert_on_grid(qt: QuantizedTensor) -> None:
    gs = qt.spec.group_size
    scale = qt.scale.repeat_interleave(gs, dim=1)
    offset = None if qt.offset is None else qt.offset.repeat_interleave(gs, dim=1)
    assert torch.equal(quantize_with_params(qt.dequantize(), scale, offset, qt.spec), qt.codes)
    assert torch.equal(qt.scale.half().float(), qt.scale)
    assert qt.codes.min() >= qt.spec.qmin and qt.codes.max() <= qt.spec.qmax


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ALL_GRIDS)
def test_gptq_beats_rtn_and_lies_on_grid(name: str, act_order: bool) -> None:
    W, X = layer()
    cfg = GPTQConfig(act_order=act_order)
    qt = gptq_quantize(W, hessian(X), grid(name), cfg)
    rtn = rtn_quantize(W, grid(name), clip_search=cfg.clip_search)
    assert output_error(X, W, qt) < 0.8 * output_error(X, W, rtn)

    assert_on_grid(qt)
    if name not in GGUF_GRIDS:
        return
    blocks = to_gguf_blocks(qt)
    assert np.array_equal(quants.dequantize(blocks, gguf_qtype(qt.spec)), qt.dequantize().numpy())


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_columns(act_order: bool) -> None:
    dead = (0, 17, 64)
    W, X = layer(seed=1, dead=dead)
    H = hessian(X)
    assert torch.all(torch.diag(H)[list(dead)] == 0)
    qt = gptq_quantize(W, H, grid("q4_0"), GPTQConfig(act_order=act_order, block_size=64))
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, list(dead)] == 0)  # Q4_0 holds 0 exactly: code 8
    assert_on_grid(qt)
    assert output_error(X, W, qt) < output_error(X, W, rtn_quantize(W, grid("q4_0"), clip_search=True))


def test_hessian_accumulator_in_chunks() -> None:
    _, X = layer(seed=2)
    acc = HessianAccumulator(128, dtype=torch.float64)
    acc32 = HessianAccumulator(128)  # float32 default, as GPTQ's reference
    for chunk in X.reshape(8, 4, 64, 128):  # [batch, seq, in] chunks
        acc.add(chunk)
        acc32.add(chunk)
    assert acc.n_tokens == 2048 and acc32.H.dtype == torch.float32
    torch.testing.assert_close(acc.H, hessian(X), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc32.H.double(), hessian(X), rtol=1e-5, atol=1e-5 * hessian(X).abs().max().item())
    with pytest.raises(ValueError, match="width"):
        acc.add(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="before any"):
        HessianAccumulator(4).H


def test_cholesky_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    W, _ = layer()
    H = torch.eye(128, dtype=torch.float64)
    H[0, 1] = H[1, 0] = 1.02  # eigenvalue -0.02: damping 0.01 fails, 0.1 works
    with caplog.at_level(logging.WARNING, logger="converter.quantization.gptq"):
        qt = gptq_quantize(W, H, grid("q8_0"), GPTQConfig())
    assert "retrying" in caplog.text
    assert torch.isfinite(qt.dequantize()).all()

    H[0, 1] = H[1, 0] = 1e6
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(W, H, grid("q8_0"), GPTQConfig())


def test_config_and_shape_validation() -> None:
    W, X = layer()
    with pytest.raises(ValueError, match="multiple of group_size"):
        gptq_quantize(W, hessian(X), grid("q4_0"), GPTQConfig(block_size=48))
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(W, hessian(X)[:64, :64], grid("q4_0"), GPTQConfig())
    with pytest.raises(ValueError, match="percdamp"):
        GPTQConfig(percdamp=-0.1)
