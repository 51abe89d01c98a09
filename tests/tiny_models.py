"""Tiny random LLaMA-family models built in the tests (fast, cover non-power-of-two sizes)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_config(family: str = "llama", hidden: int = 96, heads: int = 6, kv_heads: int = 2, layers: int = 2,
                intermediate: int = 160, vocab: int = 256, tie: bool = True):
    config_cls, _ = FAMILIES[family]
    return config_cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      head_dim=hidden // heads, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def near_hadamard_bases(shape, scale: float, seed: int = 0) -> torch.Tensor:
    """ReSpinQuant-like per-block bases [2L+1, D, D] near one Hadamard (as after training): H · expm(skew noise)."""
    from rotations.hadamard import normalized_hadamard

    g = torch.Generator().manual_seed(seed)
    H = normalized_hadamard(shape.hidden)
    bases = []
    for _ in range(2 * shape.n_layers + 1):
        A = scale * torch.randn(shape.hidden, shape.hidden, generator=g, dtype=torch.float64)
        bases.append(H @ torch.linalg.matrix_exp(A - A.T))
    return torch.stack(bases)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float64, **kwargs) -> torch.nn.Module:
    """A random model whose norm scales and biases are non-trivial (so folding is really tested)."""
    torch.manual_seed(seed)
    _, model_cls = FAMILIES[family]
    model = model_cls(tiny_config(family, **kwargs)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.requires_grad_(False)
    return model
