"""Per-tensor grids of a GGUF file: llama.cpp's mixed file types (Q4_K_M & co.) and --tensor-type.

llama.cpp's `llama-quantize` gives each tensor its own type (`quantization.llama_types` reproduces its
rules, fallbacks for rows that are not a multiple of 256 included). We apply the same choice to the
transformers parameters of the fused model, so our file and llama.cpp's are equal tensor-type for
tensor-type and GPTQ runs on every grid, fallback grids too.
"""

from __future__ import annotations

import torch

from converter.arch import ModelShape
from converter.export_gguf import gguf_tensor_name
from converter.quantization import llama_types
from converter.quantization.calibrate import FLOAT_WTYPE, MIXTURE_WTYPES, QuantConfig
from converter.quantization.grids import QuantizationError

# GGML type name → our grid name (F16 for the rare row not a multiple of 32: kept float, as F32)
GGML_TO_GRID = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
                "Q3_K": "q3_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "F32": FLOAT_WTYPE,
                "F16": FLOAT_WTYPE}


def model_tensors(model: torch.nn.Module, shape: ModelShape) -> llama_types.ModelTensors:
    """GGUF names and shapes (row length first, as ggml orders them) of the tensors we write."""
    tensors = {gguf_tensor_name(name): tuple(reversed(p.shape)) for name, p in model.named_parameters()}
    return llama_types.ModelTensors(n_layer=shape.n_layers, n_head=shape.n_heads, n_head_kv=shape.n_kv_heads,
                                 tensors=tensors)


def plan_tensor_grids(model: torch.nn.Module, shape: ModelShape, wtype: str,
                      overrides: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """transformers parameter name → grid name for the 2-D weights (the rest stays float)."""
    tensors = model_tensors(model, shape)
    types = llama_types.tensor_types(tensors, wtype, overrides)
    plan = {}
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        ggml = types[gguf_tensor_name(name)]
        if ggml not in GGML_TO_GRID:
            raise QuantizationError(f"{gguf_tensor_name(name)}: GGML type {ggml} is not a grid we quantize to; "
                                    f"supported: {', '.join(GGML_TO_GRID)}")
        plan[name] = GGML_TO_GRID[ggml]
    return plan


def resolve(quant: QuantConfig, model: torch.nn.Module, shape: ModelShape,
            overrides: tuple[tuple[str, str], ...] = ()) -> QuantConfig:
    """`quant` with its per-tensor grids filled for a mixture (or overrides); unchanged otherwise."""
    from dataclasses import replace

    if not quant.quantizes or not (is_mixture(quant.wtype) or overrides):
        return quant
    if is_mixture(quant.wtype):
        plan = plan_tensor_grids(model, shape, quant.wtype, overrides)
    else:  # one grid for the body, head_type for head and embedding, then the overrides
        plan = {name: quant.head_type if name in ("lm_head.weight", "model.embed_tokens.weight") else quant.wtype
                for name, p in model.named_parameters() if p.dim() == 2}
        plan.update(_override_plan(model, overrides))
    return replace(quant, tensor_grids=plan)


def _override_plan(model: torch.nn.Module, overrides: tuple[tuple[str, str], ...]) -> dict[str, str]:
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            ggml = llama_types.override_for(gguf_tensor_name(name), list(overrides))
            if ggml is not None:
                out[name] = GGML_TO_GRID[ggml]
    return out


def is_mixture(wtype: str) -> bool:
    return wtype.lower() in MIXTURE_WTYPES


# the 32-block grid learned rotations are trained for, by a mixture's leading precision
TRAINING_GRIDS = {"q2": "q4_0", "q3": "q4_0", "q4": "q4_0", "q5": "q5_0", "q6": "q8_0"}
