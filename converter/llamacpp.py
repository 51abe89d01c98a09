"""Run a GGUF file in llama.cpp (through llama-cpp-python) and read per-token logits.

llama-cpp-python is an optional dependency (extra `llama`); its absence is a clear error, never a
silent skip. Quantized KV caches (q8_0/q4_0) need flash attention for V in llama.cpp; llama.cpp then
rotates K/V with its own Hadamard unless `LLAMA_ATTN_ROT_DISABLE=1` is set in the environment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.errors import RespinError

logger = logging.getLogger(__name__)

KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class LlamaCppConfig:
    n_ctx: int = 512
    kv_type: str = "f16"
    n_threads: int | None = None  # None: all cores
    attn_rot: bool = True  # False sets LLAMA_ATTN_ROT_DISABLE=1 while the context is created

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"unknown KV cache type '{self.kv_type}': supported are {', '.join(KV_TYPES)}")


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise RespinError(
            "running GGUF files needs llama-cpp-python: pip install 'llama-cpp-python==0.3.36' (extra 'llama')"
        ) from exc
    return llama_cpp


class LlamaCppModel:
    """One llama.cpp context over a GGUF file; `logits(tokens)` scores a fresh segment."""

    def __init__(self, path: Path, cfg: LlamaCppConfig = LlamaCppConfig()):
        llama_cpp = _import_llama_cpp()
        ggml_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                     "q4_0": llama_cpp.GGML_TYPE_Q4_0}[cfg.kv_type]
        previous = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
        if not cfg.attn_rot:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=cfg.n_ctx, n_batch=cfg.n_ctx, n_ubatch=cfg.n_ctx, logits_all=True,
                n_threads=cfg.n_threads or os.cpu_count(), type_k=ggml_type, type_v=ggml_type,
                flash_attn=cfg.kv_type != "f16", verbose=False,
            )
        except ValueError as exc:
            raise RespinError(f"llama.cpp could not load {path}: {exc}") from exc
        finally:
            if previous is None:
                os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
            else:
                os.environ["LLAMA_ATTN_ROT_DISABLE"] = previous
        self.cfg = cfg

    def logits(self, tokens) -> np.ndarray:
        """Logits [len(tokens), vocab] (float32) of one segment evaluated from position 0."""
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.cfg.n_ctx:
            raise ValueError(f"segment of {len(tokens)} tokens exceeds n_ctx {self.cfg.n_ctx}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def generate(self, prompt_tokens, max_new_tokens: int) -> list[int]:
        """Greedy continuation (token ids) of a prompt."""
        llama_cpp = _import_llama_cpp()
        self.llm.reset()
        out = []
        for token in self.llm.generate([int(t) for t in prompt_tokens], temp=0.0, top_k=1, reset=True):
            if len(out) >= max_new_tokens or llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                break
            out.append(token)
        return out

    def close(self) -> None:
        self.llm.close()
