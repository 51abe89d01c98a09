"""The invariance gate: a model with fused rotations must compute the original function.

Runs in every conversion before quantizing. The classic silent failure it catches is a rotation
fused into the weights without its runtime counterpart, or applied twice through tied embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from converter.errors import RespinError

logger = logging.getLogger(__name__)

# max-abs logit tolerance by the dtype the models run in (DESIGN §4.8, issue 3).
INVARIANCE_TOL = {torch.float64: 1e-5, torch.float32: 1e-3}


@dataclass(frozen=True)
class InvarianceResult:
    max_abs_err: float
    tol: float
    n_tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.tol

    def describe(self) -> dict:
        return {"max_abs_logit_err": self.max_abs_err, "tol": self.tol, "tokens": self.n_tokens, "passed": self.passed}


@torch.no_grad()
def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a causal LM for a batch of token ids."""
    return model(input_ids=input_ids, use_cache=False).logits


def check_invariance(reference_logits: torch.Tensor, model: torch.nn.Module, input_ids: torch.Tensor,
                     what: str = "rotated model") -> InvarianceResult:
    """Compare `model`'s logits with the original's; raise RespinError when they differ."""
    dtype = next(model.parameters()).dtype
    tol = INVARIANCE_TOL.get(dtype, 1e-2)
    logits = model_logits(model, input_ids)
    err = (logits.double() - reference_logits.double()).abs().max().item()
    result = InvarianceResult(err, tol, input_ids.numel())
    if not result.passed:
        raise RespinError(
            f"invariance check failed: the {what} changes the FP function (max |Δlogit| = {err:.3g} > {tol:g}); "
            "a rotation was fused without its counterpart — refusing to quantize"
        )
    logger.info("invariance check passed: max |Δlogit| = %.3g (tol %g)", err, tol)
    return result
