// Row programs: Hadamard `Y = X·H_n/√n` along the last axis, per-token dynamic quantization, and the
// two fused (one read of X, one write of codes): Hadamard → DynamicQuantize / QuantizeKV.
//
// A block holds R rows of n = 2^k·m elements in shared memory (float32 whatever the input type):
//   load      X rows → buffer (fp16 / bf16 / fp32 in, float32 from here on)
//   core      X[2^k, m]·H_m per row (m > 1), into a second buffer; H_m's columns as sign bit masks:
//             y_d = Σ_b ±x_b in ascending b from 0, the CPU kernel's exact sums (±x is exact)
//   butterfly the Sylvester levels h = 1, 2, 4, … over the 2^k axis, up to three levels per pass
//             (8 values in registers per thread), in the CPU kernel's level order
//   scale     × 1/√n (float32), then either stored (Hadamard) or quantized (the fused ops)
//   quantize  per row: min/max (or max |x|) by warp butterflies and, when a row spans several warps,
//             their partials in shared memory; scale and zero point as runtime_ops.reference, codes
//             by true division and round-half-even; 4-bit codes packed two a byte.
// Every float operation is the CPU kernel's, in its order, so the results are bit-exact with it.
#pragma once

#include <cstdint>

#include "dtypes.cuh"
#include "exec.cuh"

namespace respin::cuda {

constexpr float kScaleFloor = 1e-8f;  // DynamicQuantize's smallest scale (runtime_ops.reference.SCALE_FLOOR)

struct RowParams {
  const void* x;            // [rows, n] of the input type
  int64_t rows;
  int n, pow2, m;           // n = pow2·m; transform: m ≥ 1 (H_m's construction); no transform: pow2 = n, m = 1
  bool transform;           // Hadamard (else the identity: plain DynamicQuantize)
  float scale;              // 1/√n for the transform (float32 of the double), else 1
  const uint64_t* core;     // H_m's sign masks [m][words]: bit b of column d set where H[b, d] = −1
  int words;                // ⌈m/64⌉
  int rows_per_block;       // R (a power of two); R divides the warps per block or is a multiple of it
  // Float output (Hadamard): y [rows, n] of the input type.
  void* y;
  // Quantized output (quantize = true): codes int8 [rows, n], or uint8 [rows, ⌈n/2⌉] when packed.
  bool quantize;
  int bits;                 // 2..8
  bool symmetric;
  float clip;
  bool packed;              // 4-bit codes two a byte (QuantizeKV bits 4)
  void* q;
  float* q_scale;           // [rows]
  int8_t* q_zero_point;     // [rows]
};

// Rows in shared memory. Without a core (m = 1) the butterfly's groups are 8 elements h0 apart and
// a warp's lanes would hit 4 to 8 addresses of one bank; one pad word after every 8 elements makes
// the h0 = 1 and h0 = 8 passes conflict-free (lane t of the first reads 9t + j: 9 is odd).
struct SharedRows {
  float* data;
  int base;     // this view's first element in the block's linear element index
  bool padded;

