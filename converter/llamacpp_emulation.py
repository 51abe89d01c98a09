"""Make the torch model of a GGUF file compute the way llama.cpp's CPU backend does.

What llama.cpp (0.3.36's vendored ggml, x86 AVX2/AVX512 build, F16 KV cache, flash attention off)
actually computes for a LLaMA-family graph, and what this module reproduces:

* Every weight matmul first quantizes its activation rows to 8-bit blocks of 32: Q8_0 for
  Q4_0/Q8_0 weights (Q4_0 goes through the AVX2 repack `q4_0_8x8`, whose `quantize_mat_q8_0_4x8`
  is numerically the same), Q8_1 for Q4_1. Both SIMD quantizers compute `d = amax/127` (stored
  as fp16), the multiplier `127/amax` (a true division, *not* `1/d`) and round half to even
  (`_mm256_round_ps`), unlike the scalar reference `quantize_row_q8_0_ref` (`1/d`, `roundf`).
  Q8_0 and Q8_1 give the same codes and d; Q8_1 also stores `s = fp16(d * sum(codes))`.
* RMSNorm (`ggml_compute_forward_rms_norm_f32`): float squares summed in double, float mean,
  `1.0f/sqrtf(mean + eps)`, then `x * scale`.
* RoPE (`ggml_rope_cache_init` + `rotate_pairs`, mode NORMAL on rows permuted at export):
  `theta_scale = powf(base, -2/n_dims)`, theta a running float product, `sincosf`, and the
  rotation compiled with FMA contraction: `fma(x0, cos, -fl(x1*sin))`, `fma(x1, cos, fl(x0*sin))`.
* Attention without flash attention: `kq = mul_mat(K_f16, Q)` converts Q to fp16 (K is fp16 in
  the cache), accumulates in fp32; `soft_max_ext` scales, adds the mask, subtracts the max, sums
  the exps in double and multiplies by `(float)(1/sum)`; `mul_mat(V_f16, probs)` converts the
  probabilities to fp16.

Done with forward (pre-)hooks on the stock modules and a registered attention function: no forked
modeling code. Each helper is bit-exact against the ggml function it names, except where noted
(fp32 matmul accumulation order, `ggml_v_expf`).

Measured caveat (see tests and the parity report): with 8-bit activation blocks the network is
chaotic at the ulp level -- a 1-ulp perturbation of the input embeddings changes the *emulated*
model's logits as much as the whole torch-vs-llama.cpp difference (SmolLM2-135M: top-1 ~97%),
whereas the plain fp32 model barely moves. Unless every kernel's accumulation order is matched,
emulation therefore cannot bring end-to-end parity below that noise floor; it is exact per
operation, which is what it is useful for (debugging a mismatch op by op).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from converter.arch import decoder_layers, layer_linears

ATTENTION_NAME = "respin_llamacpp_f16"
Q8_BLOCK = 32


# --- activation blocks -------------------------------------------------------------------------

def quantize_row_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K % 32 == 0) → (codes [..., K/32, 32] int8-valued float32, d [..., K/32, 1] float32
    before fp16 rounding).

    Bit-exact with ggml-cpu's SIMD `quantize_row_q8_0` / `quantize_row_q8_1` (arch/x86/quants.c,
    AVX/AVX2 branch, also used by AVX512 builds) and `ggml_quantize_mat_q8_0_4x8` (repack.cpp):
    `d = amax/127`, codes `round_half_even(x * (127/amax))`, all in float32.
    """
    x = x.float()
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK, Q8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    # torch evaluates `127.0 / t` as `127 * (1/t)` (two roundings): divide tensor by tensor.
    mul = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
    codes = torch.round(blocks * mul)  # torch.round: half to even, like _MM_ROUND_NEAREST
    return codes, d


