"""Run an exported ONNX decoder in onnxruntime: full-sequence logits (parity, perplexity) and greedy
decoding with the KV cache (`respin-export generate`).

The cache layout is read off the session's inputs, so FP32 (`key`, `value`) and quantized caches
(`key`, `key_scale`, `key_zero_point`, …) run through the same code.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.errors import RespinError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
_PAST = re.compile(r"past_key_values\.(\d+)\.(\w+)")
_NUMPY = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
          "tensor(float16)": np.float16}


@dataclass(frozen=True)
class CacheSlot:
    name: str  # e.g. "key_scale"
    dtype: type
    heads: int
    last_dim: int


def model_path(folder: Path) -> Path:
    """`folder/model.onnx` (or `folder` itself when it is the .onnx file); a clear error when absent."""
    path = Path(folder) / MODEL_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise RespinError(f"{folder} holds no {MODEL_FILE}: export one with `respin-export --to onnx -o {folder}`")
    return path


class OnnxDecoder:
    """An onnxruntime session over `folder/model.onnx` (our kernels registered when `use_kernels`)."""

    def __init__(self, folder: Path, use_kernels: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = model_path(folder)
        if use_kernels:
            from runtime_ops.library import session_options

            options = session_options(use_kernels=True, threads=threads)
        else:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
        self.path = path
        self.use_kernels = use_kernels
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.slots, self.n_layers = self._cache_slots()

    def _cache_slots(self) -> tuple[list[CacheSlot], int]:
        slots: dict[str, CacheSlot] = {}
        layers = set()
        for arg in self.session.get_inputs():
            match = _PAST.fullmatch(arg.name)
            if match:
                layers.add(int(match.group(1)))
                slots[match.group(2)] = CacheSlot(match.group(2), _NUMPY[arg.type], arg.shape[1], arg.shape[3])
        return list(slots.values()), len(layers)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {f"past_key_values.{i}.{s.name}": np.zeros((batch, s.heads, 0, s.last_dim), s.dtype)
                for i in range(self.n_layers) for s in self.slots}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict]:
        """Logits [batch, seq, vocab] of `ids` [batch, seq] after `past_len` cached tokens, and the new cache."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past_len + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
                 **past}
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, feeds)))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in outputs.items() if k.startswith("present.")}
        return outputs["logits"], present

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits of a whole sequence batch [batch, seq] from an empty cache."""
        return self.step(ids, self.empty_cache(ids.shape[0]), 0)[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding with the KV cache: the new token ids (stops at eos)."""
        ids = np.asarray([prompt_ids], np.int64)
        logits, past = self.step(ids, self.empty_cache(1), 0)
        length, new = ids.shape[1], []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos_token_id:
                break
            logits, past = self.step(np.asarray([[token]], np.int64), past, length)
            length += 1
        return new


def uses_custom_ops(folder: Path) -> bool:
    """Whether the folder's graph has `respin` nodes (weights are not loaded to find out)."""
    import onnx

    from runtime_ops.schema import DOMAIN

    return any(n.domain == DOMAIN for n in onnx.load(str(model_path(folder)), load_external_data=False).graph.node)
