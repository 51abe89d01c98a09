// One kernel body for the GPU and for the CPU: the execution model of kernels/cuda/.
//
// A kernel is a *program*: a struct with
//   using Params = ...;          // a small struct of raw pointers and sizes
//   struct Thread { ... };       // one thread's registers
//   static constexpr int kMaxThreads;  // the most threads a block is launched with (register budget)
//   template <class Exec> RESPIN_HD static void Run(Exec& ex, const Params& p);
// Run is written as a sequence of collective steps on `ex`:
//   ex.Threads(f)            f(const ThreadCtx&, Thread&) for every thread of the block
//   ex.Sync()                __syncthreads()
//   ex.WarpAllReduce(get, op) butterfly all-reduce of get(Thread&) over each warp (__shfl_xor_sync)
//   ex.Mma(get)              mma.sync m16n8k32 s8·s8 → s32 on get(Thread&)'s fragments, per warp
//   ex.Shared<T>(offset)     the block's dynamic shared memory
// Control flow outside Threads() must be uniform over the block (it may depend on Params and the
// block index only): on the GPU every thread runs it, on the CPU it runs once per block.
//
// DeviceExec (nvcc, in the __global__ wrapper `ProgramKernel`) runs Run once per GPU thread with
// that thread's registers. HostExec (any C++17 compiler) runs Run once per block, calling each
// Threads() step for every thread index in turn, with a vector of Thread registers and a host
// buffer as shared memory; Sync() is then a no-op, since a step finishes for all threads before the
// next begins, and the warp collectives are computed lane by lane in the order the GPU instructions
// define. `RunHostGrid` visits every block of a grid. So the arithmetic and indexing of every kernel
// executes on the CPU in the tests, over every block and thread index, and only the few device
// intrinsics behind DeviceExec (barrier, shuffle, mma, conversions) are not executed without a GPU.
//
// A Threads() step must not read shared memory that another thread of the same step writes (the
// GPU would race; the host order would hide it); steps separated by Sync() may.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define RESPIN_HD __host__ __device__ __forceinline__
#define RESPIN_DEVICE __device__ __forceinline__
#else
#define RESPIN_HD inline
#endif

#if defined(__CUDA_ARCH__)  // the device pass; the host compiler does not know the pragma
#define RESPIN_UNROLL _Pragma("unroll")
#else
#define RESPIN_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define RESPIN_ON_DEVICE 1
#else
#define RESPIN_ON_DEVICE 0
#endif

