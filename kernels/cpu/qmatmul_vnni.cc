// respin::QMatMul on CPUs with AVX512-VNNI (chosen at run time; see include/qmatmul.h for the maths).
//
// The inner loop is "vertical": the weights of 32 output columns are packed as [K/4][32][4] int8,
// so one vpdpbusd multiplies four uint8 activations (a = Xq + 128, broadcast) by four codes of 16
// columns at once and adds them to 16 int32 lanes, one lane per column. A group's sums therefore
// end up one per lane: no horizontal reductions, and the float64 combination per group runs on
// vectors of 8 columns. Blocks of 4 activation rows × 32 columns: 8 int32 + 16 float64 accumulators.
//
// Intrinsics are confined to the `target` region below (internal functions only, so no inline
// function compiled for AVX-512 can be shared with code that runs on other CPUs).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qmatmul.h"
#include "simd.h"

#ifdef RESPIN_HAVE_CLONES
#include <immintrin.h>
#endif

namespace respin::qmatmul {

#ifdef RESPIN_HAVE_CLONES

bool VnniUsable(int64_t G, int64_t group) {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni") && std::getenv("RESPIN_OPS_NO_VNNI") == nullptr;
  return cpu && (G == 1 || group % 4 == 0);
}

void VnniPackTile(const Problem& p, int64_t t, int8_t* codes, int32_t* sums) {
  std::vector<int8_t> row(p.Kp);
  for (int64_t i = 0; i < kVnniTile; ++i) {
    const int64_t n = t * kVnniTile + i;
    if (n < p.N) WeightRow(p, n, row.data());
    else std::fill(row.begin(), row.end(), 0);
    for (int64_t q = 0; q < p.Kp / 4; ++q) std::memcpy(codes + (q * kVnniTile + i) * 4, row.data() + 4 * q, 4);
    for (int64_t g = 0; g < p.G; ++g) {
      int32_t s = 0;
      for (int64_t k = GroupBegin(p, g); k < GroupEnd(p, g); ++k) s += row[k];
      sums[i * p.G + g] = s;
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 headers (_mm512_undefined_*)

namespace {

// Per-group parameters of the tile's 32 columns as float64 ([G][32]; zero past N).
struct TileParams {
  const double* z;     // w_zp
  const double* ws;    // w_scale
  const double* wsum;  // Σ_g codes
  const double* bias;  // [32], nullptr without bias
};

// Y[m0 : m0 + R, n0 : n0 + 32].
template <int R>
void Rows(const Problem& p, const int8_t* codes, const TileParams& tp, int64_t n0, int64_t m0) {
  const uint8_t* a = static_cast<const uint8_t*>(p.a) + m0 * p.Kp;
  __m512d acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 4; ++h) acc[r][h] = _mm512_setzero_pd();

  for (int64_t g = 0; g < p.G; ++g) {
    __m512i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
    const int64_t q1 = GroupEnd(p, g) / 4;
    for (int64_t q = GroupBegin(p, g) / 4; q < q1; ++q) {
      const int8_t* w = codes + q * 4 * kVnniTile;
      const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, a + r * p.Kp + 4 * q, 4);
        const __m512i b = _mm512_set1_epi32(quad);
        s[r][0] = _mm512_dpbusd_epi32(s[r][0], b, w0);
        s[r][1] = _mm512_dpbusd_epi32(s[r][1], b, w1);
      }
    }
    // exact = Σ a·w − z·Σa − δ·Σw + δ·|g|·z: integers below 2^53, so exact in float64 in any order;
    // then acc += exact·w_scale, rounded like the reference (no FMA: -ffp-contract=off).
    const double* z = tp.z + g * kVnniTile;
    const double* ws = tp.ws + g * kVnniTile;
    const double* wsum = tp.wsum + g * kVnniTile;
    for (int r = 0; r < R; ++r) {
      const double delta = p.delta[m0 + r];
      const __m512d as = _mm512_set1_pd(p.asum[(m0 + r) * p.G + g]);
      const __m512d dl = _mm512_set1_pd(delta), dl_len = _mm512_set1_pd(delta * p.glen[g]);
      for (int h = 0; h < 4; ++h) {
        const __m256i lanes = h % 2 ? _mm512_extracti64x4_epi64(s[r][h / 2], 1) : _mm512_castsi512_si256(s[r][h / 2]);
        const __m512d zh = _mm512_loadu_pd(z + 8 * h);
        __m512d e = _mm512_sub_pd(_mm512_cvtepi32_pd(lanes), _mm512_mul_pd(zh, as));
        e = _mm512_sub_pd(e, _mm512_mul_pd(dl, _mm512_loadu_pd(wsum + 8 * h)));
        e = _mm512_add_pd(e, _mm512_mul_pd(dl_len, zh));
        acc[r][h] = _mm512_add_pd(acc[r][h], _mm512_mul_pd(e, _mm512_loadu_pd(ws + 8 * h)));
      }
    }
  }

  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    const __m512d xs = _mm512_set1_pd(p.x_scale[m]);
    for (int h = 0; h < 4; ++h) {
      const int64_t n = n0 + 8 * h, valid = p.N - n;
      if (valid <= 0) break;
      __m512d v = _mm512_mul_pd(acc[r][h], xs);
      if (tp.bias) v = _mm512_add_pd(v, _mm512_loadu_pd(tp.bias + 8 * h));
      const __m256 f = _mm512_cvtpd_ps(v);
      float* out = p.y + m * p.N + n;
      if (valid >= 8) _mm256_storeu_ps(out, f);
      else _mm256_mask_storeu_ps(out, static_cast<__mmask8>((1u << valid) - 1), f);
    }
  }
}

void RunRows(const Problem& p, const int8_t* codes, const TileParams& tp, int64_t n0, int64_t m_begin,
             int64_t m_end) {
  int64_t m = m_begin;
  for (; m + 4 <= m_end; m += 4) Rows<4>(p, codes, tp, n0, m);
  switch (m_end - m) {
    case 3: Rows<3>(p, codes, tp, n0, m); break;
    case 2: Rows<2>(p, codes, tp, n0, m); break;
    case 1: Rows<1>(p, codes, tp, n0, m); break;
    default: break;
  }
}

}  // namespace