def quantize_q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded through llama.cpp's 8-bit activation blocks (codes * fp16 d), in x's dtype.

    What ggml's Q4_0×Q8_0, Q8_0×Q8_0 and Q4_1×Q8_1 dot products see as the activation (for Q4_1 the
    min term uses Q8_1's `s` instead, see `q8_1_block_sums`)."""
    codes, d = quantize_row_q8(x)
    return (codes * d.half().float()).reshape(x.shape).to(x.dtype)


def q8_1_block_sums(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`s` of ggml's block_q8_1 as float32: `fp16(d * sum(codes))` with the unrounded float d
    (quantize_row_q8_1, AVX2 branch). Q4_1 weights use it for their min: `dot += m * s`."""
    return (d * codes.sum(-1, keepdim=True)).half().float()


def quantize_q8_0_reference(x: torch.Tensor) -> torch.Tensor:
    """x through ggml's scalar `quantize_row_q8_0_ref` (ggml-quants.c; what gguf-py's
    `quants.quantize(…, Q8_0)` implements): `1/d` multiplier, `roundf` (halves away from zero).
    Used only by non-SIMD builds; kept to document the difference."""
    x32 = x.float()
    blocks = x32.reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scaled = blocks * inv
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


# --- RMSNorm -----------------------------------------------------------------------------------

def ggml_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Bit-exact `ggml_compute_forward_rms_norm_f32`: `sum += (double)(x*x)`, `mean = (float)(sum/n)`,
    `scale = 1.0f/sqrtf(mean + eps)`, `y = x*scale` (float32).

    (torch.sqrt on float32 is not correctly rounded on every CPU build; the double sqrt rounded to
    float is, like sqrtf.)"""
    x = x.float()
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    var = mean + torch.tensor(np.float32(eps))
    scale = torch.ones_like(var) / torch.sqrt(var.double()).float()
    return x * scale


def _rms_norm_hook(module, args, _output):
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps")
    return (ggml_rms_norm(args[0], eps) * module.weight.float()).to(args[0].dtype)


# --- RoPE --------------------------------------------------------------------------------------

def ggml_rope_cos_sin(positions: torch.Tensor, n_dims: int, freq_base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., n_dims/2] (float32) of `ggml_rope_cache_init` for plain RoPE (no scaling,
    ext_factor 0, mscale 1): `theta_scale = powf(base, -2.0f/n_dims)`; theta starts at the
    position and is multiplied by theta_scale in float32 per pair; `sincosf(theta)`.

    powf/sincosf are taken as correctly rounded (computed in double, rounded once)."""
    theta_scale = torch.tensor(np.float32(np.float64(np.float32(freq_base)) ** np.float64(np.float32(-2.0 / n_dims))))
    theta = positions.to(torch.float32)
    thetas = []
    for _ in range(n_dims // 2):
        thetas.append(theta)
        theta = theta * theta_scale
    th = torch.stack(thetas, -1).double()
    return torch.cos(th).float(), torch.sin(th).float()


def ggml_rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] laid out as HF's halves (pair i = (i, i + d/2), which export permutes to
    ggml's adjacent pairs) like ggml-cpu's `rotate_pairs` as compiled with FMA contraction:
    `out0 = fma(x0, cos, -fl(x1*sin))`, `out1 = fma(x1, cos, fl(x0*sin))`. cos/sin broadcast
    against x[..., :d/2]. The fma is evaluated in double (exact product) and rounded to float."""
    h = x.shape[-1] // 2
    x = x.float()
    x0, x1 = x[..., :h], x[..., h:]
    c = cos.double()
    o0 = (x0.double() * c - (x1 * sin).double()).float()
    o1 = (x1.double() * c + (x0 * sin).double()).float()
    return torch.cat([o0, o1], -1)


