"""Perplexity of a torch causal LM over fixed-length segments (the same segments every runtime sees)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    n_predicted: int  # tokens scored: seq_len - 1 per segment
    ctx: int

    def describe(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.n_predicted, "ctx": self.ctx}


def nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL [seq-1] of one segment from its logits [seq, vocab] (float64 sum)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(-1, input_ids[1:, None]).squeeze(-1)


def perplexity_from_nll(nll: torch.Tensor, ctx: int) -> Perplexity:
    total = float(nll.sum())
    return Perplexity(math.exp(total / nll.numel()), total, nll.numel(), ctx)


@torch.no_grad()
def torch_segment_nll(model: torch.nn.Module, segments: torch.Tensor, desc: str = "perplexity") -> torch.Tensor:
    """NLL of every predicted token [n_segments, seq-1]; each segment is scored from position 0."""
    rows = []
    for seg in tqdm(segments, desc=desc, unit="seg", leave=False):
        logits = model(input_ids=seg[None], use_cache=False).logits[0]
        rows.append(nll_from_logits(logits, seg))
    return torch.stack(rows)


def torch_perplexity(model: torch.nn.Module, segments: torch.Tensor, desc: str = "perplexity") -> Perplexity:
    return perplexity_from_nll(torch_segment_nll(model, segments, desc), segments.shape[1])
