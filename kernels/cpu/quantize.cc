// respin::DynamicQuantize, respin::QuantizeKV, respin::DequantizeKV — per-token (last axis) codes.
//
// Bit-exact with runtime_ops/reference.py: the same float32 operations in the same order (true
// divisions, no reciprocals; the build uses -ffp-contract=off and no -ffast-math), round half to
// even. Codes are signed int8; QuantizeKV with bits = 4 packs them two per byte (int4.h).
#include <algorithm>
#include <cmath>

#include "int4.h"
#include "ort_op.h"
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

struct QuantParams {
  int bits = 8;
  bool symmetric = false;
  float clip = 1.0f;
};

Ort::Status ReadQuantParams(const OrtKernelInfo* info, const char* op, int64_t default_bits, bool with_mode,
                            QuantParams& out) {
  int64_t bits = 0, symmetric = 0;
  float clip = 1.0f;
  RESPIN_RETURN_IF_ERROR(IntAttribute(info, op, "bits", default_bits, bits));
  if (bits < 2 || bits > 8) return Fail(op, "attribute bits must be in [2, 8], got " + std::to_string(bits));
  if (with_mode) {
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, op, "symmetric", 0, symmetric));
    RESPIN_RETURN_IF_ERROR(FloatAttribute(info, op, "clip", 1.0f, clip));
    if (symmetric != 0 && symmetric != 1)
      return Fail(op, "attribute symmetric must be 0 or 1, got " + std::to_string(symmetric));
    if (!(clip > 0.0f) || !std::isfinite(clip))
      return Fail(op, "attribute clip must be a finite number > 0, got " + std::to_string(clip));
  }
  out = QuantParams{static_cast<int>(bits), symmetric == 1, clip};
  return Ort::Status(nullptr);
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

std::vector<int64_t> PerTokenShape(const std::vector<int64_t>& shape) {
  std::vector<int64_t> out(shape.begin(), shape.end() - 1);
  out.push_back(1);
  return out;
}

// ------------------------------------------------------------------------- DynamicQuantize

struct DynamicQuantizeKernel : KernelBase<DynamicQuantizeKernel> {
  static constexpr const char* kName = "DynamicQuantize";
  static constexpr std::array<Arg, 1> kInputs{{{kFloat, false}}};
  static constexpr std::array<Arg, 3> kOutputs{{{kInt8, false}, {kFloat, false}, {kInt8, false}}};

  QuantParams params;

  Ort::Status Init(const OrtKernelInfo* info) { return ReadQuantParams(info, kName, 8, true, params); }

  static void InferShapes(const ShapeInference& si) {
    const auto x = si.Input(0);
    if (!x) return;
    ShapeInference::Shape token = x->leading();
    token.push(1);
    si.SetOutput(0, kInt8, *x);
    si.SetOutput(1, kFloat, token);
    si.SetOutput(2, kInt8, token);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    if (x.shape.empty() || x.last() < 1)
      return Fail(kName, "input X must be [..., K] with K >= 1, got shape " + ShapeStr(x.shape));
    const int64_t k = x.last(), rows = LeadingSize(x.shape);
    int8_t* q = AllocateOutput<int8_t>(ctx, 0, x.shape);
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    const float* xd = x.as<float>();
    const size_t tasks = TaskCount(rows, 8 * k);
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      for (int64_t r = r0; r < r1; ++r) QuantizeRow(xd + r * k, k, params, q + r * k, scale[r], zp[r]);
    });
  }
};

// ------------------------------------------------------------------------------ QuantizeKV

struct QuantizeKVKernel : KernelBase<QuantizeKVKernel> {
  static constexpr const char* kName = "QuantizeKV";
  static constexpr std::array<Arg, 1> kInputs{{{kFloat, false}}};
  // Xq is uint8 (bits 4, packed) or int8: declared "any type" (and optional, which onnxruntime
  // requires of an output type no input determines); InferShapes below gives the actual one.
  static constexpr std::array<Arg, 3> kOutputs{{{kAnyType, true}, {kFloat, false}, {kInt8, false}}};

  QuantParams params;

  Ort::Status Init(const OrtKernelInfo* info) { return ReadQuantParams(info, kName, 4, false, params); }

