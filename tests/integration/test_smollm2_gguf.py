"""Integration on the bundled SmolLM2-135M (576 = 36·16 hidden): rotation invariance, GGUF in
llama.cpp and transformers, KV-cache types, GPTQ vs RTN. Marked slow; budget ≈ 5 min on 2 cores."""

import copy

import pytest
import torch

from converter.data import calibration_batches, evaluation_tokens, load_corpus
from converter.export_gguf import GGUFExportConfig, write_gguf
from converter.invariance import check_invariance, model_logits
from converter.loading import load_model
from converter.parity import NLLAccumulator, ParityAccumulator
from converter.pipeline import rotate_model
from converter.quantization.calibrate import QuantConfig, load_quantized_weights, quantize_model
from rotations.rotations import make_rotations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def eval_segment(smollm2, corpus):
    return evaluation_tokens(smollm2.tokenizer, corpus.evaluation, 512, 512)


@pytest.fixture(scope="module")
def hadamard_model(smollm2):
    return rotate_model(smollm2, make_rotations("hadamard", smollm2.shape))


@pytest.fixture(scope="module")
def rtn_gguf(smollm2, hadamard_model, tmp_path_factory):
    qmodel = quantize_model(hadamard_model, QuantConfig(method="rtn", wtype="q4_0"))
    path = tmp_path_factory.mktemp("gguf") / "smollm2-hadamard-rtn-q4_0.gguf"
    write_gguf(hadamard_model, qmodel, smollm2.adapter, smollm2.shape, smollm2.source, path, GGUFExportConfig())
    quantized = copy.deepcopy(hadamard_model)
    load_quantized_weights(quantized, qmodel)
    return path, quantized


def test_hadamard_rotation_keeps_smollm2_function(smollm2, hadamard_model, eval_segment):
    ids = eval_segment[:, :256]
    result = check_invariance(model_logits(smollm2.model, ids), hadamard_model, ids)
    assert result.max_abs_err <= 1e-3


def test_transformers_loads_our_gguf(rtn_gguf, eval_segment):
    from transformers import AutoModelForCausalLM

    path, quantized = rtn_gguf
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = eval_segment[:, :128]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, quantized(input_ids=ids).logits, atol=2e-3, rtol=1e-3)


@pytest.mark.llamacpp
def test_llama_cpp_parity_and_generation(rtn_gguf, eval_segment, smollm2):
    pytest.importorskip("llama_cpp")
    from converter.llamacpp import LlamaCppConfig, LlamaCppModel

    path, quantized = rtn_gguf
    runtime = LlamaCppModel(path, LlamaCppConfig(n_ctx=512))
    try:
        seg = eval_segment[0]
        acc = ParityAccumulator()
        with torch.no_grad():
            acc.add(quantized(input_ids=seg[None]).logits[0], torch.from_numpy(runtime.logits(seg.tolist())), seg)
        parity = acc.result()
        assert parity.top1_agreement >= 0.96
        assert abs(parity.ppl_rel_diff) <= 0.01  # issue target without activation emulation: PPL within 1%
        prompt = smollm2.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
        generated = runtime.generate(prompt, 12)
        text = smollm2.tokenizer.decode(generated)
        assert len(generated) >= 4 and text.strip()
        with torch.no_grad():
            first = quantized(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item()
        assert generated[0] == first
    finally:
        runtime.close()


@pytest.mark.llamacpp
def test_kv_cache_types_and_llama_cpp_attention_rotation(rtn_gguf, eval_segment):
    """Our fused R1/R2 must not conflict with llama.cpp's own K/V Hadamard on quantized caches."""
    pytest.importorskip("llama_cpp")
    from converter.llamacpp import LlamaCppConfig, LlamaCppModel

    path, _ = rtn_gguf
    seg = eval_segment[0]
    ppl = {}
    for kv, rot in [("f16", True), ("q8_0", True), ("q8_0", False), ("q4_0", True), ("q4_0", False)]:
        runtime = LlamaCppModel(path, LlamaCppConfig(n_ctx=512, kv_type=kv, attn_rot=rot))
        try:
            acc = NLLAccumulator()
            acc.add(torch.from_numpy(runtime.logits(seg.tolist())), seg)
            ppl[(kv, rot)] = acc.ppl
        finally:
            runtime.close()
    base = ppl[("f16", True)]
    assert ppl[("q8_0", True)] <= base * 1.01 and ppl[("q8_0", False)] <= base * 1.01
    assert ppl[("q4_0", True)] <= base * 1.10
    # llama.cpp's rotation of a 4-bit cache helps (or at least does not hurt) on top of ours
    assert ppl[("q4_0", True)] <= ppl[("q4_0", False)] * 1.01


def test_gptq_beats_rtn_on_smollm2(smollm2, hadamard_model, corpus, eval_segment):
    calib = calibration_batches(smollm2.tokenizer, corpus.calibration, 16, 256, seed=0)
    ppl = {}
    for method in ("rtn", "gptq"):
        qmodel = quantize_model(hadamard_model, QuantConfig(method=method, wtype="q4_0"), calib)
        model = copy.deepcopy(hadamard_model)
        load_quantized_weights(model, qmodel)
        acc = NLLAccumulator()
        with torch.no_grad():
            acc.add(model(input_ids=eval_segment).logits[0], eval_segment[0])
        ppl[method] = acc.ppl
        del model
    assert ppl["gptq"] < ppl["rtn"]
