// What the CUDA kernels share: launch and pointer checks, dtype conversion, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace minipt {

constexpr unsigned FULL_WARP = 0xffffffffu;

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Every launch is followed by this: a bad configuration or an earlier sticky
// error becomes a Python RuntimeError instead of a silent no-op.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + ": CUDA launch failed: " + cudaGetErrorString(err));
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// A host pointer or another device's memory in a kernel is an illegal access
// that kills the CUDA context; one attribute query per tensor refuses it first.
inline void check_device_pointer(uintptr_t ptr, int64_t numel, const char* op, const char* arg) {
  if (numel == 0) return;
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so the next launch check does not report it
    throw std::invalid_argument(std::string(op) + ": " + arg + " is not a CUDA pointer (" +
                                cudaGetErrorString(err) + ")");
  }
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if ((attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) || attr.device != device) {
    throw std::invalid_argument(std::string(op) + ": " + arg + " must be memory of the current CUDA device " +
                                std::to_string(device) + " (memory type " + std::to_string(attr.type) + ", device " +
                                std::to_string(attr.device) + ")");
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_WARP, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_WARP, v, offset);
  return v;
}

// Calls f(T{}) with T the element type of `dtype`, so a launcher is written once.
template <typename F>
void dispatch_float(FloatType dtype, F&& f) {
  switch (dtype) {
    case FloatType::f32: f(float{}); break;
    case FloatType::f16: f(__half{}); break;
    case FloatType::bf16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace minipt