namespace respin::cuda {

constexpr int kWarpSize = 32;

// The position of one thread: 1-D blocks in a 2-D grid.
struct ThreadCtx {
  int thread;   // threadIdx.x
  int threads;  // blockDim.x
  int block_x, block_y;
  int grid_x, grid_y;
  RESPIN_HD int lane() const { return thread % kWarpSize; }
  RESPIN_HD int warp() const { return thread / kWarpSize; }
  RESPIN_HD int warps() const { return threads / kWarpSize; }
};

struct LaunchConfig {
  int grid_x = 1, grid_y = 1;
  int threads = 32;        // a multiple of 32
  size_t shared_bytes = 0; // dynamic shared memory
};

// ------------------------------------------------------------------ arithmetic without contraction
// nvcc fuses a·b + c into one FMA by default, g++ here does not (-ffp-contract=off): where a kernel
// must give the CPU kernels' bits, it multiplies and adds through these.
RESPIN_HD float MulRn(float a, float b) {
#if RESPIN_ON_DEVICE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RESPIN_HD float AddRn(float a, float b) {
#if RESPIN_ON_DEVICE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
RESPIN_HD double MulRn(double a, double b) {
#if RESPIN_ON_DEVICE
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
RESPIN_HD double AddRn(double a, double b) {
#if RESPIN_ON_DEVICE
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// std::min / std::max semantics (the CPU kernels' reductions): the first argument wins ties and NaNs
// in `b` are ignored the same way.
struct MinOp {
  template <class T>
  RESPIN_HD T operator()(T a, T b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <class T>
  RESPIN_HD T operator()(T a, T b) const { return a < b ? b : a; }
};
struct AddOp {
  template <class T>
  RESPIN_HD T operator()(T a, T b) const { return a + b; }
};

// Round half to even, as std::nearbyint in the default rounding mode.
RESPIN_HD float RoundHalfEven(float v) {
#if RESPIN_ON_DEVICE
  return rintf(v);
#else
  return __builtin_rintf(v);
#endif
}

// An integer add to shared memory from many threads of one step: exact in any order, so the host's
// sequential adds give the GPU's result.
RESPIN_HD void AtomicAddShared(int32_t* address, int32_t value) {
#if RESPIN_ON_DEVICE
  atomicAdd(address, value);
#else
  *address += value;
#endif
}

// c + Σ_i a_i·b_i over the four signed bytes of a and b (__dp4a).
RESPIN_HD int32_t Dp4a(uint32_t a, uint32_t b, int32_t c) {
#if RESPIN_ON_DEVICE
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i)
    c += static_cast<int32_t>(static_cast<int8_t>((a >> (8 * i)) & 0xFFu)) *
         static_cast<int32_t>(static_cast<int8_t>((b >> (8 * i)) & 0xFFu));
  return c;
#endif
}

// A 32-bit word from 4-byte aligned memory (no aliasing games on the host). The GPU faults on a
// misaligned word access; the host emulation refuses it too, so the tests catch one.
#if !RESPIN_ON_DEVICE
inline void CheckAligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 4) throw std::logic_error("misaligned 32-bit access (the GPU would fault)");
}
#endif

RESPIN_HD uint32_t LoadWord(const int8_t* p) {
#if RESPIN_ON_DEVICE
  return *reinterpret_cast<const uint32_t*>(p);
#else
  CheckAligned(p);
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
#endif
}

RESPIN_HD void StoreWord(int8_t* p, uint32_t w) {
#if RESPIN_ON_DEVICE
  *reinterpret_cast<uint32_t*>(p) = w;
#else
  CheckAligned(p);
  std::memcpy(p, &w, sizeof w);
#endif
}

RESPIN_HD uint32_t PackBytes(int b0, int b1, int b2, int b3) {
  return (static_cast<uint32_t>(b0) & 0xFFu) | ((static_cast<uint32_t>(b1) & 0xFFu) << 8) |
         ((static_cast<uint32_t>(b2) & 0xFFu) << 16) | ((static_cast<uint32_t>(b3) & 0xFFu) << 24);
}

RESPIN_HD float Infinity() {
#if RESPIN_ON_DEVICE
  return __int_as_float(0x7F800000);
#else
  return __builtin_huge_valf();
#endif
}

// ----------------------------------------------------------------------------- mma operands
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA), per lane with g = lane/4, t = lane%4:
//   a[0] = A[g][4t..4t+3]   a[1] = A[g+8][4t..]   a[2] = A[g][16+4t..]   a[3] = A[g+8][16+4t..]
//   b[0] = B[4t..4t+3][g]   b[1] = B[16+4t..][g]                (B is K × N, 4 bytes down a column)
//   c[0] = C[g][2t]   c[1] = C[g][2t+1]   c[2] = C[g+8][2t]   c[3] = C[g+8][2t+1]
// (4 int8 per 32-bit register, lowest address in the lowest byte). C += A·B.
struct MmaRefs {
  int32_t* c;        // [4]
  const uint32_t* a; // [4]
  const uint32_t* b; // [2]
};

RESPIN_HD int8_t ByteOf(uint32_t word, int i) { return static_cast<int8_t>((word >> (8 * i)) & 0xFFu); }

// The result of one mma for a whole warp from the 32 lanes' operands (host emulation, also the
// layout's executable statement).
inline void MmaWarpOnHost(MmaRefs lanes[kWarpSize]) {
  int8_t A[16][32], B[32][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      A[g][4 * t + i] = ByteOf(lanes[lane].a[0], i);
      A[g + 8][4 * t + i] = ByteOf(lanes[lane].a[1], i);
      A[g][16 + 4 * t + i] = ByteOf(lanes[lane].a[2], i);
      A[g + 8][16 + 4 * t + i] = ByteOf(lanes[lane].a[3], i);
      B[4 * t + i][g] = ByteOf(lanes[lane].b[0], i);
      B[16 + 4 * t + i][g] = ByteOf(lanes[lane].b[1], i);
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += static_cast<int32_t>(A[rows[i]][k]) * static_cast<int32_t>(B[k][cols[i]]);
      lanes[lane].c[i] += s;
    }
  }
}

// ------------------------------------------------------------------------------- host executor

template <class Thread>
class HostExec {
 public:
  HostExec(int block_x, int block_y, const LaunchConfig& cfg, unsigned char* shared)
      : ctx_{0, cfg.threads, block_x, block_y, cfg.grid_x, cfg.grid_y}, regs_(cfg.threads), shared_(shared) {}

