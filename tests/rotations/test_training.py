"""Rotation training on tiny models: orthogonal results, loss goes down, resume is exact, imports."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

from converter.arch import ModelShape
from converter.errors import RespinError
from converter.quantization.grids import int_grid
from rotations.cayley import orthogonality_error
from rotations.fusion import apply_rotations, fold_norms
from rotations.online import SimQuantConfig, fuse_r4
from rotations.respin import tail_energy, transitions
from rotations.rotations import Rotations, nearest_orthogonal
from rotations.training import TrainConfig, default_rank_penalty, initial_rotations, train_rotations

KW = dict(hidden=96, heads=6, kv_heads=2, intermediate=192, dtype=torch.float32)
SIM = SimQuantConfig.from_bits(4, 4)


def _canonical(seed: int = 0):
    model = tiny_model("llama", seed=seed, **KW)
    fold_norms(model)
    fuse_r4(model)
    return model, ModelShape.from_config(model.config)


def _calibration(n=6, t=32):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["spinquant", "respin"])
def test_resumed_run_ends_with_the_same_rotations(kind, tmp_path):
    model, shape = _canonical()
    cfg = TrainConfig(kind=kind, steps=6, seq_len=32, checkpoint_every=2, lr=0.5)
    full = train_rotations(model, shape, _calibration(), SIM, int_grid(4), cfg, progress=False)

    ckpt = tmp_path / "rot.ckpt"

    def stop_at_3(step, _loss):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_rotations(model, shape, _calibration(), SIM, int_grid(4), cfg, ckpt, on_step=stop_at_3, progress=False)
    resumed = train_rotations(model, shape, _calibration(), SIM, int_grid(4), cfg, ckpt, resume=True, progress=False)
    assert torch.allclose(resumed.R1, full.R1, atol=1e-10) and torch.allclose(resumed.R2, full.R2, atol=1e-10)
    assert resumed.config["train_loss_last"] == pytest.approx(full.config["train_loss_last"], rel=1e-6)
    expected_r1 = (2 * shape.n_layers + 1, 96, 96) if kind == "respin" else (96, 96)
    assert tuple(full.R1.shape) == expected_r1 and tuple(full.R2.shape) == (shape.n_layers, 2, 16, 16)
    assert orthogonality_error(full.R1) < 1e-10 and orthogonality_error(full.R2) < 1e-10
    # the model is left as it was: no hooks, stock attention
    assert not model.model.embed_tokens._forward_hooks and model.config._attn_implementation != "respin_sim"


def test_resume_with_other_settings_is_refused(tmp_path):
    model, shape = _canonical()
    cfg = TrainConfig(kind="spinquant", steps=2, seq_len=32, checkpoint_every=1)
    ckpt = tmp_path / "rot.ckpt"
    train_rotations(model, shape, _calibration(), SIM, None, cfg, ckpt, progress=False)
    with pytest.raises(RespinError, match="steps"):
        train_rotations(model, shape, _calibration(), SIM, None, TrainConfig(kind="spinquant", steps=5, seq_len=32),
                        ckpt, resume=True, progress=False)
    with pytest.raises(RespinError, match="no checkpoint"):
        train_rotations(model, shape, _calibration(), SIM, None, cfg, tmp_path / "missing.ckpt", resume=True,
                        progress=False)


@pytest.mark.parametrize("kind", ["spinquant", "respin"])
def test_training_path_keeps_the_fp_function(kind):
    """Unquantized, the training forward (fused weights, skip transitions, embedding/head hooks) gives
    the same loss at the Hadamard start as with no rotation at all; quantized, the rotations move."""
    model, shape = _canonical()
    fp_first = []
    for init in ("identity", "hadamard"):
        rot = train_rotations(model, shape, _calibration(n=1), SimQuantConfig.from_bits(16, 16), None,
                              TrainConfig(kind=kind, steps=1, seq_len=32, init=init), progress=False)
        fp_first.append(rot.config["train_loss_first"])
    assert abs(fp_first[0] - fp_first[1]) < 1e-4
    moved = train_rotations(model, shape, _calibration(), SIM, int_grid(4),
                            TrainConfig(kind=kind, steps=4, seq_len=32, lr=1.5), progress=False)
    start, _ = initial_rotations(kind, shape)
    assert (moved.R1 - start).abs().max() > 1e-4


def test_basis_lr_scale_moves_r1_only():
    """The first step of Cayley SGD with momentum is lr·A exactly (to first order): scaling R1's lr scales
    how far R1 moves and leaves R2's step as it was."""
    model, shape = _canonical()
    start_r1, start_r2 = initial_rotations("respin", shape)
    moves = {}
    for scale in (1.0, 4.0):
        rot = train_rotations(model, shape, _calibration(n=1), SIM, int_grid(4),
                              TrainConfig(kind="respin", steps=1, seq_len=32, lr=1e-3, basis_lr_scale=scale),
                              progress=False)
        moves[scale] = (float((rot.R1 - start_r1).norm()), float((rot.R2 - start_r2).norm()))
        assert orthogonality_error(rot.R1) < 1e-10
    assert moves[4.0][0] == pytest.approx(4 * moves[1.0][0], rel=1e-2)
    assert moves[4.0][1] == pytest.approx(moves[1.0][1], rel=1e-6)
    with pytest.raises(RespinError, match="basis_lr_scale"):
        TrainConfig(kind="respin", basis_lr_scale=0)


