"""The simulated-quant reference: the stock transformers model plus hooks for everything that runs
online in a W4A4KV4 runtime (no forked modeling file).

- activation fake quant (per token, dynamic) at the input of every decoder linear
  (after each RMSNorm for q/k/v and gate/up, before o_proj and down_proj); lm_head stays A16;
- R4: online Hadamard on the down_proj input, its inverse fused into W_down (`fuse_r4`);
- R3: online Hadamard on Q and K after RoPE (per head; QKᵀ unchanged), then KV-cache fake quant
  of K and V — through a registered transformers attention function ("respin_sim") wrapping SDPA;
- ReSpinQuant skip-path corrections: block b's skip carries `x ↦ x T_b`. The decoder layer's
  residual is not hookable on its own, so the equivalent is done with hooks: the layer input is
  multiplied by T_attn T_mlp, the attention output by T_mlp, and each RMSNorm input by the inverse
  of what its stream was multiplied with (RMSNorm sees exactly the stream of the deployed model).

Online transforms use `hadamard_transform` (x ↦ x H/√n, the ONNX `respin::Hadamard` op); the fused
weight is the same transform of W's rows, so `x' W'ᵀ = x H Hᵀ Wᵀ / n = x Wᵀ`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from converter.arch import ModelShape, decoder_layers
from converter.quantization.fake_quant import ActQuantSpec, quantize_dequantize
from rotations.hadamard import require_hadamard, hadamard_transform
from rotations.respin import SkipCorrection

ATTN_IMPLEMENTATION = "respin_sim"


@dataclass(frozen=True)
class SimQuantConfig:
    """What the runtime quantizes and rotates online (weights are quantized separately)."""

    act: ActQuantSpec = field(default_factory=ActQuantSpec)
    kv: ActQuantSpec = field(default_factory=ActQuantSpec)
    r3: bool = True  # online Hadamard on Q/K after RoPE
    r4: bool = True  # online Hadamard on the down_proj input (W_down must be `fuse_r4`-ed)

    @classmethod
    def from_bits(cls, abits: int = 16, kvbits: int = 16, a_clip: float = 1.0, r3: bool = True,
                  r4: bool = True) -> "SimQuantConfig":
        """Per-token asymmetric activations (clip a_clip), asymmetric KV with group = head_dim."""
        return cls(ActQuantSpec(abits, clip=a_clip), ActQuantSpec(kvbits), r3, r4)

    def describe(self) -> dict:
        return {"abits": self.act.bits, "a_sym": self.act.symmetric, "a_clip": self.act.clip,
                "kvbits": self.kv.bits, "r3": self.r3, "r4": self.r4}


def check_online_sizes(shape: ModelShape, cfg: SimQuantConfig) -> None:
    """Online rotations need a real Hadamard of their size: refuse others by name (DESIGN §4.5)."""
    for use, n, on in (("R3 (head_dim)", shape.head_dim, cfg.r3), ("R4 (intermediate)", shape.intermediate, cfg.r4)):
        if on:
            require_hadamard(n, use=f"online Hadamard {use}")


@torch.no_grad()
def fuse_r4(model: torch.nn.Module) -> None:
    """W_down ← W_down H/√n (rows transformed), the offline half of R4; in place, model dtype."""
    for layer in decoder_layers(model):
        down = layer.mlp.down_proj
        down.weight.copy_(hadamard_transform(down.weight))


def _sim_attention(module, query, key, value, attention_mask, **kwargs):
    spec: _AttentionSim | None = getattr(module, "_respin_sim", None)
    if spec is not None:
        if spec.r3:
            query, key = hadamard_transform(query), hadamard_transform(key)
        key, value = quantize_dequantize(key, spec.kv), quantize_dequantize(value, spec.kv)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _sim_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@dataclass(frozen=True)
class _AttentionSim:
    r3: bool
    kv: ActQuantSpec


class SkipCorrections:
    """The 2L skip-path corrections, replaceable between training steps (`set`)."""

    def __init__(self, corrections: list[SkipCorrection] | None = None) -> None:
        self.corrections = corrections

    def set(self, corrections: list[SkipCorrection] | None) -> None:
        self.corrections = corrections

    def block(self, b: int) -> SkipCorrection | None:
        return None if self.corrections is None else self.corrections[b]


class SimQuantHandle:
    """Hooks attached to a model; `remove()` restores the stock model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.handles: list = []
        self.saved_attn = model.config._attn_implementation

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in decoder_layers(self.model):
            layer.self_attn.__dict__.pop("_respin_sim", None)
        self.model.config._attn_implementation = self.saved_attn

    def __enter__(self) -> "SimQuantHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_simquant(model: torch.nn.Module, cfg: SimQuantConfig,
                    skips: SkipCorrections | None = None) -> SimQuantHandle:
    """Turn a (rotated, `fuse_r4`-ed when cfg.r4) stock model into the simulated-quant reference.

    skips: ReSpinQuant's corrections for blocks 0 … 2L−1 (None: a single residual basis).
    """
    handle = SimQuantHandle(model)
    act = cfg.act

    def quant_output(_m, _inp, out):
        return quantize_dequantize(out, act)

    def quant_input(_m, args):
        return (quantize_dequantize(args[0], act), *args[1:])

    def rotate_quant_input(_m, args):
        return (quantize_dequantize(hadamard_transform(args[0]), act), *args[1:])

    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        attn._respin_sim = _AttentionSim(cfg.r3, cfg.kv)
        if skips is not None:
            _attach_skip_hooks(handle, layer, skips, 2 * i, 2 * i + 1)
        reg = handle.handles.append
        # after any skip pre-hook on the norms: quantize what the q/k/v and gate/up linears read
        reg(layer.input_layernorm.register_forward_hook(quant_output))
        reg(layer.post_attention_layernorm.register_forward_hook(quant_output))
        reg(attn.o_proj.register_forward_pre_hook(quant_input))
        reg(mlp.down_proj.register_forward_pre_hook(rotate_quant_input if cfg.r4 else quant_input))
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    return handle


def _attach_skip_hooks(handle: SimQuantHandle, layer, skips: SkipCorrections, b_attn: int, b_mlp: int) -> None:
    """Residual = x T_a T_m on entry; o_proj output × T_m; each norm undoes its stream's factor."""

    def through(blocks: tuple[int, ...], inverse: bool):
        def apply(x):
            for b in blocks:
                c = skips.block(b)
                if c is not None:
                    x = c.apply_inverse(x) if inverse else c.apply(x)
            return x
        return apply

    forward_both, inverse_both = through((b_attn, b_mlp), False), through((b_mlp, b_attn), True)
    apply_mlp, inverse_mlp = through((b_mlp,), False), through((b_mlp,), True)

    def layer_in(_m, args, kwargs):
        if args:
            return (forward_both(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": forward_both(kwargs["hidden_states"])}

    reg = handle.handles.append
    reg(layer.register_forward_pre_hook(layer_in, with_kwargs=True))
    reg(layer.input_layernorm.register_forward_pre_hook(lambda _m, a: (inverse_both(a[0]),)))
    reg(layer.self_attn.o_proj.register_forward_hook(lambda _m, _i, out: apply_mlp(out)))
    reg(layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: (inverse_mlp(a[0]),)))