  RESPIN_HD float& operator[](int i) const {
    const int e = base + i;
    return data[padded ? e + (e >> 3) : e];
  }
  RESPIN_HD SharedRows Row(int r, int n) const { return {data, base + r * n, padded}; }
};

RESPIN_HD bool PaddedRows(const RowParams& p) { return !(p.transform && p.m > 1); }

// Shared memory layout of a block (byte offsets).
struct RowShared {
  size_t buffer, second, masks, partials, bytes;
};

RESPIN_HD RowShared RowSharedLayout(const RowParams& p, int threads) {
  size_t elems = static_cast<size_t>(p.rows_per_block) * p.n;
  if (PaddedRows(p)) elems += elems / 8 + 1;
  RowShared s{};
  s.buffer = 0;
  s.second = elems * 4;
  const size_t second_bytes = (p.transform && p.m > 1) ? elems * 4 : 0;
  s.masks = s.second + second_bytes;
  s.partials = s.masks + static_cast<size_t>(p.m) * p.words * 8;
  s.bytes = s.partials + 2 * sizeof(float) * (threads / kWarpSize);
  return s;
}

// The pass covering Sylvester levels h0, 2·h0, …, h0·2^(L−1) on one group of 2^L elements (in
// place; groups of one pass are disjoint). g indexes the n / 2^L groups of a row.
template <int L>
RESPIN_HD void ButterflyGroup(const SharedRows& row, int m, int h0, int g) {
  constexpr int kSize = 1 << L;
  const int d = g % m, rest = g / m;
  const int a_low = rest % h0, a_high = rest / h0;
  const int a_base = a_high * h0 * kSize + a_low;
  float v[kSize];
RESPIN_UNROLL
  for (int j = 0; j < kSize; ++j) v[j] = row[(a_base + j * h0) * m + d];
RESPIN_UNROLL
  for (int l = 0; l < L; ++l) {
    const int s = 1 << l;
RESPIN_UNROLL
    for (int j = 0; j < kSize; ++j) {
      if (j & s) continue;
      const float u = v[j], w = v[j + s];
      v[j] = AddRn(u, w);
      v[j + s] = AddRn(u, -w);
    }
  }
RESPIN_UNROLL
  for (int j = 0; j < kSize; ++j) row[(a_base + j * h0) * m + d] = v[j];
}

// The quantization parameters of a row from its reduced lo/hi (asymmetric) or max |x| (symmetric),
// runtime_ops.reference.dynamic_quantize step for step.
struct RowQuant {
  float scale, zero_point;
};

RESPIN_HD RowQuant QuantParamsOf(float lo, float hi, float amax, int bits, bool symmetric, float clip) {
  const float half = static_cast<float>(1 << (bits - 1));
  RowQuant r;
  if (symmetric) {
    r.scale = MaxOp{}(MulRn(amax, clip) / (half - 1.0f), kScaleFloor);
    r.zero_point = 0.0f;
  } else {
    lo = MulRn(MinOp{}(lo, 0.0f), clip);
    hi = MulRn(MaxOp{}(hi, 0.0f), clip);
    r.scale = MaxOp{}(AddRn(hi, -lo) / static_cast<float>((1 << bits) - 1), kScaleFloor);
    r.zero_point = AddRn(RoundHalfEven(-lo / r.scale), -half);
  }
  return r;
}

RESPIN_HD int8_t CodeOf(float x, const RowQuant& r, int bits) {
  const float half = static_cast<float>(1 << (bits - 1));
  float v = MinOp{}(MaxOp{}(x / r.scale, -1024.0f), 1024.0f);  // as the CPU kernel: exact after the clamp below
  v = AddRn(RoundHalfEven(v), r.zero_point);
  v = MinOp{}(MaxOp{}(v, -half), half - 1.0f);
  return v == v ? static_cast<int8_t>(v) : static_cast<int8_t>(0);
}

template <class In>
struct RowProgram {
  using Params = RowParams;
  static constexpr int kMaxThreads = 1024;
  struct Thread {
    float lo, hi, amax;
  };

