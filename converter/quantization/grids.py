"""Weight quantization grids: integer codes + a scale (and a min) per group of input columns.

A grid is data (`GridSpec`); the GGUF presets Q4_0, Q4_1 and Q8_0 are registered in `GRIDS`.
Codes are computed with llama.cpp's own float32 arithmetic (`quantize_row_q4_0_ref` & co.) on the
scale we store, and dequantized in the same operation order as `gguf.quants` / ggml, so a
`QuantizedTensor` packed into GGUF blocks dequantizes bit for bit to `QuantizedTensor.dequantize()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from converter.errors import RespinError


class QuantizationError(RespinError, ValueError):
    """Unknown grid, bad shapes or a tensor the grid cannot hold."""


@dataclass(frozen=True)
class GridSpec:
    """`bits`-bit codes, one scale `d` (and min `m`) per group of `group_size` input columns
    (`group_size` 0: one group per row, "per channel", as integer W4A4 GEMMs need).

    symmetric:   value = d * (q - zero_point),  q in [zero_point - 2**(bits-1), zero_point + 2**(bits-1) - 1]
    asymmetric:  value = d * q + m,             q in [0, 2**bits - 1]

    `signed_max`: symmetric scale fitted as llama.cpp's Q4_0 does, d = (value of largest magnitude)
    / -2**(bits-1), so the extreme lands exactly on the extra negative level; otherwise
    d = max|w| / (2**(bits-1) - 1) as Q8_0 does.
    `fp16_params`: d and m are rounded to fp16 *before* the weights are rounded, as GGUF stores them.
    """

    name: str
    bits: int
    symmetric: bool
    group_size: int = 32
    fp16_params: bool = True
    zero_point: int = 0
    signed_max: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QuantizationError(f"grid {self.name}: bits must be in 2..8 (got {self.bits})")
        if self.group_size < 0:
            raise QuantizationError(f"grid {self.name}: group_size must be >= 0 (got {self.group_size})")
        if not self.symmetric and (self.zero_point or self.signed_max):
            raise QuantizationError(f"grid {self.name}: zero_point/signed_max apply to symmetric grids only")

    def group_for(self, n_in: int) -> int:
        """Columns per group for a weight with `n_in` inputs."""
        return self.group_size or n_in

    def n_groups(self, n_in: int) -> int:
        """Groups per row; when group_size does not divide n_in the last group is shorter."""
        return -(-n_in // self.group_for(n_in))

    @property
    def qmin(self) -> int:
        return self.zero_point - 2 ** (self.bits - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return self.zero_point + 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


GRIDS: dict[str, GridSpec] = {
    # llama.cpp Q4_0: fp16 d, nibbles q in [0, 15], value d * (q - 8)
    "q4_0": GridSpec("q4_0", bits=4, symmetric=True, zero_point=8, signed_max=True),
    # llama.cpp Q4_1: fp16 d and m, nibbles q in [0, 15], value d * q + m
    "q4_1": GridSpec("q4_1", bits=4, symmetric=False),
    # llama.cpp Q8_0: fp16 d, int8 q, value q * d (llama.cpp writes |q| <= 127; -128 is representable)
    "q8_0": GridSpec("q8_0", bits=8, symmetric=True),
}


def grid(name: str) -> GridSpec:
    """The registered grid called `name` (case-insensitive), or "int2" … "int8": per-channel symmetric;
    a suffix "_g<N>" changes the group size (e.g. "q4_0_g128": Q4_0's grid in groups of 128)."""
    name = name.lower()
    if name in GRIDS:
        return GRIDS[name]
    base, _, size = name.rpartition("_g")
    if base in GRIDS and size.isdigit() and int(size) > 0:
        return replace(GRIDS[base], name=name, group_size=int(size))
    if len(name) == 4 and name.startswith("int") and name[3] in "2345678":
        return int_grid(int(name[3]))
    raise QuantizationError(f"unknown weight grid '{name}'; supported: {', '.join(GRIDS)}, int2 … int8")


def int_grid(bits: int, symmetric: bool = True, group_size: int = 0) -> GridSpec:
    """A plain integer grid with float32 params, e.g. the per-channel symmetric int4 weights of
    W4A4 (QuaRot/SpinQuant): value = d * q, q in [-8, 7]."""
    kind = "sym" if symmetric else "asym"
    return GridSpec(f"int{bits}_{kind}_g{group_size}", bits=bits, symmetric=symmetric, group_size=group_size,
                    fp16_params=False)


@dataclass
class QuantizedTensor:
    """A weight [out, in] as integer codes + per-group params: exactly what a GGUF block stores.

    codes:  int16 [out, in], the stored q of the spec's formula
    scale:  float32 [out, in // group_size] (fp16-representable when spec.fp16_params)
    offset: float32 [out, in // group_size], the asymmetric min m; None for symmetric grids
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    spec: GridSpec

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        gs = self.spec.group_for(n_in)
        if tuple(self.scale.shape) != (out, self.spec.n_groups(n_in)):
            raise QuantizationError(f"{self.spec.name}: codes {tuple(self.codes.shape)} and scale "
                                    f"{tuple(self.scale.shape)} do not match group_size {gs}")
        if (self.offset is None) != self.spec.symmetric:
            raise QuantizationError(f"{self.spec.name}: offset must be given iff the grid is asymmetric")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]; bit-exact with `gguf.quants.dequantize` of the packed blocks."""
        n_in = self.codes.shape[1]
        gs = self.spec.group_for(n_in)
        offset = None if self.offset is None else self.offset.repeat_interleave(gs, dim=1)[:, :n_in]
        return dequantize_codes(self.codes, self.scale.repeat_interleave(gs, dim=1)[:, :n_in], offset, self.spec)


def _round_half_away(u: torch.Tensor) -> torch.Tensor:
    # C's roundf, written as gguf.quants.np_roundf does it: every step is exact in float32.
    a = u.abs()
    floored = torch.floor(a)
    return torch.sign(u) * (floored + torch.floor(2 * (a - floored)))


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                         spec: GridSpec) -> torch.Tensor:
    """Round-to-nearest codes (int16, clamped to [qmin, qmax]); scale/offset broadcast against w.

    The arithmetic is llama.cpp's reference quantizer in float32 with id = 1/d:
    unsigned codes (Q4_0, Q4_1) `(int)(u + zero_point + 0.5f)`, signed codes (Q8_0) `roundf(u)`,
    where u = w * id (symmetric) or (w - m) * id (asymmetric). d == 0 gives the zero point.
    """
    w, d = w.float(), scale.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    u = w * inv if spec.symmetric else (w - offset.float()) * inv
    if spec.qmin >= 0:
        # llama.cpp truncates; floor differs only below 0, which the clamp maps to 0 either way
        # (and torch.trunc is ~30x slower than floor on CPU).
        q = torch.floor(u + (spec.zero_point + 0.5))
    else:
        q = _round_half_away(u) + spec.zero_point
    return q.clamp(spec.qmin, spec.qmax).to(torch.int16)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                     spec: GridSpec) -> torch.Tensor:
    """float32 values of `codes`; scale/offset broadcast against codes.

    Operation order of ggml's dequantize_row_*: Q4_0 `d * (q - 8)`, Q4_1 `d * q + m` (no FMA),
    Q8_0 `q * d`.
    """
    q = codes.float()
    if spec.symmetric:
        return scale.float() * (q - spec.zero_point)
    return scale.float() * q + offset.float()


