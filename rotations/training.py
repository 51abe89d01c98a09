"""Learning rotations: SpinQuant (one R1 + per-layer R2) and ReSpinQuant (2L+1 residual bases + R2).

The loss is next-token cross-entropy of the simulated-quant model (`rotations.online`): the stock
model runs through `torch.func.functional_call` with weights recomputed each step from the frozen
canonical weights and the current rotations (RTN fake quant with straight-through gradients), so
the only trainable tensors are the rotations, updated by Cayley SGD and kept orthogonal.
The embedding's basis R_0 and the head's basis R_2L act on activations (a hook each) instead of on
the vocab × hidden matrices: the same function for an unquantized head, at a fraction of the cost.

Training checkpoints every `checkpoint_every` steps (rotations, momentum, step); the data order and
the learning rate are pure functions of the step, so a resumed run ends with the same rotations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter.arch import ModelShape, decoder_layers, linear_param_name
from converter.errors import RespinError
from converter.quantization.fake_quant import fake_quantize_weight
from converter.quantization.grids import GridSpec
from rotations.cayley import CayleySGD, cosine_lr
from rotations.fusion import layer_params, rotate_layer_weights
from rotations.hadamard import offline_rotation
from rotations.online import SimQuantConfig, SkipCorrections, attach_simquant
from rotations.respin import dense_correction, tail_energy, transitions
from rotations.rotations import LEARNED_KINDS, Rotations

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "respin-export rotation checkpoint 1"
RESPIN_BASIS_LR_SCALE = 8.0
RESPIN_RANK_PENALTY = 10.0  # activations at 4 bits and up
# At 3-bit activations the cross-entropy gradient is larger and 10 let the tails grow: SmolLM2 held-out
# calibration W16A3KV3 PPL at rank 32 (Hadamard 1180): penalty 10 → 414, 30 → 302 (benchmarks/respin_heldout.py).
RESPIN_RANK_PENALTY_LOW_BITS = 30.0


def default_rank_penalty(abits: int) -> float:
    """ReSpinQuant's rank-penalty weight for rotations trained at `abits`-bit activations."""
    return RESPIN_RANK_PENALTY_LOW_BITS if abits <= 3 else RESPIN_RANK_PENALTY


@dataclass(frozen=True)
class TrainConfig:
    """Rotation training. Defaults are scaled to SmolLM2-135M on 2 CPU cores (~7 s a step): the
    paper's 100 steps × 8 × 2048 tokens become 32 × 2 × 256. SpinQuant's lr 1.5 moved SmolLM2's
    rotations so far per step that held-out loss got worse than the Hadamard start (measured:
    lr 0.1–1.5 all worse); 0.05 with momentum 0.9 improved on it."""

    kind: str = "spinquant"  # "spinquant" | "respin"
    steps: int = 32
    lr: float = 0.05  # Cayley step size, cosine-decayed to 0
    momentum: float = 0.9
    # lr multiplier of R1's group; None: 8 for respin, 1 for spinquant. ReSpinQuant's 2L+1 bases each
    # see only their own blocks' share of the gradient SpinQuant's single R1 sums, and at one lr moved
    # ~10x less (drift 0.006 vs 0.053). ×8 alone trains better bases whose transitions are no longer
    # low-rank (SmolLM2 W4A4KV4 GPTQ: rank full 29.36 → 27.70, rank 32 30.62 → 38.50); with the rank
    # penalty below it wins at rank 32 too (benchmarks/respin_heldout.py, README).
    basis_lr_scale: float | None = None
    # respin: adds `skip_rank_penalty` × the mean tail energy of the transitions at `skip_rank` (the
    # export's rank; None for rank 'full', and set to None without a penalty) to the loss, so
    # training keeps each T_b's change where the rank-r correction can carry it
    # (`rotations.respin.tail_energy`). None: 10 with a skip_rank, else 0 (the papers' plain
    # cross-entropy); the CLI and benchmark pass `default_rank_penalty(abits)`, 30 at <= 3-bit
    # activations. Its step is penalty·lr·basis_lr_scale per unit tail, so too large a weight
    # overshoots (tiny model: 50 at lr 0.2 × 8 did; SmolLM2: 30 at 0.05 × 8 did not). SmolLM2
    # held-out calibration W16A4KV4 PPL at rank 32 (Hadamard 37.90): ×1 38.01; ×8 46.37, with
    # penalty 1 40.04, with 10 36.10.
    skip_rank: int | None = None
    skip_rank_penalty: float | None = None
    batch_size: int = 2
    seq_len: int = 256
    # RTN fake quant of the weights while training; off ("W16") is SpinQuant's recipe when GPTQ
    # quantizes the weights afterwards, and half the step time
    quantize_weights: bool = True
    checkpoint_every: int = 10
    seed: int = 0
    learn_r2: bool = True
    init: str = "hadamard"  # "hadamard" (the papers' start) | "identity" (ablation: no rotation at step 0)
    bf16: bool = False  # autocast the forward/backward to bfloat16

    def __post_init__(self) -> None:
        if self.kind not in LEARNED_KINDS:
            raise RespinError(f"cannot train '{self.kind}' rotations: learned kinds are {', '.join(LEARNED_KINDS)}")
        if self.init not in ("hadamard", "identity"):
            raise RespinError(f"unknown rotation init '{self.init}': hadamard | identity")
        if self.basis_lr_scale is None:  # resolved here, so configs and checkpoints record the value used
            object.__setattr__(self, "basis_lr_scale", RESPIN_BASIS_LR_SCALE if self.kind == "respin" else 1.0)
        if self.skip_rank_penalty is None:
            penalty = RESPIN_RANK_PENALTY if self.kind == "respin" and self.skip_rank is not None else 0.0
            object.__setattr__(self, "skip_rank_penalty", penalty)
        if self.basis_lr_scale <= 0:
            raise RespinError(f"basis_lr_scale must be > 0 (got {self.basis_lr_scale})")
        if self.skip_rank_penalty < 0:
            raise RespinError(f"skip_rank_penalty must be >= 0 (got {self.skip_rank_penalty})")
        if self.skip_rank_penalty > 0 and (self.kind != "respin" or self.skip_rank is None or self.skip_rank < 0):
            raise RespinError("a skip-rank penalty needs respin rotations and an integer rank (not 'full')")
        if not self.skip_rank_penalty:  # without a penalty the rank does not enter training
            object.__setattr__(self, "skip_rank", None)
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.checkpoint_every < 1:
            raise RespinError("training needs steps, batch size and checkpoint interval >= 1 and seq_len >= 2")


@dataclass
class TrainState:
    step: int
    R1: torch.nn.Parameter
    R2: torch.nn.Parameter | None
    optimizer: CayleySGD
    losses: list[float]


def initial_rotations(kind: str, shape: ModelShape, init: str = "hadamard") -> tuple[torch.Tensor, torch.Tensor]:
    """R1 (one, or 2L+1 identical copies: T_b = I exactly) and R2 per layer and KV head, all starting
    from the same deterministic Hadamard (or the identity)."""
    if init == "identity":
        H, H2 = (torch.eye(n, dtype=torch.float64) for n in (shape.hidden, shape.head_dim))
    else:
        H, H2 = offline_rotation(shape.hidden).matrix, offline_rotation(shape.head_dim).matrix
    R1 = H.expand(2 * shape.n_layers + 1, -1, -1).clone() if kind == "respin" else H.clone()
    R2 = H2.expand(shape.n_layers, shape.n_kv_heads, -1, -1).clone()
    return R1, R2


def train_rotations(model: torch.nn.Module, shape: ModelShape, calibration: torch.Tensor, sim: SimQuantConfig,
                    weight_spec: GridSpec | None, cfg: TrainConfig, checkpoint: Path | None = None,
                    resume: bool = False, on_step: Callable[[int, float], None] | None = None,
                    progress: bool = True) -> Rotations:
    """Learn rotations for the canonical (folded, untied; `fuse_r4`-ed when sim.r4) `model`.

    calibration: token ids [n, ≥ seq_len]; weight_spec: the RTN grid of the decoder weights during
    training (None, or cfg.quantize_weights off: unquantized). on_step(step, loss) runs after each
    step's checkpoint.
    """
    if not cfg.quantize_weights:
        weight_spec = None
    if calibration.shape[1] < cfg.seq_len:
        raise RespinError(f"calibration segments of {calibration.shape[1]} tokens are shorter than "
                          f"the training seq_len {cfg.seq_len}")
    device = next(model.parameters()).device
    state = _load_checkpoint(checkpoint, cfg, shape, device) if resume else None
    if state is None:
        state = _fresh_state(cfg, shape, device)
    canonical = [{k: v.detach() for k, v in layer_params(layer).items()} for layer in decoder_layers(model)]
    order = torch.randperm(calibration.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    skips = SkipCorrections() if cfg.kind == "respin" else None
    bases: dict[str, torch.Tensor] = {}
    handles = [model.model.embed_tokens.register_forward_hook(lambda _m, _i, out: out @ bases["first"]),
               model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] @ bases["last"].T,))]
    sim_handle = attach_simquant(model, sim, skips)
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.kind}", unit="step", disable=not progress)
    try:
        while state.step < cfg.steps:
            lr = cosine_lr(cfg.lr, state.step, cfg.steps)
            for group in state.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            ids = _batch(calibration, order, state.step, cfg).to(device)
            loss, tail = _loss(model, ids, state, canonical, shape, weight_spec, bases, skips, cfg)
            state.optimizer.zero_grad(set_to_none=True)
            (loss + cfg.skip_rank_penalty * tail).backward()
            state.optimizer.step()
            state.step += 1
            state.losses.append(float(loss.detach()))
            if checkpoint is not None and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
                _save_checkpoint(checkpoint, state, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}", lr=f"{lr:.3g}",
                            **({"tail": f"{float(tail.detach()):.3g}"} if cfg.skip_rank_penalty > 0 else {}))
            if on_step is not None:
                on_step(state.step, state.losses[-1])
    finally:
        bar.close()
        sim_handle.remove()
        for h in handles:
            h.remove()
    config = {"train": asdict(cfg), "train_sim": sim.describe(),
              "train_weight_grid": None if weight_spec is None else weight_spec.name,
              "train_loss_first": state.losses[0] if state.losses else None,
              "train_loss_last": state.losses[-1] if state.losses else None,
              "train_s_this_run": round(time.perf_counter() - started, 1)}
    return Rotations(cfg.kind, state.R1.detach().clone(), None if state.R2 is None else state.R2.detach().clone(),
                     cfg.seed, {"R1": "learned", "R2": "learned" if cfg.learn_r2 else "hadamard"}, config)


