"""llama.cpp's per-tensor type rules (converter.quantization.llama_types) on hand-made shapes;
tests/converter/test_gguf_mixture_export.py compares them with llama-quantize itself."""

import pytest

from converter.quantization.grids import QuantizationError
from converter.quantization.llama_types import (ModelTensors, bits_per_weight, parse_tensor_type_override,
                                                tensor_types)


def model(hidden: int, ff: int, layers: int = 16) -> ModelTensors:
    tensors = {"token_embd.weight": (hidden, 1000)}
    for i in range(layers):
        tensors |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                    f"blk.{i}.attn_k.weight": (hidden, hidden // 4), f"blk.{i}.attn_v.weight": (hidden, hidden // 4),
                    f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_gate.weight": (hidden, ff),
                    f"blk.{i}.ffn_up.weight": (hidden, ff), f"blk.{i}.ffn_down.weight": (ff, hidden)}
    tensors |= {"output_norm.weight": (hidden,), "output.weight": (hidden, 1000)}
    return ModelTensors(n_layer=layers, n_head=8, n_head_kv=2, tensors=tensors)


def test_q4_k_m_rules_by_layer_position():
    types = tensor_types(model(512, 1536), "q4_k_m")
    # use_more_bits: first and last eighth, then every third layer
    more = [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert types["blk.3.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.3.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "Q4_K"


def test_rows_not_a_multiple_of_256_fall_back():
    types = tensor_types(model(576, 1536), "q4_k_m")  # SmolLM2's widths
    assert types["blk.2.attn_q.weight"] == "Q5_0" and types["blk.2.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K → Q8_0
    assert types["output.weight"] == "Q8_0"
    assert tensor_types(model(576, 1536), "q3_k_m")["blk.5.ffn_up.weight"] == "Q4_0"
    assert tensor_types(model(576, 1536), "q5_k_m")["blk.5.ffn_up.weight"] == "Q5_1"
    assert tensor_types(model(80, 1536), "q4_k_m")["blk.5.ffn_up.weight"] == "F16"  # 80 is not a multiple of 32


def test_overrides_win_first_match_and_do_not_advance_counters():
    m = model(512, 1536)
    ov = [parse_tensor_type_override("blk\\.0\\.attn_v=q8_0"), parse_tensor_type_override("attn_v=Q5_K")]
    types = tensor_types(m, "Q4_K_M", ov)
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.3.attn_v.weight"] == "Q5_K"
    assert types["blk.4.ffn_down.weight"] == "Q6_K"
    q3 = tensor_types(m, "Q3_K_M", [("blk\\.0\\.attn_v", "Q8_0")])
    assert q3["blk.2.attn_v.weight"] == "Q5_K" and q3["blk.3.attn_v.weight"] == "Q4_K"  # counter starts at blk.1


def test_bad_input_and_bits_per_weight():
    for bad in ("ffn_down", "=q4_k", "ffn_down=q9_k", "ffn_(=q4_k"):
        with pytest.raises(QuantizationError, match="--tensor-type"):
            parse_tensor_type_override(bad)
    with pytest.raises(QuantizationError, match="Q4_K_M"):
        tensor_types(model(512, 1536), "q4_k_x")
    m = model(512, 1536)
    q6 = bits_per_weight(m, tensor_types(m, "q6_k"))
    q4 = bits_per_weight(m, tensor_types(m, "q4_k_m"))
    assert 4.5 < q4 < q6 < 7.0
