// What the CPU and the CUDA kernels of each `respin` op share: inputs and outputs (dtypes), the
// attributes (read and validated at kernel creation), the input checks of every call and the
// output shapes for onnxruntime's graph inference — runtime_ops/schema.py to the letter. A kernel
// class derives from its op's spec and adds only its Compute (cpu/*.cc, cuda/ort_cuda_ops.cc).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "hadamard_construction.h"
#include "int4.h"
#include "ort_op.h"

namespace respin {

inline std::vector<int64_t> PerTokenShape(const std::vector<int64_t>& shape) {
  std::vector<int64_t> out(shape.begin(), shape.end() - 1);
  out.push_back(1);
  return out;
}

// --------------------------------------------------------------------------------- Hadamard

struct HadamardSpec {
  static constexpr const char* kName = "Hadamard";
  static constexpr std::array<Arg, 1> kInputs{{{kFloat, false}}};
  static constexpr std::array<Arg, 1> kOutputs{{{kFloat, false}}};

  int64_t n = 0, m = 1, pow2 = 1;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "n", std::nullopt, n));
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "m", 1, m));
    if (n < 1) return Fail(kName, "attribute n must be >= 1, got " + std::to_string(n));
    const auto factors = hadamard::Factorization(n);
    if (!factors)
      return Fail(kName, "no Hadamard construction of size n = " + std::to_string(n) +
                             ": supported are n = 2^k·m with m = 1 (Sylvester), m = q + 1 for a prime power "
                             "q ≡ 3 (mod 4) (Paley I) or m = 2(q + 1) for a prime power q ≡ 1 (mod 4) (Paley II)");
    if (factors->second != m)
      return Fail(kName, "attribute m = " + std::to_string(m) + " does not match n = " + std::to_string(n) +
                             ": its construction is H_" + std::to_string(factors->first) + " ⊗ H_" +
                             std::to_string(factors->second) + " (m = " + std::to_string(factors->second) + ")");
    pow2 = factors->first;
    return Ort::Status(nullptr);
  }

  static void InferShapes(const ShapeInference& si) {
    if (const auto x = si.Input(0)) si.SetOutput(0, kFloat, *x);
  }

  Ort::Status Validate(const Input& x) const {
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    return ExpectLastAxis(kName, "X", x, n, "attribute n");
  }
};

// ------------------------------------------------------------------- per-token quantization

struct QuantParams {
  int bits = 8;
  bool symmetric = false;
  float clip = 1.0f;
};

inline Ort::Status ReadQuantParams(const OrtKernelInfo* info, const char* op, int64_t default_bits, bool with_mode,
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

// The fused quantizers' Hadamard (attributes hadamard = n, hadamard_m = m; n = 0: none): checked
// against the construction at kernel creation, against X's last axis per call.
struct FusedHadamard {
  int64_t n = 0, m = 1;

  Ort::Status Init(const OrtKernelInfo* info, const char* op) {
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, op, "hadamard", 0, n));
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, op, "hadamard_m", 1, m));
    if (n < 0) return Fail(op, "attribute hadamard must be >= 0, got " + std::to_string(n));
    if (n == 0) return Ort::Status(nullptr);
    const auto factors = hadamard::Factorization(n);
    if (!factors || factors->second != m)
      return Fail(op, "attributes hadamard = " + std::to_string(n) + ", hadamard_m = " + std::to_string(m) +
                          (factors ? ": its construction has m = " + std::to_string(factors->second)
                                   : ": no Hadamard construction of that size"));
    return Ort::Status(nullptr);
  }

  Ort::Status Validate(const char* op, const Input& x) const {
    if (n && x.last() != n)
      return Fail(op, "input X has last axis " + std::to_string(x.last()) + " (shape " + ShapeStr(x.shape) +
                          "), but attribute hadamard = " + std::to_string(n) + " transforms rows of that size");
    return Ort::Status(nullptr);
  }
};

struct DynamicQuantizeSpec {
  static constexpr const char* kName = "DynamicQuantize";
  static constexpr std::array<Arg, 1> kInputs{{{kFloat, false}}};
  static constexpr std::array<Arg, 3> kOutputs{{{kInt8, false}, {kFloat, false}, {kInt8, false}}};

  QuantParams params;
  FusedHadamard hadamard;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(ReadQuantParams(info, kName, 8, true, params));
    return hadamard.Init(info, kName);
  }

  static void InferShapes(const ShapeInference& si) {
    const auto x = si.Input(0);
    if (!x) return;
    ShapeInference::Shape token = x->leading();
    token.push(1);
    si.SetOutput(0, kInt8, *x);
    si.SetOutput(1, kFloat, token);
    si.SetOutput(2, kInt8, token);
  }

  Ort::Status Validate(const Input& x) const {
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    if (x.shape.empty() || x.last() < 1)
      return Fail(kName, "input X must be [..., K] with K >= 1, got shape " + ShapeStr(x.shape));
    return hadamard.Validate(kName, x);
  }
};

