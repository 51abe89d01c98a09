// librespin_cuda.so / the CUDA half of librespin_ops.so: the kernel programs as GPU kernels
// (exec.cuh's ProgramKernel) behind the C API of api.h. Pointers are device memory; launches are
// asynchronous on the caller's stream.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "api_impl.h"

namespace {

void Check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

int CurrentDevice() {
  int device = 0;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

struct DeviceBackend {
  static constexpr bool kDevice = true;

  template <class Program>
  static void Launch(const respin::cuda::LaunchConfig& cfg, const typename Program::Params& p, void* stream) {
    const auto kernel = respin::cuda::ProgramKernel<Program>;
    if (cfg.shared_bytes > 48 * 1024)
      Check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.shared_bytes)),
            "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    kernel<<<dim3(cfg.grid_x, cfg.grid_y), cfg.threads, cfg.shared_bytes, static_cast<cudaStream_t>(stream)>>>(p);
    Check(cudaGetLastError(), "kernel launch");
  }

  // H_m's sign masks in device memory, uploaded once per (device, m) and kept for the process.
  static const uint64_t* CoreMasks(int m) {
    static std::mutex mutex;
    static std::map<std::pair<int, int>, uint64_t*> cache;
    const int device = CurrentDevice();
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find({device, m});
    if (it != cache.end()) return it->second;
    const std::vector<uint64_t> masks = respin::cuda::CoreSignMasks(m);
    uint64_t* data = nullptr;
    Check(cudaMalloc(&data, masks.size() * sizeof(uint64_t)), "cudaMalloc");
    Check(cudaMemcpy(data, masks.data(), masks.size() * sizeof(uint64_t), cudaMemcpyHostToDevice), "cudaMemcpy");
    cache[{device, m}] = data;
    return data;
  }

  static size_t MaxSharedBytes() {
    int bytes = 0;
    Check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, CurrentDevice()),
          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    return static_cast<size_t>(bytes);
  }
};

}  // namespace

RESPIN_CUDA_DEFINE_API(DeviceBackend)
