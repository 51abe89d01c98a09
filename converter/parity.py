"""Parity between a torch reference and a runtime on the same segments.

Reports max-abs logit error, top-1 agreement and the perplexity of each side on identical tokens.
Accumulated segment by segment, so full-vocabulary logits of only one segment are held at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from converter.evaluation import nll_from_logits


@dataclass(frozen=True)
class ParityResult:
    top1_agreement: float
    max_abs_logit_err: float
    ppl_reference: float
    ppl_runtime: float
    n_tokens: int  # positions compared

    @property
    def ppl_rel_diff(self) -> float:
        return (self.ppl_runtime - self.ppl_reference) / self.ppl_reference

    def describe(self) -> dict:
        return {"top1_agreement": self.top1_agreement, "max_abs_logit_err": self.max_abs_logit_err,
                "ppl_rel_diff": self.ppl_rel_diff, "ppl_reference": self.ppl_reference,
                "ppl_runtime": self.ppl_runtime, "tokens": self.n_tokens}


@dataclass
class ParityAccumulator:
    agree: int = 0
    positions: int = 0
    max_err: float = 0.0
    nll_ref: float = 0.0
    nll_rt: float = 0.0
    n_pred: int = 0

    def add(self, reference: torch.Tensor, runtime: torch.Tensor, tokens: torch.Tensor) -> None:
        """reference, runtime: logits [seq, vocab] of one segment; tokens [seq]."""
        reference, runtime = reference.float(), runtime.float()
        self.max_err = max(self.max_err, float((reference - runtime).abs().max()))
        self.agree += int((reference.argmax(-1) == runtime.argmax(-1)).sum())
        self.positions += tokens.numel()
        self.nll_ref += float(nll_from_logits(reference, tokens).sum())
        self.nll_rt += float(nll_from_logits(runtime, tokens).sum())
        self.n_pred += tokens.numel() - 1

    def result(self) -> ParityResult:
        return ParityResult(self.agree / self.positions, self.max_err, math.exp(self.nll_ref / self.n_pred),
                            math.exp(self.nll_rt / self.n_pred), self.positions)


@dataclass
class NLLAccumulator:
    """Perplexity of one model over segments."""

    nll: float = 0.0
    n_pred: int = 0

    def add(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll += float(nll_from_logits(logits, tokens).sum())
        self.n_pred += tokens.numel() - 1

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n_pred)


@torch.no_grad()
def perplexity(model: torch.nn.Module, segments: torch.Tensor, progress: str | None = None) -> NLLAccumulator:
    """Perplexity of a torch causal LM over segments [n, seq], each scored from position 0.
    progress: a tqdm description, or None for no bar."""
    from tqdm.auto import tqdm

    acc = NLLAccumulator()
    for seg in tqdm(segments, desc=progress, unit="seg", disable=progress is None):
        acc.add(model(input_ids=seg[None], use_cache=False).logits[0], seg)
    return acc


@torch.no_grad()
def runtime_parity(reference: torch.nn.Module, runtimes: dict, segments: torch.Tensor,
                   progress: str | None = None) -> dict[str, ParityResult]:
    """Parity of each runtime (name → object with `.logits(ids [1, seq]) -> ndarray`) against the torch
    reference on the same segments [n, seq]; the reference runs once per segment."""
    from tqdm.auto import tqdm

    accs = {name: ParityAccumulator() for name in runtimes}
    for seg in tqdm(segments, desc=progress, unit="seg", disable=progress is None):
        ref = reference(input_ids=seg[None], use_cache=False).logits[0]
        for name, runtime in runtimes.items():
            accs[name].add(ref, torch.from_numpy(runtime.logits(seg[None].numpy())[0]), seg)
    return {name: acc.result() for name, acc in accs.items()}


@torch.no_grad()
def noise_floor(model: torch.nn.Module, segments: torch.Tensor, progress: str | None = None) -> ParityResult:
    """Parity of `model` against itself with its token embeddings nudged by one float32 ulp: the
    agreement no second float32 implementation can be expected to beat (a low-bit model whose
    activations are re-quantized every layer amplifies such differences)."""
    from tqdm.auto import tqdm

    from converter.llamacpp_emulation import perturb_embeddings_one_ulp

    acc = ParityAccumulator()
    for seg in tqdm(segments, desc=progress, unit="seg", disable=progress is None):
        reference = model(input_ids=seg[None], use_cache=False).logits[0]
        handle = perturb_embeddings_one_ulp(model)
        try:
            nudged = model(input_ids=seg[None], use_cache=False).logits[0]
        finally:
            handle.remove()
        acc.add(reference, nudged, seg)
    return acc.result()
