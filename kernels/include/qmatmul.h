// respin::QMatMul internals shared by cpu/qmatmul.cc (the op, activations, the portable int16 path)
// and cpu/qmatmul_vnni.cc (the AVX512-VNNI path). Both compute, per group g of K,
//   exact[m, n, g] = Σ_{k∈g} (a[m, k] − δ[m])·(w[n, k] − z[n, g])
//                  = Σ a·w − z·Σ_g a − δ·Σ_g w + δ·z·|g|        (all exact integers)
// with stored activations a = Xq − α and δ = x_zp − α, then
//   Y[m, n] = float32(((Σ_g exact·w_scale[n, g]) · x_scale[m]) + bias[n])   in float64, in that order,
// which is runtime_ops.reference.qmatmul's arithmetic: the kernels are bit-exact with it.
#pragma once

#include <cstdint>

#include "int4.h"

namespace respin::qmatmul {

constexpr int64_t kPad = 64;  // K is zero-padded to a multiple of this (one 64-byte vector of uint8)

struct Problem {
  int64_t M, K, Kp, N, G, group;  // group: columns per group (K when group_size is 0)
  const void* a;                  // [M, Kp] activations a = Xq − α, zero padded (int16 or uint8)
  const int32_t* asum;            // [M, G]: Σ_{k∈g} a[m, k]
  const int32_t* delta;           // [M]: x_zp − α
  const int32_t* glen;            // [G]: elements of K in each group
  const float* x_scale;           // [M]
  const void* w;                  // packed uint8 [N, ⌈K/2⌉] (bits 4) or int8 [N, K]
  bool packed;
  const float* w_scale;           // [N, G]
  const int8_t* w_zp;             // [N, G]
  const float* bias;              // [N] or nullptr
  float* y;                       // [M, N]
};

inline int64_t GroupBegin(const Problem& p, int64_t g) { return g * p.group; }
inline int64_t GroupEnd(const Problem& p, int64_t g) { return g + 1 == p.G ? p.Kp : (g + 1) * p.group; }

// Raw codes of weight row n as T [Kp] (zero padded).
template <class T>
inline void WeightRow(const Problem& p, int64_t n, T* dst) {
  if (p.packed) {
    int4::UnpackRow(static_cast<const uint8_t*>(p.w) + n * int4::PackedSize(p.K), p.K, dst);
  } else {
    const int8_t* src = static_cast<const int8_t*>(p.w) + n * p.K;
    for (int64_t k = 0; k < p.K; ++k) dst[k] = static_cast<T>(src[k]);
  }
  for (int64_t k = p.K; k < p.Kp; ++k) dst[k] = 0;
}

// ------------------------------------------------------------------------ AVX512-VNNI path

// Whether this CPU runs the VNNI path (AVX-512 BW/VL + VNNI; RESPIN_OPS_NO_VNNI=1 says no) and the
// grouping suits it (one group, or groups of a multiple of 4 columns). Its activations are uint8
// a = Xq + 128 (α = −128).
bool VnniUsable(int64_t G, int64_t group);

// Weights in the VNNI layout: tiles of kVnniTile rows, each [Kp/4][kVnniTile][4] int8 codes (four
// consecutive k of one row in 32 bits, rows side by side), plus Σ_g codes per [N, G].
constexpr int64_t kVnniTile = 32;
inline int64_t VnniTiles(int64_t N) { return (N + kVnniTile - 1) / kVnniTile; }
inline int64_t VnniTileBytes(int64_t Kp) { return Kp * kVnniTile; }

// Packs tile t of the problem's weights (only K, Kp, N, G, group, w, packed are read) into `codes`
// (VnniTileBytes) and their group sums into `sums` ([kVnniTile, G]; rows past N are zero).
void VnniPackTile(const Problem& p, int64_t t, int8_t* codes, int32_t* sums);

// Y[m_begin : m_end, the columns of tile t] from the tile's packed codes and sums.
void VnniRunTile(const Problem& p, int64_t t, const int8_t* codes, const int32_t* sums, int64_t m_begin,
                 int64_t m_end);

}  // namespace respin::qmatmul
