// Types and checks shared by the CPU sources, the CUDA sources and the bindings.
//
// Tensors cross the Python boundary as raw addresses (uintptr_t) plus a dtype
// code; the codes below are the contract with minipt/ops/_native.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// A function compiled for the host and, by nvcc, for the device as well.
#if defined(__CUDACC__)
#define MINIPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MINIPT_HOST_DEVICE inline
#endif

namespace minipt {

// Floating-point element types of logits and attention inputs (_native.py: FLOAT_CODES).
enum class FloatType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline FloatType float_type(int code, const char* op, const char* arg) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(op) + ": " + arg +
                                " dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<FloatType>(code);
}

// Size in bytes of an integer element (ids, targets, masks): 1, 4 or 8.
inline void check_int_size(int64_t size, const char* op, const char* arg, bool allow_byte) {
  if (size == 4 || size == 8 || (allow_byte && size == 1)) return;
  throw std::invalid_argument(std::string(op) + ": " + arg + " element size must be " +
                              (allow_byte ? "1, 4 or 8" : "4 or 8") + " bytes, got " + std::to_string(size));
}

inline void check(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

// A null address is only acceptable for an empty tensor.
inline void check_ptr(uintptr_t ptr, int64_t numel, const char* op, const char* arg) {
  check(ptr != 0 || numel == 0, op, std::string(arg) + " is a null pointer for a non-empty tensor");
}

// Host-side float16 / bfloat16 conversions, bit-exact with PyTorch's (round to
// nearest even), written out because x86-64's baseline has no half type.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: man · 2^-24, exact in float32.
  const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;              // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;             // rounds to at least 65520: inf
  if (a < 0x38800000u) {                                   // below 2^-14: subnormal or zero
    // Adding 0.5 makes the FPU round the mantissa to 2^-24 steps, to nearest even.
    const float shifted = bits_to_float(a) + 0.5f;
    return sign | static_cast<uint16_t>(float_to_bits(shifted) - 0x3f000000u);
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias 127 -> 15 and round to nearest even
  return sign | static_cast<uint16_t>(r >> 13);
}

// tanh(y) in float32 to a few ulp, from e = exp(-2|y|) computed by the caller's own fast exp (the CPU's
// exp_approx, CUDA's __expf; CUDA's tanhf becomes the hardware tanh.approx, good to 2^-11 only, under
// --use_fast_math): |tanh y| = (1 - e) / (1 + e), and below |y| = 1/4, where 1 - e cancels to a few ulp of 1,
// the Taylor series to y^9 (relative error under 1e-8 there). Branch-free, so loops over it vectorise.
// ±inf give ±1 (e = 0); NaN passes through e.
MINIPT_HOST_DEVICE float tanh_from_exp(float y, float e) {
  const float a = fabsf(y);
  const float a2 = a * a;
  const float series =
      a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f + a2 * (62.0f / 2835.0f)))));
  return copysignf(a < 0.25f ? series : (1.0f - e) / (1.0f + e), y);
}

}  // namespace minipt
