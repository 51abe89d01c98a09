"""Pack a `QuantizedTensor` into llama.cpp's block bytes, and back: Q4_0 / Q4_1 / Q8_0 here, Q5_0 /
Q5_1 and the K-quants Q2_K … Q6_K through `kquant_blocks`.

Block layouts (ggml-common.h), 32 weights a block, little-endian fp16:
  Q4_0: d, 16 bytes of nibbles        byte j = q[j] | q[j + 16] << 4
  Q4_1: d, m, 16 bytes of nibbles     (same nibble order)
  Q8_0: d, 32 int8
The bytes dequantize with `gguf.quants.dequantize` bit for bit to `QuantizedTensor.dequantize()`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from converter.quantization import kquant_blocks
from converter.quantization.grids import GRIDS, GridSpec, QuantizationError, QuantizedTensor

_QTYPES = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q2_k": GGMLQuantizationType.Q2_K,
    "q3_k": GGMLQuantizationType.Q3_K,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q5_k": GGMLQuantizationType.Q5_K,
    "q6_k": GGMLQuantizationType.Q6_K,
}


def gguf_qtype(spec: GridSpec) -> GGMLQuantizationType:
    """The GGML type that stores `spec` exactly; QuantizationError for grids GGUF cannot hold."""
    if spec.name not in _QTYPES or replace(spec, fp16_params=True) != GRIDS[spec.name]:
        raise QuantizationError(f"grid {spec} has no GGUF block type; GGUF grids: {', '.join(_QTYPES)} "
                                "(with their own group sizes)")
    return _QTYPES[spec.name]


def _fp16_bytes(x: torch.Tensor, what: str) -> np.ndarray:
    x = x.detach().cpu().float()
    if not torch.equal(x.half().float(), x):
        raise QuantizationError(f"{what} values are not fp16-representable: quantize with fp16_params=True")
    return x.numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def to_gguf_blocks(qt: QuantizedTensor) -> np.ndarray:
    """uint8 [out, in // 32 * type_size]: the tensor's rows in llama.cpp block layout."""
    qtype = gguf_qtype(qt.spec)
    out, n_in = qt.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_in % block:
        raise QuantizationError(f"{qtype.name} needs the input dim to be a multiple of {block} (got {n_in})")
    codes = qt.codes.detach().cpu()
    if codes.numel() and (codes.min() < qt.spec.qmin or codes.max() > qt.spec.qmax):
        raise QuantizationError(f"{qtype.name} codes outside [{qt.spec.qmin}, {qt.spec.qmax}]")
    q = codes.numpy().reshape(out, n_in // block, block)
    if qt.spec.name in ("q5_0", "q5_1") or qt.spec.super_block:
        data = _pack_extended(qt, q.reshape(-1, block).astype(np.uint8))
        assert data.shape[-1] == type_size
        return data.reshape(out, n_in // block * type_size)
    parts = [_fp16_bytes(qt.scale, f"{qtype.name} scale")]
    if qtype == GGMLQuantizationType.Q8_0:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        if qtype == GGMLQuantizationType.Q4_1:
            parts.append(_fp16_bytes(qt.offset, "Q4_1 min"))
        q = q.astype(np.uint8)
        parts.append(q[..., : block // 2] | (q[..., block // 2 :] << np.uint8(4)))
    data = np.concatenate(parts, axis=-1)
    assert data.shape[-1] == type_size
    return data.reshape(out, n_in // block * type_size)


def _pack_extended(qt: QuantizedTensor, q: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 / K-quant blocks [n_blocks, type_size] from codes [n_blocks, block]."""
    name = qt.spec.name
    if not qt.spec.super_block:
        _fp16_bytes(qt.scale, f"{name} scale")  # raises unless fp16-representable
        m = None if qt.offset is None else qt.offset.reshape(-1).numpy()
        if m is not None:
            _fp16_bytes(qt.offset, f"{name} min")
        return kquant_blocks.pack_q5(q, qt.scale.reshape(-1).numpy(), m)
    _fp16_bytes(qt.super_scale, f"{name} super-block scale")
    s, t = qt.scale_codes()
    lo, hi = qt.spec.scale_code_range
    if s.min() < lo or s.max() > hi or (t is not None and (t.min() < 0 or t.max() > 2**qt.spec.scale_bits - 1)):
        raise QuantizationError(f"{name}: sub-block scale codes outside their {qt.spec.scale_bits}-bit range")
    per = qt.spec.groups_per_super_block
    D = qt.super_scale.reshape(-1).numpy()
    Dm = None
    if qt.super_min is not None:
        _fp16_bytes(qt.super_min, f"{name} super-block min")
        Dm = qt.super_min.reshape(-1).numpy()
    return kquant_blocks.pack_kquant(name, q, s.reshape(-1, per).numpy(), None if t is None else t.reshape(-1, per).numpy(),
                                     D, Dm)


def _unpack_extended(name: str, blocks: np.ndarray, out: int, n_in: int) -> QuantizedTensor:
    spec = GRIDS[name]
    flat = blocks.reshape(-1, blocks.shape[-1])
    if not spec.super_block:
        q, d, m = kquant_blocks.unpack_q5(flat, has_min=not spec.symmetric)
        offset = None if m is None else torch.from_numpy(m.reshape(out, -1))
        return QuantizedTensor(torch.from_numpy(q.astype(np.int16).reshape(out, n_in)),
                               torch.from_numpy(d.reshape(out, -1)), offset, spec)
    q, s, t, D, Dm = kquant_blocks.unpack_kquant(name, flat)
    per = spec.groups_per_super_block
    scale = (np.repeat(D, per).reshape(-1, per) * s.astype(np.float32)).reshape(out, -1)
    offset = None if t is None else -(np.repeat(Dm, per).reshape(-1, per) * t.astype(np.float32)).reshape(out, -1)
    return QuantizedTensor(torch.from_numpy(q.astype(np.int16).reshape(out, n_in)), torch.from_numpy(scale),
                           None if offset is None else torch.from_numpy(offset), spec,
                           torch.from_numpy(D.reshape(out, -1)), None if Dm is None else torch.from_numpy(Dm.reshape(out, -1)))


def from_gguf_blocks(data: np.ndarray, qtype: GGMLQuantizationType | int, shape: tuple[int, int]) -> QuantizedTensor:
    """Inverse of `to_gguf_blocks`: the codes and fp16 params of a Q4_0 / Q4_1 / Q8_0 tensor `shape`."""
    qtype = GGMLQuantizationType(qtype)
    names = {v: k for k, v in _QTYPES.items()}
    if qtype not in names:
        raise QuantizationError(f"GGML type {qtype.name} is not a supported grid; supported: "
                                f"{', '.join(t.name for t in _QTYPES.values())}")
    spec = GRIDS[names[qtype]]
    out, n_in = shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_in % block or np.asarray(data).size != out * n_in // block * type_size:
        raise QuantizationError(f"{qtype.name} data of {np.asarray(data).size} bytes does not hold a {shape} tensor")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, n_in // block, type_size)
    if names[qtype] not in ("q4_0", "q4_1", "q8_0"):
        return _unpack_extended(names[qtype], blocks, out, n_in)

    def fp16(at: int) -> torch.Tensor:
        return torch.from_numpy(blocks[..., at : at + 2].copy().view("<f2")[..., 0].astype(np.float32))

    scale, offset = fp16(0), fp16(2) if qtype == GGMLQuantizationType.Q4_1 else None
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[..., 2:].view(np.int8)
    else:
        nibbles = blocks[..., 4:] if offset is not None else blocks[..., 2:]
        q = np.concatenate([nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)], axis=-1)
    codes = torch.from_numpy(q.astype(np.int16).reshape(out, n_in))
    return QuantizedTensor(codes, scale, offset, spec)
