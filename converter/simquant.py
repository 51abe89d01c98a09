"""The simulated-quant reference end to end: learn rotations, fuse them, quantize weights, evaluate
W·A·KV-bit perplexity — what the ONNX W4A4 export is compared with, and what the rotation benchmark
measures.

Weights: per-channel symmetric intN (GPTQ or RTN), head and embedding 8-bit (Q8_0 grid), lm_head
input not quantized. Activations: per-token asymmetric; KV cache: per-token per-head asymmetric.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import RespinError
from converter.invariance import InvarianceResult, check_invariance, model_logits
from converter.loading import LoadedModel
from converter.parity import perplexity
from converter.quantization.calibrate import (FLOAT_WTYPE, QuantConfig, QuantizedModel, load_quantized_weights,
                                              quantize_model)
from converter.quantization.gptq import GPTQConfig
from converter.quantization.grids import GridSpec, grid
from rotations.fusion import apply_rotations, fold_norms
from rotations.online import SimQuantConfig, SimQuantHandle, SkipCorrections, attach_simquant, check_online_sizes, fuse_r4
from rotations.respin import FULL_RANK, dense_correction, online_macs_per_token, parse_rank, skip_corrections, transitions
from rotations.rotations import Rotations
from rotations.training import TrainConfig, train_rotations

logger = logging.getLogger(__name__)

FLOAT_BITS = 16


@dataclass(frozen=True)
class SimSpec:
    """Bit widths and weight quantizer of the simulated W·A·KV model (16: not quantized)."""

    wbits: int = 4
    abits: int = 4
    kvbits: int = 4
    a_clip: float = 1.0
    wquant: str = "gptq"  # "gptq" | "rtn"
    rank: int | str = 32  # ReSpinQuant skip-correction rank ("full": exact transitions)
    r3: bool = True
    r4: bool = True
    wgrid: str = ""  # weight grid name ("": per-channel symmetric int{wbits}, what integer W·A kernels need)

    def __post_init__(self) -> None:
        if not (2 <= self.wbits <= 8 or self.wbits == FLOAT_BITS):
            raise RespinError(f"--wbits must be 2..8 or 16 (got {self.wbits})")
        if isinstance(self.rank, str) and self.rank.isdigit():
            object.__setattr__(self, "rank", int(self.rank))
        if self.rank != FULL_RANK and not (isinstance(self.rank, int) and self.rank >= 0):
            raise RespinError(f"--rank must be a non-negative integer or 'full' (got {self.rank!r})")

    @property
    def wtype(self) -> str:
        if self.wbits == FLOAT_BITS:
            return FLOAT_WTYPE
        return self.wgrid or f"int{self.wbits}"

    def online(self, quantize: bool = True) -> SimQuantConfig:
        if not quantize:
            return SimQuantConfig.from_bits(16, 16, r3=self.r3, r4=self.r4)
        return SimQuantConfig.from_bits(self.abits, self.kvbits, self.a_clip, self.r3, self.r4)

    def weight_grid(self) -> GridSpec | None:
        return None if self.wbits == FLOAT_BITS else grid(self.wtype)

    def describe(self) -> dict:
        return {"wbits": self.wbits, "abits": self.abits, "kvbits": self.kvbits, "a_clip": self.a_clip,
                "wquant": self.wquant, "rank": self.rank, "r3": self.r3, "r4": self.r4,
                "wgrid": self.wtype}


@dataclass
class SimQuantModel:
    model: torch.nn.Module  # rotated, R4-fused, with the exact quantized weights and online hooks
    handle: SimQuantHandle
    rank: int | None  # skip-correction rank (None: one residual basis)
    online_macs_per_token: int  # skip corrections only (R3/R4 Hadamards are O(n log n))
    invariance: InvarianceResult
    correction_fp_err: float | None  # max |Δlogit| of the rank-r corrections vs exact, unquantized
    qmodel: QuantizedModel | None = None  # the exact codes + scales (None: weights not quantized)
    corrections: list | None = None  # the rank-r skip corrections, one per block (None: one residual basis)

    def perplexity(self, segments: torch.Tensor, progress: bool = True) -> tuple[float, int]:
        acc = perplexity(self.model, segments, "sim-quant PPL" if progress else None)
        return acc.ppl, acc.n_pred


def canonical_model(loaded: LoadedModel, rotations: Rotations | None, r4: bool) -> torch.nn.Module:
    """Folded, untied copy with `rotations` fused (and W_down ← W_down·H for R4), built in float64."""
    dtype = next(loaded.model.parameters()).dtype
    model = copy.deepcopy(loaded.model).to(torch.float64)
    fold_norms(model)
    if rotations is not None:
        rotations.check_shape(loaded.shape)
        apply_rotations(model, rotations, loaded.shape)
    if r4:
        fuse_r4(model)
    return model.to(dtype)


def learn_rotations(loaded: LoadedModel, train: TrainConfig, online: SimQuantConfig, weight_grid: GridSpec | None,
                    calibration: torch.Tensor, checkpoint: Path | None = None, resume: bool = False) -> Rotations:
    """SpinQuant / ReSpinQuant rotations for `loaded`, trained on its canonical model."""
    check_online_sizes(loaded.shape, online)
    model = canonical_model(loaded, None, online.r4)
    return train_rotations(model, loaded.shape, calibration, online, weight_grid, train, checkpoint, resume)


def _corrections(rotations: Rotations | None, rank: int | None, exact: bool):
    if rotations is None or not rotations.per_block:
        return None
    if exact:
        return SkipCorrections([dense_correction(T) for T in transitions(rotations.R1)])
    return SkipCorrections(skip_corrections(rotations.R1, rank))


def build_simquant(loaded: LoadedModel, rotations: Rotations | None, spec: SimSpec, probe: torch.Tensor,
                   calibration: torch.Tensor | None, gptq: GPTQConfig = GPTQConfig()) -> SimQuantModel:
    """Fuse, check invariance (exact corrections, nothing quantized), quantize weights on the model as it
    runs (R3/R4 and rank-r corrections on, activations FP), then switch activation/KV quantization on."""
    check_online_sizes(loaded.shape, spec.online())
    model = canonical_model(loaded, rotations, spec.r4)
    rank = parse_rank(spec.rank, loaded.shape.hidden) if rotations is not None and rotations.per_block else None
    reference = model_logits(loaded.model, probe)
    with attach_simquant(model, spec.online(False), _corrections(rotations, rank, exact=True)):
        invariance = check_invariance(reference, model, probe, what="rotated model (exact skip transitions)")
    fp_err = None
    if rank is not None:
        with attach_simquant(model, spec.online(False), _corrections(rotations, rank, exact=False)):
            fp_err = float((model_logits(model, probe) - reference).abs().max())
        logger.info("rank-%d skip corrections change the FP logits by max %.3g", rank, fp_err)
    corrections = _corrections(rotations, rank, exact=False)
    quant = QuantConfig(method=spec.wquant, wtype=spec.wtype, gptq=gptq)
    qmodel = None
    if quant.quantizes:
        with attach_simquant(model, spec.online(False), corrections):
            qmodel = quantize_model(model, quant, calibration if quant.needs_calibration else None)
        load_quantized_weights(model, qmodel)
    macs = 0 if corrections is None else online_macs_per_token(corrections.corrections)
    handle = attach_simquant(model, spec.online(), corrections)
    return SimQuantModel(model, handle, rank, macs, invariance, fp_err, qmodel,
                         None if corrections is None else corrections.corrections)


def model_macs_per_token(loaded: LoadedModel) -> int:
    """Multiply-accumulates of the linears per token (lm_head included; attention scores excluded)."""
    s = loaded.shape
    attn = s.hidden * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
    mlp = 3 * s.hidden * s.intermediate
    return s.n_layers * (attn + mlp) + s.hidden * s.vocab
