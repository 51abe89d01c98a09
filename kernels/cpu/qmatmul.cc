// respin::QMatMul — the W4A4 (or W8A8) GEMM: int8 activation codes × packed int4 / int8 weight codes.
//
//   Y[m, n] = x_scale[m]·Σ_g w_scale[n, g]·Σ_{k∈g} (Xq[m, k] − x_zp[m])(Wq[n, k] − w_zp[n, g]) + bias[n]
//
// Exact integer sums per group, combined in float64 in the reference's order: bit-exact with
// runtime_ops/reference.py (include/qmatmul.h has the algebra). Two implementations:
//   - AVX512-VNNI CPUs (qmatmul_vnni.cc): uint8 activations × int8 codes packed for vpdpbusd; a
//     constant W (an initializer) is packed once, at session creation;
//   - everywhere else, and for group sizes that are not a multiple of 4 (this file): int16
//     a = Xq − x_zp × int16 codes unpacked 16 weight rows at a time, each tile reused by all
//     activation rows; a plain scalar dot product of 4 × 4 rows that g++ -O3 vectorizes into
//     pmaddwd (SSE2 / AVX2 / AVX-512 clones picked at load time, simd.h).
// Tiles over N run on the session's intra-op thread pool.
#include <algorithm>
#include <type_traits>

#include "op_specs.h"
#include "qmatmul.h"
#include "respin_ops.h"
#include "simd.h"

