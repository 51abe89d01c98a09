"""The tokenizer section of a GGUF file: copied from a GGUF source, or built from an HF directory.

A GGUF source already holds exactly what llama.cpp needs (`tokenizer.*` keys), so those keys are
carried over verbatim. An HF directory goes through `gguf.vocab` (gpt2-BPE from tokenizer.json or
vocab.json + merges, sentencepiece from tokenizer.model) plus `SpecialVocab` for special ids,
add-bos/eos flags and the chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from converter.errors import RespinError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFKeyValue:
    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def tokenizer_kv_from_gguf(path: Path) -> list[GGUFKeyValue]:
    """Every `tokenizer.*` key of a GGUF file, ready to write again."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append(GGUFKeyValue(key, field.contents(), vtype, sub_type))
    return out


def write_tokenizer_kv(writer: gguf.GGUFWriter, kvs: list[GGUFKeyValue]) -> None:
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)


def bpe_pre_tokenizer_name(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a gpt2-BPE tokenizer.json, read off its pre-tokenizer.

    llama.cpp selects its pre-tokenizer regex by this name; the structures matched here are the
    ones of the families we adapt.
    """
    if model_type == "qwen2":
        return "qwen2"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if "Digits" in types and any(p.get("individual_digits") for p in parts) and "ByteLevel" in types:
        return "smollm"  # single digits, then the GPT-2 byte-level regex
    splits = [json.dumps(p.get("pattern", {})) for p in parts if p.get("type") == "Split"]
    if any("\\\\p{N}{1,3}" in s for s in splits):
        return "llama-bpe"  # LLaMA-3 style: numbers in runs of up to 3 digits
    if types == ["ByteLevel"]:
        return "gpt-2"
    logger.warning("unrecognised BPE pre-tokenizer %s: writing tokenizer.ggml.pre = 'default'", types)
    return "default"


def write_hf_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, model_type: str, n_vocab: int) -> None:
    """Write the tokenizer of an HF model directory into a GGUF writer."""
    tokenizer_json_path = model_dir / "tokenizer.json"
    try:
        vocab = gguf.vocab.BpeVocab(model_dir)
    except (FileNotFoundError, ValueError):
        vocab = None
    if vocab is not None:
        tokens, _scores, types = _all_tokens(vocab, n_vocab)
        writer.add_tokenizer_model("gpt2")
        tj = json.loads(tokenizer_json_path.read_text()) if tokenizer_json_path.is_file() else {}
        _mark_added_tokens(types, tj)
        writer.add_tokenizer_pre(bpe_pre_tokenizer_name(tj, model_type))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        load_merges = True
    elif (model_dir / "tokenizer.model").is_file():
        vocab = gguf.vocab.SentencePieceVocab(model_dir)
        tokens, scores, types = _all_tokens(vocab, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        load_merges = False
    else:
        raise RespinError(f"{model_dir}: no gpt2-BPE tokenizer.json/vocab.json nor sentencepiece tokenizer.model found")
    gguf.vocab.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _mark_added_tokens(types: list, tokenizer_json: dict) -> None:
    """Added tokens inside the base vocab come out NORMAL from BpeVocab; llama.cpp needs special
    ones as CONTROL (end-of-generation detection, no splitting) and the rest as USER_DEFINED."""
    for item in tokenizer_json.get("added_tokens", []):
        if item["id"] < len(types):
            types[item["id"]] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED


def _all_tokens(vocab, n_vocab: int):
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    # Models pad their embedding past the tokenizer's size: llama.cpp needs one entry per row.
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if len(tokens) > n_vocab:
        raise RespinError(f"tokenizer has {len(tokens)} tokens but the model's vocabulary is {n_vocab}")
    return tokens, scores, types