  template <class F>
  void Threads(F&& f) {
    for (int t = 0; t < ctx_.threads; ++t) {
      ThreadCtx c = ctx_;
      c.thread = t;
      f(static_cast<const ThreadCtx&>(c), regs_[t]);
    }
  }
  void Sync() {}

  template <class Get, class Op>
  void WarpAllReduce(Get get, Op op) {
    for (int w = 0; w < ctx_.threads / kWarpSize; ++w) {
      using T = std::remove_reference_t<decltype(get(regs_[0]))>;
      T v[kWarpSize], next[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) v[l] = get(regs_[w * kWarpSize + l]);
      for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {  // the order of the device butterfly
        for (int l = 0; l < kWarpSize; ++l) next[l] = op(v[l], v[l ^ mask]);
        for (int l = 0; l < kWarpSize; ++l) v[l] = next[l];
      }
      for (int l = 0; l < kWarpSize; ++l) get(regs_[w * kWarpSize + l]) = v[l];
    }
  }

  template <class Get>
  void Mma(Get get) {
    for (int w = 0; w < ctx_.threads / kWarpSize; ++w) {
      MmaRefs lanes[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) lanes[l] = get(regs_[w * kWarpSize + l]);
      MmaWarpOnHost(lanes);
    }
  }

  template <class T>
  T* Shared(size_t offset_bytes = 0) const { return reinterpret_cast<T*>(shared_ + offset_bytes); }
  int BlockX() const { return ctx_.block_x; }
  int BlockY() const { return ctx_.block_y; }
  int BlockThreads() const { return ctx_.threads; }

 private:
  ThreadCtx ctx_;
  std::vector<Thread> regs_;
  unsigned char* shared_;
};

// Runs `Program` over every block of `cfg`'s grid on the host. Shared memory starts as garbage
// bytes (0xA5), never zeros, so a program that reads before it writes fails its tests.
template <class Program>
void RunHostGrid(const LaunchConfig& cfg, const typename Program::Params& p) {
  std::vector<unsigned char> shared(cfg.shared_bytes + 16, 0xA5);
  for (int by = 0; by < cfg.grid_y; ++by) {
    for (int bx = 0; bx < cfg.grid_x; ++bx) {
      std::memset(shared.data(), 0xA5, shared.size());
      HostExec<typename Program::Thread> ex(bx, by, cfg, shared.data());
      Program::Run(ex, p);
    }
  }
}

// ----------------------------------------------------------------------------- device executor
#if defined(__CUDACC__)

template <class Thread>
class DeviceExec {
 public:
  template <class F>
  __device__ __forceinline__ void Threads(F&& f) {
    const ThreadCtx c{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), static_cast<int>(blockIdx.x),
                      static_cast<int>(blockIdx.y), static_cast<int>(gridDim.x), static_cast<int>(gridDim.y)};
    f(c, regs_);
  }
  __device__ __forceinline__ void Sync() { __syncthreads(); }

  template <class Get, class Op>
  __device__ __forceinline__ void WarpAllReduce(Get get, Op op) {
    auto& v = get(regs_);
RESPIN_UNROLL
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, mask));
  }

  template <class Get>
  __device__ __forceinline__ void Mma(Get get) {
    const MmaRefs r = get(regs_);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(r.c[0]), "+r"(r.c[1]), "+r"(r.c[2]), "+r"(r.c[3])
        : "r"(r.a[0]), "r"(r.a[1]), "r"(r.a[2]), "r"(r.a[3]), "r"(r.b[0]), "r"(r.b[1]));
#endif
  }

  template <class T>
  __device__ __forceinline__ T* Shared(size_t offset_bytes = 0) const {
    extern __shared__ __align__(16) unsigned char respin_shared[];
    return reinterpret_cast<T*>(respin_shared + offset_bytes);
  }
  __device__ __forceinline__ int BlockX() const { return static_cast<int>(blockIdx.x); }
  __device__ __forceinline__ int BlockY() const { return static_cast<int>(blockIdx.y); }
  __device__ __forceinline__ int BlockThreads() const { return static_cast<int>(blockDim.x); }

 private:
  Thread regs_{};
};

template <class Program>
__global__ void __launch_bounds__(Program::kMaxThreads) ProgramKernel(const typename Program::Params p) {
  DeviceExec<typename Program::Thread> ex;
  Program::Run(ex, p);
}

#endif  // __CUDACC__

}  // namespace respin::cuda
