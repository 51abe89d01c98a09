// The C API of api.h for one backend: argument checks, launch shapes and kernel parameters, shared
// by the GPU library (device_api.cu, DeviceBackend) and the host emulation (host_api.cc,
// HostBackend), so both run the same programs with the same launch shapes. A Backend provides
//   template <class Program> static void Launch(const LaunchConfig&, const Program::Params&, void* stream);
//   static const uint64_t* CoreMasks(int m);   H_m's sign masks where the programs run
//   static size_t MaxSharedBytes();            dynamic shared memory a block may have
//   static constexpr bool kDevice;
// and reports failures by throwing std::runtime_error (caught here, never across the C ABI).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "dtypes.cuh"
#include "exec.cuh"
#include "hadamard_construction.h"
#include "qmatmul.cuh"
#include "residual_correction.cuh"
#include "row_transform.cuh"

namespace respin::cuda {

inline std::string& LastError() {
  static thread_local std::string message;
  return message;
}

// Runs `body`; 0 on success, 1 with LastError() set on failure.
template <class Body>
int Guarded(const char* what, Body&& body) noexcept {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    LastError() = std::string(what) + ": " + e.what();
  } catch (...) {
    LastError() = std::string(what) + ": unknown error";
  }
  return 1;
}

[[noreturn]] inline void Refuse(const std::string& message) { throw std::invalid_argument(message); }

// H_m's columns as sign bit masks, [m][⌈m/64⌉]: bit b of column d set where H[b, d] = −1.
inline std::vector<uint64_t> CoreSignMasks(int m) {
  const std::vector<int8_t> H = hadamard::CoreMatrix(m);
  const int words = (m + 63) / 64;
  std::vector<uint64_t> masks(static_cast<size_t>(m) * words, 0);
  for (int b = 0; b < m; ++b)
    for (int d = 0; d < m; ++d)
      if (H[static_cast<size_t>(b) * m + d] < 0) masks[static_cast<size_t>(d) * words + b / 64] |= uint64_t{1} << (b % 64);
  return masks;
}

inline int FloorPow2(int64_t v) {
  int p = 1;
  while (static_cast<int64_t>(p) * 2 <= v) p *= 2;
  return p;
}

inline void CheckThreads(int threads) {
  if (threads < kWarpSize || threads > 1024 || threads % kWarpSize)
    Refuse("threads per block must be a multiple of 32 in [32, 1024], got " + std::to_string(threads));
}

inline void CheckShared(size_t bytes, size_t limit, const std::string& what) {
  if (bytes > limit)
    Refuse(what + " needs " + std::to_string(bytes) + " bytes of shared memory per block, more than the " +
           std::to_string(limit) + " this device gives");
}

// ---------------------------------------------------------------------------------- row programs

template <class Backend>
RowParams PlanRows(int64_t rows, int n, bool transform, const RespinLaunch* launch, LaunchConfig& cfg) {
  if (rows < 0) Refuse("rows must be >= 0, got " + std::to_string(rows));
  if (n < 1) Refuse("the last axis must have n >= 1 elements, got " + std::to_string(n));
  RowParams p{};
  p.rows = rows, p.n = n, p.transform = transform, p.pow2 = n, p.m = 1, p.scale = 1.0f, p.words = 0;
  if (transform) {
    const auto factors = hadamard::Factorization(n);
    if (!factors)
      Refuse("no Hadamard construction of size n = " + std::to_string(n) +
             ": supported are n = 2^k·m with m = 1 (Sylvester), m = q + 1 for a prime power q ≡ 3 (mod 4) "
             "(Paley I) or m = 2(q + 1) for a prime power q ≡ 1 (mod 4) (Paley II)");
    p.pow2 = static_cast<int>(factors->first), p.m = static_cast<int>(factors->second);
    p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
    p.words = (p.m + 63) / 64;
    p.core = p.m > 1 ? Backend::CoreMasks(p.m) : nullptr;
  }
  const int per_block = launch && launch->rows_per_block ? launch->rows_per_block
                                                         : FloorPow2(std::max<int64_t>(1, std::min<int64_t>(4096 / n, rows)));
  if (per_block < 1 || (per_block & (per_block - 1)))
    Refuse("rows_per_block must be a power of two, got " + std::to_string(per_block));
  int threads = per_block * n > 8192 ? 1024 : per_block * n > 4096 ? 512 : 256;
  if (launch && launch->threads) threads = launch->threads;
  CheckThreads(threads);
  const int warps = threads / kWarpSize;
  if (per_block % warps && warps % per_block)
    Refuse("rows_per_block " + std::to_string(per_block) + " and " + std::to_string(warps) +
           " warps: one must divide the other");
  p.rows_per_block = per_block;
  cfg.threads = threads;
  cfg.grid_x = static_cast<int>((rows + per_block - 1) / per_block);
  cfg.shared_bytes = RowSharedLayout(p, threads).bytes;
  CheckShared(cfg.shared_bytes, Backend::MaxSharedBytes(), "a row of n = " + std::to_string(n));
  return p;
}

