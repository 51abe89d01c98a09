"""Canonicalize (fold RMSNorm scales, untie the head) and fuse R1/R2 into the weights.

Row-vector convention: a linear computes `y = x Wᵀ` with `W[out, in]`. With the residual stream
rotated to `x R1`, a reader of the stream keeps its function with `W ← W R1`, a writer with
`W ← R1ᵀ W` (and `b ← b R1`); the embedding becomes `E R1`. RMSNorm with unit scale commutes with an
orthogonal R1, so after `fold_norms` the FP function is unchanged (DESIGN §4).

All functions change the model in place, in the model's dtype: the pipeline runs them on a float64
copy and casts back once.
"""

from __future__ import annotations

import logging

import torch

from converter.arch import ModelShape, decoder_layers, layer_linears
from rotations.rotations import Rotations

logger = logging.getLogger(__name__)


@torch.no_grad()
def untie_lm_head(model: torch.nn.Module) -> bool:
    """Give lm_head its own weight when it shares the embedding's; returns whether it was tied."""
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    # transformers re-ties on `tie_weights()` while this mapping names the pair.
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {}
    return True


def _fold_scale_into(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    g = norm.weight.detach()
    for linear in linears:
        linear.weight.mul_(g.to(linear.weight.dtype)[None, :])
    norm.weight.fill_(1.0)


@torch.no_grad()
def fold_norms(model: torch.nn.Module) -> None:
    """Fold every RMSNorm scale into the linears it feeds (`W ← W·diag(g)`), norm scales → 1.

    The head is untied first: the final norm's scale goes into lm_head, not into the embedding.
    RMSNorm models need no mean-centring of the embedding (RMSNorm does not subtract a mean).
    """
    if untie_lm_head(model):
        logger.info("lm_head untied from the embedding (the folded final-norm scale makes them differ)")
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        _fold_scale_into(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_scale_into(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold_scale_into(model.model.norm, [model.lm_head])


def rotate_layer_weights(params: dict[str, torch.Tensor], R_attn: torch.Tensor, R_mlp: torch.Tensor,
                         R_out: torch.Tensor, R2: torch.Tensor | None, shape: ModelShape) -> dict[str, torch.Tensor]:
    """The weights of one decoder layer with its residual bases and head rotations fused (pure, differentiable).

    params: "q_proj.weight", …, "down_proj.weight" (+ any "*.bias") of the canonical layer.
    The attention block reads the stream in basis R_attn and writes in R_mlp; the MLP block reads in
    R_mlp and writes in R_out (all equal for QuaRot/SpinQuant: R1). R2: [d_h, d_h] for every head or
    [n_kv_heads, d_h, d_h], one per KV head shared by its query group.
    """
    out = dict(params)
    for short in ("q_proj", "k_proj", "v_proj"):
        out[f"{short}.weight"] = params[f"{short}.weight"] @ R_attn
    for short in ("gate_proj", "up_proj"):
        out[f"{short}.weight"] = params[f"{short}.weight"] @ R_mlp
    for short, R in (("o_proj", R_mlp), ("down_proj", R_out)):
        out[f"{short}.weight"] = R.T @ params[f"{short}.weight"]
        if f"{short}.bias" in params:
            out[f"{short}.bias"] = params[f"{short}.bias"] @ R
    if R2 is not None:
        R2 = R2.expand(shape.n_kv_heads, shape.head_dim, shape.head_dim) if R2.dim() == 2 else R2
        d = shape.head_dim
        v = out["v_proj.weight"].reshape(shape.n_kv_heads, d, -1)
        out["v_proj.weight"] = torch.einsum("hji,hjk->hik", R2, v).reshape(-1, v.shape[-1])
        if "v_proj.bias" in params:
            b = params["v_proj.bias"].reshape(shape.n_kv_heads, 1, d)
            out["v_proj.bias"] = (b @ R2).reshape(-1)
        # o_proj input column block of query head h uses the R2 of its KV head h // group
        R2_q = R2.repeat_interleave(shape.n_heads // shape.n_kv_heads, dim=0)
        o = out["o_proj.weight"].reshape(-1, shape.n_heads, d)
        out["o_proj.weight"] = torch.einsum("ohi,hij->ohj", o, R2_q).reshape(o.shape[0], -1)
    return out


def layer_params(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """"q_proj.weight" … "down_proj.bias" → the layer's linear parameters."""
    return {f"{short}.{kind}": p for short, linear in layer_linears(layer).items()
            for kind, p in (("weight", linear.weight), ("bias", linear.bias)) if p is not None}


@torch.no_grad()
def apply_rotations(model: torch.nn.Module, rotations: Rotations, shape: ModelShape) -> None:
    """Fuse the residual bases (R1, or ReSpinQuant's per-block bases) and per-layer R2 (V/O heads)
    into the weights of a folded model.

    Requires `fold_norms` first (unit norm scales), else the function changes. With per-block bases
    the model needs its skip-path corrections at run time (`rotations.online`).
    """
    embed = model.model.embed_tokens
    if model.lm_head.weight.data_ptr() == embed.weight.data_ptr():
        # Rotating a tied pair would apply R1 twice to one tensor: fold_norms unties it.
        raise ValueError("apply_rotations needs an untied lm_head: run fold_norms first")
    dtype = model.lm_head.weight.dtype
    basis = [rotations.residual_basis(b).to(dtype) for b in range(2 * shape.n_layers + 1)]
    embed.weight.copy_(embed.weight @ basis[0])
    for i, layer in enumerate(decoder_layers(model)):
        R2 = None if rotations.R2 is None else rotations.R2[i].to(dtype)
        params = layer_params(layer)
        fused = rotate_layer_weights(params, basis[2 * i], basis[2 * i + 1], basis[2 * i + 2], R2, shape)
        for name, p in params.items():
            p.copy_(fused[name])
    model.lm_head.weight.copy_(model.lm_head.weight @ basis[-1])
