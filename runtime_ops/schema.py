"""The single place that names the custom ONNX domain, its ops, their attributes and versions.

Exporter, ONNX function bodies, NumPy references and the C++/CUDA kernels all follow this table
(DESIGN §6).
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "respin"
OPSET_VERSION = 1


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[str, ...]
    meaning: str


OPS: dict[str, OpSchema] = {op.name: op for op in (
    OpSchema("Hadamard", ("X",), ("Y",), ("n", "m"), "Y = X·H_n/√n along the last axis, H_n = H_{2^k} ⊗ H_m"),
    OpSchema("DynamicQuantize", ("X",), ("Xq", "scale", "zero_point"), ("bits", "symmetric", "clip"),
             "per-token (last axis) quantization to 4/8-bit codes held in int8"),
    OpSchema("QMatMul", ("Xq", "x_scale", "x_zp", "W", "w_scale", "w_zp", "bias"), ("Y",), ("bits", "group_size"),
             "low-bit GEMM with int32 accumulation and fused dequantization; bias optional"),
    OpSchema("ResidualCorrection", ("X", "Q", "M"), ("Y",), (), "Y = X + (X·Q)·M·Qᵀ (ReSpinQuant skip path)"),
)}