  template <class Exec>
  RESPIN_HD static void Run(Exec& ex, const Params& p) {
    const int threads = ex.BlockThreads();
    const RowShared layout = RowSharedLayout(p, threads);
    const SharedRows buffer{ex.template Shared<float>(layout.buffer), 0, PaddedRows(p)};
    const SharedRows second{ex.template Shared<float>(layout.second), 0, false};
    uint64_t* masks = ex.template Shared<uint64_t>(layout.masks);
    float* partials = ex.template Shared<float>(layout.partials);
    const int R = p.rows_per_block, n = p.n;
    const int64_t row0 = static_cast<int64_t>(ex.BlockX()) * R;
    const int valid = static_cast<int>(p.rows - row0 < R ? p.rows - row0 : R);  // rows of this block
    const int elems = valid * n;

    ex.Threads([&](const ThreadCtx& c, Thread&) {  // load (coalesced), and H_m's masks
      const typename In::Raw* x = static_cast<const typename In::Raw*>(p.x) + row0 * n;
      for (int e = c.thread; e < elems; e += c.threads) buffer[e] = In::Load(x[e]);
      if (p.transform && p.m > 1)
        for (int i = c.thread; i < p.m * p.words; i += c.threads) masks[i] = p.core[i];
    });
    ex.Sync();

    SharedRows rows = buffer;
    if (p.transform && p.m > 1) {
      ex.Threads([&](const ThreadCtx& c, Thread&) {  // X[2^k, m]·H_m
        for (int e = c.thread; e < elems; e += c.threads) {
          const int r = e / n, i = e % n, a = i / p.m, d = i % p.m;
          const SharedRows xa = buffer.Row(r, n).Row(a, p.m);
          const uint64_t* column = masks + d * p.words;
          float acc = 0.0f;
          for (int b = 0; b < p.m; ++b) {
            const float v = xa[b];
            acc = AddRn(acc, ((column[b / 64] >> (b % 64)) & 1u) ? -v : v);
          }
          second[e] = acc;
        }
      });
      ex.Sync();
      rows = second;
    }

    if (p.transform) {
      for (int h0 = 1; h0 < p.pow2;) {  // uniform loop: one pass per up-to-three levels
        int levels = 0;
        while (levels < 3 && (h0 << levels) < p.pow2) ++levels;
        const int groups = n >> levels;
        ex.Threads([&](const ThreadCtx& c, Thread&) {
          for (int t = c.thread; t < valid * groups; t += c.threads) {
            const SharedRows row = rows.Row(t / groups, n);
            if (levels == 3) ButterflyGroup<3>(row, p.m, h0, t % groups);
            else if (levels == 2) ButterflyGroup<2>(row, p.m, h0, t % groups);
            else ButterflyGroup<1>(row, p.m, h0, t % groups);
          }
        });
        ex.Sync();
        h0 <<= levels;
      }
    }

    if (!p.quantize) {
      ex.Threads([&](const ThreadCtx& c, Thread&) {
        typename In::Raw* y = static_cast<typename In::Raw*>(p.y) + row0 * n;
        for (int e = c.thread; e < elems; e += c.threads) y[e] = In::Store(MulRn(rows[e], p.scale));
      });
      return;
    }
    QuantizeRows(ex, p, rows, partials, row0, valid);
  }

