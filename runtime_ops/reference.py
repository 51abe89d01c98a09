"""NumPy references of the `respin` ops: the ground truth the ONNX function bodies and the C++/CUDA
kernels are tested against. Plain, unoptimized, float32 where the kernels are float32 (float64
only where noted), following `runtime_ops.schema` to the letter.
"""

from __future__ import annotations

import math

import numpy as np

SCALE_FLOOR = np.float32(1e-8)  # smallest scale of DynamicQuantize (an all-zero row stays exact)


def _hadamard_matrix(n: int) -> np.ndarray:
    # imported lazily: the reference itself needs no torch unless Hadamard is called
    from rotations.hadamard import hadamard_matrix

    return hadamard_matrix(n).numpy().astype(np.float64)


def hadamard(x: np.ndarray, n: int, m: int = 1) -> np.ndarray:
    """Y = X·H_n/√n along the last axis, computed in float64, returned as float32."""
    if x.shape[-1] != n:
        raise ValueError(f"Hadamard: last axis {x.shape[-1]} != n = {n}")
    from rotations.hadamard import hadamard_factorization

    if hadamard_factorization(n) is None or hadamard_factorization(n)[1] != m:
        raise ValueError(f"Hadamard: n = {n} has no construction with core m = {m}")
    return (x.astype(np.float64) @ _hadamard_matrix(n) / math.sqrt(n)).astype(np.float32)


_hadamard_op = hadamard  # the fused quantizers' `hadamard` attribute shadows the name


def dynamic_quantize(x: np.ndarray, bits: int = 8, symmetric: int = 0, clip: float = 1.0, hadamard: int = 0,
                     hadamard_m: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token codes int8 [..., K], scale float32 [..., 1], zero point int8 [..., 1] (schema); of
    `hadamard(x, hadamard, hadamard_m)` when hadamard > 0 (the fused R4 / R3 forms)."""
    if hadamard:
        x = _hadamard_op(x, hadamard, hadamard_m)
    x = x.astype(np.float32)
    clip = np.float32(clip)
    half = 2 ** (bits - 1)
    if symmetric:
        qmax = np.float32(half - 1)
        scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) * clip / qmax, SCALE_FLOOR)
        zp = np.zeros_like(scale)
    else:
        lo = np.minimum(x.min(axis=-1, keepdims=True), np.float32(0)) * clip
        hi = np.maximum(x.max(axis=-1, keepdims=True), np.float32(0)) * clip
        scale = np.maximum((hi - lo) / np.float32(2**bits - 1), SCALE_FLOOR)
        zp = np.round(-lo / scale) - np.float32(half)
    q = np.clip(np.round(x / scale) + zp, -half, half - 1)
    return q.astype(np.int8), scale.astype(np.float32), zp.astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """(q − zero_point)·scale in float32."""
    return ((q.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale).astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes [..., K] (int8 in [−8, 7]) → uint8 [..., ⌈K/2⌉], low nibble first, nibble = q + 8."""
    q = q.astype(np.int16)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("pack_int4: codes outside [-8, 7]")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.int16)], axis=-1)
    u = (q + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `pack_int4`: int8 codes [..., k]."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    q = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return q[..., :k].astype(np.int8)


def qmatmul(xq: np.ndarray, x_scale: np.ndarray, x_zp: np.ndarray, w: np.ndarray, w_scale: np.ndarray,
            w_zp: np.ndarray, bias: np.ndarray | None = None, K: int | None = None, bits: int = 4,
            group_size: int = 0) -> np.ndarray:
    """Low-bit GEMM: exact integer (int64) sums per group, then scaled in float64 → float32 [..., N]."""
    K = xq.shape[-1] if K is None else K
    wq = unpack_int4(w, K) if bits == 4 else w.astype(np.int8)
    gs = group_size or K
    n_groups = -(-K // gs)
    xc = xq.astype(np.int64) - x_zp.astype(np.int64)  # [..., K]
    y = np.zeros((*xq.shape[:-1], wq.shape[0]), np.float64)
    for g in range(n_groups):
        cols = slice(g * gs, min(K, (g + 1) * gs))
        wc = wq[:, cols].astype(np.int64) - w_zp[:, g:g + 1].astype(np.int64)  # [N, gs]
        acc = xc[..., cols] @ wc.T  # integer accumulation
        y += acc.astype(np.float64) * w_scale[:, g].astype(np.float64)
    y *= x_scale.astype(np.float64)
    if bias is not None:
        y += bias.astype(np.float64)
    return y.astype(np.float32)


def residual_correction(x: np.ndarray, Q: np.ndarray, M: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """Y = X + ((X·Q)·M)·Qᵀ in float64 → float32, then + Z in float32 when given."""
    x64 = x.astype(np.float64)
    Q64 = Q.astype(np.float64)
    y = (x64 + ((x64 @ Q64) @ M.astype(np.float64)) @ Q64.T).astype(np.float32)
    return y if z is None else (y + z.astype(np.float32)).astype(np.float32)


def quantize_kv(x: np.ndarray, bits: int = 4, hadamard: int = 0, hadamard_m: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric per-token-and-head codes of the KV cache (of its Hadamard transform when
    hadamard = head_dim); 4-bit codes packed two per byte."""
    q, scale, zp = dynamic_quantize(x, bits=bits, symmetric=0, clip=1.0, hadamard=hadamard, hadamard_m=hadamard_m)
    return (pack_int4(q) if bits == 4 else q), scale, zp


def dequantize_kv(xq: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int = 4,
                  head_dim: int | None = None) -> np.ndarray:
    head_dim = (2 * xq.shape[-1] if bits == 4 else xq.shape[-1]) if head_dim is None else head_dim
    q = unpack_int4(xq, head_dim) if bits == 4 else xq
    return dequantize(q, scale, zp)
