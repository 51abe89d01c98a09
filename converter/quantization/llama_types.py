"""llama.cpp's choice of a GGML type per tensor for its mixed file types (Q4_K_M & co.).

A pure reproduction of `llama_tensor_get_type` / `tensor_type_fallback` in the vendored llama.cpp's
src/llama-quant.cpp, for dense LLaMA-family models (no MoE, not Falcon), so our GGUF files carry
exactly the tensor types `llama-quantize` writes (tests compare with llama.cpp itself):

  - default type by file type (Q4_K_M → Q4_K, Q3_K_M → Q3_K, …);
  - `--tensor-type PATTERN=TYPE` overrides (regex search on the GGUF name, first match wins; a
    matched tensor skips the mixture rules, and its attn_v / ffn_down counter does not advance);
  - the mixture rules: output.weight Q6_K (Q8_0 when its rows are not a multiple of the default
    type's block), attn_v / ffn_down / attn_output upgrades by layer position (`use_more_bits`);
  - the fallback for rows not a multiple of 256: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1,
    Q6_K → Q8_0, then F16 if not a multiple of 32.
Only weights with ≥ 2 dims whose names end in "weight" and are not norms are quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from converter.quantization.grids import QuantizationError

# file type → default tensor type
DEFAULT_TYPE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
                "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
OVERRIDE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32")


@dataclass(frozen=True)
class ModelTensors:
    """What the rules look at: GGUF tensor names → shapes (ggml order, row length first), in file order."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def block_size(ggml_type: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]


def parse_tensor_type_override(text: str) -> tuple[str, str]:
    """"PATTERN=TYPE" (llama-quantize's --tensor-type) → (PATTERN, TYPE upper-case)."""
    pattern, sep, ggml_type = text.rpartition("=")
    ggml_type = ggml_type.strip().upper()
    if not sep or not pattern:
        raise QuantizationError(f"--tensor-type '{text}': expected PATTERN=TYPE, e.g. 'ffn_down=q6_k'")
    if ggml_type not in OVERRIDE_TYPES:
        raise QuantizationError(f"--tensor-type '{text}': unknown type {ggml_type}; supported: "
                                f"{', '.join(t.lower() for t in OVERRIDE_TYPES)}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise QuantizationError(f"--tensor-type '{text}': bad regex ({exc})") from None
    return pattern, ggml_type


def override_for(name: str, overrides: list[tuple[str, str]] | tuple) -> str | None:
    """The type of the first override whose pattern is found in `name` (regex search), or None."""
    for pattern, ggml_type in overrides:
        if re.search(pattern, name):
            return ggml_type
    return None


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _Counters:
    def __init__(self, model: ModelTensors) -> None:
        self.n_attention_wv = sum("attn_v.weight" in n for n in model.tensors)
        self.n_ffn_down = sum("ffn_down" in n for n in model.tensors)
        self.i_attention_wv = self.i_ffn_down = 0


def _mixture_type(name: str, shape: tuple[int, ...], new_type: str, ftype: str, model: ModelTensors,
                  c: _Counters) -> str:
    """llama_tensor_get_type_impl for the K file types on a dense, non-Falcon model."""
    if name == "output.weight":
        return "Q8_0" if shape[0] % block_size(new_type) else ("Q6_K" if new_type != "Q8_0" else new_type)
    if name == "token_embd.weight":
        return new_type
    if "attn_v.weight" in name:
        i = c.i_attention_wv
        if ftype == "Q2_K":
            new_type = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, c.n_attention_wv):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new_type = "Q5_K"
        c.i_attention_wv += 1
    elif "ffn_down" in name:
        i, n = c.i_ffn_down, c.n_ffn_down
        if ftype == "Q2_K":
            new_type = "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            new_type = "Q5_K"
        c.i_ffn_down += 1
    elif "attn_output.weight" in name:
        new_type = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new_type)
    return new_type


def _fallback(shape: tuple[int, ...], ggml_type: str) -> str:
    if ggml_type == "F32" or shape[0] % block_size(ggml_type) == 0:
        return ggml_type
    ggml_type = FALLBACK.get(ggml_type, ggml_type)
    return ggml_type if shape[0] % block_size(ggml_type) == 0 else "F16"


def tensor_types(model: ModelTensors, ftype: str, overrides: list[tuple[str, str]] | tuple = ()) -> dict[str, str]:
    """GGUF name → GGML type name for every tensor of `model` (unquantized ones "F32"), as
    llama-quantize gives them for file type `ftype` (e.g. "Q4_K_M")."""
    ftype = ftype.upper()
    if ftype not in DEFAULT_TYPE:
        raise QuantizationError(f"unknown llama.cpp file type {ftype}; supported: {', '.join(DEFAULT_TYPE)}")
    counters = _Counters(model)
    types = {}
    for name, shape in model.tensors.items():
        if not _quantizable(name, shape):
            types[name] = "F32"
            continue
        manual = override_for(name, overrides)
        chosen = manual or _mixture_type(name, shape, DEFAULT_TYPE[ftype], ftype, model, counters)
        types[name] = _fallback(shape, chosen)
    return types


def bits_per_weight(model: ModelTensors, types: dict[str, str]) -> float:
    """Bits per weight of the whole file (F32 tensors count 32)."""
    bits = n = 0
    for name, shape in model.tensors.items():
        count = 1
        for s in shape:
            count *= s
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[types[name]]]
        bits += count // block * type_size * 8
        n += count
    return bits / n
