// The library's entry point: onnxruntime's SessionOptions.register_custom_ops_library(path) calls
// RegisterCustomOps, which adds the `respin` domain (version 1) with all kernels to the session
// options: the CPU kernels, and the CUDA-EP kernels when the library was built with nvcc (a session
// on the CPU EP never places those; one on the CUDA EP runs them on its stream). Built against the
// API headers of onnxruntime 1.21 (ORT_API_VERSION 21) and not linked to libonnxruntime: every later
// runtime serves that API.
#include <mutex>
#include <vector>

#include "ort_op.h"
#include "respin_ops.h"

namespace {

// One domain for the life of the process: session options keep a pointer to it, never a copy.
OrtStatus* SharedDomain(const OrtApi& api, OrtCustomOpDomain** out) {
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* error = nullptr;
  static std::once_flag once;
  std::call_once(once, [&api] {
    OrtCustomOpDomain* d = nullptr;
    if ((error = api.CreateCustomOpDomain(respin::kDomain, &d)) != nullptr) return;
    const std::vector<const OrtCustomOp*> ops = {
        respin::HadamardOp(),       respin::DynamicQuantizeOp(), respin::QMatMulOp(),
        respin::ResidualCorrectionOp(), respin::QuantizeKVOp(), respin::DequantizeKVOp(),
#ifdef RESPIN_WITH_CUDA
        respin::HadamardCudaOp(),   respin::DynamicQuantizeCudaOp(), respin::QMatMulCudaOp(),
        respin::ResidualCorrectionCudaOp(), respin::QuantizeKVCudaOp(), respin::DequantizeKVCudaOp(),
#endif
    };
    for (const OrtCustomOp* op : ops) {
      if ((error = api.CustomOpDomain_Add(d, op)) != nullptr) {
        api.ReleaseCustomOpDomain(d);
        return;
      }
    }
    domain = d;
  });
  if (domain == nullptr) {
    return api.CreateStatus(ORT_FAIL, error ? api.GetErrorMessage(error) : "respin: could not create the op domain");
  }
  *out = domain;
  return nullptr;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than the headers: answer through the oldest API
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "respin ops library needs onnxruntime >= 1.21 (ORT API version 21)");
  }
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = SharedDomain(*api, &domain)) return status;
  return api->AddCustomOpDomain(options, domain);
}
