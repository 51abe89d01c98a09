// respin::ResidualCorrection — Y = (X + ((X·Q)·M)·Qᵀ) + Z (Z optional), X float32 [..., D], Q [D, r], M [r, r]
// (the ReSpinQuant skip path). Row by row in float32: t = x·Q, u = t·M, y = x + u·Qᵀ, all three
// read from one copy of Qᵀ [r, D] (transposed once at session creation for a constant Q): when
// decoding, Q comes from DRAM on every call, so its bytes are the cost (two copies cost 18.5 µs a
// call cold, one 5.8 µs: benchmarks/online_ops.py). Every float sum runs in a fixed order, the same on every ISA clone and in
// the CUDA kernel, so they agree bit for bit:
//   t[j] = Σ_l p_l (l ascending), p_l = Σ_{d ≡ l mod 16} x[d]·Q[d, j] (d ascending): 16 lanes
//   u[l] = Σ_j t[j]·M[j, l] (j ascending);  y[d] = x[d] + Σ_j u[j]·Q[d, j] (from x[d], j ascending)
#include <algorithm>
#include <vector>

#include "op_specs.h"
#include "respin_ops.h"
#include "simd.h"

namespace respin {
namespace {

constexpr int64_t kLanes = 16;  // = kCorrectionLanes of kernels/cuda/residual_correction.cuh

// y = x + ((x·Q)·M)·Qᵀ for one row, Qt = Qᵀ [r, D]; t and u are scratch [r].
RESPIN_TARGET_CLONES
void CorrectRow(const float* x, float* y, const float* M, const float* Qt, int64_t D, int64_t r, float* t, float* u) {
  for (int64_t j = 0; j < r; ++j) {  // t = x·Q: 16 lane sums over contiguous Qᵀ rows, then the lanes in order
    const float* qj = Qt + j * D;
    float lanes[kLanes] = {};
    int64_t d0 = 0;
    for (; d0 + kLanes <= D; d0 += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[d0 + l] * qj[d0 + l];
    for (int64_t l = 0; d0 + l < D; ++l) lanes[l] += x[d0 + l] * qj[d0 + l];
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
    t[j] = sum;
  }
  std::fill_n(u, r, 0.0f);
  for (int64_t j = 0; j < r; ++j) {  // u = t·M
    const float v = t[j];
    const float* mj = M + j * r;
    for (int64_t l = 0; l < r; ++l) u[l] += v * mj[l];
  }
  int64_t d0 = 0;  // y = x + u·Qᵀ in chunks of 16 outputs held in registers (j ascending per output)
  for (; d0 + kLanes <= D; d0 += kLanes) {
    float acc[kLanes];
    std::copy_n(x + d0, kLanes, acc);
    for (int64_t j = 0; j < r; ++j) {
      const float v = u[j];
      const float* qj = Qt + j * D + d0;
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += v * qj[l];
    }
    std::copy_n(acc, kLanes, y + d0);
  }
  std::copy_n(x + d0, D - d0, y + d0);
  for (int64_t j = 0; j < r; ++j) {
    const float v = u[j];
    const float* qj = Qt + j * D;
    for (int64_t d = d0; d < D; ++d) y[d] += v * qj[d];
  }
}

RESPIN_TARGET_CLONES
void AddRow(float* y, const float* z, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += z[d];
}

struct ResidualCorrectionKernel : KernelBase<ResidualCorrectionKernel>, ResidualCorrectionSpec {
  // Qᵀ of a constant Q (an initializer), transposed once at session creation (transposing per call
  // cost more than the correction itself when decoding one token); Compute reads only this copy.
  std::vector<float> constant_qt;
  int64_t constant_d = 0, constant_r = 0;

  Ort::Status Init(const OrtKernelInfo* info) {
    const OrtApi& api = Ort::GetApi();
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value)) {
      api.ReleaseStatus(status);
      return Ort::Status(nullptr);
    }
    if (!is_constant || value == nullptr) return Ort::Status(nullptr);
    const Ort::ConstValue q(value);
    const auto type_shape = q.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = type_shape.GetShape();
    if (type_shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 2) return Ort::Status(nullptr);
    constant_d = shape[0];
    constant_r = shape[1];
    constant_qt = Transposed(q.GetTensorData<float>(), constant_d, constant_r);
    return Ort::Status(nullptr);
  }

  static std::vector<float> Transposed(const float* Q, int64_t D, int64_t r) {
    std::vector<float> Qt(r * D);  // Qᵀ [r, D]
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < r; ++j) Qt[j * D + d] = Q[d * r + j];
    return Qt;
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0), q = ReadInput(ctx, 1), mm = ReadInput(ctx, 2), z = ReadInput(ctx, 3);
    RESPIN_RETURN_IF_ERROR(Validate(x, q, mm, z));
    const int64_t D = q.shape[0], r = q.shape[1];

    float* y = AllocateOutput<float>(ctx, 0, x.shape);
    const int64_t rows = LeadingSize(x.shape);
    const float* xd = x.as<float>();
    const float* Q = q.as<float>();
    const float* M = mm.as<float>();
    std::vector<float> per_call;
    const bool cached = !constant_qt.empty() && D == constant_d && r == constant_r;
    if (!cached) per_call = Transposed(Q, D, r);
    const float* Qt = cached ? constant_qt.data() : per_call.data();

    const size_t tasks = TaskCount(rows, 2 * D * r + r * r);
    return ParallelFor(ctx, tasks, [&](size_t task) {
      const auto [r0, r1] = TaskRange(task, tasks, rows);
      std::vector<float> scratch(2 * r);
      const float* zd = z.present ? z.as<float>() : nullptr;
      for (int64_t i = r0; i < r1; ++i) {
        CorrectRow(xd + i * D, y + i * D, M, Qt, D, r, scratch.data(), scratch.data() + r);
        if (zd) AddRow(y + i * D, zd + i * D, D);  // the residual's add, last (the unfused graph's order)
      }
    });
  }
};

}  // namespace

const OrtCustomOp* ResidualCorrectionOp() {
  static const RespinOp<ResidualCorrectionKernel> op;
  return &op;
}

}  // namespace respin
