// QMatMul on the GPU: W4A4 / W4A8 / W8A8 GEMM with int32 accumulation and fused dequantization,
//
//   Y[m, n] = x_scale[m]·Σ_g w_scale[n, g]·E[m, n, g] + bias[n],
//   E[m, n, g] = Σ_{k∈g} (Xq[m, k] − x_zp[m])(Wq[n, k] − w_zp[n, g])
//              = S − w_zp·ΣX − x_zp·ΣW + x_zp·w_zp·|g|,   S = Σ_{k∈g} Xq·Wq   (exact integers)
//
// with the float part in float64 in runtime_ops.reference's order, so both programs are bit-exact
// with the reference and the CPU kernels. Raw signed codes go into the integer products (4-bit
// weights are unpacked to int8, "int8 tensor-core math on unpacked 4-bit codes"); the zero points
// enter through the group sums ΣX (per row) and ΣW (per column), which the tile loads add up.
//
// Two programs, for the launcher to choose by shape:
//   QMatMulMma  tensor cores: mma.sync m16n8k32 s8·s8→s32 (sm_80 and sm_90), block tile BM×BN×BK in
//               shared memory (rows padded by 16 bytes: conflict-free fragment loads), warps of
//               WM×WN; groups of a multiple of 32 columns (or one group);
//   QMatMulDp4a CUDA cores: __dp4a, one warp per output column and up to kRows rows (decode), any
//               group size.
#pragma once

#include <cstdint>

#include "exec.cuh"

