"""Validate an exported GGUF: perplexity and parity, torch reference vs llama.cpp, same tokens.

Per segment it runs: the FP reference, our torch model with the exact quantized weights (fp32
matmuls), the same model emulating llama.cpp's 8-bit activation blocks and F16 attention, and the
GGUF file inside llama.cpp. Parity is reported both ways (with and without emulation).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter.llamacpp import LlamaCppConfig, LlamaCppModel
from converter.llamacpp_emulation import emulate_llamacpp
from converter.parity import NLLAccumulator, ParityAccumulator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    tokens: int = 8192  # evaluation tokens (rounded down to whole segments)
    ctx: int = 512  # segment length: every model scores the same segments from position 0
    kv_type: str = "f16"  # llama.cpp KV cache type for the parity run


@torch.no_grad()
def validate_gguf(fp_model: torch.nn.Module, quantized: torch.nn.Module, gguf_path: Path,
                  segments: torch.Tensor, cfg: ValidationConfig) -> dict:
    emulated = copy.deepcopy(quantized)
    emulate_llamacpp(emulated)
    runtime = LlamaCppModel(gguf_path, LlamaCppConfig(n_ctx=cfg.ctx, kv_type=cfg.kv_type))
    fp, q = NLLAccumulator(), NLLAccumulator()
    parity, parity_fp32 = ParityAccumulator(), ParityAccumulator()
    try:
        for seg in tqdm(segments, desc="validate (torch + llama.cpp)", unit="seg"):
            ids = seg[None]
            rt = torch.from_numpy(runtime.logits(seg.tolist()))
            fp.add(fp_model(input_ids=ids, use_cache=False).logits[0], seg)
            q_logits = quantized(input_ids=ids, use_cache=False).logits[0]
            q.add(q_logits, seg)
            parity_fp32.add(q_logits, rt, seg)
            parity.add(emulated(input_ids=ids, use_cache=False).logits[0], rt, seg)
    finally:
        runtime.close()
    emul, plain = parity.result(), parity_fp32.result()
    return {
        "tokens": fp.n_pred, "ctx": cfg.ctx, "segments": len(segments), "kv_type": cfg.kv_type,
        "fp_ppl": fp.ppl,
        "torch_quantized_ppl": q.ppl,
        "torch_emulated_ppl": emul.ppl_reference,
        "llama_cpp_ppl": emul.ppl_runtime,
        "parity": emul.describe(),
        "parity_fp32": plain.describe(),
    }
