// The custom ops of domain `respin` (version 1) implemented by this library, one factory per op
// (cpu/*.cc, and cuda/ort_cuda_ops.cc when built with CUDA); cpu/register.cc adds them to a session's options. Names, inputs, attributes and
// dtypes follow runtime_ops/schema.py.
#pragma once

#include <onnxruntime_c_api.h>

namespace respin {

const OrtCustomOp* HadamardOp();
const OrtCustomOp* DynamicQuantizeOp();
const OrtCustomOp* QuantizeKVOp();
const OrtCustomOp* DequantizeKVOp();
const OrtCustomOp* QMatMulOp();
const OrtCustomOp* ResidualCorrectionOp();

#ifdef RESPIN_WITH_CUDA  // the same ops for the CUDA execution provider (cuda/ort_cuda_ops.cc)
const OrtCustomOp* HadamardCudaOp();
const OrtCustomOp* DynamicQuantizeCudaOp();
const OrtCustomOp* QuantizeKVCudaOp();
const OrtCustomOp* DequantizeKVCudaOp();
const OrtCustomOp* QMatMulCudaOp();
const OrtCustomOp* ResidualCorrectionCudaOp();
#endif

}  // namespace respin
