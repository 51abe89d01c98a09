// librespin_cuda_host.so: the CUDA kernel programs run on the CPU (exec.cuh's HostExec) behind the
// same C API as the GPU library (api.h), for the tests. Compiled by the host C++ compiler only.
#include <map>
#include <mutex>
#include <vector>

#include "api_impl.h"

namespace {

struct HostBackend {
  static constexpr bool kDevice = false;

  template <class Program>
  static void Launch(const respin::cuda::LaunchConfig& cfg, const typename Program::Params& p, void* /*stream*/) {
    respin::cuda::RunHostGrid<Program>(cfg, p);
  }

  static const uint64_t* CoreMasks(int m) {
    static std::mutex mutex;
    static std::map<int, std::vector<uint64_t>> cache;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(m);
    if (it == cache.end()) it = cache.emplace(m, respin::cuda::CoreSignMasks(m)).first;
    return it->second.data();
  }

  // An H100 / H200's opt-in shared memory per block (227 KiB): the host refuses what the GPU would.
  static size_t MaxSharedBytes() { return 232448; }
};

}  // namespace

RESPIN_CUDA_DEFINE_API(HostBackend)
