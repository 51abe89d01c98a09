"""Perplexity building block: next-token NLL of a segment from its logits (used by parity/validation,
so every runtime is scored the same way on the same segments)."""

from __future__ import annotations

import torch


def nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL [seq-1] of one segment from its logits [seq, vocab], in float64."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(-1, input_ids[1:, None]).squeeze(-1)