namespace respin {
namespace {

using qmatmul::GroupBegin;
using qmatmul::GroupEnd;
using qmatmul::kPad;
using qmatmul::Problem;

constexpr int64_t kTileN = 16;          // int16 path: weight rows unpacked per tile (a multiple of 4)
constexpr int64_t kChunk = 32768;       // longest run accumulated in int32: 32768·255·128 < 2^31
constexpr int64_t kRowBytes = 1 << 19;  // activation rows per pass over the weights: about an L2 share

#define RESPIN_INLINE inline __attribute__((always_inline))

// --------------------------------------------------------------------------- int16 path (δ = 0)

// out[r·4 + c] += Σ_{k0 ≤ k < k1} a_r[k]·w_c[k] for R ∈ {1, 4} activation rows × 4 weight rows.
// Scalar accumulators in one loop: g++ gives each its own vector accumulator (pmaddwd).
template <int R>
RESPIN_INLINE void Dot(const int16_t* a, const int16_t* w, int64_t ld, int64_t k0, int64_t k1, int64_t* out) {
  const int16_t *a0 = a, *a1 = a + ld, *a2 = a + 2 * ld, *a3 = a + 3 * ld;
  const int16_t *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    const int64_t c1 = std::min(k1, c0 + kChunk);
    int32_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
    int32_t s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
    if constexpr (R == 1) {
      for (int64_t k = c0; k < c1; ++k) {
        const int32_t v0 = a0[k];
        s00 += v0 * w0[k], s01 += v0 * w1[k], s02 += v0 * w2[k], s03 += v0 * w3[k];
      }
    } else {
      for (int64_t k = c0; k < c1; ++k) {
        const int32_t v0 = a0[k], v1 = a1[k], v2 = a2[k], v3 = a3[k];
        const int32_t u0 = w0[k], u1 = w1[k], u2 = w2[k], u3 = w3[k];
        s00 += v0 * u0, s01 += v0 * u1, s02 += v0 * u2, s03 += v0 * u3;
        s10 += v1 * u0, s11 += v1 * u1, s12 += v1 * u2, s13 += v1 * u3;
        s20 += v2 * u0, s21 += v2 * u1, s22 += v2 * u2, s23 += v2 * u3;
        s30 += v3 * u0, s31 += v3 * u1, s32 += v3 * u2, s33 += v3 * u3;
      }
    }
    const int32_t s[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
    for (int i = 0; i < R * 4; ++i) out[i] += s[i];
  }
}

// Y[m0 : m0 + R, n0 + j : n0 + j + 4] from one unpacked tile (δ = 0: exact = Σ a·w − z·Σ a).
template <int R>
RESPIN_INLINE void Block(const Problem& p, const int16_t* tile, int64_t n0, int64_t j, int64_t m0) {
  const int16_t* a = static_cast<const int16_t*>(p.a) + m0 * p.Kp;
  int64_t nn[4];
  for (int c = 0; c < 4; ++c) nn[c] = std::min(n0 + j + c, p.N - 1);  // padding rows borrow row N − 1's params
  double acc[R * 4] = {};
  for (int64_t g = 0; g < p.G; ++g) {
    int64_t dot[R * 4] = {};
    Dot<R>(a, tile + j * p.Kp, p.Kp, GroupBegin(p, g), GroupEnd(p, g), dot);
    for (int r = 0; r < R; ++r) {
      const int64_t as = p.asum[(m0 + r) * p.G + g];
      for (int c = 0; c < 4; ++c) {
        const int64_t exact = dot[r * 4 + c] - static_cast<int64_t>(p.w_zp[nn[c] * p.G + g]) * as;
        acc[r * 4 + c] += static_cast<double>(exact) * static_cast<double>(p.w_scale[nn[c] * p.G + g]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    for (int c = 0; c < 4 && n0 + j + c < p.N; ++c) {
      double v = acc[r * 4 + c] * static_cast<double>(p.x_scale[m]);
      if (p.bias) v += static_cast<double>(p.bias[n0 + j + c]);
      p.y[m * p.N + n0 + j + c] = static_cast<float>(v);
    }
  }
}

// Tiles [t0, t1): for each pass over about kRowBytes of activation rows, unpack every tile and
// run its 4×4 (and leftover 1×4) blocks.
RESPIN_TARGET_CLONES
void RunTilesInt16(const Problem& p, int64_t t0, int64_t t1, int16_t* tile) {
  const int64_t pass = std::max<int64_t>(4, kRowBytes / (2 * p.Kp) / 4 * 4);
  for (int64_t m_begin = 0; m_begin < p.M; m_begin += pass) {
    const int64_t m_end = std::min(p.M, m_begin + pass);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN;
      for (int64_t i = 0; i < kTileN; ++i) {
        if (n0 + i < p.N) qmatmul::WeightRow(p, n0 + i, tile + i * p.Kp);
        else std::fill_n(tile + i * p.Kp, p.Kp, int16_t{0});
      }
      for (int64_t j = 0; j < kTileN && n0 + j < p.N; j += 4) {
        int64_t m = m_begin;
        for (; m + 4 <= m_end; m += 4) Block<4>(p, tile, n0, j, m);
        for (; m < m_end; ++m) Block<1>(p, tile, n0, j, m);
      }
    }
  }
}

// a = Xq − α as A [M, Kp] (zero padded), its group sums [M, G] and δ = x_zp − α [M]:
// α = −128 for uint8 (the VNNI path: a = Xq + 128), α = x_zp for int16 (δ = 0).
template <class A>
void PrepareActivations(const Problem& p, const int8_t* xq, const int8_t* x_zp, A* a, int32_t* asum,
                        int32_t* delta) {
  for (int64_t m = 0; m < p.M; ++m) {
    const int32_t alpha = std::is_same_v<A, uint8_t> ? -128 : x_zp[m];
    A* dst = a + m * p.Kp;
    for (int64_t k = 0; k < p.K; ++k) dst[k] = static_cast<A>(xq[m * p.K + k] - alpha);
    for (int64_t k = p.K; k < p.Kp; ++k) dst[k] = 0;
    for (int64_t g = 0; g < p.G; ++g) {
      int32_t s = 0;
      for (int64_t k = GroupBegin(p, g); k < GroupEnd(p, g); ++k) s += dst[k];
      asum[m * p.G + g] = s;
    }
    delta[m] = x_zp[m] - alpha;
  }
}

// ------------------------------------------------------------------------------------- the op

struct QMatMulKernel : KernelBase<QMatMulKernel>, QMatMulSpec {
  // A constant W packed for the VNNI path at session creation: codes and group sums of all tiles.
  std::vector<int8_t> packed_codes;
  std::vector<int32_t> packed_sums;
  int64_t packed_rows = -1;

  // The problem's shape fields (K, Kp, N, G, group) and W.
  Problem Shape(int64_t N, const void* w) const {
    Problem p{};
    p.K = K, p.Kp = (K + kPad - 1) / kPad * kPad, p.N = N, p.G = Groups(), p.group = group_size ? group_size : K;
    p.w = w, p.packed = bits == 4;
    return p;
  }

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(QMatMulSpec::Init(info));
    PackConstantWeights(info);
    return Ort::Status(nullptr);
  }

  // Packs W once when it is a constant initializer of the expected dtype and shape and the VNNI
  // path will run (otherwise Compute packs or unpacks tiles per call, and reports a bad W).
  void PackConstantWeights(const OrtKernelInfo* info) {
    const int64_t G = Groups();
    if (!qmatmul::VnniUsable(G, group_size ? group_size : K)) return;
    const OrtApi& api = Ort::GetApi();
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 3, &is_constant, &value)) {
      api.ReleaseStatus(status);
      return;
    }
    if (!is_constant || value == nullptr) return;
    const Ort::ConstValue w(value);
    const auto type_shape = w.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = type_shape.GetShape();
    const bool packed = bits == 4;
    if (type_shape.GetElementType() != (packed ? kUInt8 : kInt8) || shape.size() != 2 ||
        shape[1] != (packed ? int4::PackedSize(K) : K))
      return;
    const Problem p = Shape(shape[0], w.GetTensorRawData());
    const int64_t tiles = qmatmul::VnniTiles(p.N), tile_bytes = qmatmul::VnniTileBytes(p.Kp);
    packed_codes.resize(tiles * tile_bytes);
    packed_sums.resize(tiles * qmatmul::kVnniTile * G);
    for (int64_t t = 0; t < tiles; ++t)
      qmatmul::VnniPackTile(p, t, packed_codes.data() + t * tile_bytes, packed_sums.data() + t * qmatmul::kVnniTile * G);
    packed_rows = p.N;
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input xq = ReadInput(ctx, 0), x_scale = ReadInput(ctx, 1), x_zp = ReadInput(ctx, 2);
    const Input w = ReadInput(ctx, 3), w_scale = ReadInput(ctx, 4), w_zp = ReadInput(ctx, 5);
    const Input bias = ReadInput(ctx, 6);
    RESPIN_RETURN_IF_ERROR(Validate(xq, x_scale, x_zp, w, w_scale, w_zp, bias));

    const int64_t M = LeadingSize(xq.shape), N = w.shape[0];
    float* y = AllocateOutput<float>(ctx, 0, OutputShape(xq, w));
    if (M == 0 || N == 0) return Ort::Status(nullptr);

    Problem p = Shape(N, w.data);
    p.M = M, p.x_scale = x_scale.as<float>(), p.w_scale = w_scale.as<float>(), p.w_zp = w_zp.as<int8_t>();
    p.bias = bias.present ? bias.as<float>() : nullptr, p.y = y;
    std::vector<int32_t> glen(p.G), asum(M * p.G), delta(M);
    for (int64_t g = 0; g < p.G; ++g) glen[g] = static_cast<int32_t>(std::min(K, GroupEnd(p, g)) - GroupBegin(p, g));
    p.glen = glen.data(), p.asum = asum.data(), p.delta = delta.data();

    if (qmatmul::VnniUsable(p.G, p.group)) {
      std::vector<uint8_t> a(M * p.Kp);
      PrepareActivations(p, xq.as<int8_t>(), x_zp.as<int8_t>(), a.data(), asum.data(), delta.data());
      p.a = a.data();
      return RunVnni(ctx, p);
    }
    std::vector<int16_t> a(M * p.Kp);
    PrepareActivations(p, xq.as<int8_t>(), x_zp.as<int8_t>(), a.data(), asum.data(), delta.data());
    p.a = a.data();
    const int64_t tiles = (N + kTileN - 1) / kTileN;
    const size_t tasks = TileTasks(p, tiles);
    return ParallelFor(ctx, tasks, [&](size_t task) {
      const auto [t0, t1] = TaskRange(task, tasks, tiles);
      std::vector<int16_t> tile(kTileN * p.Kp);
      RunTilesInt16(p, t0, t1, tile.data());
    });
  }