template <class Backend, class Program>
void LaunchRows(LaunchConfig cfg, const RowParams& p, void* stream) {
  if (p.rows == 0) return;
  Backend::template Launch<Program>(cfg, p, stream);
}

template <class Backend>
void LaunchRowsTyped(int dtype, const LaunchConfig& cfg, const RowParams& p, void* stream) {
  switch (dtype) {
    case RESPIN_FLOAT32: return LaunchRows<Backend, RowProgram<Float32>>(cfg, p, stream);
    case RESPIN_FLOAT16: return LaunchRows<Backend, RowProgram<Float16>>(cfg, p, stream);
    case RESPIN_BFLOAT16: return LaunchRows<Backend, RowProgram<BFloat16>>(cfg, p, stream);
    default: Refuse("dtype must be float32 (0), float16 (1) or bfloat16 (2), got " + std::to_string(dtype));
  }
}

template <class Backend>
int Hadamard(const void* x, void* y, int dtype, int64_t rows, int n, const RespinLaunch* launch, void* stream) {
  return Guarded("respin_hadamard", [&] {
    LaunchConfig cfg;
    RowParams p = PlanRows<Backend>(rows, n, true, launch, cfg);
    p.x = x, p.y = y, p.quantize = false;
    LaunchRowsTyped<Backend>(dtype, cfg, p, stream);
  });
}

template <class Backend>
int QuantizeRows(const void* x, int dtype, int64_t rows, int n, int transform, int bits, int symmetric, float clip,
                 int packed, void* q, float* scale, int8_t* zero_point, const RespinLaunch* launch, void* stream) {
  return Guarded("respin_quantize_rows", [&] {
    if (bits < 2 || bits > 8) Refuse("bits must be in [2, 8], got " + std::to_string(bits));
    if (packed && bits != 4) Refuse("packed codes need bits = 4, got " + std::to_string(bits));
    if (!(clip > 0.0f) || !std::isfinite(clip)) Refuse("clip must be a finite number > 0");
    LaunchConfig cfg;
    RowParams p = PlanRows<Backend>(rows, n, transform != 0, launch, cfg);
    p.x = x, p.quantize = true, p.bits = bits, p.symmetric = symmetric != 0, p.clip = clip;
    p.packed = packed != 0, p.q = q, p.q_scale = scale, p.q_zero_point = zero_point;
    LaunchRowsTyped<Backend>(dtype, cfg, p, stream);
  });
}

template <class Backend>
int DequantizeRows(const void* q, const float* scale, const int8_t* zero_point, float* y, int64_t rows, int d,
                   int packed, const RespinLaunch* launch, void* stream) {
  return Guarded("respin_dequantize_rows", [&] {
    if (rows < 0 || d < 1) Refuse("need rows >= 0 and d >= 1, got rows " + std::to_string(rows) + ", d " + std::to_string(d));
    LaunchConfig cfg;
    cfg.threads = launch && launch->threads ? launch->threads : 256;
    CheckThreads(cfg.threads);
    const int64_t blocks = (rows * d + cfg.threads - 1) / cfg.threads;
    cfg.grid_x = static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65536));
    if (rows == 0) return;
    Backend::template Launch<DequantProgram>(cfg, DequantParams{q, scale, zero_point, y, rows, d, packed != 0}, stream);
  });
}