struct QuantizeKVSpec {
  static constexpr const char* kName = "QuantizeKV";
  static constexpr std::array<Arg, 1> kInputs{{{kFloat, false}}};
  // Xq is uint8 (bits 4, packed) or int8: declared "any type" (and optional, which onnxruntime
  // requires of an output type no input determines); InferShapes below gives the actual one.
  static constexpr std::array<Arg, 3> kOutputs{{{kAnyType, true}, {kFloat, false}, {kInt8, false}}};

  QuantParams params;
  FusedHadamard hadamard;

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(ReadQuantParams(info, kName, 4, false, params));
    return hadamard.Init(info, kName);
  }
  bool Packed() const { return params.bits == 4; }

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

  Ort::Status Validate(const Input& x) const {
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    if (x.shape.empty() || x.last() < 1)
      return Fail(kName, "input X must be [..., head_dim] with head_dim >= 1, got shape " + ShapeStr(x.shape));
    return hadamard.Validate(kName, x);
  }

  // Allocates Xq [..., stored] and checks its dtype in the model against `bits`.
  Ort::Status CodesOutput(Ort::KernelContext& ctx, const Input& x, void*& data) const {
    std::vector<int64_t> shape = x.shape;
    shape.back() = Packed() ? int4::PackedSize(x.last()) : x.last();
    Ort::UnownedValue value = ctx.GetOutput(0, shape);
    if (!value) return Fail(kName, "output Xq is required");
    const ElemType type = value.GetTensorTypeAndShapeInfo().GetElementType();
    const ElemType expected = Packed() ? kUInt8 : kInt8;
    if (type != expected)
      return Fail(kName, std::string("output Xq is ") + TypeName(type) + " in the model, but bits = " +
                             std::to_string(params.bits) + " stores " + TypeName(expected) + " codes");
    data = value.GetTensorMutableRawData();
    return Ort::Status(nullptr);
  }
};

struct DequantizeKVSpec {
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
  bool Packed() const { return bits == 4; }

  static void InferShapes(const ShapeInference& si) {
    const auto q = si.Input(0);
    const int64_t head_dim = si.IntAttr("head_dim", -1);
    if (!q || head_dim < 1) return;
    ShapeInference::Shape y = q->leading();
    y.push(head_dim);
    si.SetOutput(0, kFloat, y);
  }

  Ort::Status Validate(const Input& q, const Input& scale, const Input& zp) const {
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "Xq", q, Packed() ? kUInt8 : kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "scale", scale, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "zero_point", zp, kInt8));
    const int64_t stored = Packed() ? int4::PackedSize(head_dim) : head_dim;
    RESPIN_RETURN_IF_ERROR(
        ExpectLastAxis(kName, "Xq", q, stored, Packed() ? "⌈head_dim/2⌉ (packed 4-bit)" : "attribute head_dim"));
    RESPIN_RETURN_IF_ERROR(ExpectPerToken(kName, "scale", scale, q, "Xq"));
    return ExpectPerToken(kName, "zero_point", zp, q, "Xq");
  }

  std::vector<int64_t> OutputShape(const Input& q) const {
    std::vector<int64_t> shape = q.shape;
    shape.back() = head_dim;
    return shape;
  }
};

// ---------------------------------------------------------------------------------- QMatMul

struct QMatMulSpec {
  static constexpr const char* kName = "QMatMul";
  static constexpr std::array<Arg, 7> kInputs{{{kInt8, false},
                                               {kFloat, false},
                                               {kInt8, false},
                                               {kAnyType, false},  // uint8 packed (bits 4) or int8
                                               {kFloat, false},
                                               {kInt8, false},
                                               {kFloat, true}}};
  static constexpr std::array<Arg, 1> kOutputs{{{kFloat, false}}};

  int64_t K = 0, bits = 4, group_size = 0;

  int64_t Groups() const { return group_size ? (K + group_size - 1) / group_size : 1; }

