"""Cayley SGD with momentum on the orthogonal group (Li, Fuxin & Todorovic, ICLR 2020), the optimiser
SpinQuant trains its rotations with.

For an orthogonal X [n, n] (or a stack [..., n, n]) with Euclidean gradient G and momentum M:

    M ← β·M + G                       (momentum on the Euclidean gradient)
    A = ½(M Xᵀ − X Mᵀ)                (skew-symmetric: a tangent direction at X is −A X)
    X ← (I + α/2·A)⁻¹ (I − α/2·A) X   (Cayley retraction: exactly orthogonal for skew A)
    M ← A X                           (momentum kept in the tangent space)

The retraction is solved exactly (not by the paper's fixed-point iteration) in the parameter's dtype:
with float64 parameters XᵀX stays I to ~1e-13 over thousands of steps.
"""

from __future__ import annotations

import math

import torch


class CayleySGD(torch.optim.Optimizer):
    """SGD on the Stiefel manifold of square orthogonal matrices; parameters must start orthogonal."""

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.9) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"CayleySGD needs lr > 0 and 0 <= momentum < 1 (got {lr}, {momentum})")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for X in group["params"]:
                if X.grad is None:
                    continue
                state = self.state[X]
                M = state.get("momentum")
                M = X.grad.clone() if M is None else M.mul_(beta).add_(X.grad)
                A = 0.5 * (M @ X.mT - X @ M.mT)
                X.copy_(cayley_retraction(X, A, lr))
                state["momentum"] = A @ X
        return loss


def cayley_retraction(X: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    """(I + α/2·A)⁻¹ (I − α/2·A) X for skew-symmetric A (batched over leading dims)."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    half = 0.5 * alpha * A
    return torch.linalg.solve(eye + half, (eye - half) @ X)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr at step 0 to 0 at total_steps (a pure function: resumes exactly)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def orthogonality_error(R: torch.Tensor) -> float:
    """max |RᵀR − I| over a matrix or a stack of matrices."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return float((R.mT @ R - eye).abs().max())