namespace respin::cuda {

struct QMatMulParams {
  const int8_t* xq;        // [M, K]
  const float* x_scale;    // [M]
  const int8_t* x_zp;      // [M]
  const void* w;           // packed uint8 [N, ⌈K/2⌉] (packed) or int8 [N, K]
  bool packed;
  const float* w_scale;    // [N, G]
  const int8_t* w_zp;      // [N, G]
  const float* bias;       // [N] or nullptr
  float* y;                // [M, N]
  int64_t M;
  int K, N, G, group;      // group: columns per group (K when G = 1)
};

RESPIN_HD int GroupLength(const QMatMulParams& p, int g) {
  const int end = (g + 1) * p.group < p.K ? (g + 1) * p.group : p.K;
  return end - g * p.group;
}

// The weight code at (n, k), 0 outside the matrix.
RESPIN_HD int WeightCode(const QMatMulParams& p, int n, int k) {
  if (n >= p.N || k >= p.K) return 0;
  if (!p.packed) return static_cast<const int8_t*>(p.w)[static_cast<int64_t>(n) * p.K + k];
  const uint8_t byte = static_cast<const uint8_t*>(p.w)[static_cast<int64_t>(n) * ((p.K + 1) / 2) + k / 2];
  return ((k % 2) ? (byte >> 4) : (byte & 0x0F)) - 8;
}

RESPIN_HD int ActivationCode(const QMatMulParams& p, int64_t m, int k) {
  return (m < p.M && k < p.K) ? p.xq[m * p.K + k] : 0;
}

// Σ of the four signed bytes of a word.
RESPIN_HD int ByteSum(uint32_t w) {
  return static_cast<int8_t>(w & 0xFFu) + static_cast<int8_t>((w >> 8) & 0xFFu) + static_cast<int8_t>((w >> 16) & 0xFFu) +
         static_cast<int8_t>(w >> 24);
}

// Codes (m | n, k … k+3) as one word: one 32-bit load of Xq (K % 4 == 0), one 16-bit load of packed
// W (two bytes → four nibbles, each − 8) where aligned, else element by element (edges, odd K,
// groups that start at an odd column).
RESPIN_HD uint32_t ActivationWord(const QMatMulParams& p, int64_t m, int k) {
  if (m < p.M && k + 3 < p.K && p.K % 4 == 0 && k % 4 == 0) return LoadWord(p.xq + m * p.K + k);
  return PackBytes(ActivationCode(p, m, k), ActivationCode(p, m, k + 1), ActivationCode(p, m, k + 2),
                   ActivationCode(p, m, k + 3));
}

RESPIN_HD uint32_t WeightWord(const QMatMulParams& p, int n, int k) {
  if (n < p.N && k + 3 < p.K) {
    if (!p.packed && p.K % 4 == 0 && k % 4 == 0) return LoadWord(static_cast<const int8_t*>(p.w) + static_cast<int64_t>(n) * p.K + k);
    if (p.packed && p.K % 2 == 0 && k % 2 == 0) {
      const uint8_t* b = static_cast<const uint8_t*>(p.w) + static_cast<int64_t>(n) * (p.K / 2) + k / 2;
      const uint32_t lo = b[0], hi = b[1];
      // nibbles low-first: (lo & 15, lo >> 4, hi & 15, hi >> 4); x − 8 per byte = (x + 0x78) ^ 0x80 for x < 16
      const uint32_t nibbles = (lo & 0x0Fu) | ((lo >> 4) << 8) | ((hi & 0x0Fu) << 16) | ((hi >> 4) << 24);
      return (nibbles + 0x78787878u) ^ 0x80808080u;
    }
  }
  return PackBytes(WeightCode(p, n, k), WeightCode(p, n, k + 1), WeightCode(p, n, k + 2), WeightCode(p, n, k + 3));
}

// The first `count` (< 4) codes of code(i) as a word, zeros after.
template <class Code>
RESPIN_HD uint32_t GroupTail(int count, Code code) {
  return PackBytes(count > 0 ? code(0) : 0, count > 1 ? code(1) : 0, count > 2 ? code(2) : 0, 0);
}

// E from the integer parts (int64: ΣX·w_zp and friends can pass 2^31 for 8-bit codes and long K).
RESPIN_HD int64_t ExactGroupSum(int64_t s, int64_t sum_x, int64_t sum_w, int64_t x_zp, int64_t w_zp, int64_t len) {
  return s - w_zp * sum_x - x_zp * sum_w + x_zp * w_zp * len;
}

// acc + E·w_scale and the final x_scale·acc + bias, in float64 without contraction.
RESPIN_HD double AddGroup(double acc, int64_t exact, float w_scale) {
  return AddRn(acc, MulRn(static_cast<double>(exact), static_cast<double>(w_scale)));
}
RESPIN_HD float Finish(const QMatMulParams& p, double acc, int64_t m, int n) {
  double v = MulRn(acc, static_cast<double>(p.x_scale[m]));
  if (p.bias) v = AddRn(v, static_cast<double>(p.bias[n]));
  return static_cast<float>(v);
}

// ------------------------------------------------------------------------------ tensor cores

// kGrouped: several groups along K (float64 accumulators per output); without, the one group's E is
// scaled and stored as soon as K is done (64 fewer registers a thread: two blocks per SM at 64×128).
template <int BM, int BN, int WM, int WN, int BK, bool kGrouped>
struct QMatMulMma {
  static_assert(BK % 32 == 0 && WM % 16 == 0 && WN % 8 == 0 && BM % WM == 0 && BN % WN == 0, "tile shape");
  using Params = QMatMulParams;
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kThreads = (BM / WM) * kWarpsN * kWarpSize;
  static constexpr int kMaxThreads = kThreads;
  static constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  static constexpr int kStride = BK + 16;          // bytes per shared row: 4-byte fragment loads hit 32 banks
  static constexpr size_t kA = 0, kB = kA + BM * kStride, kSumX = kB + BN * kStride, kSumW = kSumX + 4 * BM;
  static constexpr size_t kSharedBytes = kSumW + 4 * BN;

  struct Thread {
    static constexpr int AM = kGrouped ? MT : 1, AN = kGrouped ? NT : 1;
    int32_t c[MT][NT][4];     // S of the current group
    double acc[AM][AN][4];    // Σ_g E·w_scale (grouped only)
    uint32_t a[MT][4];
    uint32_t b[NT][2];
    int32_t sum_x_before[MT][2];  // the running ΣX of this thread's rows at the group's start
    int32_t sum_w_before[NT][2];
  };

