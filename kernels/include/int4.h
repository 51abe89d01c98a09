// Packed signed 4-bit codes, as runtime_ops/schema.py fixes them (MatMulNBits' nibble order):
// two codes per uint8, element 2j in the low nibble and 2j+1 in the high nibble, each nibble
// holding q + 8 ∈ [0, 15]; an odd last axis is padded with code 0 (nibble 8).
#pragma once

#include <cstddef>
#include <cstdint>

namespace respin::int4 {

constexpr int64_t PackedSize(int64_t k) { return (k + 1) / 2; }

// codes int8 [k] in [−8, 7] → uint8 [⌈k/2⌉] (`reference.pack_int4`).
inline void PackRow(const int8_t* q, int64_t k, uint8_t* packed) {
  for (int64_t j = 0; j < k / 2; ++j)
    packed[j] = static_cast<uint8_t>((q[2 * j] + 8) | ((q[2 * j + 1] + 8) << 4));
  if (k % 2) packed[k / 2] = static_cast<uint8_t>((q[k - 1] + 8) | (8 << 4));
}

// uint8 [⌈k/2⌉] → codes [k] in [−8, 7] as T (int8 for storage, int16 for the GEMM) (`unpack_int4`).
template <class T>
inline void UnpackRow(const uint8_t* packed, int64_t k, T* q) {
  for (int64_t j = 0; j < k / 2; ++j) {
    q[2 * j] = static_cast<T>((packed[j] & 0x0F) - 8);
    q[2 * j + 1] = static_cast<T>((packed[j] >> 4) - 8);
  }
  if (k % 2) q[k - 1] = static_cast<T>((packed[k / 2] & 0x0F) - 8);
}

}  // namespace respin::int4
