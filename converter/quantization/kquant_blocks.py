"""Byte layouts of llama.cpp's Q5_0 / Q5_1 blocks and K-quant super-blocks (ggml-common.h), both ways.

Each layout is a pair of small NumPy functions over all blocks at once: `pack_*` takes codes
[n_blocks, block] (uint8, the stored q) and the block's params, `unpack_*` returns them. The
bit positions follow `gguf.quants`' dequantization (the tests check bit-exactness against it):

  Q5_0   d, qh (bit j = high bit of q[j]), qs (byte j = q[j] & 15 | (q[j + 16] & 15) << 4)
  Q5_1   d, m, qh, qs
  Q2_K   scales[16] (s | t << 4), qs[64] (2-bit), d, dmin
  Q3_K   hmask[32] (bit 2 of q), qs[64] (2 low bits), scales[12] (6-bit s + 32), d
  Q4_K   d, dmin, scales[12] (6-bit s and t), qs[128] (nibbles)
  Q5_K   d, dmin, scales[12], qh[32] (bit 4 of q), qs[128]
  Q6_K   ql[128] (low nibbles), qh[64] (2 high bits), scales[16] (int8 s), d
"""

from __future__ import annotations

import numpy as np

U8 = np.uint8


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [n] (fp16-representable) → uint8 [n, 2] little-endian fp16."""
    return np.ascontiguousarray(x, dtype=np.float32).astype("<f2").view(U8).reshape(-1, 2)


def fp16_values(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2")[:, 0].astype(np.float32)


# --- bit-plane helpers: element (group g, plane k, lane l) of a [n, planes·lanes·groups] code array ---

def _pack_planes(q: np.ndarray, lanes: int, bits: int) -> np.ndarray:
    """Codes [n, G·P·lanes] (element g·P·lanes + k·lanes + l) → bytes [n, G·lanes] with
    byte g·lanes + l = Σ_k q[...] << (bits·k), P = 8 / bits planes per byte."""
    planes = 8 // bits
    n = q.shape[0]
    q = q.reshape(n, -1, planes, lanes).astype(U8)
    out = np.zeros((n, q.shape[1], lanes), U8)
    for k in range(planes):
        out |= (q[:, :, k, :] & U8((1 << bits) - 1)) << U8(bits * k)
    return out.reshape(n, -1)


def _unpack_planes(b: np.ndarray, lanes: int, bits: int) -> np.ndarray:
    planes = 8 // bits
    n = b.shape[0]
    b = b.reshape(n, -1, 1, lanes)
    shifts = (np.arange(planes, dtype=U8) * U8(bits)).reshape(1, 1, planes, 1)
    return ((b >> shifts) & U8((1 << bits) - 1)).reshape(n, -1)


# --- 32-blocks with a fifth bit ------------------------------------------------------------------

def pack_q5(q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Q5_0 (m None) / Q5_1 blocks from codes [n, 32] in [0, 31]."""
    qh = np.packbits((q >> 4).astype(U8) & U8(1), axis=-1, bitorder="little")  # [n, 4]: bit j of the uint32
    qs = _pack_planes(q & 15, 16, 4)
    parts = [fp16_bytes(d)] + ([] if m is None else [fp16_bytes(m)]) + [qh, qs]
    return np.concatenate(parts, axis=-1)


def unpack_q5(b: np.ndarray, has_min: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d = fp16_values(b[:, 0:2])
    m = fp16_values(b[:, 2:4]) if has_min else None
    at = 4 if has_min else 2
    high = np.unpackbits(b[:, at:at + 4], axis=-1, bitorder="little")
    return _unpack_planes(b[:, at + 4:], 16, 4) | (high << U8(4)), d, m


# --- K-quants: 6-bit scale packing ---------------------------------------------------------------

def _pack_scales_q4k(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """8 scale and 8 min codes (6 bits) → 12 bytes (get_scale_min_k4's layout)."""
    s, t = s.astype(U8), t.astype(U8)
    lo_s = s[:, :4] | ((s[:, 4:] >> 4) << 6)
    lo_t = t[:, :4] | ((t[:, 4:] >> 4) << 6)
    mixed = (s[:, 4:] & 15) | ((t[:, 4:] & 15) << 4)
    return np.concatenate([lo_s, lo_t, mixed], axis=-1)


def _unpack_scales_q4k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    s = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 0x30)], axis=-1)
    t = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return s, t