  // f(mt, nt, i) for every accumulator element of a thread (fully unrolled: register indices stay
  // compile-time constants on the GPU).
  template <class F>
  RESPIN_HD static void ForEachAccumulator(F&& f) {
RESPIN_UNROLL
    for (int mt = 0; mt < MT; ++mt)
RESPIN_UNROLL
      for (int nt = 0; nt < NT; ++nt)
RESPIN_UNROLL
        for (int i = 0; i < 4; ++i) f(mt, nt, i);
  }

  // The block tile's row (of BM) / column (of BN) of accumulator element (mt, nt, i) of a lane.
  RESPIN_HD static int TileRow(const ThreadCtx& c, int mt, int i) {
    return (c.warp() / kWarpsN) * WM + mt * 16 + c.lane() / 4 + (i >= 2 ? 8 : 0);
  }
  RESPIN_HD static int TileCol(const ThreadCtx& c, int nt, int i) {
    return (c.warp() % kWarpsN) * WN + nt * 8 + 2 * (c.lane() % 4) + (i & 1);
  }

  template <class Exec>
  RESPIN_HD static void Run(Exec& ex, const Params& p) {
    int8_t* As = ex.template Shared<int8_t>(kA);
    int8_t* Bs = ex.template Shared<int8_t>(kB);
    int32_t* sum_x = ex.template Shared<int32_t>(kSumX);  // running Σ Xq of the tile's rows over K so far
    int32_t* sum_w = ex.template Shared<int32_t>(kSumW);
    const int64_t m0 = static_cast<int64_t>(ex.BlockY()) * BM;
    const int n0 = ex.BlockX() * BN;

    ex.Threads([&](const ThreadCtx& c, Thread& th) {
      ForEachAccumulator([&](int mt, int nt, int i) {
        th.c[mt][nt][i] = 0;
        if constexpr (kGrouped) th.acc[mt][nt][i] = 0.0;
      });
RESPIN_UNROLL
      for (int mt = 0; mt < MT; ++mt) th.sum_x_before[mt][0] = th.sum_x_before[mt][1] = 0;
RESPIN_UNROLL
      for (int nt = 0; nt < NT; ++nt) th.sum_w_before[nt][0] = th.sum_w_before[nt][1] = 0;
      for (int i = c.thread; i < BM; i += c.threads) sum_x[i] = 0;
      for (int i = c.thread; i < BN; i += c.threads) sum_w[i] = 0;
    });
    ex.Sync();

    for (int k0 = 0; k0 < p.K; k0 += BK) {
      ex.Threads([&](const ThreadCtx& c, Thread&) { LoadTiles(c, p, m0, n0, k0, As, Bs, sum_x, sum_w); });
      ex.Sync();
RESPIN_UNROLL
      for (int ks = 0; ks < BK / 32; ++ks) {
        ex.Threads([&](const ThreadCtx& c, Thread& th) { LoadFragments(c, As, Bs, ks, th); });
RESPIN_UNROLL
        for (int mt = 0; mt < MT; ++mt)
RESPIN_UNROLL
          for (int nt = 0; nt < NT; ++nt)
            ex.Mma([mt, nt](Thread& t) { return MmaRefs{t.c[mt][nt], t.a[mt], t.b[nt]}; });
      }
      const bool last = k0 + BK >= p.K;
      if (last || (p.G > 1 && (k0 + BK) % p.group == 0)) {
        const int g = p.G > 1 ? k0 / p.group : 0;
        ex.Threads([&](const ThreadCtx& c, Thread& th) { CloseGroup(c, p, m0, n0, g, sum_x, sum_w, th); });
      }
      ex.Sync();  // the tiles and sums are overwritten next
    }

    if constexpr (kGrouped) {
      ex.Threads([&](const ThreadCtx& c, Thread& th) {
        ForEachAccumulator([&](int mt, int nt, int i) {
          const int64_t m = m0 + TileRow(c, mt, i);
          const int n = n0 + TileCol(c, nt, i);
          if (m < p.M && n < p.N) p.y[m * p.N + n] = Finish(p, th.acc[mt][nt][i], m, n);
        });
      });
    }
  }