  // Xq's dtype follows `bits`, which onnxruntime cannot see: without this it would know no dtype
  // for Xq, and a model would have to declare it.
  static void InferShapes(const ShapeInference& si) {
    const int64_t bits = si.IntAttr("bits", 4);
    const auto x = si.Input(0);
    if (!x) return;
    ShapeInference::Shape q = *x, token = x->leading();
    if (bits == 4) {
      if (q.dims.back() >= 0) q.set(q.rank() - 1, int4::PackedSize(q.dims.back()));
      else q.set(q.rank() - 1, q.params.back() + "_packed4");
    }
    token.push(1);
    si.SetOutput(0, bits == 4 ? kUInt8 : kInt8, q);
    si.SetOutput(1, kFloat, token);
    si.SetOutput(2, kInt8, token);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    if (x.shape.empty() || x.last() < 1)
      return Fail(kName, "input X must be [..., head_dim] with head_dim >= 1, got shape " + ShapeStr(x.shape));
    const int64_t d = x.last(), rows = LeadingSize(x.shape);
    const bool packed = params.bits == 4;
    const int64_t stored = packed ? int4::PackedSize(d) : d;
    std::vector<int64_t> q_shape = x.shape;
    q_shape.back() = stored;

    Ort::UnownedValue q_value = ctx.GetOutput(0, q_shape);
    if (!q_value) return Fail(kName, "output Xq is required");
    const ElemType q_type = q_value.GetTensorTypeAndShapeInfo().GetElementType();
    const ElemType expected = packed ? kUInt8 : kInt8;
    if (q_type != expected)
      return Fail(kName, std::string("output Xq is ") + TypeName(q_type) + " in the model, but bits = " +
                             std::to_string(params.bits) + " stores " + TypeName(expected) + " codes");
    void* q = q_value.GetTensorMutableRawData();
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    const float* xd = x.as<float>();
    const size_t tasks = TaskCount(rows, 8 * d);
    return ParallelFor(ctx, tasks, [&](size_t t) {
      const auto [r0, r1] = TaskRange(t, tasks, rows);
      std::vector<int8_t> codes(packed ? d : 0);
      for (int64_t r = r0; r < r1; ++r) {
        if (packed) {
          QuantizeRow(xd + r * d, d, params, codes.data(), scale[r], zp[r]);
          int4::PackRow(codes.data(), d, static_cast<uint8_t*>(q) + r * stored);
        } else {
          QuantizeRow(xd + r * d, d, params, static_cast<int8_t*>(q) + r * d, scale[r], zp[r]);
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------- DequantizeKV

struct DequantizeKVKernel : KernelBase<DequantizeKVKernel> {
  static constexpr const char* kName = "DequantizeKV";
  static constexpr std::array<Arg, 3> kInputs{{{kAnyType, false}, {kFloat, false}, {kInt8, false}}};
  static constexpr std::array<Arg, 1> kOutputs{{{kFloat, false}}};

  int64_t bits = 4, head_dim = 0;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "bits", 4, bits));
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "head_dim", std::nullopt, head_dim));
    if (bits < 2 || bits > 8) return Fail(kName, "attribute bits must be in [2, 8], got " + std::to_string(bits));
    if (head_dim < 1) return Fail(kName, "attribute head_dim must be >= 1, got " + std::to_string(head_dim));
    return Ort::Status(nullptr);
  }

  static void InferShapes(const ShapeInference& si) {
    const auto q = si.Input(0);
    const int64_t head_dim = si.IntAttr("head_dim", -1);
    if (!q || head_dim < 1) return;
    ShapeInference::Shape y = q->leading();
    y.push(head_dim);
    si.SetOutput(0, kFloat, y);
  }

  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input q = ReadInput(ctx, 0), scale = ReadInput(ctx, 1), zp = ReadInput(ctx, 2);
    const bool packed = bits == 4;
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "Xq", q, packed ? kUInt8 : kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "scale", scale, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "zero_point", zp, kInt8));
    const int64_t stored = packed ? int4::PackedSize(head_dim) : head_dim;
    RESPIN_RETURN_IF_ERROR(
        ExpectLastAxis(kName, "Xq", q, stored, packed ? "⌈head_dim/2⌉ (packed 4-bit)" : "attribute head_dim"));
    RESPIN_RETURN_IF_ERROR(ExpectPerToken(kName, "scale", scale, q, "Xq"));
    RESPIN_RETURN_IF_ERROR(ExpectPerToken(kName, "zero_point", zp, q, "Xq"));

    std::vector<int64_t> y_shape = q.shape;
    y_shape.back() = head_dim;
    float* y = AllocateOutput<float>(ctx, 0, y_shape);
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
