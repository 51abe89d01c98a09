"""The exported ONNX folder: `model.onnx` + `model.onnx.data` (weights, written tensor by tensor),
the tokenizer files and `genai_config.json` for onnxruntime-genai — written into a temporary folder
beside the target and renamed into place only when complete and checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import onnx

from converter.errors import RespinError
from converter.export_onnx import OnnxGraphConfig, build_decoder
from converter.loading import LoadedModel
from converter.onnx_runtime import MODEL_FILE

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise RespinError(f"ONNX output {path} is a file: give a directory (it will hold model.onnx, "
                          "its weights and the tokenizer)")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise RespinError(f"output directory {path} is not empty: pass --force to replace it")


def genai_config(loaded: LoadedModel, graph: OnnxGraphConfig, context_length: int) -> dict:
    """onnxruntime-genai's config for our decoder (its IO names are ours, DESIGN §6)."""
    s, config = loaded.shape, loaded.model.config
    tokenizer = loaded.tokenizer
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or eos)
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim, "hidden_size": s.hidden,
                "num_attention_heads": s.n_heads, "num_hidden_layers": s.n_layers,
                "num_key_value_heads": s.n_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
            "eos_token_id": eos, "pad_token_id": pad,
            "type": GENAI_MODEL_TYPES.get(config.model_type, "llama"),
            "vocab_size": s.vocab,
        },
        "search": {"do_sample": False, "max_length": context_length, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }


def check_genai_config(folder: Path) -> str:
    """Load the folder's config with the installed onnxruntime-genai (if any): "ok", or why not checked."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai not installed: config not checked"
    try:
        og.Config(str(folder))
    except Exception as exc:  # genai raises plain RuntimeError/OSError with its parser's message
        raise RespinError(f"onnxruntime-genai {og.__version__} rejects {folder / GENAI_CONFIG}: {exc}") from None
    return f"ok (onnxruntime-genai {og.__version__})"


def write_onnx_folder(out_dir: Path, loaded: LoadedModel, model, qmodel, graph: OnnxGraphConfig,
                      corrections: list | None, metadata: dict[str, str], force: bool) -> dict:
    """Write the whole folder atomically; returns what was written (sizes, genai check)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build_decoder(tmp / MODEL_FILE, model, qmodel, loaded.shape, graph, corrections, metadata)
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        loaded.tokenizer.save_pretrained(tmp)
        loaded.model.config.save_pretrained(tmp)  # lets `respin-export parity` rebuild the torch reference
        context = int(min(loaded.shape.max_positions, 8192))
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(loaded, graph, context), indent=2) + "\n")
        genai = check_genai_config(tmp) if not graph.kv_quantized else (
            "not applicable: onnxruntime-genai has no quantized-cache inputs (run with respin-export generate)")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir() if p.is_file()}
    return {"files": sizes, "model_bytes": sizes[MODEL_FILE] + sizes.get(MODEL_FILE + ".data", 0),
            "genai_config": genai}
