// onnxruntime glue shared by the CPU kernels: one op adapter (CustomOpBase with status-returning
// CreateKernelV2/ComputeV2), input reading, attribute reading, shape/dtype checks and ParallelFor.
//
// Contract with onnxruntime: nothing here throws across the C ABI. Every entry point that ORT calls
// (kernel creation, compute) runs inside `Guard`, which turns any C++ exception into an error
// status; bad input is reported as ORT_INVALID_ARGUMENT "respin::<Op>: <what is wrong>".
#pragma once

#include <onnxruntime_cxx_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace respin {

constexpr const char* kDomain = "respin";
constexpr int kOpsetVersion = 1;

using ElemType = ONNXTensorElementDataType;
constexpr ElemType kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ElemType kInt8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr ElemType kUInt8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ElemType kAnyType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // checked by the kernel itself

#define RESPIN_RETURN_IF_ERROR(expr)      \
  do {                                    \
    Ort::Status _respin_status = (expr);  \
    if (!_respin_status.IsOK()) return _respin_status; \
  } while (0)

inline Ort::Status Fail(const char* op, const std::string& message) {
  return Ort::Status(("respin::" + std::string(op) + ": " + message).c_str(), ORT_INVALID_ARGUMENT);
}

inline std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline const char* TypeName(ElemType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "non-numeric";
  }
}

// Runs `body` (returning Ort::Status) and hands ORT an OrtStatus*: nullptr on success.
template <class Body>
OrtStatusPtr Guard(const char* op, Body&& body) noexcept {
  try {
    return body().release();
  } catch (const Ort::Exception& e) {
    return Ort::Status(("respin::" + std::string(op) + ": " + e.what()).c_str(), e.GetOrtErrorCode()).release();
  } catch (const std::bad_alloc&) {
    return Ort::Status(("respin::" + std::string(op) + ": out of memory").c_str(), ORT_FAIL).release();
  } catch (const std::exception& e) {
    return Ort::Status(("respin::" + std::string(op) + ": " + e.what()).c_str(), ORT_FAIL).release();
  } catch (...) {
    return Ort::Status(("respin::" + std::string(op) + ": unknown error").c_str(), ORT_FAIL).release();
  }
}

// ------------------------------------------------------------------------------------ tensors

// A kernel input as a plain view: dtype, shape, data (absent optional inputs have present = false).
struct Input {
  bool present = false;
  ElemType type = kAnyType;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t last() const { return shape.empty() ? 0 : shape.back(); }
  std::vector<int64_t> leading() const { return {shape.begin(), shape.end() - (shape.empty() ? 0 : 1)}; }
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

inline Input ReadInput(const Ort::KernelContext& ctx, size_t index) {
  Input in;
  if (index >= ctx.GetInputCount()) return in;
  Ort::ConstValue value = ctx.GetInput(index);
  if (!value) return in;
  auto info = value.GetTensorTypeAndShapeInfo();
  in.present = true;
  in.type = info.GetElementType();
  in.shape = info.GetShape();
  in.data = value.GetTensorRawData();
  return in;
}

// Product of the leading dims (all but the last); the number of rows of a [..., last] tensor.
inline int64_t LeadingSize(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) n *= shape[i];
  return n;
}

inline Ort::Status ExpectType(const char* op, const char* name, const Input& in, ElemType type) {
  if (in.type != type)
    return Fail(op, std::string("input ") + name + " must be " + TypeName(type) + ", got " + TypeName(in.type));
  return Ort::Status(nullptr);
}

// `in` is [..., last] with rank >= 1 and the given last-axis size.
inline Ort::Status ExpectLastAxis(const char* op, const char* name, const Input& in, int64_t last,
                                  const char* what) {
  if (in.shape.empty())
    return Fail(op, std::string("input ") + name + " must have rank >= 1, got a scalar");
  if (in.last() != last)
    return Fail(op, std::string("input ") + name + " has last axis " + std::to_string(in.last()) + " (shape " +
                        ShapeStr(in.shape) + "), expected " + what + " = " + std::to_string(last));
  return Ort::Status(nullptr);
}

// `in` has exactly `shape`.
inline Ort::Status ExpectShape(const char* op, const char* name, const Input& in, const std::vector<int64_t>& shape,
                               const char* what) {
  if (in.shape != shape)
    return Fail(op, std::string("input ") + name + " has shape " + ShapeStr(in.shape) + ", expected " +
                        ShapeStr(shape) + " (" + what + ")");
  return Ort::Status(nullptr);
}

