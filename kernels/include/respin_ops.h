// The custom ops of domain `respin` (version 1) implemented by this library, one factory per op
// (cpu/*.cc); cpu/register.cc adds them to a session's options. Names, inputs, attributes and
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

}  // namespace respin