  // Xq[m0 : m0+BM, k0 : k0+BK] and Wq[n0 : n0+BN, k0 : k0+BK] as int8 into shared memory (zeros
  // outside the matrices), their row sums added to the running ΣX / ΣW.
  RESPIN_HD static void LoadTiles(const ThreadCtx& c, const Params& p, int64_t m0, int n0, int k0, int8_t* As,
                                  int8_t* Bs, int32_t* sum_x, int32_t* sum_w) {
    for (int i = c.thread; i < BM * (BK / 4); i += c.threads) {
      const int r = i / (BK / 4), k = k0 + 4 * (i % (BK / 4));
      const uint32_t word = ActivationWord(p, m0 + r, k);
      StoreWord(As + r * kStride + (k - k0), word);
      AtomicAddShared(sum_x + r, ByteSum(word));
    }
    for (int i = c.thread; i < BN * (BK / 4); i += c.threads) {
      const int r = i / (BK / 4), k = k0 + 4 * (i % (BK / 4));
      const uint32_t word = WeightWord(p, n0 + r, k);
      StoreWord(Bs + r * kStride + (k - k0), word);
      AtomicAddShared(sum_w + r, ByteSum(word));
    }
  }

  // The A and B fragments of k-step ks (see MmaRefs for the layout).
  RESPIN_HD static void LoadFragments(const ThreadCtx& c, const int8_t* As, const int8_t* Bs, int ks, Thread& th) {
    const int g = c.lane() / 4, t = c.lane() % 4;
    const int row = (c.warp() / kWarpsN) * WM, col = (c.warp() % kWarpsN) * WN;
RESPIN_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      const int8_t* top = As + (row + mt * 16 + g) * kStride + ks * 32 + 4 * t;
      const int8_t* bottom = top + 8 * kStride;
      th.a[mt][0] = LoadWord(top), th.a[mt][1] = LoadWord(bottom);
      th.a[mt][2] = LoadWord(top + 16), th.a[mt][3] = LoadWord(bottom + 16);
    }
RESPIN_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      const int8_t* column = Bs + (col + nt * 8 + g) * kStride + ks * 32 + 4 * t;
      th.b[nt][0] = LoadWord(column), th.b[nt][1] = LoadWord(column + 16);
    }
  }

  // Group g ends with this tile: E from S and the group's sums, into the float64 accumulators.
  RESPIN_HD static void CloseGroup(const ThreadCtx& c, const Params& p, int64_t m0, int n0, int g,
                                   const int32_t* sum_x, const int32_t* sum_w, Thread& th) {
    const int len = GroupLength(p, g);
    ForEachAccumulator([&](int mt, int nt, int i) {
      const int r = TileRow(c, mt, i), col = TileCol(c, nt, i);
      const int64_t m = m0 + r;
      const int n = n0 + col;
      if (m < p.M && n < p.N) {
        const int64_t gx = sum_x[r] - th.sum_x_before[mt][i >> 1];
        const int64_t gw = sum_w[col] - th.sum_w_before[nt][i & 1];
        const int64_t idx = static_cast<int64_t>(n) * p.G + g;
        const int64_t exact = ExactGroupSum(th.c[mt][nt][i], gx, gw, p.x_zp[m], p.w_zp[idx], len);
        if constexpr (kGrouped) th.acc[mt][nt][i] = AddGroup(th.acc[mt][nt][i], exact, p.w_scale[idx]);
        else p.y[m * p.N + n] = Finish(p, AddGroup(0.0, exact, p.w_scale[idx]), m, n);  // the only group
      }
      th.c[mt][nt][i] = 0;
    });
RESPIN_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      for (int h = 0; h < 2; ++h) th.sum_x_before[mt][h] = sum_x[TileRow(c, mt, 2 * h)];
RESPIN_UNROLL
    for (int nt = 0; nt < NT; ++nt)
      for (int h = 0; h < 2; ++h) th.sum_w_before[nt][h] = sum_w[TileCol(c, nt, h)];
  }
};

