// respin::Hadamard — Y = X·H_n/√n along the last axis, float32 [..., n] (DESIGN §6).
//
// H_n = H_{2^k} ⊗ H_m (hadamard_construction.h). Viewing a row x as X [2^k, m] (row-major),
// x·(H_{2^k} ⊗ H_m) = vec(H_{2^k}ᵀ X H_m) and H_{2^k} is symmetric, so each row costs
// O(n·m) for X·H_m (H_m on the right, not transposed: Paley I cores are not symmetric) plus
// O(n log 2^k) for the Sylvester butterfly over the 2^k axis. Accumulation in float32.
#include <algorithm>
#include <cmath>

#include "hadamard_rows.h"
#include "op_specs.h"
#include "respin_ops.h"
#include "simd.h"

namespace respin {

// The vectorized axis is always the one written (no float sum is reassociated), so the ISA clones
// agree bit for bit.
RESPIN_TARGET_CLONES
void HadamardTransformRow(const float* x, float* y, int64_t n, int64_t m, int64_t pow2, const float* core, float scale,
                  float* scratch) {
  if (m == 1) {
    std::copy_n(x, n, y);
  } else {
    // Y = X·H_m for X viewed as [2^k, m], computed column-major: Yᵀ[d, :] = Σ_b H[b, d]·Xᵀ[b, :], so
    // the vector loops run over the 2^k rows instead of the short core (m = 12 for n = 1536). Each
    // element is still 0 + Σ_b in ascending b: the same operations as the row-major product.
    float* xt = scratch;
    float* yt = scratch + n;
    for (int64_t a = 0; a < pow2; ++a)
      for (int64_t b = 0; b < m; ++b) xt[b * pow2 + a] = x[a * m + b];
    for (int64_t d = 0; d < m; ++d) {
      float* out = yt + d * pow2;
      std::fill_n(out, pow2, 0.0f);
      for (int64_t b = 0; b < m; ++b) {
        const float h = core[b * m + d];
        const float* xb = xt + b * pow2;
        for (int64_t a = 0; a < pow2; ++a) out[a] += xb[a] * h;
      }
    }
    for (int64_t a = 0; a < pow2; ++a)
      for (int64_t d = 0; d < m; ++d) y[a * m + d] = yt[d * pow2 + a];
  }
  for (int64_t h = 1; h < pow2; h *= 2) {  // Sylvester butterfly: one H_2 per bit of the 2^k index
    const int64_t span = h * m;
    for (int64_t base = 0; base < pow2; base += 2 * h) {
      float* lo = y + base * m;
      float* hi = lo + span;
      for (int64_t i = 0; i < span; ++i) {
        const float u = lo[i], v = hi[i];
        lo[i] = u + v;
        hi[i] = u - v;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) y[i] *= scale;
}

Ort::Status HadamardRows::Init(const char* op, int64_t size, int64_t core_size) {
  if (core_size > kMaxCore)
    return Fail(op, "Hadamard core size m = " + std::to_string(core_size) + " is larger than this kernel supports (" +
                        std::to_string(kMaxCore) + ")");
  const auto factors = hadamard::Factorization(size);
  if (!factors || factors->second != core_size)
    return Fail(op, "no Hadamard construction H_" + std::to_string(size) + " with core " + std::to_string(core_size));
  n = size, m = core_size, pow2 = factors->first;
  const std::vector<int8_t> h = hadamard::CoreMatrix(m);
  core.assign(h.begin(), h.end());
  scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  return Ort::Status(nullptr);
}

int64_t HadamardRows::Work() const {
  int64_t levels = 0;
  for (int64_t p = pow2; p > 1; p /= 2) ++levels;
  return n * (levels + m);
}

namespace {

struct HadamardKernel : KernelBase<HadamardKernel>, HadamardSpec {
  HadamardRows transform;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(HadamardSpec::Init(info));
    return transform.Init(kName, n, m);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    float* y = AllocateOutput<float>(ctx, 0, x.shape);
    const int64_t rows = LeadingSize(x.shape);
    const size_t tasks = TaskCount(rows, transform.Work());
    const float* xd = x.as<float>();
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      std::vector<float> scratch(transform.ScratchFloats());
      for (int64_t r = r0; r < r1; ++r) transform.Apply(xd + r * n, y + r * n, scratch.data());
    });
  }
};

}  // namespace

const OrtCustomOp* HadamardOp() {
  static const RespinOp<HadamardKernel> op;
  return &op;
}

}  // namespace respin
