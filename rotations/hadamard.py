"""Hadamard matrices of every size we can construct, and the rotations built from them.

A Hadamard matrix ``H_n`` has ±1 entries and ``H_n @ H_n.T == n * I``. We build
``H_n = H_{2^k} ⊗ H_m`` (DESIGN §4.5): ``H_{2^k}`` by Sylvester's construction and ``H_m`` by

* Paley I:  ``m = q + 1`` for a prime power ``q ≡ 3 (mod 4)`` (12 from q=11, 28 from q=27, ...);
* Paley II: ``m = 2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)`` (36 from q=17, 52 from q=25, ...).

Both need the quadratic character of GF(q), so a small GF(p^k) lives here too (q stays small, brute
force is fine). Everything is generated, nothing is tabulated; the tests check ``H Hᵀ = n I``.

Offline (fused) rotations fall back to a seeded random orthogonal matrix when no construction
exists; the online transform refuses such a size.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from converter.errors import RespinError

logger = logging.getLogger(__name__)

_H2 = ((1, 1), (1, -1))


class HadamardSizeError(RespinError, ValueError):
    """No Hadamard construction exists (here) for the requested size."""


def _size_error(n: int, use: str = "Hadamard matrix") -> HadamardSizeError:
    cores = [m for m in range(1, 120) if m & (m - 1) and hadamard_factorization(m) == (1, m)]
    below = next(s for s in range(n - 1, 0, -1) if hadamard_factorization(s) is not None)
    above = next(s for s in itertools.count(n + 1) if hadamard_factorization(s) is not None)
    return HadamardSizeError(
        f"no {use} of size {n}: constructible sizes are n = 2^k * m with m = 1 (Sylvester), "
        f"m = q + 1 for a prime power q ≡ 3 (mod 4) (Paley I) or m = 2(q + 1) for a prime power "
        f"q ≡ 1 (mod 4) (Paley II), i.e. m in {{1, {', '.join(map(str, cores))}, ...}}; "
        f"nearest constructible sizes: {below} and {above}"
    )


# ------------------------------------------------------------ GF(p^k) and its quadratic character


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_rem(a: tuple[int, ...], f: tuple[int, ...], p: int) -> tuple[int, ...]:
    """Remainder of ``a`` modulo the monic ``f`` over GF(p); coefficients low degree first."""
    r = list(a)
    d = len(f) - 1
    for i in range(len(r) - 1, d - 1, -1):
        c = r[i]
        if c:
            for j in range(d + 1):
                r[i - d + j] = (r[i - d + j] - c * f[j]) % p
    return tuple(c % p for c in r[:d]) + (0,) * max(0, d - len(r))


def _irreducible_polynomial(p: int, k: int) -> tuple[int, ...]:
    """First monic degree-k polynomial over GF(p) with no monic factor of degree 1..k//2."""
    for low in itertools.product(range(p), repeat=k):
        f = (*low, 1)
        if all(
            any(_poly_rem(f, (*g, 1), p))
            for d in range(1, k // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        ):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(a_i − a_j)`` over GF(q), int64 [q, q]; χ is the quadratic character.

    Element ``a_i`` is the polynomial whose base-p digits of ``i`` are its coefficients (low degree
    first), taken modulo an irreducible polynomial; for prime q this is just ``i mod q``.
    """
    pk = _prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"Jacobsthal matrix needs an odd prime power, got {q}")
    p, k = pk
    f = _irreducible_polynomial(p, k)
    weights = torch.tensor([p**i for i in range(k)], dtype=torch.int64)
    digits = (torch.arange(q, dtype=torch.int64)[:, None] // weights) % p  # [q, k]

    chi = torch.full((q,), -1, dtype=torch.int64)
    for a in digits.tolist():
        square = [0] * (2 * k - 1)
        for i, j in itertools.product(range(k), repeat=2):
            square[i + j] += a[i] * a[j]
        chi[sum(c * w for c, w in zip(_poly_rem(tuple(square), f, p), weights.tolist()))] = 1
    chi[0] = 0

    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, k]: a_i − a_j coefficient-wise
    return chi[(diff * weights).sum(-1)]


# ---------------------------------------------------------------- constructions (int8, ±1)


def _paley_i(q: int) -> torch.Tensor:
    """H of order q + 1 for q ≡ 3 (mod 4): ``I + S`` with ``S = [[0, 1ᵀ], [−1, Q]]`` skew."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got {q}")
    Q = _jacobsthal(q)  # antisymmetric because χ(−1) = −1
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return (S + torch.eye(q + 1, dtype=torch.int64)).to(torch.int8)


def _paley_ii(q: int) -> torch.Tensor:
    """H of order 2(q + 1) for q ≡ 1 (mod 4) from the symmetric conference matrix C (C Cᵀ = q I)."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got {q}")
    Q = _jacobsthal(q)  # symmetric because χ(−1) = 1
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = torch.tensor(_H2, dtype=torch.int64)
    B = torch.tensor(((1, -1), (-1, -1)), dtype=torch.int64)
    H = torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.int64), B)
    return H.to(torch.int8)


def _construction(m: int) -> tuple[str, int] | None:
    """How H_m is built: ``("sylvester", 1)``, ``("paley1", q)``, ``("paley2", q)`` or None."""
    if m == 1:
        return ("sylvester", 1)
    if m % 4:
        return None
    # When both apply (28: q = 27 or q = 13) either works; Paley I goes first, for determinism.
    if (m - 1) % 4 == 3 and _prime_power(m - 1) is not None:
        return ("paley1", m - 1)
    if (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1) is not None:
        return ("paley2", m // 2 - 1)
    return None


@lru_cache(maxsize=None)
def _core_hadamard(m: int) -> torch.Tensor:
    """H_m as int8 [m, m] for a constructible m (see `_construction`). Cached: never hand it out."""
    kind, q = _construction(m) or (None, 0)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.int8)
    if kind == "paley1":
        return _paley_i(q)
    if kind == "paley2":
        return _paley_ii(q)
    raise _size_error(m)


def _sylvester(pow2: int) -> torch.Tensor:
    """H_{2^k} as int8: ``H[i, j] = (−1)^popcount(i & j)`` (symmetric)."""
    H = torch.ones(1, 1, dtype=torch.int8)
    H2 = torch.tensor(_H2, dtype=torch.int8)
    while H.shape[0] < pow2:
        H = torch.kron(H2, H)
    return H


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n == 2^k * m`` and H_m constructible, m smallest; else None."""
    if n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n}")
    pow2 = n & -n  # largest power of two dividing n
    while pow2 >= 1:
        if _construction(n // pow2) is not None:
            return pow2, n // pow2
        pow2 //= 2
    return None


@lru_cache(maxsize=8)
def _hadamard_int8(n: int) -> torch.Tensor:
    factors = hadamard_factorization(n)
    if factors is None:
        raise _size_error(n)
    pow2, m = factors
    logger.debug("building H_%d = H_%d ⊗ H_%d (%s)", n, pow2, m, _construction(m))
    return torch.kron(_sylvester(pow2), _core_hadamard(m))


def hadamard_matrix(n: int) -> torch.Tensor:
    """H_n as float64 [n, n] with ±1 entries and ``H @ H.T == n * I`` exactly.

    ``H_n = H_{2^k} ⊗ H_m`` with the factorization of `hadamard_factorization`. Not symmetric
    in general (Paley I cores are not). The cache holds int8; each call returns a fresh float64
    copy, so callers may modify it. Raises `HadamardSizeError` if n has no construction.
    """
    return _hadamard_int8(n).to(torch.float64)


def normalized_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H_n / sqrt(n)``: orthogonal [n, n], computed in float64 and cast once to `dtype`."""
    return (hadamard_matrix(n) / math.sqrt(n)).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-distributed orthogonal [n, n]: QR of a seeded Gaussian, signs fixed so diag(R) > 0.

    Deterministic per seed (own `torch.Generator`, global RNG untouched); built in float64.
    """
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(torch.float64)
    return (Q * signs).to(dtype)


# eq=False: a generated __eq__ would call bool() on a tensor comparison; compare `.matrix` yourself.
@dataclass(frozen=True, eq=False)
class OfflineRotation:
    """A rotation to fuse into weights: orthogonal float64 [n, n], and how it was made."""

    matrix: torch.Tensor
    kind: str  # "hadamard" or "random"
    seed: int | None  # the seed of a "random" rotation, None for "hadamard"

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "random"):
            raise ValueError(f"OfflineRotation.kind must be 'hadamard' or 'random': {self.kind!r}")
        shape = tuple(self.matrix.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"OfflineRotation.matrix must be square, got shape {shape}")
        if self.matrix.dtype != torch.float64:
            raise ValueError(f"OfflineRotation.matrix must be float64, got {self.matrix.dtype}")