// A per-token tensor [..., 1] matching the leading dims of `ref` ([..., K]).
inline Ort::Status ExpectPerToken(const char* op, const char* name, const Input& in, const Input& ref,
                                  const char* ref_name) {
  std::vector<int64_t> shape = ref.leading();
  shape.push_back(1);
  if (in.shape != shape)
    return Fail(op, std::string("input ") + name + " has shape " + ShapeStr(in.shape) + ", expected " +
                        ShapeStr(shape) + " (one value per row of " + ref_name + " " + ShapeStr(ref.shape) + ")");
  return Ort::Status(nullptr);
}

template <class T>
T* AllocateOutput(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) {
  return ctx.GetOutput(index, shape).GetTensorMutableData<T>();
}

// ---------------------------------------------------------------------------------- attributes

inline Ort::Status IntAttribute(const OrtKernelInfo* info, const char* op, const char* name,
                                std::optional<int64_t> fallback, int64_t& out) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &out);
  if (status == nullptr) return Ort::Status(nullptr);
  Ort::GetApi().ReleaseStatus(status);
  if (!fallback) return Fail(op, std::string("missing required int attribute '") + name + "'");
  out = *fallback;
  return Ort::Status(nullptr);
}

inline Ort::Status FloatAttribute(const OrtKernelInfo* info, const char* /*op*/, const char* name, float fallback,
                                  float& out) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &out);
  if (status == nullptr) return Ort::Status(nullptr);
  Ort::GetApi().ReleaseStatus(status);
  out = fallback;
  return Ort::Status(nullptr);
}

// ---------------------------------------------------------------------------------- threading

// Runs fn(i) for i in [0, tasks) on the session's intra-op thread pool (serially when the session
// has one thread). fn must not throw; an exception that escapes anyway is reported as a failure.
template <class Fn>
Ort::Status ParallelFor(const Ort::KernelContext& ctx, size_t tasks, Fn&& fn) {
  if (tasks == 0) return Ort::Status(nullptr);
  struct Job {
    Fn* fn;
    std::atomic<bool> failed{false};
  } job{&fn};
  auto run = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    try {
      (*j->fn)(i);
    } catch (...) {
      j->failed = true;
    }
  };
  if (tasks == 1) {
    run(&job, 0);
  } else {
    ctx.ParallelFor(run, tasks, 0, &job);
  }
  if (job.failed) return Ort::Status("respin: a parallel task failed (out of memory?)", ORT_FAIL);
  return Ort::Status(nullptr);
}

// Number of tasks to split `rows` rows of `work_per_row` operations into: about 64k operations
// per task at least, at most 64 tasks.
inline size_t TaskCount(int64_t rows, int64_t work_per_row) {
  const int64_t total = rows * (work_per_row > 0 ? work_per_row : 1);
  int64_t tasks = total / 65536;
  if (tasks > 64) tasks = 64;
  if (tasks > rows) tasks = rows;
  return static_cast<size_t>(tasks < 1 ? 1 : tasks);
}

// [begin, end) of task i of `tasks` over `rows` rows.
inline std::pair<int64_t, int64_t> TaskRange(size_t i, size_t tasks, int64_t rows) {
  const int64_t t = static_cast<int64_t>(tasks);
  const int64_t ii = static_cast<int64_t>(i);
  return {rows * ii / t, rows * (ii + 1) / t};
}

// ---------------------------------------------------------------------------- shape inference

// Output dtypes and shapes for onnxruntime's graph inference, through the C API. For library ops
// onnxruntime only knows each output's declared dtype: an output of "any type" (QuantizeKV's Xq)
// gets none, and an op downstream of an output of unknown rank may not place it. Never throws;
// unknown dimensions without a name get fresh names (onnxruntime would record them as −1).
class ShapeInference {
 public:
  struct Shape {
    std::vector<int64_t> dims;        // −1 where unknown
    std::vector<std::string> params;  // the name of each unknown dim ("" where dims[i] is known)
    size_t rank() const { return dims.size(); }
    void set(size_t i, int64_t value) { dims[i] = value, params[i].clear(); }
    void set(size_t i, std::string param) { dims[i] = -1, params[i] = std::move(param); }
    Shape leading() const {  // all but the last dim
      return {{dims.begin(), dims.end() - 1}, {params.begin(), params.end() - 1}};
    }
    void push(int64_t value, std::string param = "") { dims.push_back(value), params.push_back(std::move(param)); }
  };

  explicit ShapeInference(OrtShapeInferContext* ctx) : ctx_(ctx) {}