#pragma GCC diagnostic pop
#pragma GCC pop_options

void VnniRunTile(const Problem& p, int64_t t, const int8_t* codes, const int32_t* sums, int64_t m_begin,
                 int64_t m_end) {
  const int64_t n0 = t * kVnniTile;
  std::vector<double> params(3 * p.G * kVnniTile + kVnniTile, 0.0);
  double *z = params.data(), *ws = z + p.G * kVnniTile, *wsum = ws + p.G * kVnniTile, *bias = wsum + p.G * kVnniTile;
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t i = 0; i < kVnniTile && n0 + i < p.N; ++i) {
      z[g * kVnniTile + i] = p.w_zp[(n0 + i) * p.G + g];
      ws[g * kVnniTile + i] = p.w_scale[(n0 + i) * p.G + g];
      wsum[g * kVnniTile + i] = sums[i * p.G + g];
    }
  }
  for (int64_t i = 0; p.bias && i < kVnniTile && n0 + i < p.N; ++i) bias[i] = p.bias[n0 + i];
  RunRows(p, codes, TileParams{z, ws, wsum, p.bias ? bias : nullptr}, n0, m_begin, m_end);
}

#else  // no VNNI path in this build

bool VnniUsable(int64_t, int64_t) { return false; }
void VnniPackTile(const Problem&, int64_t, int8_t*, int32_t*) {}
void VnniRunTile(const Problem&, int64_t, const int8_t*, const int32_t*, int64_t, int64_t) {}

#endif

}  // namespace respin::qmatmul