def offline_rotation(n: int, seed: int = 0) -> OfflineRotation:
    """Normalized H_n if constructible, else `random_orthogonal(n, seed)` with a warning.

    Never raises for an unconstructible size: a fused rotation only needs to be orthogonal.
    """
    if hadamard_factorization(n) is not None:
        return OfflineRotation(normalized_hadamard(n), "hadamard", None)
    logger.warning(
        "no Hadamard construction for size %d; using a random orthogonal rotation (seed %d) "
        "for this offline rotation",
        n,
        seed,
    )
    return OfflineRotation(random_orthogonal(n, seed), "random", seed)


def require_hadamard(n: int, use: str) -> None:
    """Raise `HadamardSizeError` naming `use` and the nearest sizes when n has no construction
    (online rotations cannot fall back to a random matrix: DESIGN §4.5)."""
    if hadamard_factorization(n) is None:
        raise _size_error(n, use=use)


def walsh_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalized Hadamard transform, last axis: equals ``x @ hadamard_matrix(n).T / sqrt(n)``.

    ``x`` [..., n] floating point → same shape and dtype. In column-vector terms each row becomes
    ``H x / sqrt(n)``. ``H`` is not symmetric when its core is Paley I (e.g. n = 12, 28, 1536), so
    there this is *not* ``x @ H``; its inverse is `hadamard_transform`. Cost O(n log n + n m): an H_m
    matmul on [..., 2^k, m], then a butterfly over the 2^k axis. Raises `HadamardSizeError` for an
    n with no construction.
    """
    return _fast_hadamard(x, transpose=True)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(n) / sqrt(n)`` along the last axis: the ONNX `respin::Hadamard` op
    (DESIGN §6) and the online R3/R4 of the simulated-quant model; inverse of
    `walsh_hadamard_transform`."""
    return _fast_hadamard(x, transpose=False)


def _fast_hadamard(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"a Hadamard transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    factors = hadamard_factorization(n)
    if factors is None:
        raise _size_error(n, use="online Hadamard transform")
    pow2, m = factors
    lead = x.shape[:-1]
    y = x.reshape(*lead, pow2, m)
    if m > 1:
        # With X = x viewed as [2^k, m] (row-major), (H_{2^k} ⊗ H_m) vec(X) = vec(H_{2^k} X H_mᵀ):
        # H_m(ᵀ) on the right here, H_{2^k} (symmetric) on the left by the butterfly below.
        core = _core_hadamard(m).to(device=x.device, dtype=x.dtype)
        y = y @ (core.T if transpose else core)
    h = 1
    while h < pow2:  # Sylvester butterfly: one H_2 per bit of the 2^k index
        y = y.reshape(*lead, pow2 // (2 * h), 2, h, m)
        a, b = y[..., 0, :, :], y[..., 1, :, :]
        y = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return y.reshape(x.shape) * (1.0 / math.sqrt(n))
