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
    asymmetric with `integer_zero_point`: value = d * (q - z), z an integer in [0, 2**bits - 1] per group
                 (stored in the offset field), as onnxruntime's MatMulNBits and GPTQ's own quantizer do;
                 its range always holds 0, so 0 is exactly representable.

    `signed_max`: symmetric scale fitted as llama.cpp's Q4_0 does, d = (value of largest magnitude)
    / -2**(bits-1), so the extreme lands exactly on the extra negative level; otherwise
    d = max|w| / (2**(bits-1) - 1) as Q8_0 does.
    `fp16_params`: d and m are rounded to fp16 *before* the weights are rounded, as GGUF stores them.

    K-quants (`super_block` 256): the groups ("sub-blocks" of 16 or 32) of one super-block share an
    fp16 super-scale D (and super-min Dm); each group's d = D · s and m = −Dm · t with integer codes
    s, t of `scale_bits` bits (s signed in [−2**(scale_bits−1), 2**(scale_bits−1) − 1] when
    `signed_scales`, else in [0, 2**scale_bits − 1]). Products of an fp16 and a code of at most 8
    bits are exact in float32, so d and m are exactly what ggml's dequantization computes.
    """

    name: str
    bits: int
    symmetric: bool
    group_size: int = 32
    fp16_params: bool = True
    zero_point: int = 0
    signed_max: bool = False
    integer_zero_point: bool = False
    super_block: int = 0
    scale_bits: int = 0
    signed_scales: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QuantizationError(f"grid {self.name}: bits must be in 2..8 (got {self.bits})")
        if self.group_size < 0:
            raise QuantizationError(f"grid {self.name}: group_size must be >= 0 (got {self.group_size})")
        if not self.symmetric and (self.zero_point or self.signed_max):
            raise QuantizationError(f"grid {self.name}: zero_point/signed_max apply to symmetric grids only")
        if self.symmetric and self.integer_zero_point:
            raise QuantizationError(f"grid {self.name}: integer_zero_point applies to asymmetric grids only")
        if self.super_block and (self.group_size <= 0 or self.super_block % self.group_size
                                 or not 1 <= self.scale_bits <= 8 or not self.fp16_params):
            raise QuantizationError(f"grid {self.name}: a super-block needs groups dividing it, 1..8 scale bits "
                                    "and fp16 params")

    @property
    def scale_code_range(self) -> tuple[int, int]:
        """[lo, hi] of a K-quant group's integer scale code s (its min code t is in [0, 2**scale_bits − 1])."""
        if self.signed_scales:
            return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1
        return 0, 2**self.scale_bits - 1

    @property
    def groups_per_super_block(self) -> int:
        return self.super_block // self.group_size if self.super_block else 1

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
    # llama.cpp Q5_0: fp16 d, 5-bit q in [0, 31], value d * (q - 16); Q5_1: fp16 d and m, value d * q + m
    "q5_0": GridSpec("q5_0", bits=5, symmetric=True, zero_point=16, signed_max=True),
    "q5_1": GridSpec("q5_1", bits=5, symmetric=False),
    # llama.cpp K-quants: super-blocks of 256 (ggml-common.h block_q*_K)
    #   Q2_K: 16 groups of 16, 4-bit s and t, q in [0, 3]         value (D·s)·q − Dm·t
    #   Q3_K: 16 groups of 16, 6-bit signed s, q in [0, 7]         value (D·s)·(q − 4)
    #   Q4_K:  8 groups of 32, 6-bit s and t, q in [0, 15]        value (D·s)·q − Dm·t
    #   Q5_K:  8 groups of 32, 6-bit s and t, q in [0, 31]        value (D·s)·q − Dm·t
    #   Q6_K: 16 groups of 16, 8-bit signed s, q in [0, 63]        value (D·s)·(q − 32)
    "q2_k": GridSpec("q2_k", bits=2, symmetric=False, group_size=16, super_block=256, scale_bits=4),
    "q3_k": GridSpec("q3_k", bits=3, symmetric=True, zero_point=4, group_size=16, super_block=256, scale_bits=6,
                     signed_scales=True),
    "q4_k": GridSpec("q4_k", bits=4, symmetric=False, group_size=32, super_block=256, scale_bits=6),
    "q5_k": GridSpec("q5_k", bits=5, symmetric=False, group_size=32, super_block=256, scale_bits=6),
    "q6_k": GridSpec("q6_k", bits=6, symmetric=True, zero_point=32, group_size=16, super_block=256, scale_bits=8,
                     signed_scales=True),
    # onnxruntime MatMulNBits with zero points: fp16 d, per-block integer z in [0, 15], value d * (q - z)
    "q4_zp": GridSpec("q4_zp", bits=4, symmetric=False, integer_zero_point=True),
}


