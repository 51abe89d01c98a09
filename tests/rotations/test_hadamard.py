"""Hadamard constructions: H Hᵀ = n I exactly, fast transform vs dense matmul, random fallback."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from rotations.hadamard import (
    HadamardSizeError,
    OfflineRotation,
    _paley_i,
    _paley_ii,
    hadamard_factorization,
    hadamard_matrix,
    normalized_hadamard,
    offline_rotation,
    random_orthogonal,
    walsh_hadamard_transform,
)

CORES = (12, 20, 28, 36, 44, 52, 60, 76)
# Full H Hᵀ check (O(n³)) up to 2048; above that a row sample (O(r n²)) keeps the suite fast.
DENSE_SIZES = sorted(
    {2**k for k in range(12)}
    | {m * 2**j for m in CORES for j in range(4)}
    | {64, 96, 192, 576, 1536}
)
LARGE_SIZES = (4096, 8192, 14336)  # 2^14 (2 GiB dense) is checked through the transform below
UNSUPPORTED = (3, 5, 7, 43, 86, 92, 172, 11008 // 64)


def _assert_hadamard_rows(H: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows `rows` of H are ±1 and orthogonal to every row of H with norm² n."""
    n = H.shape[0]
    assert H.dtype == torch.float64 and H.shape == (n, n)
    assert torch.equal(H[rows].abs(), torch.ones(len(rows), n, dtype=torch.float64))
    assert torch.equal(H[rows] @ H.T, n * torch.eye(n, dtype=torch.float64)[rows])


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_hadamard_matrix_is_hadamard(n: int) -> None:
    H = hadamard_matrix(n)
    _assert_hadamard_rows(H, torch.arange(n))
    assert torch.equal(H.abs(), torch.ones_like(H))


@pytest.mark.parametrize("n", LARGE_SIZES)
def test_large_hadamard_matrix_rows(n: int) -> None:
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:4]
    _assert_hadamard_rows(hadamard_matrix(n), torch.cat([torch.tensor([0, n - 1]), rows]))


