"""Write a `QuantizedModel` as a GGUF file that llama.cpp runs as it is.

The quantized tensors go in as the exact blocks GPTQ/RTN chose (integer codes + fp16 scales), the
RMSNorm weights after folding (ones) and biases as F32. The file is written to a temporary name in
the target directory and renamed at the end: no partial output on failure.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from converter import __version__
from converter.arch import ArchAdapter, ModelShape
from converter.gguf_tokenizer import tokenizer_kv_from_gguf, write_hf_tokenizer, write_tokenizer_kv
from converter.loading import ModelSource
from converter.quantization.calibrate import MIXTURE_WTYPES, QuantizedModel
from converter.quantization.gguf_blocks import gguf_qtype, to_gguf_blocks
from converter.quantization.grids import QuantizedTensor

logger = logging.getLogger(__name__)

FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32,
              # llama.cpp's mixtures (converter.gguf_mixture): the file type llama-quantize writes for them
              "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K, "q3_k_s": gguf.LlamaFileType.MOSTLY_Q3_K_S,
              "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M, "q3_k_l": gguf.LlamaFileType.MOSTLY_Q3_K_L,
              "q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "q5_k_s": gguf.LlamaFileType.MOSTLY_Q5_K_S, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
              "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
assert set(MIXTURE_WTYPES) <= set(FILE_TYPES)
# transformers parameter name (within a layer) → llama.cpp tensor name
LAYER_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSOR_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                       "lm_head.weight": "output.weight"}


@dataclass(frozen=True)
class GGUFExportConfig:
    name: str = "respin-export model"
    provenance: dict = field(default_factory=dict)  # flat {key: str|int|float|bool}, written as respin.*


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.<rest>
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in LAYER_TENSOR_NAMES:
        raise KeyError(f"no GGUF name for tensor '{hf_name}'")
    return f"blk.{parts[2]}.{LAYER_TENSOR_NAMES['.'.join(parts[3:])]}"


def rope_permute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q/K weight (or its codes/scales, row-aligned) from HF's half-split RoPE
    layout to the interleaved pairs llama.cpp's LLaMA graph rotates (same as llama.cpp's converter)."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _permute_quantized(qt: QuantizedTensor, n_heads: int) -> QuantizedTensor:
    return QuantizedTensor(
        codes=rope_permute_rows(qt.codes, n_heads), scale=rope_permute_rows(qt.scale, n_heads),
        offset=None if qt.offset is None else rope_permute_rows(qt.offset, n_heads), spec=qt.spec,
        super_scale=None if qt.super_scale is None else rope_permute_rows(qt.super_scale, n_heads),
        super_min=None if qt.super_min is None else rope_permute_rows(qt.super_min, n_heads))


def _rope_heads(hf_name: str, adapter: ArchAdapter, shape: ModelShape) -> int | None:
    if not adapter.permute_qk_for_gguf:
        return None
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        return shape.n_heads
    if hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        return shape.n_kv_heads
    return None


def write_gguf(model: torch.nn.Module, qmodel: QuantizedModel, adapter: ArchAdapter, shape: ModelShape,
               source: ModelSource, path: Path, cfg: GGUFExportConfig) -> Path:
    """Write the GGUF file at `path` (atomically). `model` supplies the float tensors (norms, biases)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, adapter.gguf_arch)
        _add_metadata(writer, adapter, shape, qmodel, cfg)
        if source.is_gguf:
            write_tokenizer_kv(writer, tokenizer_kv_from_gguf(source.path))
        else:
            write_hf_tokenizer(writer, source.path, model.config.model_type, shape.vocab)
        _add_tensors(writer, model, qmodel, adapter, shape)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def _add_metadata(writer: gguf.GGUFWriter, adapter: ArchAdapter, shape: ModelShape, qmodel: QuantizedModel,
                  cfg: GGUFExportConfig) -> None:
    writer.add_name(cfg.name)
    writer.add_context_length(shape.max_positions)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.n_heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(FILE_TYPES.get(qmodel.config.wtype, gguf.LlamaFileType.GUESSED))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("respin.version", __version__)
    for key, value in cfg.provenance.items():
        _add_scalar(writer, f"respin.{key}", value)


def _add_scalar(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_string(key, str(value))


def _add_tensors(writer: gguf.GGUFWriter, model: torch.nn.Module, qmodel: QuantizedModel, adapter: ArchAdapter,
                 shape: ModelShape) -> None:
    params = dict(model.named_parameters())
    for hf_name in params:
        name = gguf_tensor_name(hf_name)
        heads = _rope_heads(hf_name, adapter, shape)
        qt = qmodel.tensors.get(hf_name)
        if qt is not None:
            if heads:
                qt = _permute_quantized(qt, heads)
            writer.add_tensor(name, to_gguf_blocks(qt), raw_dtype=gguf_qtype(qt.spec))
        else:
            t = params[hf_name].detach().float()
            if heads:
                t = rope_permute_rows(t, heads)
            writer.add_tensor(name, t.numpy().astype(np.float32))
