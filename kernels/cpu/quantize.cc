// respin::DynamicQuantize, respin::QuantizeKV, respin::DequantizeKV — per-token (last axis) codes.
//
// Bit-exact with runtime_ops/reference.py: the same float32 operations in the same order (true
// divisions, no reciprocals; the build uses -ffp-contract=off and no -ffast-math), round half to
// even. Codes are signed int8; QuantizeKV with bits = 4 packs them two per byte (int4.h).
#include <algorithm>
#include <cmath>

#include "hadamard_rows.h"
#include "op_specs.h"
#include "respin_ops.h"

namespace respin {
namespace {

const float kScaleFloor = static_cast<float>(1e-8);  // np.float32(1e-8): rounded from the double, as NumPy does

// Round half to even for |v| <= 2^22 in the default rounding mode (the sum lands where float spacing
// is 1, and 1.5·2^23 is even); vectorizes where std::nearbyint would be a libm call per element.
inline float RoundHalfEven(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// One row [k] → codes, scale, zero point, step for step as reference.dynamic_quantize.
void QuantizeRow(const float* x, int64_t k, const QuantParams& p, int8_t* q, float& scale_out, int8_t& zp_out) {
  const float half = static_cast<float>(1 << (p.bits - 1));
  float scale, zp;
  if (p.symmetric) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
    scale = std::max(amax * p.clip / (half - 1.0f), kScaleFloor);
    zp = 0.0f;
  } else {
    float lo = x[0], hi = x[0];
    for (int64_t i = 1; i < k; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    lo = std::min(lo, 0.0f) * p.clip;
    hi = std::max(hi, 0.0f) * p.clip;
    scale = std::max((hi - lo) / static_cast<float>((1 << p.bits) - 1), kScaleFloor);
    zp = std::nearbyint(-lo / scale) - half;
  }
  const float qmin = -half, qmax = half - 1.0f;
  for (int64_t i = 0; i < k; ++i) {
    // Pre-clamping to ±1024 changes nothing after the final clamp (|zp| <= 128) and keeps the
    // magic-number rounding in its exact range.
    float v = std::min(std::max(x[i] / scale, -1024.0f), 1024.0f);
    v = RoundHalfEven(v) + zp;
    v = std::min(std::max(v, qmin), qmax);
    q[i] = v == v ? static_cast<int8_t>(v) : 0;  // NaN input: code 0 rather than undefined behaviour
  }
  scale_out = scale;
  zp_out = zp == zp ? static_cast<int8_t>(zp) : 0;
}

// ------------------------------------------------------------------------- DynamicQuantize

// The rows a quantizer reads: X itself, or its Hadamard transform (the fused ops), one row at a time.
struct RowSource {
  HadamardRows transform;
  bool fused = false;

  Ort::Status Init(const char* op, const FusedHadamard& h) {
    fused = h.n > 0;
    return fused ? transform.Init(op, h.n, h.m) : Ort::Status(nullptr);
  }
  int64_t Work(int64_t k) const { return fused ? transform.Work() + 8 * k : 8 * k; }
  // Per-task buffers: the rotated row and the transform's scratch.
  std::vector<float> Buffer() const { return std::vector<float>(fused ? transform.n + transform.ScratchFloats() : 0); }
  const float* Row(const float* x, float* buffer) const {
    if (!fused) return x;
    transform.Apply(x, buffer, buffer + transform.n);
    return buffer;
  }
};

struct DynamicQuantizeKernel : KernelBase<DynamicQuantizeKernel>, DynamicQuantizeSpec {
  RowSource source;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(DynamicQuantizeSpec::Init(info));
    return source.Init(kName, hadamard);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    const int64_t k = x.last(), rows = LeadingSize(x.shape);
    int8_t* q = AllocateOutput<int8_t>(ctx, 0, x.shape);
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    const float* xd = x.as<float>();
    const size_t tasks = TaskCount(rows, source.Work(k));
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      std::vector<float> buffer = source.Buffer();
      for (int64_t r = r0; r < r1; ++r)
        QuantizeRow(source.Row(xd + r * k, buffer.data()), k, params, q + r * k, scale[r], zp[r]);
    });
  }
};

// ------------------------------------------------------------------------------ QuantizeKV

struct QuantizeKVKernel : KernelBase<QuantizeKVKernel>, QuantizeKVSpec {
  RowSource source;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(QuantizeKVSpec::Init(info));
    return source.Init(kName, hadamard);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    const int64_t d = x.last(), rows = LeadingSize(x.shape);
    const bool packed = Packed();
    const int64_t stored = packed ? int4::PackedSize(d) : d;
    void* q = nullptr;
    RESPIN_RETURN_IF_ERROR(CodesOutput(ctx, x, q));
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    const float* xd = x.as<float>();
    const size_t tasks = TaskCount(rows, source.Work(d));
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      std::vector<int8_t> codes(packed ? d : 0);
      std::vector<float> buffer = source.Buffer();
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = source.Row(xd + r * d, buffer.data());
        if (packed) {
          QuantizeRow(row, d, params, codes.data(), scale[r], zp[r]);
          int4::PackRow(codes.data(), d, static_cast<uint8_t*>(q) + r * stored);
        } else {
          QuantizeRow(row, d, params, static_cast<int8_t*>(q) + r * d, scale[r], zp[r]);
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------- DequantizeKV

struct DequantizeKVKernel : KernelBase<DequantizeKVKernel>, DequantizeKVSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input q = ReadInput(ctx, 0), scale = ReadInput(ctx, 1), zp = ReadInput(ctx, 2);
    RESPIN_RETURN_IF_ERROR(Validate(q, scale, zp));
    const bool packed = Packed();
    const int64_t stored = packed ? int4::PackedSize(head_dim) : head_dim;
    float* y = AllocateOutput<float>(ctx, 0, OutputShape(q));
    const int64_t rows = LeadingSize(q.shape), d = head_dim;
    const float* s = scale.as<float>();
    const int8_t* z = zp.as<int8_t>();
    const size_t tasks = TaskCount(rows, 2 * d);
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      std::vector<int8_t> codes(packed ? d : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int8_t* c = q.as<int8_t>() + r * d;
        if (packed) {
          int4::UnpackRow(q.as<uint8_t>() + r * stored, d, codes.data());
          c = codes.data();
        }
        const int32_t zr = z[r];
        const float sr = s[r];
        for (int64_t i = 0; i < d; ++i) y[r * d + i] = static_cast<float>(static_cast<int32_t>(c[i]) - zr) * sr;
      }
    });
  }
};

}  // namespace

const OrtCustomOp* DynamicQuantizeOp() {
  static const RespinOp<DynamicQuantizeKernel> op;
  return &op;
}

const OrtCustomOp* QuantizeKVOp() {
  static const RespinOp<QuantizeKVKernel> op;
  return &op;
}

const OrtCustomOp* DequantizeKVOp() {
  static const RespinOp<DequantizeKVKernel> op;
  return &op;
}

}  // namespace respin