  // Rows → codes. Warps per row W_r = max(1, W / R); with R ≥ W each warp does rows w, w + W, …
  template <class Exec>
  RESPIN_HD static void QuantizeRows(Exec& ex, const Params& p, const SharedRows& rows, float* partials,
                                     int64_t row0, int valid) {
    const int warps = ex.BlockThreads() / kWarpSize, R = p.rows_per_block, n = p.n;
    const int per_row = R >= warps ? 1 : warps / R;
    const int rounds = R >= warps ? R / warps : 1;
    for (int round = 0; round < rounds; ++round) {
      // the row of warp w this round, and the slice [part·n/per_row, (part+1)·n/per_row) it reduces
      auto row_of = [&](const ThreadCtx& c) { return per_row == 1 ? round * warps + c.warp() : c.warp() / per_row; };
      ex.Threads([&](const ThreadCtx& c, Thread& th) {
        const int r = row_of(c), part = c.warp() % per_row;
        th.lo = Infinity(), th.hi = -Infinity(), th.amax = 0.0f;  // the identities of min and max
        if (r >= valid) return;
        const SharedRows x = rows.Row(r, n);
        const int begin = n * part / per_row, end = n * (part + 1) / per_row;
        for (int i = begin + c.lane(); i < end; i += kWarpSize) {
          const float v = p.transform ? MulRn(x[i], p.scale) : x[i];
          th.lo = MinOp{}(th.lo, v);
          th.hi = MaxOp{}(th.hi, v);
          th.amax = MaxOp{}(th.amax, v < 0.0f ? -v : v);
        }
      });
      ex.WarpAllReduce([](Thread& t) -> float& { return t.lo; }, MinOp{});
      ex.WarpAllReduce([](Thread& t) -> float& { return t.hi; }, MaxOp{});
      ex.WarpAllReduce([](Thread& t) -> float& { return t.amax; }, MaxOp{});
      if (per_row > 1) {  // combine the row's warps in a fixed order
        ex.Threads([&](const ThreadCtx& c, Thread& th) {
          if (c.lane() == 0) {
            partials[2 * c.warp()] = p.symmetric ? th.amax : th.lo;
            partials[2 * c.warp() + 1] = th.hi;
          }
        });
        ex.Sync();
        ex.Threads([&](const ThreadCtx& c, Thread& th) {
          const int first = (c.warp() / per_row) * per_row;
          th.lo = partials[2 * first], th.hi = partials[2 * first + 1], th.amax = partials[2 * first];
          for (int w = first + 1; w < first + per_row; ++w) {
            th.lo = MinOp{}(th.lo, partials[2 * w]);
            th.hi = MaxOp{}(th.hi, partials[2 * w + 1]);
            th.amax = MaxOp{}(th.amax, partials[2 * w]);
          }
        });
      }
      ex.Threads([&](const ThreadCtx& c, Thread& th) {
        const int r = row_of(c), part = c.warp() % per_row;
        if (r >= valid) return;
        const RowQuant rq = QuantParamsOf(th.lo, th.hi, th.amax, p.bits, p.symmetric, p.clip);
        const SharedRows x = rows.Row(r, n);
        const int64_t row = row0 + r;
        if (p.packed) {  // byte j holds elements 2j (low nibble) and 2j + 1, each as code + 8
          const int bytes = (n + 1) / 2, begin = bytes * part / per_row, end = bytes * (part + 1) / per_row;
          uint8_t* q = static_cast<uint8_t*>(p.q) + row * bytes;
          for (int j = begin + c.lane(); j < end; j += kWarpSize) {
            const float v0 = p.transform ? MulRn(x[2 * j], p.scale) : x[2 * j];
            const int low = CodeOf(v0, rq, p.bits) + 8;
            int high = 8;
            if (2 * j + 1 < n) high = CodeOf(p.transform ? MulRn(x[2 * j + 1], p.scale) : x[2 * j + 1], rq, p.bits) + 8;
            q[j] = static_cast<uint8_t>(low | (high << 4));
          }
        } else {
          const int begin = n * part / per_row, end = n * (part + 1) / per_row;
          int8_t* q = static_cast<int8_t*>(p.q) + row * n;
          for (int i = begin + c.lane(); i < end; i += kWarpSize)
            q[i] = CodeOf(p.transform ? MulRn(x[i], p.scale) : x[i], rq, p.bits);
        }
        if (part == 0 && c.lane() == 0) {
          p.q_scale[row] = rq.scale;
          p.q_zero_point[row] = static_cast<int8_t>(rq.zero_point);
        }
      });
      if (per_row > 1) ex.Sync();  // the partials are reused by the next round
    }
  }
};

// DequantizeKV: y = (q − zero_point)·scale, float32 [rows, d], from int8 codes or packed nibbles.
struct DequantParams {
  const void* q;          // int8 [rows, d] or uint8 [rows, ⌈d/2⌉] (packed)
  const float* scale;     // [rows]
  const int8_t* zero_point;
  float* y;               // [rows, d]
  int64_t rows;
  int d;
  bool packed;
};

struct DequantProgram {
  using Params = DequantParams;
  static constexpr int kMaxThreads = 1024;
  struct Thread {};

  template <class Exec>
  RESPIN_HD static void Run(Exec& ex, const Params& p) {
    ex.Threads([&](const ThreadCtx& c, Thread&) {
      const int64_t total = p.rows * p.d;
      const int64_t stride = static_cast<int64_t>(c.threads) * c.grid_x;
      for (int64_t e = static_cast<int64_t>(c.block_x) * c.threads + c.thread; e < total; e += stride) {
        const int64_t row = e / p.d;
        const int i = static_cast<int>(e % p.d);
        int code;
        if (p.packed) {
          const uint8_t byte = static_cast<const uint8_t*>(p.q)[row * ((p.d + 1) / 2) + i / 2];
          code = ((i % 2) ? (byte >> 4) : (byte & 0x0F)) - 8;
        } else {
          code = static_cast<const int8_t*>(p.q)[e];
        }
        p.y[e] = MulRn(static_cast<float>(code - static_cast<int>(p.zero_point[row])), p.scale[row]);
      }
    });
  }
};

}  // namespace respin::cuda
