import pytest
import torch

from rotations.cayley import orthogonality_error

from converter.arch import ModelShape
from converter.errors import RespinError
from converter.invariance import check_invariance, model_logits
from rotations.fusion import apply_rotations, fold_norms
from rotations.hadamard import random_orthogonal
from rotations.rotations import Rotations, hadamard_rotations
from tiny_models import tiny_model

FAMILIES = ["llama", "mistral", "qwen2"]


def _ids(vocab=256, n=2, seq=24):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norms_keeps_function_and_unties(family):
    model = tiny_model(family)
    ids = _ids()
    ref = model_logits(model, ids)
    fold_norms(model)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    torch.testing.assert_close(model_logits(model, ids), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hidden,heads,kv", [(96, 6, 2), (64, 4, 4), (80, 5, 1)])
def test_hadamard_rotation_preserves_logits_float64(family, hidden, heads, kv):
    # 96 = 12*8 (Paley), 64 (Sylvester), 80 = 20*4 (Paley); head dims 16; 80/5 = 16
    model = tiny_model(family, hidden=hidden, heads=heads, kv_heads=kv)
    shape = ModelShape.from_config(model.config)
    ids = _ids()
    ref = model_logits(model, ids)
    fold_norms(model)
    rot = hadamard_rotations(shape)
    assert rot.notes == {"R1": "hadamard", "R2": "hadamard"}
    apply_rotations(model, rot, shape)
    result = check_invariance(ref, model, ids)
    assert result.max_abs_err <= 1e-5 and result.tol == 1e-5


def test_random_r1_for_sizes_without_hadamard():
    # 156 = 4*39 and head_dim 26 = 2*13 have no Hadamard construction → seeded random orthogonal, no crash
    model = tiny_model("llama", hidden=156, heads=6, kv_heads=2)
    shape = ModelShape.from_config(model.config)
    ids = _ids()
    ref = model_logits(model, ids)
    fold_norms(model)
    rot = hadamard_rotations(shape)
    assert rot.notes == {"R1": "random", "R2": "random"}
    apply_rotations(model, rot, shape)
    assert check_invariance(ref, model, ids).passed


def test_per_layer_random_r2_and_gqa():
    model = tiny_model("llama", hidden=96, heads=6, kv_heads=2, layers=3)
    shape = ModelShape.from_config(model.config)
    ids = _ids()
    ref = model_logits(model, ids)
    fold_norms(model)
    R2 = torch.stack([random_orthogonal(shape.head_dim, seed=s) for s in range(shape.n_layers)])
    apply_rotations(model, Rotations("custom", random_orthogonal(shape.hidden, 7), R2), shape)
    assert check_invariance(ref, model, ids).passed


def test_invariance_gate_catches_missing_counterpart():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    ids = _ids()
    ref = model_logits(model, ids)
    fold_norms(model)
    apply_rotations(model, hadamard_rotations(shape), shape)
    # the classic bug: R1 fused into the embedding twice (as through a tied head) without its counterpart
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ hadamard_rotations(shape).R1)
    with pytest.raises(RespinError, match="invariance check failed"):
        check_invariance(ref, model, ids)


def test_rotating_tied_model_is_refused():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    with pytest.raises(ValueError, match="untied"):
        apply_rotations(model, hadamard_rotations(shape), shape)


def test_rotations_save_load_roundtrip(tmp_path):
    model = tiny_model("llama")
    rot = hadamard_rotations(ModelShape.from_config(model.config))
    rot.save(tmp_path / "rot.safetensors")
    back = Rotations.load(tmp_path / "rot.safetensors")
    assert back.kind == "hadamard" and back.notes == rot.notes
    # stored as float32, re-orthogonalized on load
    assert torch.allclose(back.R1, rot.R1, atol=1e-6) and torch.allclose(back.R2, rot.R2, atol=1e-6)
    assert orthogonality_error(back.R1) < 1e-12 and orthogonality_error(back.R2) < 1e-12