// ------------------------------------------------------------------------------- CUDA cores

// One warp per output column n (kColumns warps a block), the block's kRows activation rows.
template <int kRows, int kColumns>
struct QMatMulDp4a {
  using Params = QMatMulParams;
  static constexpr int kThreads = kColumns * kWarpSize;
  static constexpr int kMaxThreads = kThreads;
  static constexpr size_t kSharedBytes = 0;

  struct Thread {
    int32_t s[kRows], sum_x[kRows], sum_w;
    double acc[kRows];
  };

  template <class Exec>
  RESPIN_HD static void Run(Exec& ex, const Params& p) {
    const int64_t m0 = static_cast<int64_t>(ex.BlockY()) * kRows;
    ex.Threads([&](const ThreadCtx&, Thread& th) {
RESPIN_UNROLL
      for (int r = 0; r < kRows; ++r) th.acc[r] = 0.0;
    });
    for (int g = 0; g < p.G; ++g) {
      ex.Threads([&](const ThreadCtx& c, Thread& th) { GroupDots(c, p, m0, g, th); });
RESPIN_UNROLL
      for (int r = 0; r < kRows; ++r) {
        ex.WarpAllReduce([r](Thread& t) -> int32_t& { return t.s[r]; }, AddOp{});
        ex.WarpAllReduce([r](Thread& t) -> int32_t& { return t.sum_x[r]; }, AddOp{});
      }
      ex.WarpAllReduce([](Thread& t) -> int32_t& { return t.sum_w; }, AddOp{});
      ex.Threads([&](const ThreadCtx& c, Thread& th) {
        const int n = ex.BlockX() * kColumns + c.warp();
        if (n >= p.N) return;
        const int64_t idx = static_cast<int64_t>(n) * p.G + g;
RESPIN_UNROLL
        for (int r = 0; r < kRows; ++r) {
          if (m0 + r >= p.M) continue;
          const int64_t exact = ExactGroupSum(th.s[r], th.sum_x[r], th.sum_w, p.x_zp[m0 + r], p.w_zp[idx],
                                              GroupLength(p, g));
          th.acc[r] = AddGroup(th.acc[r], exact, p.w_scale[idx]);
        }
      });
    }
    ex.Threads([&](const ThreadCtx& c, Thread& th) {
      const int n = ex.BlockX() * kColumns + c.warp();
      if (n >= p.N || c.lane() >= kRows) return;
RESPIN_UNROLL
      for (int r = 0; r < kRows; ++r)  // lane r writes row r (the reduced values are in every lane)
        if (r == c.lane() && m0 + r < p.M) p.y[(m0 + r) * p.N + n] = Finish(p, th.acc[r], m0 + r, n);
    });
  }

  // This lane's share of S, ΣX and ΣW over group g, four columns of K at a time.
  RESPIN_HD static void GroupDots(const ThreadCtx& c, const Params& p, int64_t m0, int g, Thread& th) {
    const int n = static_cast<int>(c.block_x) * kColumns + c.warp();
    const int begin = g * p.group, end = begin + GroupLength(p, g);
RESPIN_UNROLL
    for (int r = 0; r < kRows; ++r) th.s[r] = 0, th.sum_x[r] = 0;
    th.sum_w = 0;
    for (int k = begin + 4 * c.lane(); k < end; k += 4 * kWarpSize) {
      const bool whole = k + 3 < end;  // else the group ends inside these four columns
      const uint32_t wword = whole ? WeightWord(p, n, k) : GroupTail(end - k, [&](int i) { return WeightCode(p, n, k + i); });
      th.sum_w = Dp4a(wword, 0x01010101u, th.sum_w);
      RESPIN_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const uint32_t xword =
            whole ? ActivationWord(p, m0 + r, k) : GroupTail(end - k, [&](int i) { return ActivationCode(p, m0 + r, k + i); });
        th.s[r] = Dp4a(xword, wword, th.s[r]);
        th.sum_x[r] = Dp4a(xword, 0x01010101u, th.sum_x[r]);
      }
    }
  }
};

}  // namespace respin::cuda
