// The `respin` ops for onnxruntime's CUDA execution provider: the same op specs as the CPU kernels
// (include/op_specs.h: attributes, input checks, shape inference), computed by the GPU kernels of
// device_api.cu on the EP's stream (KernelContext::GetGPUComputeStream: the C++ API hands it over,
// so no CUDA-EP context header is needed). Inputs and outputs live in device memory; host code here
// checks shapes and dtypes and passes raw pointers on. Compiled by the host C++ compiler.
#include "api.h"
#include "op_specs.h"
#include "respin_ops.h"

namespace respin {
namespace {

template <class K>
struct CudaKernelBase : KernelBase<K> {
  static constexpr const char* kProvider = "CUDAExecutionProvider";
};

// A C API result as an onnxruntime status.
Ort::Status Launched(const char* op, int code) {
  if (code == 0) return Ort::Status(nullptr);
  return Ort::Status(("respin::" + std::string(op) + " (CUDA): " + respin_cuda_last_error()).c_str(), ORT_FAIL);
}

struct HadamardCuda : CudaKernelBase<HadamardCuda>, HadamardSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    float* y = AllocateOutput<float>(ctx, 0, x.shape);
    return Launched(kName, respin_hadamard(x.data, y, RESPIN_FLOAT32, LeadingSize(x.shape), static_cast<int>(n),
                                           nullptr, ctx.GetGPUComputeStream()));
  }
};

struct DynamicQuantizeCuda : CudaKernelBase<DynamicQuantizeCuda>, DynamicQuantizeSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    int8_t* q = AllocateOutput<int8_t>(ctx, 0, x.shape);
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    return Launched(kName, respin_quantize_rows(x.data, RESPIN_FLOAT32, LeadingSize(x.shape), static_cast<int>(x.last()),
                                                hadamard.n > 0, params.bits, params.symmetric, params.clip, 0, q,
                                                scale, zp,
                                                nullptr, ctx.GetGPUComputeStream()));
  }
};

struct QuantizeKVCuda : CudaKernelBase<QuantizeKVCuda>, QuantizeKVSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0);
    RESPIN_RETURN_IF_ERROR(Validate(x));
    void* q = nullptr;
    RESPIN_RETURN_IF_ERROR(CodesOutput(ctx, x, q));
    float* scale = AllocateOutput<float>(ctx, 1, PerTokenShape(x.shape));
    int8_t* zp = AllocateOutput<int8_t>(ctx, 2, PerTokenShape(x.shape));
    return Launched(kName, respin_quantize_rows(x.data, RESPIN_FLOAT32, LeadingSize(x.shape), static_cast<int>(x.last()),
                                                hadamard.n > 0, params.bits, 0, 1.0f, Packed(), q, scale, zp, nullptr,
                                                ctx.GetGPUComputeStream()));
  }
};

struct DequantizeKVCuda : CudaKernelBase<DequantizeKVCuda>, DequantizeKVSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input q = ReadInput(ctx, 0), scale = ReadInput(ctx, 1), zp = ReadInput(ctx, 2);
    RESPIN_RETURN_IF_ERROR(Validate(q, scale, zp));
    float* y = AllocateOutput<float>(ctx, 0, OutputShape(q));
    return Launched(kName, respin_dequantize_rows(q.data, scale.as<float>(), zp.as<int8_t>(), y, LeadingSize(q.shape),
                                                  static_cast<int>(head_dim), Packed(), nullptr,
                                                  ctx.GetGPUComputeStream()));
  }
};

struct QMatMulCuda : CudaKernelBase<QMatMulCuda>, QMatMulSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input xq = ReadInput(ctx, 0), x_scale = ReadInput(ctx, 1), x_zp = ReadInput(ctx, 2);
    const Input w = ReadInput(ctx, 3), w_scale = ReadInput(ctx, 4), w_zp = ReadInput(ctx, 5);
    const Input bias = ReadInput(ctx, 6);
    RESPIN_RETURN_IF_ERROR(Validate(xq, x_scale, x_zp, w, w_scale, w_zp, bias));
    float* y = AllocateOutput<float>(ctx, 0, OutputShape(xq, w));
    return Launched(kName, respin_qmatmul(xq.as<int8_t>(), x_scale.as<float>(), x_zp.as<int8_t>(), w.data,
                                          static_cast<int>(bits), w_scale.as<float>(), w_zp.as<int8_t>(),
                                          bias.present ? bias.as<float>() : nullptr, y, LeadingSize(xq.shape),
                                          static_cast<int>(K), static_cast<int>(w.shape[0]),
                                          static_cast<int>(group_size), nullptr, ctx.GetGPUComputeStream()));
  }
};

struct ResidualCorrectionCuda : CudaKernelBase<ResidualCorrectionCuda>, ResidualCorrectionSpec {
  Ort::Status Compute(Ort::KernelContext& ctx) {
    const Input x = ReadInput(ctx, 0), q = ReadInput(ctx, 1), mm = ReadInput(ctx, 2), z = ReadInput(ctx, 3);
    RESPIN_RETURN_IF_ERROR(Validate(x, q, mm, z));
    float* y = AllocateOutput<float>(ctx, 0, x.shape);
    return Launched(kName, respin_residual_correction(x.as<float>(), q.as<float>(), mm.as<float>(),
                                                      z.present ? z.as<float>() : nullptr, y,
                                                      LeadingSize(x.shape), static_cast<int>(q.shape[0]),
                                                      static_cast<int>(q.shape[1]), nullptr,
                                                      ctx.GetGPUComputeStream()));
  }
};

}  // namespace

const OrtCustomOp* HadamardCudaOp() {
  static const RespinOp<HadamardCuda> op;
  return &op;
}
const OrtCustomOp* DynamicQuantizeCudaOp() {
  static const RespinOp<DynamicQuantizeCuda> op;
  return &op;
}
const OrtCustomOp* QuantizeKVCudaOp() {
  static const RespinOp<QuantizeKVCuda> op;
  return &op;
}
const OrtCustomOp* DequantizeKVCudaOp() {
  static const RespinOp<DequantizeKVCuda> op;
  return &op;
}
const OrtCustomOp* QMatMulCudaOp() {
  static const RespinOp<QMatMulCuda> op;
  return &op;
}
const OrtCustomOp* ResidualCorrectionCudaOp() {
  static const RespinOp<ResidualCorrectionCuda> op;
  return &op;
}

}  // namespace respin
