// Element types of the CUDA kernels' float inputs: float32, float16 and bfloat16, converted by bit
// manipulation so that host emulation and GPU give the same values (round to nearest even on the
// way back, NaN kept as a quiet NaN).
#pragma once

#include <cstdint>
#include <cstring>

#include "exec.cuh"

namespace respin::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

RESPIN_HD uint32_t FloatBits(float f) {
#if RESPIN_ON_DEVICE
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

RESPIN_HD float BitsFloat(uint32_t u) {
#if RESPIN_ON_DEVICE
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RESPIN_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return BitsFloat(sign | 0x7F800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return BitsFloat(sign);
  int e = -1;  // subnormal: normalize
  do {
    mantissa <<= 1;
    ++e;
  } while ((mantissa & 0x400u) == 0);
  return BitsFloat(sign | (static_cast<uint32_t>(112 - e) << 23) | ((mantissa & 0x3FFu) << 13));
}

RESPIN_HD uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 .. 24
    const uint32_t value = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    const uint32_t rounded = value + ((rest > half || (rest == half && (value & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | rounded);
  }
  const uint32_t rebased = abs - 0x38000000u;  // exponent 127 → 15
  const uint32_t value = rebased >> 13, rest = rebased & 0x1FFFu;
  const uint32_t rounded = value + ((rest > 0x1000u || (rest == 0x1000u && (value & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);
}

RESPIN_HD float BFloat16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

RESPIN_HD uint16_t FloatToBFloat16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Storage and conversion of one element type: Raw is what lies in memory.
struct Float32 {
  using Raw = float;
  static constexpr DType kType = DType::kFloat32;
  RESPIN_HD static float Load(Raw v) { return v; }
  RESPIN_HD static Raw Store(float v) { return v; }
};
struct Float16 {
  using Raw = uint16_t;
  static constexpr DType kType = DType::kFloat16;
  RESPIN_HD static float Load(Raw v) { return HalfToFloat(v); }
  RESPIN_HD static Raw Store(float v) { return FloatToHalf(v); }
};
struct BFloat16 {
  using Raw = uint16_t;
  static constexpr DType kType = DType::kBFloat16;
  RESPIN_HD static float Load(Raw v) { return BFloat16ToFloat(v); }
  RESPIN_HD static Raw Store(float v) { return FloatToBFloat16(v); }
};

inline int DTypeBytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace respin::cuda