def _pack_scales_q3k(stored: np.ndarray) -> np.ndarray:
    """16 six-bit codes (s + 32) → 12 bytes: low nibbles in bytes 0..7, high 2 bits in 8..11."""
    stored = stored.astype(U8)
    low = (stored[:, :8] & 15) | ((stored[:, 8:] & 15) << 4)
    return np.concatenate([low, _pack_planes(stored >> 4, 4, 2)], axis=-1)


def _unpack_scales_q3k(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 15, b[:, :8] >> 4], axis=-1)
    return low | (_unpack_planes(b[:, 8:12], 4, 2) << U8(4))


# --- K-quant super-blocks: codes q [n, 256], scale codes s (and min codes t) [n, G], D (and Dm) [n] ---

def pack_kquant(kind: str, q: np.ndarray, s: np.ndarray, t: np.ndarray | None, D: np.ndarray,
                Dm: np.ndarray | None) -> np.ndarray:
    q = q.astype(U8)
    if kind == "q2_k":
        scales = (s.astype(U8) & 15) | (t.astype(U8) << 4)
        return np.concatenate([scales, _pack_planes(q, 32, 2), fp16_bytes(D), fp16_bytes(Dm)], axis=-1)
    if kind == "q3_k":
        hmask = _pack_planes(q >> 2, 32, 1)
        return np.concatenate([hmask, _pack_planes(q & 3, 32, 2), _pack_scales_q3k(s + 32), fp16_bytes(D)], axis=-1)
    if kind == "q4_k":
        return np.concatenate([fp16_bytes(D), fp16_bytes(Dm), _pack_scales_q4k(s, t), _pack_planes(q, 32, 4)],
                              axis=-1)
    if kind == "q5_k":
        return np.concatenate([fp16_bytes(D), fp16_bytes(Dm), _pack_scales_q4k(s, t), _pack_planes(q >> 4, 32, 1),
                               _pack_planes(q & 15, 32, 4)], axis=-1)
    if kind == "q6_k":
        ql = _pack_planes(q & 15, 64, 4)
        qh = _pack_planes(q >> 4, 32, 2)
        return np.concatenate([ql, qh, s.astype(np.int8).view(U8), fp16_bytes(D)], axis=-1)
    raise ValueError(kind)


def unpack_kquant(kind: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray,
                                                      np.ndarray | None]:
    """(q [n, 256], s [n, G], t [n, G] | None, D [n], Dm [n] | None) of K-quant blocks b [n, type_size]."""
    if kind == "q2_k":
        s, t = b[:, :16] & 15, b[:, :16] >> 4
        return _unpack_planes(b[:, 16:80], 32, 2), s, t, fp16_values(b[:, 80:82]), fp16_values(b[:, 82:84])
    if kind == "q3_k":
        q = _unpack_planes(b[:, 32:96], 32, 2) | (_unpack_planes(b[:, :32], 32, 1) << U8(2))
        s = _unpack_scales_q3k(b[:, 96:108]).astype(np.int16) - 32
        return q, s, None, fp16_values(b[:, 108:110]), None
    if kind in ("q4_k", "q5_k"):
        D, Dm = fp16_values(b[:, 0:2]), fp16_values(b[:, 2:4])
        s, t = _unpack_scales_q4k(b[:, 4:16])
        if kind == "q4_k":
            return _unpack_planes(b[:, 16:144], 32, 4), s, t, D, Dm
        q = _unpack_planes(b[:, 48:176], 32, 4) | (_unpack_planes(b[:, 16:48], 32, 1) << U8(4))
        return q, s, t, D, Dm
    if kind == "q6_k":
        q = _unpack_planes(b[:, :128], 64, 4) | (_unpack_planes(b[:, 128:192], 32, 2) << U8(4))
        return q, b[:, 192:208].view(np.int8).astype(np.int16), None, fp16_values(b[:, 208:210]), None
    raise ValueError(kind)