def grid(name: str) -> GridSpec:
    """The registered grid called `name` (case-insensitive), or "int2" … "int8": per-channel symmetric;
    a suffix "_g<N>" changes the group size (e.g. "q4_0_g128": Q4_0's grid in groups of 128)."""
    name = name.lower()
    if name in GRIDS:
        return GRIDS[name]
    base, _, size = name.rpartition("_g")
    if base in GRIDS and size.isdigit() and int(size) > 0 and not GRIDS[base].super_block:
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
    offset: float32 [out, in // group_size], the asymmetric min m (the integer zero point z for
            `integer_zero_point` grids); None for symmetric grids
    super_scale, super_min: K-quants only, fp16-representable float32 [out, in // super_block]: D
            and Dm of every super-block, with scale = D · s and offset = −Dm · t for integer codes
            s, t (see GridSpec); super_min None for symmetric K-quants
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    spec: GridSpec
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        gs = self.spec.group_for(n_in)
        if tuple(self.scale.shape) != (out, self.spec.n_groups(n_in)):
            raise QuantizationError(f"{self.spec.name}: codes {tuple(self.codes.shape)} and scale "
                                    f"{tuple(self.scale.shape)} do not match group_size {gs}")
        if (self.offset is None) != self.spec.symmetric:
            raise QuantizationError(f"{self.spec.name}: offset must be given iff the grid is asymmetric")
        sb = self.spec.super_block
        if sb and n_in % sb:
            raise QuantizationError(f"{self.spec.name} needs the input dim to be a multiple of {sb} (got {n_in})")
        if (self.super_scale is not None) != bool(sb) or (self.super_min is not None) != (bool(sb) and
                                                                                         not self.spec.symmetric):
            raise QuantizationError(f"{self.spec.name}: super-block scale (and min, if asymmetric) must be given "
                                    "iff the grid has super-blocks")

    def scale_codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K-quants: the integer codes (s, t) [out, n_groups] of every group's scale and min (exact:
        scale = D·s with |s| < 2**8 and an fp16 D is a float32 product without rounding)."""
        per_group = self.spec.groups_per_super_block
        D = self.super_scale.repeat_interleave(per_group, dim=1)
        s = torch.where(D == 0, torch.zeros_like(D), self.scale / torch.where(D == 0, torch.ones_like(D), D))
        if self.super_min is None:
            return s.round().to(torch.int16), None
        Dm = self.super_min.repeat_interleave(per_group, dim=1)
        t = torch.where(Dm == 0, torch.zeros_like(Dm), -self.offset / torch.where(Dm == 0, torch.ones_like(Dm), Dm))
        return s.round().to(torch.int16), t.round().to(torch.int16)

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
    if spec.integer_zero_point:
        u = w * inv + offset.float()
    else:
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
    Q8_0 `q * d`; integer zero points as MatMulNBits `d * (q - z)`.
    """
    q = codes.float()
    if spec.integer_zero_point:
        return scale.float() * (q - offset.float())
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
    elif spec.integer_zero_point:
        lo, hi = w.amin(dim=1).clamp(max=0) * shrink, w.amax(dim=1).clamp(min=0) * shrink
        d = (hi - lo) / (2**spec.bits - 1)
        if spec.fp16_params:
            d = d.half().float()
        safe = torch.where(d == 0, torch.ones_like(d), d)
        z = torch.where(d == 0, torch.zeros_like(d), torch.round(-lo / safe)).clamp(0, 2**spec.bits - 1)
        return d, z
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


# --- K-quants: groups of 16/32 inside super-blocks of 256 ----------------------------------------

def _weighted_error(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, spec: GridSpec, norm: float,
                    importance: torch.Tensor | None) -> torch.Tensor:
    """Σ importance · |w − Q(w)|**norm over the last axis; d, m broadcast against w [..., k]."""
    err = (w - dequantize_codes(quantize_with_params(w, d, m, spec), d, m, spec)).abs().pow(norm)
    return (err if importance is None else err * importance).sum(dim=-1)