def test_recipe_defaults_resolve_by_kind():
    assert (TrainConfig(kind="spinquant").basis_lr_scale, TrainConfig(kind="spinquant").skip_rank_penalty) == (1.0, 0.0)
    assert TrainConfig(kind="respin").basis_lr_scale == 8.0
    assert TrainConfig(kind="respin").skip_rank_penalty == 0.0  # rank full: nothing to aim at
    assert TrainConfig(kind="respin", skip_rank=32).skip_rank_penalty == 10.0
    assert TrainConfig(kind="respin", skip_rank=32, skip_rank_penalty=0.0).skip_rank_penalty == 0.0
    assert [default_rank_penalty(b) for b in (2, 3, 4, 8, 16)] == [30.0, 30.0, 10.0, 10.0, 10.0]


def test_skip_rank_penalty_concentrates_transitions():
    """With the tail-energy penalty the trained transitions lose less when compressed to the rank it
    names than without it, from the same data and steps; the cross-entropy is still what is recorded."""
    model, shape = _canonical()
    tails, losses = {}, {}
    for penalty in (0.0, 1.0):
        cfg = TrainConfig(kind="respin", steps=3, seq_len=32, lr=0.2, basis_lr_scale=8, skip_rank=4,
                          skip_rank_penalty=penalty, quantize_weights=False)
        rot = train_rotations(model, shape, _calibration(), SIM, None, cfg, progress=False)
        tails[penalty] = float(tail_energy(transitions(rot.R1), 4).mean())
        losses[penalty] = rot.config["train_loss_first"]
        assert orthogonality_error(rot.R1) < 1e-10
    assert tails[0.0] > 1e-4  # the unpenalized bases did move apart
    assert tails[1.0] < 0.5 * tails[0.0]
    assert losses[1.0] == pytest.approx(losses[0.0], rel=1e-6)  # step 0: same rotations, same CE
    for bad in (dict(kind="respin", skip_rank=4, skip_rank_penalty=-1.0),
                dict(kind="respin", skip_rank=None, skip_rank_penalty=1.0),  # rank 'full'
                dict(kind="spinquant", skip_rank=4, skip_rank_penalty=1.0)):
        with pytest.raises(RespinError, match="penalty"):
            TrainConfig(**bad)


def test_spinquant_layout_import_matches_own_fusion(tmp_path):
    """A file in SpinQuant's torch.save layout ("R1", "model.layers.{i}.self_attn.R2") fuses like our own."""
    model = tiny_model("llama", **{**KW, "dtype": torch.float64})
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(5)
    R1 = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))[0]
    R2 = [torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0] for _ in range(shape.n_layers)]
    path = tmp_path / "R.bin"
    torch.save({"R1": R1.float(), **{f"model.layers.{i}.self_attn.R2": r.float() for i, r in enumerate(R2)}}, path)
    imported = Rotations.load(path)
    assert imported.kind == "spinquant" and tuple(imported.R2.shape) == (shape.n_layers, 16, 16)
    ids = torch.randint(0, 256, (1, 20), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        for m, rot in ((a, imported), (b, Rotations("spinquant", R1, torch.stack(R2)))):
            fold_norms(m)
            apply_rotations(m, rot, shape)
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert (la - ref).abs().max() < 1e-5 and (la - lb).abs().max() < 1e-5  # float32 file → re-orthogonalized


def test_bad_rotation_files_are_clear_errors(tmp_path):
    junk = tmp_path / "R.bin"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(RespinError, match="no 'R1'"):
        Rotations.load(junk)
    with pytest.raises(RespinError, match="not found"):
        Rotations.load(tmp_path / "nope.safetensors")
    shape = ModelShape.from_config(tiny_model("llama", **KW).config)
    with pytest.raises(RespinError, match="do not fit"):
        Rotations("spinquant", torch.eye(64, dtype=torch.float64), None).check_shape(shape)


def test_per_block_rotations_roundtrip(tmp_path):
    _, shape = _canonical()
    bases = torch.stack([torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0] for _ in range(5)])
    rot = Rotations("respin", bases, None, config={"train": {"steps": 3}})
    rot.save(tmp_path / "r.safetensors")
    back = Rotations.load(tmp_path / "r.safetensors")
    assert back.per_block and back.config == rot.config and torch.allclose(back.R1, bases, atol=1e-6)
    back.check_shape(shape)


def test_nearest_orthogonal_falls_back_when_svd_fails(monkeypatch):
    g = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    noisy = Q + 1e-4 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    expected = nearest_orthogonal(noisy)

    def failing_svd(*_a, **_k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    got = nearest_orthogonal(noisy)
    assert orthogonality_error(got) < 1e-13 and torch.allclose(got, expected, atol=1e-10)
