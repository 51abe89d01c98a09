"""Architecture adapters: what the converter needs to know about a model family, as data.

All supported families share the transformers LLaMA module layout
(`model.embed_tokens`, `model.layers[i].self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`); they differ in biases and in
how llama.cpp names and lays out their tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter.errors import RespinError


@dataclass(frozen=True)
class ArchAdapter:
    """Names and layout facts for one model family."""

    name: str
    hf_model_types: tuple[str, ...]
    gguf_arch: str  # llama.cpp's `general.architecture`
    qkv_bias: bool  # Qwen2 has biases on q/k/v
    permute_qk_for_gguf: bool  # llama.cpp's LLaMA graph expects Q/K rows in GGML RoPE order


LLAMA = ArchAdapter("llama", ("llama", "mistral"), "llama", qkv_bias=False, permute_qk_for_gguf=True)
QWEN2 = ArchAdapter("qwen2", ("qwen2",), "qwen2", qkv_bias=True, permute_qk_for_gguf=False)

ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA, QWEN2)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.hf_model_types)


def adapter_for(model_type: str) -> ArchAdapter:
    """The adapter of a transformers `config.model_type`; unknown → RespinError naming the list."""
    for adapter in ADAPTERS:
        if model_type in adapter.hf_model_types:
            return adapter
    raise RespinError(
        f"unsupported architecture '{model_type}': supported are {', '.join(supported_model_types())}"
    )


@dataclass(frozen=True)
class ModelShape:
    """Dimensions read off a transformers config."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        rope_theta = _rope_theta(config)
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            rms_eps=config.rms_norm_eps,
            rope_theta=rope_theta,
            max_positions=config.max_position_embeddings,
        )


def _rope_theta(config) -> float:
    # transformers 5 keeps RoPE settings in `rope_parameters`; older configs in `rope_theta`.
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


def linear_param_name(layer: int, short: str, kind: str = "weight") -> str:
    """transformers' parameter name of a decoder linear, e.g. (3, "o_proj") → model.layers.3.self_attn.o_proj.weight."""
    part = "self_attn" if short in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{part}.{short}.{kind}"


def layer_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The seven linears of a decoder layer, keyed by their short names."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "q_proj": attn.q_proj,
        "k_proj": attn.k_proj,
        "v_proj": attn.v_proj,
        "o_proj": attn.o_proj,
        "gate_proj": mlp.gate_proj,
        "up_proj": mlp.up_proj,
        "down_proj": mlp.down_proj,
    }
