"""Cayley SGD keeps rotations orthogonal and descends."""

from __future__ import annotations

import torch

from rotations.cayley import CayleySGD, cosine_lr, orthogonality_error
from rotations.hadamard import normalized_hadamard
from rotations.rotations import nearest_orthogonal


def test_stays_orthogonal_over_hundreds_of_steps():
    g = torch.Generator().manual_seed(0)
    R = torch.nn.Parameter(torch.stack([normalized_hadamard(64), normalized_hadamard(64)]))
    opt = CayleySGD([R], lr=1.5, momentum=0.9)
    for _ in range(400):
        R.grad = torch.randn(R.shape, generator=g, dtype=torch.float64)
        opt.step()
    assert orthogonality_error(R.detach()) < 1e-5
    assert orthogonality_error(R.detach()) < 1e-11  # exact retraction in float64


def test_solves_orthogonal_procrustes():
    """min ‖R − A‖² over orthogonal R has the polar factor of A as its solution."""
    A = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if torch.linalg.det(A) < 0:
        A[0] = -A[0]  # a Cayley path from I stays in SO(n): make the optimum reachable
    R = torch.nn.Parameter(torch.eye(32, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.05, momentum=0.9)
    losses = []
    for step in range(300):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(0.05, step, 300)
        loss = ((R - A) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    best = float(((nearest_orthogonal(A) - A) ** 2).sum())
    assert losses[-1] < losses[0] and abs(losses[-1] - best) < 1e-6 * best + 1e-8
    assert torch.allclose(R.detach(), nearest_orthogonal(A), atol=1e-5)


def test_cosine_lr():
    assert cosine_lr(1.5, 0, 100) == 1.5 and abs(cosine_lr(1.5, 100, 100)) < 1e-12
    assert abs(cosine_lr(1.5, 50, 100) - 0.75) < 1e-12
