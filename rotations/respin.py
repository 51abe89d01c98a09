"""ReSpinQuant: one residual basis per block and the skip-path transitions between them.

With per-block bases R_0 … R_2L (row convention, stream entering block b is `x R_b`), block b's
skip path must carry `x R_b` to `x R_{b+1}`: the transition is `T_b = R_bᵀ R_{b+1}` (orthogonal).
All bases start from the same deterministic Hadamard, so T_b starts at I and stays close to it:
`T_b − I` is nearly low-rank and is compressed after training to rank r:

    Q = top-r singular vectors of (T − I)        (left = right subspace: T is normal; via eigh of 2I − T − Tᵀ)
    R̂ = polar(Qᵀ T Q)                            (nearest orthogonal r×r matrix)
    x T̂ = x + ((x Q)(R̂ − I)) Qᵀ                  (T̂ = I + Q (R̂ − I) Qᵀ is orthogonal)

r = D reproduces T exactly; r = 0 is the identity skip (bases' differences ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter.errors import RespinError
from rotations.rotations import nearest_orthogonal

FULL_RANK = "full"


@dataclass
class SkipCorrection:
    """x ↦ x + ((x Q) M) Qᵀ with Q [D, r] orthonormal columns and M = R̂ − I [r, r] (the ONNX
    `ResidualCorrection` op). Dense transitions (training) use Q = I and M = T − I."""

    Q: torch.Tensor
    M: torch.Tensor

    @property
    def rank(self) -> int:
        return self.Q.shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        Q, M = self.Q.to(x), self.M.to(x)
        return x + ((x @ Q) @ M) @ Q.T

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        # T̂ is orthogonal: T̂⁻¹ = T̂ᵀ = I + Q Mᵀ Qᵀ
        Q, M = self.Q.to(x), self.M.to(x)
        return x + ((x @ Q) @ M.T) @ Q.T

    def dense(self) -> torch.Tensor:
        D = self.Q.shape[0]
        return torch.eye(D, dtype=self.Q.dtype, device=self.Q.device) + self.Q @ self.M @ self.Q.T

    def macs_per_token(self) -> int:
        D, r = self.Q.shape
        return 2 * D * r + r * r


def transitions(bases: torch.Tensor) -> torch.Tensor:
    """T_b = R_bᵀ R_{b+1} for bases [2L+1, D, D] → [2L, D, D]."""
    return bases[:-1].mT @ bases[1:]


@dataclass
class DenseTransition:
    """The exact transition x ↦ x T (training, and rank 'full' ablations)."""

    T: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.T.to(x)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.T.to(x).T


def dense_correction(T: torch.Tensor) -> DenseTransition:
    return DenseTransition(T)


def parse_rank(rank: int | str, hidden: int) -> int:
    """"full" → D; an int in [0, D]; anything else → one clear error."""
    if rank == FULL_RANK:
        return hidden
    try:
        r = int(rank)
    except (TypeError, ValueError):
        raise RespinError(f"--rank must be an integer 0..{hidden} or 'full' (got {rank!r})") from None
    if not 0 <= r <= hidden:
        raise RespinError(f"--rank must be in 0..{hidden} or 'full' (got {r})")
    return r


@torch.no_grad()
def top_change_subspace(T: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` singular vectors of T − I, largest first: [..., D, D] → [..., D, rank] (T's dtype).
    They are the top eigenvectors of (T − I)ᵀ(T − I) = 2I − T − Tᵀ (symmetric eigh in float64: robust
    where SVD of a matrix with many equal singular values may not converge)."""
    T64 = T.detach().to(torch.float64)
    eye = torch.eye(T.shape[-1], dtype=torch.float64, device=T.device)
    _, V = torch.linalg.eigh(2 * eye - T64 - T64.mT)
    return V[..., V.shape[-1] - rank:].flip(-1).to(T.dtype)


@torch.no_grad()
def compress_transition(T: torch.Tensor, rank: int) -> SkipCorrection:
    """Rank-r correction approximating the orthogonal transition T [D, D] (float64 inside)."""
    T64 = T.to(torch.float64)
    D = T64.shape[0]
    if rank == 0:
        empty = torch.zeros(D, 0, dtype=torch.float64, device=T.device)
        return SkipCorrection(empty, torch.zeros(0, 0, dtype=torch.float64, device=T.device))
    Q = top_change_subspace(T64, rank)
    R_hat = nearest_orthogonal(Q.T @ T64 @ Q)
    return SkipCorrection(Q, R_hat - torch.eye(rank, dtype=torch.float64, device=T.device))


def tail_energy(T: torch.Tensor, rank: int) -> torch.Tensor:
    """½‖T − I‖²_F outside the top-`rank` subspace of T − I, per transition [..., D, D] → [...]:
    what compressing T to that rank throws away (T is normal, so the top subspace is invariant and
    the compression error is exactly this tail). With U the subspace, ½‖(T − I)U‖² = r − tr(UᵀTU),
    so tail = (D − r) − tr(T) + tr(UᵀTU). U is found without gradient (it maximizes the kept part,
    so its own derivative does not enter): a training penalty that pushes each T's change into
    `rank` directions, the ones the deployed rank-r correction keeps."""
    D = T.shape[-1]
    if not 0 <= rank <= D:
        raise RespinError(f"skip rank must be in 0..{D} (got {rank})")
    U = top_change_subspace(T, rank)
    kept = (U.mT @ T @ U).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (D - rank) - T.diagonal(dim1=-2, dim2=-1).sum(-1) + kept


def skip_corrections(bases: torch.Tensor, rank: int) -> list[SkipCorrection]:
    """The 2L compressed corrections of per-block bases at one rank."""
    return [compress_transition(T, rank) for T in transitions(bases.to(torch.float64))]


def online_macs_per_token(corrections: list[SkipCorrection]) -> int:
    return sum(c.macs_per_token() for c in corrections)
