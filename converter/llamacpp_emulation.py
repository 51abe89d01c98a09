"""Make the torch model of a GGUF file compute the way llama.cpp's CPU backend does.

llama.cpp does not multiply float activations by its quantized weights: it first quantizes each
activation row to 8-bit blocks of 32 (Q8_0 for Q4_0/Q8_0 weights, Q8_1 for Q4_1: `d = amax/127`,
`q = round(x/d)`, d stored as fp16), and with an F16 KV cache it rounds Q, K, V and the softmax
probabilities to fp16 around its attention matmuls. Emulating both brings the torch reference
close to llama.cpp token for token (parity), instead of comparing against an fp32 ideal.

Done with forward pre-hooks on the stock linears and a registered attention function: no forked
modeling code.
"""

from __future__ import annotations

import torch
from torch import nn

from converter.arch import decoder_layers, layer_linears

ATTENTION_NAME = "respin_llamacpp_f16"
Q8_BLOCK = 32


def quantize_q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K % 32 == 0) → x rounded through llama.cpp's Q8_0 activation blocks, as float32.

    Matches ggml's quantize_row_q8_0: the codes use the unrounded `1/d`, the dot product the fp16 d.
    """
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // Q8_BLOCK, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scaled = blocks * inv
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # C roundf: halves away from zero
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def _q8_input_hook(_module, args):
    return (quantize_q8_blocks(args[0]),) + tuple(args[1:])


def _llamacpp_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with llama.cpp's F16-cache roundings (fp32 accumulation, fp32 softmax)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = module.num_key_value_groups
    q = query.half().float()
    k = repeat_kv(key.half().float(), groups)
    v = repeat_kv(value.half().float(), groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).half().float()
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _llamacpp_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def emulate_llamacpp(model: nn.Module) -> list:
    """Switch `model` (in place) to llama.cpp's activation blocks and F16 attention; returns the
    hook handles (remove them and reset the attention implementation to undo)."""
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    handles = []
    for layer in decoder_layers(model):
        for linear in layer_linears(layer).values():
            handles.append(linear.register_forward_pre_hook(_q8_input_hook))
    handles.append(model.lm_head.register_forward_pre_hook(_q8_input_hook))
    return handles