  Ort::Status RunVnni(Ort::KernelContext& ctx, const Problem& p) const {
    const int64_t tiles = qmatmul::VnniTiles(p.N), tile_bytes = qmatmul::VnniTileBytes(p.Kp);
    const int64_t sums_per_tile = qmatmul::kVnniTile * p.G;
    const bool prepacked = packed_rows == p.N;
    const size_t tasks = TileTasks(p, tiles);
    const int64_t pass = std::max<int64_t>(4, kRowBytes / p.Kp / 4 * 4);
    return ParallelFor(ctx, tasks, [&](size_t task) {
      const auto [t0, t1] = TaskRange(task, tasks, tiles);
      std::vector<int8_t> codes(prepacked ? 0 : (t1 - t0) * tile_bytes);  // this task's tiles, packed now
      std::vector<int32_t> sums(prepacked ? 0 : (t1 - t0) * sums_per_tile);
      for (int64_t t = t0; !prepacked && t < t1; ++t)
        qmatmul::VnniPackTile(p, t, codes.data() + (t - t0) * tile_bytes, sums.data() + (t - t0) * sums_per_tile);
      for (int64_t m_begin = 0; m_begin < p.M; m_begin += pass) {
        for (int64_t t = t0; t < t1; ++t) {
          const int8_t* c = prepacked ? packed_codes.data() + t * tile_bytes : codes.data() + (t - t0) * tile_bytes;
          const int32_t* s = prepacked ? packed_sums.data() + t * sums_per_tile : sums.data() + (t - t0) * sums_per_tile;
          qmatmul::VnniRunTile(p, t, c, s, m_begin, std::min(p.M, m_begin + pass));
        }
      }
    });
  }

  // Tasks for `tiles` column tiles: about 32k multiply-adds each at least, at most 64.
  static size_t TileTasks(const Problem& p, int64_t tiles) {
    return static_cast<size_t>(std::clamp<int64_t>(p.M * p.N * p.K / 32768, 1, std::min<int64_t>(tiles, 64)));
  }
};

}  // namespace

const OrtCustomOp* QMatMulOp() {
  static const RespinOp<QMatMulKernel> op;
  return &op;
}

}  // namespace respin
