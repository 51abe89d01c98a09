// ResidualCorrection on the GPU: Y = (X + ((X·Q)·M)·Qᵀ) + Z (Z optional), X float32 [rows, D], Q [D, r], M [r, r]
// (ReSpinQuant's rank-r skip path), fused for r ≤ 128: a block keeps R rows of X and their t = X·Q
// and u = t·M in shared memory, so X is read once and Y written once.
//   t[j] = Σ_l p_l (l ascending from 0), p_l = Σ_{d ≡ l mod 16} x[d]·Q[d, j] (d ascending from 0)
//   u[l] = Σ_j t[j]·M[j, l]     (j ascending from 0)
//   y[d] = x[d] + Σ_j u[j]·Q[d, j]   (from x[d], j ascending)
// each product and sum rounded on its own (no FMA): the CPU kernel's operations in its order, so the
// results are bit-exact with it.
#pragma once

#include <cstdint>

#include "exec.cuh"

namespace respin::cuda {

constexpr int kMaxCorrectionRank = 128;
constexpr int kCorrectionLanes = 16;  // the CPU kernel's lane sums of t = x·Q (kernels/cpu/residual_correction.cc)

struct CorrectionParams {
  const float* x;  // [rows, D]
  const float* Q;  // [D, r]
  const float* M;  // [r, r]
  const float* z;  // [rows, D] added last (the residual's add, fused), or nullptr
  float* y;        // [rows, D]
  int64_t rows;
  int D, r;
  int rows_per_block;  // R
};

RESPIN_HD size_t CorrectionSharedBytes(const CorrectionParams& p) {
  return static_cast<size_t>(p.rows_per_block) * (p.D + 2 * p.r) * sizeof(float);
}

struct CorrectionProgram {
  using Params = CorrectionParams;
  static constexpr int kMaxThreads = 1024;
  struct Thread {};

  template <class Exec>
  RESPIN_HD static void Run(Exec& ex, const Params& p) {
    const int R = p.rows_per_block, D = p.D, r = p.r;
    float* xs = ex.template Shared<float>(0);  // [R, D]
    float* ts = xs + R * D;                    // [R, r]
    float* us = ts + R * r;                    // [R, r]
    const int64_t row0 = static_cast<int64_t>(ex.BlockX()) * R;
    const int valid = static_cast<int>(p.rows - row0 < R ? p.rows - row0 : R);

    ex.Threads([&](const ThreadCtx& c, Thread&) {
      for (int e = c.thread; e < valid * D; e += c.threads) xs[e] = p.x[row0 * D + e];
    });
    ex.Sync();
    ex.Threads([&](const ThreadCtx& c, Thread&) {  // t = x·Q: consecutive threads read consecutive Q[d, j]
      for (int e = c.thread; e < valid * r; e += c.threads) {
        const int row = e / r, j = e % r;
        const float* x = xs + row * D;
        float lanes[kCorrectionLanes] = {};
        int d0 = 0;
        for (; d0 + kCorrectionLanes <= D; d0 += kCorrectionLanes) {
          RESPIN_UNROLL
          for (int l = 0; l < kCorrectionLanes; ++l)
            lanes[l] = AddRn(lanes[l], MulRn(x[d0 + l], p.Q[(d0 + l) * r + j]));
        }
        RESPIN_UNROLL
        for (int l = 0; l < kCorrectionLanes; ++l)  // the tail, unrolled with a guard: lanes stay in registers
          if (d0 + l < D) lanes[l] = AddRn(lanes[l], MulRn(x[d0 + l], p.Q[(d0 + l) * r + j]));
        float acc = 0.0f;
        RESPIN_UNROLL
        for (int l = 0; l < kCorrectionLanes; ++l) acc = AddRn(acc, lanes[l]);
        ts[e] = acc;
      }
    });
    ex.Sync();
    ex.Threads([&](const ThreadCtx& c, Thread&) {  // u = t·M
      for (int e = c.thread; e < valid * r; e += c.threads) {
        const int row = e / r, l = e % r;
        const float* t = ts + row * r;
        float acc = 0.0f;
        for (int j = 0; j < r; ++j) acc = AddRn(acc, MulRn(t[j], p.M[j * r + l]));
        us[e] = acc;
      }
    });
    ex.Sync();
    ex.Threads([&](const ThreadCtx& c, Thread&) {  // y = x + u·Qᵀ
      for (int e = c.thread; e < valid * D; e += c.threads) {
        const int row = e / D, d = e % D;
        const float* u = us + row * r;
        const float* q = p.Q + d * r;
        float acc = xs[e];
        for (int j = 0; j < r; ++j) acc = AddRn(acc, MulRn(u[j], q[j]));
        p.y[row0 * D + e] = p.z ? AddRn(acc, p.z[row0 * D + e]) : acc;
      }
    });
  }
};

}  // namespace respin::cuda