def _sylvester_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Independent reference: ``H_n[i, j] = (−1)^popcount(i & j)`` for a power of two n."""
    bits = rows[:, None] & torch.arange(n)
    parity = torch.zeros_like(bits)
    for b in range(n.bit_length()):
        parity ^= (bits >> b) & 1
    return (1 - 2 * parity).to(torch.float64)


@pytest.mark.parametrize("n", (1, 2, 64, 2048))
def test_sylvester_closed_form(n: int) -> None:
    assert torch.equal(hadamard_matrix(n), _sylvester_rows(torch.arange(n), n))


@pytest.mark.parametrize("n", (4096, 2**14))
def test_large_power_of_two_transform_closed_form(n: int) -> None:
    rows = torch.tensor([0, 1, 5, n // 2 + 3, n - 1])
    basis = torch.zeros(len(rows), n, dtype=torch.float64)
    basis[torch.arange(len(rows)), rows] = 1.0
    expected = _sylvester_rows(rows, n) / math.sqrt(n)
    torch.testing.assert_close(walsh_hadamard_transform(basis), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("q", (3, 7, 11, 19, 27, 43, 243, 343))
def test_paley_i(q: int) -> None:
    H = _paley_i(q).to(torch.float64)
    assert torch.equal(H @ H.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))


@pytest.mark.parametrize("q", (5, 9, 13, 17, 25, 49, 81, 125))
def test_paley_ii(q: int) -> None:
    H = _paley_ii(q).to(torch.float64)
    m = 2 * (q + 1)
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 1)),
        (2, (2, 1)),
        (64, (64, 1)),
        (2**14, (2**14, 1)),
        (12, (1, 12)),
        (24, (2, 12)),
        (28, (1, 28)),
        (52, (1, 52)),
        (72, (2, 36)),
        (96, (8, 12)),
        (192, (16, 12)),
        (576, (16, 36)),
        (1536, (128, 12)),
        (14336, (512, 28)),
        (11008, (32, 344)),  # LLaMA-7B's FFN size: 344 = 7³ + 1 (Paley I over GF(343)), not 172
    ],
)
def test_factorization(n: int, expected: tuple[int, int]) -> None:
    assert hadamard_factorization(n) == expected


@pytest.mark.parametrize("n", DENSE_SIZES + list(LARGE_SIZES) + list(range(1, 300)))
def test_factorization_is_consistent(n: int) -> None:
    factors = hadamard_factorization(n)
    if factors is None:
        return
    pow2, m = factors
    assert pow2 * m == n and pow2 & (pow2 - 1) == 0
    assert all(hadamard_factorization(m // 2**j) is None for j in range(1, 8) if m % 2**j == 0)


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_size_raises_naming_size(n: int) -> None:
    assert hadamard_factorization(n) is None
    with pytest.raises(HadamardSizeError, match=rf"size {n}\b.*Paley"):
        hadamard_matrix(n)
    with pytest.raises(HadamardSizeError, match=rf"size {n}\b"):
        walsh_hadamard_transform(torch.zeros(2, n))
    assert issubclass(HadamardSizeError, ValueError)


@pytest.mark.parametrize("n", (1, 2, 12, 28, 36, 52, 192, 576, 1536))
def test_normalized_hadamard_is_orthogonal(n: int) -> None:
    Hn = normalized_hadamard(n)
    torch.testing.assert_close(Hn @ Hn.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert normalized_hadamard(n, torch.float32).dtype == torch.float32


def test_hadamard_cache_not_mutated_by_caller() -> None:
    H = hadamard_matrix(12)
    H.zero_()
    normalized_hadamard(12).mul_(3.0)
    _assert_hadamard_rows(hadamard_matrix(12), torch.arange(12))


@pytest.mark.parametrize("n", (1, 2, 8, 64, 1024, 4096, 12, 20, 28, 36, 96, 576, 1536))
def test_walsh_hadamard_transform_matches_dense(n: int) -> None:
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = x @ hadamard_matrix(n).T / math.sqrt(n)
    torch.testing.assert_close(walsh_hadamard_transform(x), expected, rtol=0, atol=1e-10)


def test_walsh_hadamard_transform_side_and_dtype() -> None:
    # Paley I cores are not symmetric: the transform is x @ Hᵀ, i.e. it maps I to Hᵀ / sqrt(n).
    H = hadamard_matrix(12)
    assert not torch.equal(H, H.T)
    identity = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(walsh_hadamard_transform(identity), H.T / math.sqrt(12))
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    y = walsh_hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # default float32 tolerances
    torch.testing.assert_close(y, x @ normalized_hadamard(576, torch.float32).T)
    with pytest.raises(TypeError):
        walsh_hadamard_transform(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("n", (1, 7, 86, 256))
def test_random_orthogonal(n: int) -> None:
    Q = random_orthogonal(n, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(Q, random_orthogonal(n, seed=3))
    if n > 1:
        assert not torch.allclose(Q, random_orthogonal(n, seed=4))
    assert random_orthogonal(n, seed=3, dtype=torch.float32).dtype == torch.float32


def test_offline_rotation_hadamard() -> None:
    rot = offline_rotation(576, seed=5)
    assert rot.kind == "hadamard" and rot.seed is None
    assert torch.equal(rot.matrix, normalized_hadamard(576))


@pytest.mark.parametrize("n", (86, 43 * 2 * 3))
def test_offline_rotation_falls_back_to_random_with_warning(
    n: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rotations.hadamard"):
        rot = offline_rotation(n, seed=7)
    assert rot.kind == "random" and rot.seed == 7 and rot.matrix.dtype == torch.float64
    assert torch.equal(rot.matrix, random_orthogonal(n, seed=7))
    assert any(r.levelno == logging.WARNING and str(n) in r.getMessage() for r in caplog.records)


def test_offline_rotation_validates() -> None:
    with pytest.raises(ValueError, match="kind"):
        OfflineRotation(torch.eye(2, dtype=torch.float64), "sylvester", None)
    with pytest.raises(ValueError, match="float64"):
        OfflineRotation(torch.eye(2), "random", 0)