  // The shape of input `index`; nullopt when absent or of unknown rank (rank 0 counts as unknown:
  // onnxruntime reports a missing shape as rank 0, and no respin op takes a scalar).
  std::optional<Shape> Input(size_t index) const {
    const OrtApi& api = Ort::GetApi();
    size_t count = 0, rank = 0;
    OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
    if (!Ok(api.ShapeInferContext_GetInputCount(ctx_, &count)) || index >= count ||
        !Ok(api.ShapeInferContext_GetInputTypeShape(ctx_, index, &info)) || info == nullptr ||
        !Ok(api.GetDimensionsCount(info, &rank)) || rank == 0)
      return std::nullopt;
    Shape shape{std::vector<int64_t>(rank), std::vector<std::string>(rank)};
    std::vector<const char*> names(rank, nullptr);
    if (!Ok(api.GetDimensions(info, shape.dims.data(), rank)) ||
        !Ok(api.GetSymbolicDimensions(info, names.data(), rank)))
      return std::nullopt;
    static std::atomic<int64_t> fresh{0};
    for (size_t i = 0; i < rank; ++i) {
      if (shape.dims[i] >= 0) continue;
      shape.set(i, names[i] && *names[i] ? std::string(names[i]) : "respin_unk_" + std::to_string(fresh++));
    }
    return shape;
  }

  int64_t IntAttr(const char* name, int64_t fallback) const {
    const OrtApi& api = Ort::GetApi();
    const OrtOpAttr* attr = nullptr;
    int64_t value = fallback;
    size_t size = 0;
    if (!Ok(api.ShapeInferContext_GetAttribute(ctx_, name, &attr)) || attr == nullptr ||
        !Ok(api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &value, sizeof(value), &size)))
      return fallback;
    return value;
  }

  void SetOutput(size_t index, ElemType type, const Shape& shape) const {
    const OrtApi& api = Ort::GetApi();
    std::vector<const char*> names;
    for (const std::string& p : shape.params) names.push_back(p.c_str());
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (!Ok(api.CreateTensorTypeAndShapeInfo(&info))) return;
    if (Ok(api.SetTensorElementType(info, type)) && Ok(api.SetDimensions(info, shape.dims.data(), shape.rank())) &&
        Ok(api.SetSymbolicDimensions(info, names.data(), names.size())))
      Ok(api.ShapeInferContext_SetOutputTypeShape(ctx_, index, info));
    api.ReleaseTensorTypeAndShapeInfo(info);
  }

 private:
  static bool Ok(OrtStatus* status) {
    if (status == nullptr) return true;
    Ort::GetApi().ReleaseStatus(status);
    return false;
  }

  OrtShapeInferContext* ctx_;
};

// -------------------------------------------------------------------------------- op adapter

struct Arg {
  ElemType type;  // kAnyType: the kernel checks the dtype itself
  bool optional;
};

// One OrtCustomOp per kernel class K, which provides:
//   static constexpr const char* kName, *kProvider;  static constexpr std::array<Arg, I> kInputs, kOutputs;
//   static void InferShapes(const ShapeInference&);   (output dtypes and shapes, best effort)
//   Ort::Status Init(const OrtKernelInfo*);   (reads and validates attributes)
//   Ort::Status Compute(Ort::KernelContext&);
template <class K>
struct RespinOp : Ort::CustomOpBase<RespinOp<K>, K, /*WithStatus=*/true> {
  RespinOp() {
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      try {  // best effort: what cannot be inferred stays as onnxruntime has it
        K::InferShapes(ShapeInference(ctx));
      } catch (...) {
      }
      return nullptr;
    };
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return Guard(K::kName, [&]() -> Ort::Status {
      auto k = std::make_unique<K>();
      RESPIN_RETURN_IF_ERROR(k->Init(info));
      *kernel = k.release();
      return Ort::Status(nullptr);
    });
  }
  const char* GetName() const { return K::kName; }
  const char* GetExecutionProviderType() const { return K::kProvider; }
  size_t GetInputTypeCount() const { return K::kInputs.size(); }
  ElemType GetInputType(size_t i) const { return K::kInputs[i].type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return K::kInputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return K::kOutputs.size(); }
  ElemType GetOutputType(size_t i) const { return K::kOutputs[i].type; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return K::kOutputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

// Mixin for kernel classes: the ComputeV2 entry point RespinOp calls, and the execution provider
// the kernel is for (CudaKernelBase in cuda/ort_cuda_ops.cc says CUDA).
template <class K>
struct KernelBase {
  static constexpr const char* kProvider = "CPUExecutionProvider";
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(K::kName, [&]() -> Ort::Status {
      Ort::KernelContext ctx(context);
      return static_cast<K*>(this)->Compute(ctx);
    });
  }
};

}  // namespace respin