  Ort::Status Init(const OrtKernelInfo* info) {
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "K", std::nullopt, K));
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "bits", 4, bits));
    RESPIN_RETURN_IF_ERROR(IntAttribute(info, kName, "group_size", 0, group_size));
    if (K < 1) return Fail(kName, "attribute K must be >= 1, got " + std::to_string(K));
    if (bits < 2 || bits > 8) return Fail(kName, "attribute bits must be in [2, 8], got " + std::to_string(bits));
    if (group_size < 0) return Fail(kName, "attribute group_size must be >= 0, got " + std::to_string(group_size));
    return Ort::Status(nullptr);
  }

  static void InferShapes(const ShapeInference& si) {  // Y [..., N]: Xq's leading dims, W's rows
    const auto xq = si.Input(0), w = si.Input(3);
    if (!xq || !w) return;
    ShapeInference::Shape y = xq->leading();
    y.push(w->dims[0], w->params[0]);
    si.SetOutput(0, kFloat, y);
  }

  Ort::Status Validate(const Input& xq, const Input& x_scale, const Input& x_zp, const Input& w,
                       const Input& w_scale, const Input& w_zp, const Input& bias) const {
    const bool packed = bits == 4;
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "Xq", xq, kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "x_scale", x_scale, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "x_zero_point", x_zp, kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "W", w, packed ? kUInt8 : kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "w_scale", w_scale, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "w_zero_point", w_zp, kInt8));
    RESPIN_RETURN_IF_ERROR(ExpectLastAxis(kName, "Xq", xq, K, "attribute K"));
    RESPIN_RETURN_IF_ERROR(ExpectPerToken(kName, "x_scale", x_scale, xq, "Xq"));
    RESPIN_RETURN_IF_ERROR(ExpectPerToken(kName, "x_zero_point", x_zp, xq, "Xq"));
    if (w.shape.size() != 2)
      return Fail(kName, "input W must be 2-D [N, " + std::string(packed ? "⌈K/2⌉" : "K") + "], got shape " +
                             ShapeStr(w.shape));
    const int64_t N = w.shape[0], G = Groups();
    RESPIN_RETURN_IF_ERROR(ExpectShape(kName, "W", w, {N, packed ? int4::PackedSize(K) : K},
                                       packed ? "bits = 4: two codes per byte, [N, ⌈K/2⌉]" : "[N, K] int8 codes"));
    RESPIN_RETURN_IF_ERROR(ExpectShape(kName, "w_scale", w_scale, {N, G}, "[N, G], G = ⌈K/group_size⌉"));
    RESPIN_RETURN_IF_ERROR(ExpectShape(kName, "w_zero_point", w_zp, {N, G}, "[N, G], G = ⌈K/group_size⌉"));
    if (bias.present) {
      RESPIN_RETURN_IF_ERROR(ExpectType(kName, "bias", bias, kFloat));
      RESPIN_RETURN_IF_ERROR(ExpectShape(kName, "bias", bias, {N}, "[N]"));
    }
    return Ort::Status(nullptr);
  }

  static std::vector<int64_t> OutputShape(const Input& xq, const Input& w) {
    std::vector<int64_t> shape = xq.leading();
    shape.push_back(w.shape[0]);
    return shape;
  }
};

// ------------------------------------------------------------------------ ResidualCorrection

struct ResidualCorrectionSpec {
  static constexpr const char* kName = "ResidualCorrection";
  static constexpr std::array<Arg, 4> kInputs{{{kFloat, false}, {kFloat, false}, {kFloat, false}, {kFloat, true}}};
  static constexpr std::array<Arg, 1> kOutputs{{{kFloat, false}}};

  Ort::Status Init(const OrtKernelInfo*) { return Ort::Status(nullptr); }

  static void InferShapes(const ShapeInference& si) {
    if (const auto x = si.Input(0)) si.SetOutput(0, kFloat, *x);
  }

  static Ort::Status Validate(const Input& x, const Input& q, const Input& mm, const Input& z) {
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "X", x, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "Q", q, kFloat));
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "M", mm, kFloat));
    if (x.shape.empty()) return Fail(kName, "input X must have rank >= 1, got a scalar");
    if (q.shape.size() != 2) return Fail(kName, "input Q must be 2-D [D, r], got shape " + ShapeStr(q.shape));
    const int64_t D = q.shape[0], r = q.shape[1];
    RESPIN_RETURN_IF_ERROR(ExpectLastAxis(kName, "X", x, D, "D, the first axis of Q"));
    RESPIN_RETURN_IF_ERROR(ExpectShape(kName, "M", mm, {r, r}, "[r, r], r = the second axis of Q"));
    if (!z.present) return Ort::Status(nullptr);
    RESPIN_RETURN_IF_ERROR(ExpectType(kName, "Z", z, kFloat));
    return ExpectShape(kName, "Z", z, x.shape, "the shape of X");
  }
};

}  // namespace respin
