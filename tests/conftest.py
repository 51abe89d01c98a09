import os
import sys
from pathlib import Path

import pytest

# tests import their helpers (tiny_models) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The bundled SmolLM2 tokenizer (gpt2-BPE, 49152 tokens), loaded once."""
    from transformers import AutoTokenizer

    from converter.loading import BUNDLED_GGUF_NAME, bundled_model_path

    return AutoTokenizer.from_pretrained(os.fspath(bundled_model_path().parent), gguf_file=BUNDLED_GGUF_NAME)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory, smollm2_tokenizer):
    """Tiny random models of every supported family saved as HF dirs (sharded safetensors + tokenizer)."""
    from tiny_models import FAMILIES, tiny_model

    import torch

    dirs = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        model = tiny_model(family, vocab=49152, hidden=64, heads=4, kv_heads=2, intermediate=128, dtype=torch.float32)
        model.save_pretrained(path, max_shard_size="1MB")
        smollm2_tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs
