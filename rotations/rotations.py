"""The `Rotations` artefact: R1 (residual stream) and per-layer R2 (attention heads).

Saved as a small safetensors file so a conversion can be re-applied without relearning.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter.arch import ModelShape
from converter.errors import RespinError
from rotations.hadamard import offline_rotation

logger = logging.getLogger(__name__)

ROTATION_KINDS = ("none", "hadamard", "spinquant", "respin")
LEARNED_KINDS = ("spinquant", "respin")


@dataclass
class Rotations:
    """Residual bases and head rotations, float64, orthogonal.

    R1: [D, D] one basis for the whole residual stream (QuaRot, SpinQuant), or [2L+1, D, D]
        ReSpinQuant's per-block bases: block b (attention of layer b//2, or its MLP) reads the
        stream in basis b and writes in basis b+1; the last one is undone by lm_head.
    R2: [L, d_h, d_h] (one per layer) or [L, n_kv_heads, d_h, d_h] (one per KV head); None: none.
    config: how they were made (training settings, rank), stored with them.
    """

    kind: str
    R1: torch.Tensor
    R2: torch.Tensor | None
    seed: int = 0
    notes: dict = field(default_factory=dict)  # e.g. {"R1": "random"} where no Hadamard exists
    config: dict = field(default_factory=dict)

    @property
    def per_block(self) -> bool:
        return self.R1.dim() == 3

    def residual_basis(self, block: int) -> torch.Tensor:
        """Basis of the stream entering residual block `block` (0 … 2L; 2L: the head's input)."""
        return self.R1[block] if self.per_block else self.R1

    def describe(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "dim_R1": self.R1.shape[-1],
                "residual_bases": self.R1.shape[0] if self.per_block else 1,
                "dim_R2": None if self.R2 is None else self.R2.shape[-1], **self.notes, **self.config}

    def as_stored(self) -> "Rotations":
        """These rotations as `save` + `load` gives them back (float32, re-orthogonalized): use them
        in the run that saves them, so re-applying the file reproduces that run exactly."""
        R2 = None if self.R2 is None else nearest_orthogonal(self.R2.float())
        return Rotations(self.kind, nearest_orthogonal(self.R1.float()), R2, self.seed, dict(self.notes),
                         dict(self.config))

    def save(self, path: Path) -> None:
        """float32 safetensors (a ReSpinQuant set for SmolLM2 is 61 × 576² values); `load`
        re-orthogonalizes. Written to a temp file and renamed."""
        from safetensors.torch import save_file

        tensors = {"R1": self.R1.float().contiguous()}
        if self.R2 is not None:
            tensors["R2"] = self.R2.float().contiguous()
        meta = {"kind": self.kind, "seed": str(self.seed), "notes": json.dumps(self.notes),
                "config": json.dumps(self.config), "format": "respin-export rotations 1"}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Rotations":
        """Our safetensors file, or SpinQuant's `torch.save` layout (`R.bin`: "R1" and
        "model.layers.{i}.self_attn.R2")."""
        path = Path(path)
        if not path.is_file():
            raise RespinError(f"rotations file {path} not found")
        if path.suffix != ".safetensors":
            return _load_spinquant_layout(path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                R1 = fh.get_tensor("R1")
                R2 = fh.get_tensor("R2") if "R2" in fh.keys() else None
        except Exception as exc:  # safetensors raises several types for a broken file
            raise RespinError(f"cannot read rotations from {path}: {exc}") from None
        return cls(meta.get("kind", "custom"), nearest_orthogonal(R1),
                   None if R2 is None else nearest_orthogonal(R2), int(meta.get("seed", 0)),
                   json.loads(meta.get("notes", "{}")), json.loads(meta.get("config", "{}")))

    def check_shape(self, shape: ModelShape) -> None:
        """One clear error when these rotations do not fit the model."""
        D, L, dh = shape.hidden, shape.n_layers, shape.head_dim
        ok_r1 = tuple(self.R1.shape) in ((D, D), (2 * L + 1, D, D))
        ok_r2 = self.R2 is None or tuple(self.R2.shape) in ((L, dh, dh), (L, shape.n_kv_heads, dh, dh))
        if not (ok_r1 and ok_r2):
            r2 = None if self.R2 is None else tuple(self.R2.shape)
            raise RespinError(f"rotations R1 {tuple(self.R1.shape)} / R2 {r2} do not fit the model "
                              f"(hidden {D}, {L} layers, head_dim {dh})")


def nearest_orthogonal(R: torch.Tensor) -> torch.Tensor:
    """Polar factor U Vᵀ of R (batched), in float64: the closest orthogonal matrix.

    LAPACK's divide-and-conquer SVD can fail to converge on matrices whose singular values are all
    (nearly) equal — exactly the near-orthogonal ones this is mostly called on — so those fall back
    to Newton–Schulz iterations X ← X (3I − XᵀX)/2, which converge for singular values in (0, √3).
    """
    R = R.to(torch.float64)
    try:
        U, _, Vh = torch.linalg.svd(R)
        return U @ Vh
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    X = R
    for _ in range(100):
        err = X.mT @ X - eye
        if float(err.abs().max()) < 1e-14:
            break
        X = X @ (1.5 * eye - 0.5 * (X.mT @ X))
    return X


def _load_spinquant_layout(path: Path) -> Rotations:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RespinError(f"cannot read rotations from {path} (torch.save file expected): {exc}") from None
    if not isinstance(state, dict):
        raise RespinError(f"{path}: expected a dict of rotations (SpinQuant's R.bin layout)")
    r1_key = next((k for k in ("R1", "model.R1", "R1.weight") if k in state), None)
    if r1_key is None:
        raise RespinError(f"{path}: no 'R1' in the file (keys: {', '.join(list(state)[:5])}…)")
    r2 = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.self_attn\.R2(?:\.weight)?", key)
        if m:
            r2[int(m.group(1))] = value
    R2 = None
    if r2:
        if sorted(r2) != list(range(len(r2))):
            raise RespinError(f"{path}: R2 given for layers {sorted(r2)}, not 0..{len(r2) - 1}")
        R2 = torch.stack([r2[i] for i in range(len(r2))])
    return Rotations("spinquant", nearest_orthogonal(state[r1_key]),
                     None if R2 is None else nearest_orthogonal(R2), notes={"imported": str(path.name)})


def hadamard_rotations(shape: ModelShape, seed: int = 0) -> Rotations:
    """QuaRot's rotations: R1 = normalized Hadamard of the hidden size (a seeded random orthogonal
    matrix where no construction exists, logged), R2 = normalized Hadamard of head_dim per layer."""
    r1 = offline_rotation(shape.hidden, seed=seed)
    notes = {"R1": r1.kind}
    r2 = offline_rotation(shape.head_dim, seed=seed + 1)
    notes["R2"] = r2.kind
    R2 = r2.matrix.expand(shape.n_layers, -1, -1).clone()
    return Rotations("hadamard", r1.matrix, R2, seed, notes)


def make_rotations(kind: str, shape: ModelShape, seed: int = 0) -> Rotations | None:
    """Rotations of a named kind; "none" → None (nothing to fuse)."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return hadamard_rotations(shape, seed)
    if kind in LEARNED_KINDS:
        raise ValueError(f"'{kind}' rotations are learned: see rotations.training.train_rotations")
    raise ValueError(f"unknown rotation kind '{kind}': supported are {', '.join(ROTATION_KINDS)}")