def _batch(calibration: torch.Tensor, order: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    n = calibration.shape[0]
    rows = [int(order[(step * cfg.batch_size + j) % n]) for j in range(cfg.batch_size)]
    return calibration[rows, : cfg.seq_len]


def _loss(model, ids, state: TrainState, canonical, shape, weight_spec, bases, skips, cfg):
    """(cross-entropy, mean tail energy of the transitions at cfg.skip_rank or 0)."""
    dtype = canonical[0]["q_proj.weight"].dtype
    R1 = state.R1.to(dtype)
    R2 = None if state.R2 is None else state.R2.to(dtype)
    basis = (lambda b: R1[b]) if R1.dim() == 3 else (lambda b: R1)
    bases["first"], bases["last"] = basis(0), basis(2 * shape.n_layers)
    tail = torch.zeros((), dtype=dtype)
    if skips is not None:
        Ts = transitions(R1)
        skips.set([dense_correction(T) for T in Ts])
        if cfg.skip_rank_penalty > 0:
            tail = tail_energy(Ts, cfg.skip_rank).mean()
    weights = {}
    for i, params in enumerate(canonical):
        fused = rotate_layer_weights(params, basis(2 * i), basis(2 * i + 1), basis(2 * i + 2),
                                     None if R2 is None else R2[i], shape)
        for key, w in fused.items():
            if weight_spec is not None and key.endswith(".weight"):
                w = fake_quantize_weight(w, weight_spec)
            weights[linear_param_name(i, *key.split("."))] = w
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = torch.func.functional_call(model, weights, (), {"input_ids": ids, "use_cache": False}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()), tail


def _fresh_state(cfg: TrainConfig, shape: ModelShape, device) -> TrainState:
    R1, R2 = initial_rotations(cfg.kind, shape, cfg.init)
    R1 = torch.nn.Parameter(R1.to(device))
    R2 = torch.nn.Parameter(R2.to(device), requires_grad=cfg.learn_r2)
    groups = [{"params": [R1], "lr_scale": cfg.basis_lr_scale}]
    if cfg.learn_r2:
        groups.append({"params": [R2], "lr_scale": 1.0})
    return TrainState(0, R1, R2, CayleySGD(groups, lr=cfg.lr, momentum=cfg.momentum), [])


def _save_checkpoint(path: Path, state: TrainState, cfg: TrainConfig) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": state.step,
                "R1": state.R1.detach(), "R2": None if state.R2 is None else state.R2.detach(),
                "optimizer": state.optimizer.state_dict(), "losses": state.losses}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path | None, cfg: TrainConfig, shape: ModelShape, device) -> TrainState | None:
    if path is None or not Path(path).is_file():
        raise RespinError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise RespinError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RespinError(f"{path} is not a respin-export rotation checkpoint")
    saved = ckpt["config"]
    # checkpoints written before these keys existed
    defaults = {"basis_lr_scale": 1.0, "skip_rank": None, "skip_rank_penalty": 0.0}
    for key in ("kind", "steps", "lr", "momentum", "basis_lr_scale", "skip_rank", "skip_rank_penalty", "batch_size",
                "seq_len", "seed", "learn_r2", "init", "quantize_weights"):
        made_with = saved.get(key, defaults.get(key))
        if made_with != getattr(cfg, key):
            raise RespinError(f"checkpoint {path} was made with {key}={made_with!r}, this run has "
                              f"{key}={getattr(cfg, key)!r}: resume with the same settings")
    state = _fresh_state(cfg, shape, device)
    if tuple(ckpt["R1"].shape) != tuple(state.R1.shape):
        raise RespinError(f"checkpoint {path} holds rotations for another model shape")
    with torch.no_grad():
        state.R1.copy_(ckpt["R1"])
        if state.R2 is not None and ckpt["R2"] is not None:
            state.R2.copy_(ckpt["R2"])
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise RespinError(f"checkpoint {path} holds optimizer state of another layout ({exc}): train afresh") from None
    state.step, state.losses = int(ckpt["step"]), list(ckpt["losses"])
    logger.info("resumed rotation training from %s at step %d/%d", path, state.step, cfg.steps)
    return state
