import json

import pytest
import torch

from converter.arch import supported_model_types
from converter.errors import RespinError
from converter.loading import load_model, resolve_source
from tiny_models import FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_sharded_hf_dir_of_each_family(tiny_hf_dirs, family):
    path = tiny_hf_dirs[family]
    assert len(list(path.glob("*.safetensors"))) > 1  # really sharded
    loaded = load_model(path)
    assert loaded.source.kind == "hf"
    assert loaded.adapter.qkv_bias == (family == "qwen2")
    assert loaded.shape.hidden == 64 and loaded.shape.n_kv_heads == 2 and loaded.shape.head_dim == 16
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(RespinError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "gpt_neox" in msg and all(t in msg for t in supported_model_types()) and "\n" not in msg


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(RespinError, match="not found"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(RespinError, match="without config.json"):
        resolve_source(tmp_path)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(RespinError, match="not a GGUF file"):
        resolve_source(bad)


def test_truncated_gguf_is_refused(tmp_path):
    from converter.loading import bundled_model_path

    data = bundled_model_path().read_bytes()[:200_000]
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data)
    with pytest.raises(RespinError, match="cannot (read|load) GGUF"):
        load_model(path)


def test_nan_weights_are_refused(tiny_hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    for f in tiny_hf_dirs["llama"].glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RespinError, match="model.layers.1.mlp.up_proj.weight.*NaN"):
        load_model(tmp_path)
