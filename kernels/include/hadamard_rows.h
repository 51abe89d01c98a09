// The CPU Hadamard transform of rows, shared by respin::Hadamard and the fused quantizers
// (DynamicQuantize / QuantizeKV with `hadamard` > 0): cpu/hadamard.cc has the row kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ort_op.h"

namespace respin {

// y = x·H_n/√n for one row of n = pow2·m floats (x and y do not alias); core = H_m [m, m] as float;
// scratch holds 2n floats (unused for m = 1). Float32, bit-exact across the ISA clones.
void HadamardTransformRow(const float* x, float* y, int64_t n, int64_t m, int64_t pow2, const float* core,
                          float scale, float* scratch);

// H_n prepared for a kernel: its factorization, the core as floats, 1/√n.
struct HadamardRows {
  static constexpr int64_t kMaxCore = 4096;  // H_m is held as float [m, m]; larger cores are refused

  int64_t n = 0, m = 1, pow2 = 1;
  std::vector<float> core;
  float scale = 1.0f;

  // n and m as the attributes give them (already checked against the construction by the spec).
  Ort::Status Init(const char* op, int64_t size, int64_t core_size);
  int64_t ScratchFloats() const { return m == 1 ? 0 : 2 * n; }
  int64_t Work() const;  // operations per row, for task sizing
  void Apply(const float* x, float* y, float* scratch) const {
    HadamardTransformRow(x, y, n, m, pow2, core.data(), scale, scratch);
  }
};

}  // namespace respin
