"""GPTQ (Frantar et al., 2022) for one linear layer onto a `GridSpec` grid.

Minimises ||X Wᵀ - X Ŵᵀ||² column by column: each column is rounded, and its error, scaled by the
Cholesky factor of H⁻¹ (H = 2/n XᵀX), is spread over the columns not yet rounded. Group params
are fp16-rounded before the weights are rounded, so the returned codes are exactly the grid that
GPTQ optimised for, and `QuantizedTensor.dequantize()` equals the weights it decided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from converter.quantization.grids import (GridSpec, QuantizationError, QuantizedTensor, dequantize_codes,
                                          fit_group_params, fit_super_block_params, quantize_with_params)

logger = logging.getLogger(__name__)

_CHOLESKY_RETRIES = 3


@dataclass(frozen=True)
class GPTQConfig:
    """percdamp: damping added to diag(H), as a fraction of its mean. block_size: columns per lazy
    batch update (a multiple of the grid's group size). act_order: process columns by decreasing
    H_ii; groups stay the contiguous runs of `group_size` columns GGUF stores, so their params are
    fitted up front on the original weights ("static groups"). clip_search: MSE search of each
    group's range (see `fit_group_params`)."""

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip_search: bool = True

    def __post_init__(self) -> None:
        if self.percdamp < 0:
            raise QuantizationError(f"GPTQ percdamp must be >= 0 (got {self.percdamp})")
        if self.block_size < 1:
            raise QuantizationError(f"GPTQ block_size must be positive (got {self.block_size})")


class HessianAccumulator:
    """Running H = 2/n · Σ x xᵀ over the n tokens of inputs x [..., in] to one linear layer.

    float32 by default, as in the GPTQ reference: float64 products cost several times more on CPUs
    and GPTQ damps H anyway.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.n_tokens = 0
        self._xtx = torch.zeros(in_features, in_features, device=device, dtype=dtype)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(f"Hessian of a {self.in_features}-input layer fed inputs of width {x.shape[-1]}")
        x = x.detach().reshape(-1, self.in_features).to(self._xtx)
        self._xtx.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise QuantizationError("Hessian requested before any calibration input was seen")
        return self._xtx * (2.0 / self.n_tokens)


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹; damping grows 10x per failed attempt."""
    mean_diag = torch.diag(H).mean()
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(_CHOLESKY_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return Hinv
        if attempt < _CHOLESKY_RETRIES:
            new_damp = torch.maximum(10 * damp, 1e-3 * mean_diag)
            logger.warning("GPTQ: Hessian not positive definite with damp %.3g; retrying with %.3g",
                           float(damp), float(new_damp))
            damp = new_damp
    raise QuantizationError(f"GPTQ: Hessian not positive definite even with damp {float(damp):.3g} "
                            f"({float(damp / mean_diag):.3g} of mean diag): calibration inputs broken?")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: GridSpec, cfg: GPTQConfig) -> QuantizedTensor:
    """GPTQ-quantize w [out, in] given H [in, in] (∝ Σ x xᵀ of its calibration inputs; scale-free).

    Dead inputs (H_ii == 0) get H_ii = 1 and a zero weight column. Computation in float64; codes are
    rounded in float32 with llama.cpp's arithmetic (see `quantize_with_params`).
    """
    out, n_in = w.shape
    gs = spec.group_for(n_in)
    # Params are fitted per "fit unit": a group, or a whole super-block of a K-quant (its groups share
    # the fp16 super-scale). Units wider than a lazy block (per-channel grids) are fitted up front.
    unit = spec.super_block or gs
    if spec.super_block and n_in % unit:
        raise QuantizationError(f"GPTQ on {spec.name}: the input dim must be a multiple of {unit} (got {n_in})")
    block_size = -(-cfg.block_size // unit) * unit if spec.super_block else cfg.block_size
    static_groups = cfg.act_order or unit > block_size
    if not static_groups and block_size % unit:
        raise QuantizationError(f"GPTQ on {spec.name}: block_size {block_size} must be a multiple of "
                                f"group_size {unit}")
    if tuple(H.shape) != (n_in, n_in):
        raise QuantizationError(f"GPTQ: Hessian {tuple(H.shape)} does not match weight {tuple(w.shape)}")
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    if not torch.isfinite(H).all() or not torch.isfinite(W).all():
        raise QuantizationError("GPTQ: NaN or inf in the weight or its Hessian")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = -(-n_in // gs)  # the last group may be shorter (MatMulNBits pads it)
    scale = torch.zeros(out, n_groups, dtype=torch.float32, device=W.device)
    offset = None if spec.symmetric else torch.zeros_like(scale)
    n_super = n_in // unit if spec.super_block else 0
    super_scale = torch.zeros(out, n_super, dtype=torch.float32, device=W.device) if n_super else None
    super_min = None if super_scale is None or spec.symmetric else torch.zeros_like(super_scale)
    importance = torch.diag(H).float()

    def fit(u: int, unit_w: torch.Tensor) -> None:
        """Params of fit unit u from its columns unit_w [out, ≤ unit]."""
        if not spec.super_block:
            d, m = fit_group_params(unit_w, spec, clip_search=cfg.clip_search)
            scale[:, u] = d
            if offset is not None:
                offset[:, u] = m
            return
        per = spec.groups_per_super_block
        d, m, D, Dm = fit_super_block_params(unit_w, spec, clip_search=cfg.clip_search,
                                             importance=importance[u * unit:(u + 1) * unit])
        scale[:, u * per:(u + 1) * per] = d
        super_scale[:, u] = D
        if offset is not None:
            offset[:, u * per:(u + 1) * per] = m
            super_min[:, u] = Dm

    perm = torch.arange(n_in, device=W.device)
    if static_groups:
        for u in range(-(-n_in // unit)):  # fitted on the original weights
            fit(u, W[:, u * unit : (u + 1) * unit])
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // gs).tolist()  # group of the j-th processed column

    Hinv = _inverse_hessian_cholesky(H, cfg.percdamp)
    codes = torch.zeros(out, n_in, dtype=torch.int16, device=W.device)  # in processing order

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if not static_groups and (i1 + i) % unit == 0:
                # fitted on the unit's weights as updated so far (block_size is a multiple of the unit)
                fit((i1 + i) // unit, W1[:, i : i + unit].float())
            g = group_of[i1 + i]
            d = scale[:, g : g + 1]
            m = None if offset is None else offset[:, g : g + 1]
            q = quantize_with_params(W1[:, i : i + 1], d, m, spec)
            codes[:, i1 + i] = q[:, 0]
            err = (W1[:, i] - dequantize_codes(q, d, m, spec)[:, 0].double()) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    return QuantizedTensor(codes, scale, offset, spec, super_scale, super_min)