def _params(w: torch.Tensor, spec: GridSpec, shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row (d, m) for the range of w [rows, k] shrunk by `shrink` (1.0: llama.cpp's rule)."""
    half = 2 ** (spec.bits - 1)
    if spec.symmetric and spec.signed_max:
        signed_max = torch.gather(w, 1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
        d, m = (signed_max * shrink) / -half, None
    elif spec.symmetric:
        d, m = (w.abs().amax(dim=1) * shrink) / (half - 1), None
    else:
        lo, hi = w.amin(dim=1) * shrink, w.amax(dim=1) * shrink
        d, m = (hi - lo) / (2**spec.bits - 1), lo
    if spec.fp16_params:
        d = d.half().float()
        m = None if m is None else m.half().float()
    return d, m


def _group_error(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, spec: GridSpec,
                 norm: float) -> torch.Tensor:
    d, m = d[:, None], None if m is None else m[:, None]
    q = quantize_with_params(w, d, m, spec)
    return (w - dequantize_codes(q, d, m, spec)).abs().pow(norm).sum(dim=1)


def fit_group_params(w: torch.Tensor, spec: GridSpec, clip_search: bool = False, norm: float = 2.4,
                     grid_points: int = 20, max_shrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale [rows] (and min [rows], None if symmetric) for one group w [rows, group_size].

    Without clip search this is llama.cpp's rule: Q4_0 d = (value of largest |w|) / -8, Q4_1
    d = (max - min) / 15 and m = min, Q8_0 d = max|w| / 127. With clip search (GPTQ's MSE search)
    the range is shrunk by p = 1 - max_shrink * i / grid_points, i = 0..grid_points, and each row
    keeps the p with the smallest sum |w - Q(w)|**norm; p = 1 is tried first, so it never does worse.
    """
    w = w.float()
    d, m = _params(w, spec, 1.0)
    if not clip_search:
        return d, m
    best = _group_error(w, d, m, spec, norm)
    for i in range(1, grid_points + 1):
        d_p, m_p = _params(w, spec, 1.0 - max_shrink * i / grid_points)
        err = _group_error(w, d_p, m_p, spec, norm)
        better = err < best
        best = torch.where(better, err, best)
        d = torch.where(better, d_p, d)
        m = None if m is None else torch.where(better, m_p, m)
    return d, m