// ----------------------------------------------------------------------------------- QMatMul

template <class Backend, class Program>
void LaunchGemm(const QMatMulParams& p, int bm, int bn, void* stream) {
  LaunchConfig cfg;
  cfg.threads = Program::kThreads;
  cfg.grid_x = (p.N + bn - 1) / bn;
  const int64_t grid_y = (p.M + bm - 1) / bm;
  if (grid_y > 65535) Refuse("M = " + std::to_string(p.M) + " rows are more than one launch covers with this tile");
  cfg.grid_y = static_cast<int>(grid_y);
  cfg.shared_bytes = Program::kSharedBytes;
  Backend::template Launch<Program>(cfg, p, stream);
}

template <class Backend, int BM, int BN, int WM, int WN>
void LaunchMma(const QMatMulParams& p, void* stream) {
  if (p.G == 1) return LaunchGemm<Backend, QMatMulMma<BM, BN, WM, WN, 64, false>>(p, BM, BN, stream);
  if (p.group % 64 == 0) return LaunchGemm<Backend, QMatMulMma<BM, BN, WM, WN, 64, true>>(p, BM, BN, stream);
  return LaunchGemm<Backend, QMatMulMma<BM, BN, WM, WN, 32, true>>(p, BM, BN, stream);
}

template <class Backend>
int QMatMul(const int8_t* xq, const float* x_scale, const int8_t* x_zp, const void* w, int bits, const float* w_scale,
            const int8_t* w_zp, const float* bias, float* y, int64_t M, int K, int N, int group_size,
            const RespinLaunch* launch, void* stream) {
  return Guarded("respin_qmatmul", [&] {
    if (K < 1 || N < 0 || M < 0) Refuse("need K >= 1, N >= 0, M >= 0");
    if (bits < 2 || bits > 8) Refuse("bits must be in [2, 8], got " + std::to_string(bits));
    if (group_size < 0) Refuse("group_size must be >= 0, got " + std::to_string(group_size));
    // S = Σ Xq·Wq and the running ΣX stay inside int32: |Xq·Wq| ≤ 2^14, K ≤ 2^17.
    if (K > (1 << 17)) Refuse("K = " + std::to_string(K) + " is above the 131072 this kernel accumulates exactly");
    QMatMulParams p{xq, x_scale, x_zp, w, bits == 4, w_scale, w_zp, bias, y, M, K, N, 1, K};
    if (group_size) p.G = (K + group_size - 1) / group_size, p.group = group_size;
    if (M == 0 || N == 0) return;
    const bool mma_ok = p.G == 1 || p.group % 32 == 0;
    int variant = launch ? launch->variant : RESPIN_QMATMUL_AUTO;
    if (variant == RESPIN_QMATMUL_AUTO) {
      // A first choice, not yet measured on a GPU (benchmarks/cuda_kernels.py measures all three).
      variant = !mma_ok || M <= 4 ? RESPIN_QMATMUL_DP4A : M <= 16 ? RESPIN_QMATMUL_MMA_SMALL : RESPIN_QMATMUL_MMA;
    }
    if ((variant == RESPIN_QMATMUL_MMA || variant == RESPIN_QMATMUL_MMA_SMALL) && !mma_ok)
      Refuse("the tensor-core QMatMul needs one group or groups of a multiple of 32 columns, got group_size " +
             std::to_string(group_size));
    switch (variant) {
      case RESPIN_QMATMUL_MMA: return LaunchMma<Backend, 64, 128, 32, 32>(p, stream);
      case RESPIN_QMATMUL_MMA_SMALL: return LaunchMma<Backend, 16, 64, 16, 16>(p, stream);
      case RESPIN_QMATMUL_DP4A: return LaunchGemm<Backend, QMatMulDp4a<4, 4>>(p, 4, 4, stream);
      default: Refuse("unknown QMatMul variant " + std::to_string(variant));
    }
  });
}

