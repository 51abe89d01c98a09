"""The `Rotations` artefact: R1 (residual stream) and per-layer R2 (attention heads).

Saved as a small safetensors file so a conversion can be re-applied without relearning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter.arch import ModelShape
from rotations.hadamard import offline_rotation

logger = logging.getLogger(__name__)

ROTATION_KINDS = ("none", "hadamard")


@dataclass
class Rotations:
    """R1 [D, D] and R2 [L, d_h, d_h] (None: no head rotation), float64, orthogonal."""

    kind: str
    R1: torch.Tensor
    R2: torch.Tensor | None
    seed: int = 0
    notes: dict = field(default_factory=dict)  # e.g. {"R1": "random"} where no Hadamard exists

    def describe(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "dim_R1": self.R1.shape[0],
                "dim_R2": None if self.R2 is None else self.R2.shape[-1], **self.notes}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"R1": self.R1.contiguous()}
        if self.R2 is not None:
            tensors["R2"] = self.R2.contiguous()
        meta = {"kind": self.kind, "seed": str(self.seed), "notes": json.dumps(self.notes)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "Rotations":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            R1 = fh.get_tensor("R1")
            R2 = fh.get_tensor("R2") if "R2" in fh.keys() else None
        return cls(meta.get("kind", "custom"), R1, R2, int(meta.get("seed", 0)), json.loads(meta.get("notes", "{}")))


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
    raise ValueError(f"unknown rotation kind '{kind}': supported are {', '.join(ROTATION_KINDS)}")
