"""GGUF files of tiny models: exact blocks, RoPE layout, loadable by transformers and llama.cpp."""

import copy

import gguf
import numpy as np
import pytest
import torch

from converter.export_gguf import GGUFExportConfig, gguf_tensor_name, rope_permute_rows, write_gguf
from converter.loading import load_model
from converter.quantization.calibrate import QuantConfig, load_quantized_weights, quantize_model
from converter.quantization.gptq import GPTQConfig
from converter.pipeline import rotate_model
from rotations.rotations import make_rotations

PROMPT = "The quick brown fox jumps over the lazy dog. Alabama is a state in the United States; 12345 apples."


def _export(hf_dir, path, rotate="hadamard", method="rtn", wtype="q4_0"):
    loaded = load_model(hf_dir)
    fused = rotate_model(loaded, make_rotations(rotate, loaded.shape))
    calib = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method=method, wtype=wtype, gptq=GPTQConfig(block_size=32))
    qmodel = quantize_model(fused, cfg, calib if method == "gptq" else None)
    write_gguf(fused, qmodel, loaded.adapter, loaded.shape, loaded.source, path,
               GGUFExportConfig(name="tiny", provenance={"rotation.kind": rotate, "gptq.damp": 0.01}))
    quantized = copy.deepcopy(fused)
    load_quantized_weights(quantized, qmodel)
    return loaded, qmodel, quantized


@pytest.mark.parametrize("wtype", ["q4_0", "q4_1", "q8_0"])
def test_file_holds_exact_blocks_in_llama_layout(tiny_hf_dirs, tmp_path, wtype):
    path = tmp_path / "m.gguf"
    loaded, qmodel, _ = _export(tiny_hf_dirs["llama"], path, wtype=wtype, method="gptq")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for hf_name, qt in qmodel.tensors.items():
        t = tensors[gguf_tensor_name(hf_name)]
        expected = qt.dequantize()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = loaded.shape.n_heads if "q_proj" in hf_name else loaded.shape.n_kv_heads
            expected = rope_permute_rows(expected, heads)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert np.array_equal(got, expected.numpy()), hf_name  # bit-exact
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == wtype.upper()
    assert tensors["output.weight"].tensor_type.name == "Q8_0"  # 8-bit head by default
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert np.all(tensors["blk.1.attn_norm.weight"].data == 1.0)  # folded norms kept as ones
    fields = reader.fields
    assert fields["respin.rotation.kind"].contents() == "hadamard"
    assert fields["respin.gptq.damp"].contents() == pytest.approx(0.01)
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    # transformers' GGUF→HF tokenizer conversion keeps only the ByteLevel pre-tokenizer
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "im_start" in fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_reads_our_gguf_back(tiny_hf_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "m.gguf"
    _, _, quantized = _export(tiny_hf_dirs[family], path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, quantized(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_runs_our_gguf(tiny_hf_dirs, tmp_path, family):
    pytest.importorskip("llama_cpp", reason="needs the 'llama' extra (llama-cpp-python)")
    from converter.llamacpp import LlamaCppConfig, LlamaCppModel

    path = tmp_path / "m.gguf"
    loaded, _, quantized = _export(tiny_hf_dirs[family], path, wtype="q8_0")
    runtime = LlamaCppModel(path, LlamaCppConfig(n_ctx=64))
    try:
        ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        assert runtime.tokenize(PROMPT) == ids  # tokenizer written from the HF dir matches the HF tokenizer
        rt = torch.from_numpy(runtime.logits(ids))
        with torch.no_grad():
            ref = quantized(input_ids=torch.tensor([ids])).logits[0]
        # Q8_0 weights; llama.cpp adds 8-bit activation blocks: close, not bit-equal
        assert (rt - ref).abs().max() < 0.05 * ref.abs().max()
        assert (rt.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    finally:
        runtime.close()


def test_failed_write_leaves_no_file(tiny_hf_dirs, tmp_path, monkeypatch):
    import converter.export_gguf as export_gguf

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_gguf, "_add_tensors", boom)
    with pytest.raises(RuntimeError):
        _export(tiny_hf_dirs["llama"], tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pre,model_type,expected", [
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "llama", "smollm"),
    ({"type": "ByteLevel"}, "llama", "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}{1,3}"}},
                                            {"type": "ByteLevel"}]}, "llama", "llama-bpe"),
    ({"type": "ByteLevel"}, "qwen2", "qwen2"),
])
def test_bpe_pre_tokenizer_name(pre, model_type, expected):
    from converter.gguf_tokenizer import bpe_pre_tokenizer_name

    assert bpe_pre_tokenizer_name({"pre_tokenizer": pre}, model_type) == expected


@pytest.mark.llamacpp
def test_sentencepiece_tokenizer_from_hf_dir(tmp_path):
    """An HF dir with a sentencepiece tokenizer.model becomes a 'llama' (SPM) GGUF vocabulary."""
    pytest.importorskip("llama_cpp")
    spm = pytest.importorskip("sentencepiece")
    import json

    from converter.data import load_corpus
    from converter.llamacpp import LlamaCppConfig, LlamaCppModel
    from tiny_models import tiny_model

    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "train.txt").write_text(load_corpus().calibration[:200_000])
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(src / "tokenizer"),
                                   vocab_size=512, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tiny_model("llama", vocab=512, hidden=64, heads=4, kv_heads=2, intermediate=128, dtype=torch.float32).save_pretrained(src)
    path = tmp_path / "m.gguf"
    _export(src, path, wtype="q8_0")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    runtime = LlamaCppModel(path, LlamaCppConfig(n_ctx=64))
    try:
        assert runtime.tokenize(PROMPT) == sp.encode(PROMPT)
    finally:
        runtime.close()
