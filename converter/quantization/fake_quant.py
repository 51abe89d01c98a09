"""Quantize-dequantize ("fake quant") of activations, KV cache and weights for the simulated-quant
reference model, with straight-through gradients so rotations can be trained through it.

Activations and KV entries are quantized per token over groups of the last axis (group 0: the whole
axis), dynamically (params from the values themselves), as the runtime's `DynamicQuantize` does:

    asymmetric: scale = clip·(max − min)/(2^b − 1), zp = round(−clip·min / scale),
                q = clamp(round(x/scale) + zp, 0, 2^b − 1),         x̂ = (q − zp)·scale
    symmetric:  scale = clip·max|x| / (2^(b−1) − 1),
                q = clamp(round(x/scale), −2^(b−1), 2^(b−1) − 1),   x̂ = q·scale

with the range always containing 0 (asymmetric) and round-half-to-even (ONNX QuantizeLinear's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter.errors import RespinError
from converter.quantization.grids import GridSpec

FLOAT_BITS = 16  # "16 bits": not quantized


@dataclass(frozen=True)
class ActQuantSpec:
    """Per-token dynamic quantization of one kind of tensor (activations or KV cache)."""

    bits: int = FLOAT_BITS
    symmetric: bool = False
    clip: float = 1.0  # fraction of the range kept (QuaRot uses 0.9 for activations)
    group_size: int = 0  # 0: one group per token (the whole last axis)

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 8 or self.bits == FLOAT_BITS):
            raise RespinError(f"activation/KV bits must be 2..8 or {FLOAT_BITS} (got {self.bits})")
        if not 0 < self.clip <= 1:
            raise RespinError(f"clip ratio must be in (0, 1] (got {self.clip})")

    @property
    def enabled(self) -> bool:
        return self.bits < FLOAT_BITS


def _straight_through(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    # forward: x_hat; backward: identity (the rounding has no useful gradient)
    return x + (x_hat - x).detach()


def quantize_dequantize(x: torch.Tensor, spec: ActQuantSpec) -> torch.Tensor:
    """Per-token dynamic fake quant of x [..., n] (identity when spec.bits is 16)."""
    if not spec.enabled:
        return x
    n = x.shape[-1]
    gs = spec.group_size or n
    if n % gs:
        raise RespinError(f"activation group size {gs} does not divide the axis of size {n}")
    with torch.no_grad():
        g = x.detach().reshape(*x.shape[:-1], n // gs, gs).float()
        if spec.symmetric:
            qmax = 2 ** (spec.bits - 1) - 1
            scale = (g.abs().amax(-1, keepdim=True) * spec.clip / qmax).clamp_min(1e-8)
            q = torch.clamp(torch.round(g / scale), -qmax - 1, qmax)
            x_hat = q * scale
        else:
            qmax = 2**spec.bits - 1
            lo = g.amin(-1, keepdim=True).clamp(max=0) * spec.clip
            hi = g.amax(-1, keepdim=True).clamp(min=0) * spec.clip
            scale = ((hi - lo) / qmax).clamp_min(1e-8)
            zp = torch.round(-lo / scale)
            q = torch.clamp(torch.round(g / scale) + zp, 0, qmax)
            x_hat = (q - zp) * scale
        x_hat = x_hat.reshape(x.shape).to(x.dtype)
    return _straight_through(x, x_hat)


def fake_quantize_weight(w: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Round-to-nearest of w [out, in] onto `spec` (no clip search), straight-through gradient."""
    from converter.quantization.rtn import rtn_quantize

    with torch.no_grad():
        w_hat = rtn_quantize(w.detach().float(), spec).dequantize().to(w.dtype)
    return _straight_through(w, w_hat)
