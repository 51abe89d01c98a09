"""The simulated-quant reference: FP function kept by R3/R4/skip corrections, quantization where expected."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import near_hadamard_bases, tiny_model

from converter.arch import ModelShape
from converter.invariance import INVARIANCE_TOL
from converter.quantization.fake_quant import ActQuantSpec, quantize_dequantize
from rotations.fusion import apply_rotations, fold_norms
from rotations.hadamard import HadamardSizeError, normalized_hadamard, random_orthogonal
from rotations.online import SimQuantConfig, SkipCorrections, attach_simquant, check_online_sizes, fuse_r4
from rotations.respin import compress_transition, dense_correction, skip_corrections, tail_energy, transitions
from rotations.rotations import Rotations

ONLINE_KW = dict(hidden=96, heads=6, kv_heads=2, intermediate=192)  # 192 = 16·12: R4 constructible


def _ids(vocab=256, n=2, t=24, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_r3_r4_keep_fp_function(family):
    model = tiny_model(family, **ONLINE_KW)
    ids = _ids()
    ref = _logits(model, ids)
    sim = copy.deepcopy(model)
    fold_norms(sim)
    fuse_r4(sim)
    with attach_simquant(sim, SimQuantConfig.from_bits(16, 16)):
        assert (_logits(sim, ids) - ref).abs().max() < 1e-9
    # detached: the plain model again, which without the online R4 differs
    assert (_logits(sim, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_respin_full_rank_reproduces_exact_model(family):
    model = tiny_model(family, **ONLINE_KW)
    shape = ModelShape.from_config(model.config)
    ids = _ids()
    ref = _logits(model, ids)
    bases = near_hadamard_bases(shape, 0.05)
    R2 = torch.stack([random_orthogonal(shape.head_dim, seed=i) for i in range(shape.n_layers)])
    rot = Rotations("respin", bases, R2)
    sim = copy.deepcopy(model)
    fold_norms(sim)
    apply_rotations(sim, rot, shape)
    fuse_r4(sim)
    cfg = SimQuantConfig.from_bits(16, 16)
    for corrections in (skip_corrections(bases, shape.hidden), [dense_correction(T) for T in transitions(bases)]):
        with attach_simquant(sim, cfg, SkipCorrections(corrections)):
            # transformers' RMSNorm computes in float32: the norm input x·T·Tᵀ is not x bit for bit
            assert (_logits(sim, ids) - ref).abs().max() < INVARIANCE_TOL[torch.float64]
    # without the skip corrections the function is wrong: they are really needed
    with attach_simquant(sim, cfg, SkipCorrections(skip_corrections(bases, 0))):
        assert (_logits(sim, ids) - ref).abs().max() > 1e-3


def test_low_rank_correction_is_orthogonal_and_converges():
    shape = ModelShape.from_config(tiny_model("llama", **ONLINE_KW).config)
    T = transitions(near_hadamard_bases(shape, 0.02))[1]
    errors = []
    for r in (0, 8, 32, 64, 96):
        c = compress_transition(T, r)
        T_hat = c.dense()
        assert (T_hat.T @ T_hat - torch.eye(96, dtype=torch.float64)).abs().max() < 1e-12
        errors.append(float(torch.linalg.norm(T_hat - T)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12


def test_tail_energy_is_what_compression_drops():
    """½‖T − T̂‖² of the rank-r correction equals the tail energy where r keeps whole rotation planes
    (even r: T's eigenvalues come in conjugate pairs); an odd r cuts a plane and drops at least as much."""
    shape = ModelShape.from_config(tiny_model("llama", **ONLINE_KW).config)
    Ts = transitions(near_hadamard_bases(shape, 0.02))
    tails = tail_energy(Ts, 8)
    assert tails.shape == (Ts.shape[0],)
    for T, tail in zip(Ts, tails):
        dropped = 0.5 * float(torch.linalg.norm(compress_transition(T, 8).dense() - T) ** 2)
        assert float(tail) == pytest.approx(dropped, rel=1e-6)
        assert 0.5 * float(torch.linalg.norm(compress_transition(T, 7).dense() - T) ** 2) >= float(
            tail_energy(T, 7)) * (1 - 1e-9)
        assert float(tail_energy(T, 0)) == pytest.approx(0.5 * float(torch.linalg.norm(T - torch.eye(96)) ** 2))
        assert abs(float(tail_energy(T, 96))) < 1e-10


def test_exactly_low_rank_transition_is_reproduced_at_its_rank():
    D, r = 96, 8
    Q, _ = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    R = random_orthogonal(r, seed=3)
    T = torch.eye(D, dtype=torch.float64) + Q @ (R - torch.eye(r, dtype=torch.float64)) @ Q.T
    assert torch.linalg.norm(compress_transition(T, r).dense() - T) < 1e-10


def test_equal_bases_give_no_correction():
    shape = ModelShape.from_config(tiny_model("llama", **ONLINE_KW).config)
    H = normalized_hadamard(shape.hidden)
    bases = H.expand(2 * shape.n_layers + 1, -1, -1)
    for c in skip_corrections(bases, 32):
        assert c.M.abs().max() < 1e-12  # T = I: nothing to correct
    x = torch.randn(3, shape.hidden, dtype=torch.float64)
    assert torch.allclose(skip_corrections(bases, 32)[0].apply(x), x, atol=1e-12)


def test_quantization_points_are_quantized():
    """With A4 every linear input lies on a 16-level per-token grid; with KV4 so do K and V."""
    model = tiny_model("llama", **ONLINE_KW)
    fold_norms(model)
    fuse_r4(model)
    seen = {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "o_proj", "down_proj")):
            mod.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, i[0]))
    with attach_simquant(model, SimQuantConfig.from_bits(4, 4)):
        _logits(model, _ids(t=16))
    for name, x in seen.items():
        levels = [torch.unique(row).numel() for row in x.reshape(-1, x.shape[-1])]
        assert max(levels) <= 16, name


def test_act_quant_spec_grid_and_straight_through():
    x = torch.randn(4, 64, requires_grad=True)
    y = quantize_dequantize(x, ActQuantSpec(4))
    assert all(torch.unique(row).numel() <= 16 for row in y.detach())
    assert (y - x).abs().max() <= ((x.max(1).values - x.min(1).values) / 15).max() / 2 + 1e-6
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    sym = quantize_dequantize(x.detach(), ActQuantSpec(8, symmetric=True))
    assert (sym - x.detach()).abs().max() < x.detach().abs().max() / 127


def test_online_size_without_hadamard_is_refused():
    shape = ModelShape.from_config(tiny_model("llama", hidden=96, intermediate=184).config)  # no construction
    with pytest.raises(HadamardSizeError, match="184"):
        check_online_sizes(shape, SimQuantConfig())
    check_online_sizes(shape, SimQuantConfig(r4=False))
