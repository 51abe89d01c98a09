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

from converter.arch import ModelShape, decoder_layers
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


def _rotate_input(linear: torch.nn.Linear, R: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight @ R)


def _rotate_output(linear: torch.nn.Linear, R: torch.Tensor) -> None:
    linear.weight.copy_(R.T @ linear.weight)
    if linear.bias is not None:
        linear.bias.copy_(linear.bias @ R)


def _rotate_heads_output(linear: torch.nn.Linear, R2: torch.Tensor, n_heads: int) -> None:
    """v_proj: each KV head's output block `W_h ← R2ᵀ W_h` (and its bias `b_h ← b_h R2`)."""
    d = R2.shape[0]
    w = linear.weight.view(n_heads, d, -1)
    w.copy_(torch.einsum("ji,hjk->hik", R2, w))
    if linear.bias is not None:
        b = linear.bias.view(n_heads, d)
        b.copy_(b @ R2)


def _rotate_heads_input(linear: torch.nn.Linear, R2: torch.Tensor, n_heads: int) -> None:
    """o_proj: each query head's input columns `W[:, h] ← W[:, h] R2` (GQA: same R2 for the group)."""
    d = R2.shape[0]
    w = linear.weight.view(linear.out_features, n_heads, d)
    w.copy_(torch.einsum("ohi,ij->ohj", w, R2))


@torch.no_grad()
def apply_rotations(model: torch.nn.Module, rotations: Rotations, shape: ModelShape) -> None:
    """Fuse R1 (residual stream) and per-layer R2 (V/O heads) into the weights of a folded model.

    Requires `fold_norms` first (unit norm scales), else the function changes.
    """
    embed = model.model.embed_tokens
    if model.lm_head.weight.data_ptr() == embed.weight.data_ptr():
        # Rotating a tied pair would apply R1 twice to one tensor: fold_norms unties it.
        raise ValueError("apply_rotations needs an untied lm_head: run fold_norms first")
    dtype = model.lm_head.weight.dtype
    R1 = rotations.R1.to(dtype)
    embed.weight.copy_(embed.weight @ R1)
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input(linear, R1)
        for linear in (attn.o_proj, mlp.down_proj):
            _rotate_output(linear, R1)
        if rotations.R2 is not None:
            R2 = rotations.R2[i].to(dtype)
            _rotate_heads_output(attn.v_proj, R2, shape.n_kv_heads)
            _rotate_heads_input(attn.o_proj, R2, shape.n_heads)
    _rotate_input(model.lm_head, R1)
