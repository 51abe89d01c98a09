"""The single place that names the custom ONNX domain, its ops, their inputs, attributes and versions.

Exporter, ONNX function bodies (`runtime_ops.functions`), NumPy references (`runtime_ops.reference`)
and the C++/CUDA kernels (`kernels/`) all follow this table (DESIGN §6). Conventions shared by all:

- Codes are *signed* and live in int8: a b-bit code q ∈ [−2^(b−1), 2^(b−1) − 1]; an asymmetric
  grid shifts by an int8 zero point z ∈ [−2^(b−1), 2^(b−1) − 1], value = (q − z)·scale (the way ONNX
  `QuantizeLinear` to int8 works, so 8-bit asymmetric codes fit too).
- Packed 4-bit storage (`QMatMul` weights with bits = 4, the 4-bit KV cache): two codes per uint8,
  element 2j in the low nibble, 2j+1 in the high nibble, each nibble holding q + 8 ∈ [0, 15]
  (MatMulNBits' nibble order); an odd last axis is padded with code 0.
- Per-token tensors (scale, zero point) keep the reduced axis: shape [..., 1].
- Rounding is half to even (ONNX `Round`, `QuantizeLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "respin"
OPSET_VERSION = 1


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int" | "float"
    default: int | float | None  # None: required


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[Attribute, ...]
    meaning: str
    optional_inputs: tuple[str, ...] = ()

    def attribute(self, name: str) -> Attribute:
        return next(a for a in self.attributes if a.name == name)

    def defaults(self) -> dict:
        return {a.name: a.default for a in self.attributes if a.default is not None}


OPS: dict[str, OpSchema] = {op.name: op for op in (
    OpSchema(
        "Hadamard", ("X",), ("Y",),
        (Attribute("n", "int", None), Attribute("m", "int", 1)),
        "Y = X·H_n/√n along the last axis (float32 [..., n]); H_n = H_{2^k} ⊗ H_m, H_m the core "
        "(1: Sylvester; 12, 20, 28, 36, …: Paley) as built by rotations.hadamard.hadamard_matrix",
    ),
    OpSchema(
        "DynamicQuantize", ("X",), ("Xq", "scale", "zero_point"),
        (Attribute("bits", "int", 8), Attribute("symmetric", "int", 0), Attribute("clip", "float", 1.0),
         Attribute("hadamard", "int", 0), Attribute("hadamard_m", "int", 1)),
        "per-token (last axis) dynamic quantization of float32 X [..., K] — of Hadamard(X; n = hadamard, "
        "m = hadamard_m) when hadamard = K > 0 (fused: one read of X, e.g. R4 before down_proj): Xq int8 [..., K], "
        "scale float32 [..., 1], zero_point int8 [..., 1]. asymmetric: lo = min(min X, 0)·clip, "
        "hi = max(max X, 0)·clip, scale = max((hi − lo)/(2^b − 1), 1e-8), z = round(−lo/scale) − 2^(b−1); "
        "symmetric: scale = max(max|X|·clip/(2^(b−1) − 1), 1e-8), z = 0; "
        "Xq = clamp(round(X/scale) + z, −2^(b−1), 2^(b−1) − 1)",
    ),
    OpSchema(
        "QMatMul", ("Xq", "x_scale", "x_zero_point", "W", "w_scale", "w_zero_point", "bias"), ("Y",),
        (Attribute("K", "int", None), Attribute("bits", "int", 4), Attribute("group_size", "int", 0)),
        "Y[..., n] = Σ_g w_scale[n, g]·x_scale·Σ_{k∈g} (Xq[k] − x_zero_point)(Wq[n, k] − w_zero_point[n, g]) "
        "+ bias[n], int32 accumulation per group; Xq int8 [..., K] with x_scale float32 / x_zero_point "
        "int8 [..., 1]; W: bits 4 → uint8 [N, ⌈K/2⌉] packed, bits 8 → int8 [N, K]; w_scale float32 "
        "[N, G], w_zero_point int8 [N, G], G = ⌈K/group_size⌉ (group_size 0: G = 1); bias float32 [N]",
        optional_inputs=("bias",),
    ),
    OpSchema(
        "ResidualCorrection", ("X", "Q", "M", "Z"), ("Y",), (),
        "Y = (X + ((X·Q)·M)·Qᵀ) + Z, X float32 [..., D], Q [D, r], M [r, r] (ReSpinQuant skip path); "
        "the optional Z (same shape as X) is the block output the residual adds, fused (float32 add last)",
        optional_inputs=("Z",),
    ),
    OpSchema(
        "QuantizeKV", ("X",), ("Xq", "scale", "zero_point"),
        (Attribute("bits", "int", 4), Attribute("hadamard", "int", 0), Attribute("hadamard_m", "int", 1)),
        "KV-cache storage: DynamicQuantize(X, bits, asymmetric, clip 1, hadamard, hadamard_m) per token and head "
        "(hadamard = head_dim: R3 on K fused into the cache write) "
        "(last axis = head_dim); bits 4 → Xq uint8 [..., ⌈d/2⌉] packed, bits 8 → Xq int8 [..., d]",
    ),
    OpSchema(
        "DequantizeKV", ("Xq", "scale", "zero_point"), ("Y",),
        (Attribute("bits", "int", 4), Attribute("head_dim", "int", None)),
        "inverse of QuantizeKV: Y = (q − zero_point)·scale, float32 [..., head_dim]",
    ),
)}


def schema(op: str) -> OpSchema:
    """The schema of `op`; unknown names raise KeyError listing the known ones."""
    if op not in OPS:
        raise KeyError(f"unknown {DOMAIN} op '{op}': known are {', '.join(OPS)}")
    return OPS[op]