class _RopeState:
    """cos/sin of the current forward's positions, handed from the rotary module to q/k_proj."""

    def __init__(self, head_dim: int, freq_base: float):
        self.head_dim, self.freq_base = head_dim, freq_base
        self.cos_sin = None

    def rotary_hook(self, _module, args, kwargs, output):
        positions = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.cos_sin = ggml_rope_cos_sin(positions, self.head_dim, self.freq_base)
        cos, sin = output
        # HF then computes q*1 + rotate_half(q)*0 == q exactly: the rotation happens in qk_hook.
        return torch.ones_like(cos), torch.zeros_like(sin)

    def qk_hook(self, _module, _args, output):
        b, n, _ = output.shape
        cos, sin = self.cos_sin
        heads = output.reshape(b, n, -1, self.head_dim)
        rotated = ggml_rope_rotate(heads, cos[:, :, None], sin[:, :, None])
        return rotated.reshape(output.shape).to(output.dtype)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"llama.cpp emulation supports plain RoPE only, not '{params['rope_type']}'")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


# --- attention ---------------------------------------------------------------------------------

def ggml_soft_max(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`ggml_compute_forward_soft_max_f32` (no ALiBi, no sinks): `w = scores*scale + mask`,
    `e = exp(w - max)`, sum in double, `e * (float)(1/sum)`. Not bit-exact in the exp itself
    (ggml uses its own `ggml_v_expf`; torch.exp differs by ~1 ulp)."""
    w = scores.float() * torch.tensor(np.float32(scale))
    if mask is not None:
        w = w + mask.float()
    e = torch.exp(w - w.amax(-1, keepdim=True))
    inv = (1.0 / e.double().sum(-1, keepdim=True)).float()
    return e * inv


def _llamacpp_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Non-flash attention with an F16 KV cache, as llama.cpp's CPU graph runs it."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = module.num_key_value_groups
    q = query.half().float()
    k = repeat_kv(key.half().float(), groups)
    v = repeat_kv(value.half().float(), groups)
    scores = torch.matmul(q, k.transpose(2, 3))
    probs = ggml_soft_max(scores, attention_mask, scaling).half().float()
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _llamacpp_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


# --- wiring ------------------------------------------------------------------------------------

def _q8_input_hook(_module, args):
    return (quantize_q8_blocks(args[0]),) + tuple(args[1:])


def emulate_llamacpp(model: nn.Module) -> list:
    """Switch `model` (in place) to llama.cpp's CPU arithmetic: 8-bit activation blocks before every
    linear and lm_head, ggml RMSNorm and RoPE, F16 non-flash attention. Returns the hook handles
    (remove them and reset the attention implementation to undo).

    The same call serves Q4_0, Q4_1 and Q8_0 files: their activation blocks (Q8_0 / Q8_1) have the
    same codes and scale. Models must be float32 with plain RoPE; the exported Q/K row permutation
    is accounted for (pairs (i, i+d/2) here are ggml's adjacent pairs there)."""
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _RopeState(head_dim, _rope_theta(config))
    handles = [model.model.rotary_emb.register_forward_hook(rope.rotary_hook, with_kwargs=True)]
    for layer in decoder_layers(model):
        for name, linear in layer_linears(layer).items():
            handles.append(linear.register_forward_pre_hook(_q8_input_hook))
            if name in ("q_proj", "k_proj"):
                handles.append(linear.register_forward_hook(rope.qk_hook))
        handles.append(layer.input_layernorm.register_forward_hook(_rms_norm_hook))
        handles.append(layer.post_attention_layernorm.register_forward_hook(_rms_norm_hook))
    handles.append(model.model.norm.register_forward_hook(_rms_norm_hook))
    handles.append(model.lm_head.register_forward_pre_hook(_q8_input_hook))
    return handles


def perturb_embeddings_one_ulp(model: nn.Module, seed: int = 0):
    """Multiply the token embeddings by (1 ± 2^-23) with random signs (a 1-ulp nudge): run a model
    with and without it to measure its own noise floor for parity metrics. Returns the handle."""

    def hook(_module, _args, output):
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, output.shape, generator=gen).to(output.dtype) * 2 - 1
        return output * (1 + signs * 2.0 ** -23)

    return model.model.embed_tokens.register_forward_hook(hook)