def _k_group_range(groups: torch.Tensor, spec: GridSpec, shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unrounded (d, m) of every group [..., gs]: the signed-max rule for symmetric K-quants (the
    extreme lands on the extra negative level), min/max for asymmetric ones with min ≤ 0, since
    they store −m as a non-negative code."""
    if spec.symmetric:
        signed_max = torch.gather(groups, -1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]
        return signed_max * shrink / -(2 ** (spec.bits - 1)), None
    lo = groups.amin(dim=-1).clamp(max=0) * shrink
    hi = torch.maximum(groups.amax(dim=-1) * shrink, lo)
    return (hi - lo) / (2**spec.bits - 1), lo


def _super_scale(values: torch.Tensor, spec: GridSpec, signed: bool) -> torch.Tensor:
    """fp16 D [rows] putting the largest-magnitude value of each row [rows, groups] on the widest code."""
    lo, hi = spec.scale_code_range if signed else (0, 2**spec.scale_bits - 1)
    if signed:  # the extreme maps to the negative end, as llama.cpp's make_qx_quants does
        extreme = torch.gather(values, 1, values.abs().argmax(dim=1, keepdim=True))[:, 0]
        return (extreme / lo).half().float()
    return (values.amax(dim=1).clamp(min=0) / hi).half().float()


def _codes_of(values: torch.Tensor, D: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    safe = torch.where(D == 0, torch.ones_like(D), D)[:, None]
    return torch.where(D[:, None] == 0, torch.zeros_like(values), torch.round(values / safe)).clamp(lo, hi)


def fit_super_block_params(w: torch.Tensor, spec: GridSpec, clip_search: bool = False, norm: float = 2.4,
                           grid_points: int = 20, max_shrink: float = 0.2, importance: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(scale [rows, G], offset [rows, G] | None, D [rows], Dm [rows] | None) for one super-block
    w [rows, super_block] of a K-quant grid (G groups of `group_size`).

    1. every group's float range (with clip search: the shrink with the least error, as in
       `fit_group_params`), 2. the fp16 super-scale (and super-min) from the largest group scale,
    3. each group's integer scale (and min) code rounded, then the best of the codes ±1 kept, so the
       grid is refitted to the quantized scales. `importance` [super_block] (e.g. the Hessian
       diagonal of the columns: what llama.cpp's imatrix holds) weights every error.
    """
    rows, width = w.shape
    if width != spec.super_block:
        raise QuantizationError(f"{spec.name}: a super-block holds {spec.super_block} columns (got {width})")
    gs, n_groups = spec.group_size, spec.groups_per_super_block
    groups = w.float().reshape(rows, n_groups, gs)
    imp = None if importance is None else importance.float().reshape(1, n_groups, gs)
    raw = replace(spec, super_block=0, scale_bits=0, signed_scales=False, fp16_params=False)

    d, m = _k_group_range(groups, spec, 1.0)
    if clip_search:
        best = _weighted_error(groups, d[..., None], None if m is None else m[..., None], raw, norm, imp)
        for i in range(1, grid_points + 1):
            d_p, m_p = _k_group_range(groups, spec, 1.0 - max_shrink * i / grid_points)
            err = _weighted_error(groups, d_p[..., None], None if m_p is None else m_p[..., None], raw, norm, imp)
            better = err < best
            best, d = torch.where(better, err, best), torch.where(better, d_p, d)
            m = None if m is None else torch.where(better, m_p, m)

    s_lo, s_hi = spec.scale_code_range
    D = _super_scale(d, spec, spec.signed_scales)
    s = _codes_of(d, D, s_lo, s_hi)
    Dm = t = None
    t_hi = 2**spec.scale_bits - 1
    if m is not None:
        Dm = _super_scale(-m, spec, signed=False)
        t = _codes_of(-m, Dm, 0, t_hi)

    # refit: each group keeps the pair of codes (s ± 1, t ± 1) with the least error
    steps = (0, -1, 1)  # (0, 0) first: the rounded codes are the incumbent
    candidates = [(ds, dt) for ds in steps for dt in (steps if m is not None else (0,))]
    best_err, best_s, best_t = None, s, t
    for ds, dt in candidates:
        s_c = (s + ds).clamp(s_lo, s_hi)
        t_c = None if t is None else (t + dt).clamp(0, t_hi)
        scale_c = D[:, None] * s_c
        offset_c = None if t_c is None else -(Dm[:, None] * t_c)
        err = _weighted_error(groups, scale_c[..., None], None if offset_c is None else offset_c[..., None], spec,
                              norm, imp)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s_c, best_s)
        best_t = None if t is None else torch.where(better, t_c, best_t)
    scale = D[:, None] * best_s
    offset = None if best_t is None else -(Dm[:, None] * best_t)
    return scale, offset, D, Dm