// ------------------------------------------------------------------------ ResidualCorrection

template <class Backend>
int ResidualCorrection(const float* x, const float* Q, const float* M, const float* z, float* y, int64_t rows, int D,
                       int r, const RespinLaunch* launch, void* stream) {
  return Guarded("respin_residual_correction", [&] {
    if (rows < 0 || D < 1 || r < 0) Refuse("need rows >= 0, D >= 1, r >= 0");
    if (r > kMaxCorrectionRank)
      Refuse("rank r = " + std::to_string(r) + " is above the " + std::to_string(kMaxCorrectionRank) +
             " this kernel fuses");
    CorrectionParams p{x, Q, M, z, y, rows, D, r, 1};
    p.rows_per_block = launch && launch->rows_per_block
                           ? launch->rows_per_block
                           : FloorPow2(std::max<int64_t>(1, std::min<int64_t>(8192 / (D + 2 * r), rows)));
    LaunchConfig cfg;
    cfg.threads = launch && launch->threads ? launch->threads : 256;
    CheckThreads(cfg.threads);
    cfg.grid_x = static_cast<int>((rows + p.rows_per_block - 1) / p.rows_per_block);
    cfg.shared_bytes = CorrectionSharedBytes(p);
    CheckShared(cfg.shared_bytes, Backend::MaxSharedBytes(), "ResidualCorrection with D = " + std::to_string(D));
    if (rows == 0) return;
    Backend::template Launch<CorrectionProgram>(cfg, p, stream);
  });
}

}  // namespace respin::cuda

// The C functions of api.h for `Backend` (one translation unit per library).
#define RESPIN_CUDA_DEFINE_API(Backend)                                                                         \
  extern "C" {                                                                                                  \
  const char* respin_cuda_last_error(void) { return respin::cuda::LastError().c_str(); }                       \
  int respin_cuda_is_device(void) { return Backend::kDevice ? 1 : 0; }                                          \
  int respin_hadamard(const void* x, void* y, int dtype, int64_t rows, int n, const RespinLaunch* launch,       \
                      void* stream) {                                                                           \
    return respin::cuda::Hadamard<Backend>(x, y, dtype, rows, n, launch, stream);                               \
  }                                                                                                             \
  int respin_quantize_rows(const void* x, int dtype, int64_t rows, int n, int transform, int bits,             \
                           int symmetric, float clip, int packed, void* q, float* scale, int8_t* zero_point,   \
                           const RespinLaunch* launch, void* stream) {                                          \
    return respin::cuda::QuantizeRows<Backend>(x, dtype, rows, n, transform, bits, symmetric, clip, packed, q, \
                                               scale, zero_point, launch, stream);                              \
  }                                                                                                             \
  int respin_dequantize_rows(const void* q, const float* scale, const int8_t* zero_point, float* y,           \
                             int64_t rows, int d, int packed, const RespinLaunch* launch, void* stream) {      \
    return respin::cuda::DequantizeRows<Backend>(q, scale, zero_point, y, rows, d, packed, launch, stream);    \
  }                                                                                                             \
  int respin_qmatmul(const int8_t* xq, const float* x_scale, const int8_t* x_zero_point, const void* w,        \
                     int bits, const float* w_scale, const int8_t* w_zero_point, const float* bias, float* y,  \
                     int64_t M, int K, int N, int group_size, const RespinLaunch* launch, void* stream) {      \
    return respin::cuda::QMatMul<Backend>(xq, x_scale, x_zero_point, w, bits, w_scale, w_zero_point, bias, y,  \
                                          M, K, N, group_size, launch, stream);                                 \
  }                                                                                                             \
  int respin_residual_correction(const float* x, const float* Q, const float* M, const float* z, float* y,    \
                                 int64_t rows, int D, int r, const RespinLaunch* launch, void* stream) {       \
    return respin::cuda::ResidualCorrection<Backend>(x, Q, M, z, y, rows, D, r, launch, stream);                \
  }                                                                                                             \
  }
