// Cross-entropy on the GPU: one block per row, 16-byte loads, float32 maths.
//
// Forward: each thread folds its elements into an online log-sum-exp (m, s) plus
// Σ x, eight (bf16/fp16) or four (fp32) elements per step so that the rescale
// exp is paid once per vector; each warp, then the block, merges the threads'
// (m, s) pairs: the max, then the sums rescaled to it.
//   loss = lse - (1 - ε)·x[t] - (ε / V)·Σ x,   lse = m + log s
// Backward: grad = (exp(x - lse) - ε/V - (1 - ε)·[j == t])·g from the saved lse.
//
// Rows start wherever row·V·sizeof(T) falls, so each row is walked as a scalar
// head up to the first 16-byte boundary, a vector body, and a scalar tail: V
// need not be a multiple of anything (GPT-2's 50257 included).
//
// -inf logits (masked columns) never make NaN: a step of -inf adds nothing and
// is skipped, a merge of -inf maxima rescales nothing, the smoothing term is left
// out when ε = 0 (Σ x is -inf), and __expf(-inf) = 0 is their gradient.
//
// Soft-capping (softcap s > 0) is a template flag, so the plain kernels are what
// they were: the capped forward replaces each loaded x by c = s·tanh(x / s), the
// capped backward does the same and multiplies the gradient by 1 - tanh². The
// z-loss needs no flag: the forward adds z·lse² per row, and the backward scales
// the softmax by k = 1 + 2z·lse, exactly 1 for z = 0. tanh is common.h's
// tanh_from_exp on __expf: under --use_fast_math nvcc's tanhf is tanh.approx (2^-11).
//
// Memory traffic: forward reads NV, backward reads NV and writes NV; at H100's
// ~3 TB/s a (16k, 50k) bf16 batch is ~1.1 ms forward and ~2.2 ms backward.
#include <climits>
#include <cmath>
#include <type_traits>

#include "cuda_common.cuh"
#include "ops.h"

namespace minipt {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

using One = std::integral_constant<int, 1>;

// Visits x[0, V) of one row as head / vector body / tail, calling
// f(values, count, first_index) with count an integral_constant of 1 or VEC, so
// that the loops over a chunk unroll and the values stay in registers.
template <typename T, typename F>
__device__ __forceinline__ void for_each_chunk(const T* x, int64_t V, F&& f) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(x) % 16) / sizeof(T));
  const int64_t head = misalign == 0 ? 0 : (V < VEC - misalign ? V : VEC - misalign);
  const int64_t n_vec = (V - head) / VEC;
  float v[VEC];
  for (int64_t j = threadIdx.x; j < head; j += THREADS) {
    v[0] = to_float(x[j]);
    f(v, One{}, j);
  }
  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  for (int64_t k = threadIdx.x; k < n_vec; k += THREADS) {
    const uint4 raw = __ldg(body + k);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = to_float(elems[e]);
    f(v, std::integral_constant<int, VEC>{}, head + k * VEC);
  }
  for (int64_t j = head + n_vec * VEC + threadIdx.x; j < V; j += THREADS) {
    v[0] = to_float(x[j]);
    f(v, One{}, j);
  }
}

// Combines the lanes' (m, s, Σx) into warp-wide totals, the same in every lane:
// the max first, then each s rescaled to it and summed. A lane that saw only -inf
// has s = 0; when every lane did, the rescale exp(-inf - -inf) would be NaN.
__device__ __forceinline__ void warp_merge(float& m, float& s, float& sum_x) {
  const float wm = warp_max(m);
  s = warp_sum(wm == -INFINITY ? 0.0f : s * __expf(m - wm));
  m = wm;
  sum_x = warp_sum(sum_x);
}

__device__ __forceinline__ float tanh_fast(float y) { return tanh_from_exp(y, __expf(-2.0f * fabsf(y))); }

template <typename T, typename Target, bool SOFTCAP>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_forward_kernel(const T* __restrict__ logits, const Target* __restrict__ target,
                                 float* __restrict__ loss, float* __restrict__ lse, int64_t V, int64_t ignore_index,
                                 float eps, float softcap, float z_loss) {
  const int64_t row = blockIdx.x;
  const int64_t t = static_cast<int64_t>(target[row]);
  if (t == ignore_index || t < 0 || t >= V) {  // the block leaves together: no barrier is skipped
    if (threadIdx.x == 0) {
      // An out-of-range target cannot raise here; NaN makes the loss show it.
      loss[row] = t == ignore_index ? 0.0f : NAN;
      lse[row] = t == ignore_index ? 0.0f : NAN;
    }
    return;
  }
  const T* x = logits + row * V;  // int64: N·V exceeds 2^31 for a real LM batch

  const float inv_cap = SOFTCAP ? 1.0f / softcap : 0.0f;
  float m = -INFINITY, s = 0.0f, sum_x = 0.0f;
  for_each_chunk(x, V, [&](float* v, auto count, int64_t) {
    if (SOFTCAP) {
#pragma unroll
      for (int e = 0; e < decltype(count)::value; ++e) v[e] = softcap * tanh_fast(v[e] * inv_cap);
    }
    float vmax = v[0];
#pragma unroll
    for (int e = 0; e < decltype(count)::value; ++e) {
      vmax = fmaxf(vmax, v[e]);
      sum_x += v[e];
    }
    if (vmax == -INFINITY) return;  // adds nothing; avoids exp(-inf - -inf) = NaN
    if (vmax > m) {
      s *= __expf(m - vmax);
      m = vmax;
    }
#pragma unroll
    for (int e = 0; e < decltype(count)::value; ++e) s += __expf(v[e] - m);  // NaN logits make s NaN, as in torch
  });

  warp_merge(m, s, sum_x);
  __shared__ float shared_m[WARPS], shared_s[WARPS], shared_sum_x[WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
    shared_sum_x[warp] = sum_x;
  }
  __syncthreads();
  if (warp != 0) return;
  m = lane < WARPS ? shared_m[lane] : -INFINITY;
  s = lane < WARPS ? shared_s[lane] : 0.0f;
  sum_x = lane < WARPS ? shared_sum_x[lane] : 0.0f;
  warp_merge(m, s, sum_x);
  if (lane == 0) {
    const float row_lse = isnan(sum_x) ? NAN : m + __logf(s);
    // With ε = 0 the smoothing term is skipped, not multiplied by 0: Σ x may be -inf.
    const float smooth = eps > 0.0f ? eps / static_cast<float>(V) * sum_x : 0.0f;
    const float x_t = SOFTCAP ? softcap * tanh_fast(to_float(x[t]) * inv_cap) : to_float(x[t]);
    lse[row] = row_lse;
    loss[row] = row_lse - (1.0f - eps) * x_t - smooth + (z_loss != 0.0f ? z_loss * row_lse * row_lse : 0.0f);
  }
}

template <typename T, typename Target, bool SOFTCAP>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_backward_kernel(const T* __restrict__ logits, const Target* __restrict__ target,
                                  const float* __restrict__ lse, const float* __restrict__ grad_rows,
                                  T* __restrict__ grad_logits, int64_t V, int64_t ignore_index, float eps,
                                  float softcap, float z_loss, bool vector_store) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const int64_t t = static_cast<int64_t>(target[row]);
  const bool zero = t == ignore_index || t < 0 || t >= V;
  const float g = zero ? 0.0f : grad_rows[row];
  const float row_lse = zero ? 0.0f : lse[row];
  const float k = 1.0f + 2.0f * z_loss * row_lse;  // the z-loss's scale of the softmax
  const float smooth = eps / static_cast<float>(V);
  const float inv_cap = SOFTCAP ? 1.0f / softcap : 0.0f;
  const T* x = logits + row * V;
  T* out = grad_logits + row * V;
  for_each_chunk(x, V, [&](const float* v, auto count, int64_t first) {
    constexpr int n = decltype(count)::value;
    alignas(16) T vals[VEC];
#pragma unroll
    for (int e = 0; e < n; ++e) {
      const float target_term = first + e == t ? 1.0f - eps : 0.0f;
      float grad;
      if (SOFTCAP) {
        const float th = tanh_fast(v[e] * inv_cap);
        grad = (__expf(softcap * th - row_lse) * k - smooth - target_term) * g * (1.0f - th * th);
      } else {
        grad = (__expf(v[e] - row_lse) * k - smooth - target_term) * g;
      }
      vals[e] = from_float<T>(zero ? 0.0f : grad);
    }
    // out shares x's offset within 16 bytes when vector_store, so x's vector chunks are out's.
    if (n == VEC && vector_store) {
      *reinterpret_cast<uint4*>(out + first) = *reinterpret_cast<const uint4*>(vals);
    } else {
#pragma unroll
      for (int e = 0; e < n; ++e) out[first + e] = vals[e];
    }
  });
}

// Calls f(std::bool_constant<softcap > 0>{}), so a launcher picks the kernel's SOFTCAP flag once.
template <typename F>
void dispatch_softcap(float softcap, F&& f) {
  if (softcap > 0.0f) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename Target>
void launch_forward(const CrossEntropyArgs& a, uintptr_t loss, cudaStream_t stream) {
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_softcap(a.softcap, [&](auto cap) {
      cross_entropy_forward_kernel<T, Target, decltype(cap)::value>
          <<<static_cast<unsigned>(a.n_rows), THREADS, 0, stream>>>(
              reinterpret_cast<const T*>(a.logits), reinterpret_cast<const Target*>(a.target),
              reinterpret_cast<float*>(loss), reinterpret_cast<float*>(a.lse), a.n_classes, a.ignore_index,
              a.label_smoothing, a.softcap, a.z_loss);
    });
  });
  check_launch("cross_entropy_forward_kernel");
}

template <typename Target>
void launch_backward(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits, cudaStream_t stream) {
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_softcap(a.softcap, [&](auto cap) {
      cross_entropy_backward_kernel<T, Target, decltype(cap)::value>
          <<<static_cast<unsigned>(a.n_rows), THREADS, 0, stream>>>(
              reinterpret_cast<const T*>(a.logits), reinterpret_cast<const Target*>(a.target),
              reinterpret_cast<const float*>(a.lse), reinterpret_cast<const float*>(grad_rows),
              reinterpret_cast<T*>(grad_logits), a.n_classes, a.ignore_index, a.label_smoothing, a.softcap,
              a.z_loss, a.logits % 16 == grad_logits % 16);
    });
  });
  check_launch("cross_entropy_backward_kernel");
}

// One block per row: gridDim.x caps the rows of one launch.
void check_args(const CrossEntropyArgs& a) {
  check(a.n_rows <= INT_MAX, "cross_entropy",
        "CUDA kernels take at most 2^31 - 1 rows, got " + std::to_string(a.n_rows));
  check_device_pointer(a.logits, a.n_rows * a.n_classes, "cross_entropy", "logits");
  check_device_pointer(a.target, a.n_rows, "cross_entropy", "target");
  check_device_pointer(a.lse, a.n_rows, "cross_entropy", "lse");
}

}  // namespace

void cross_entropy_forward_cuda(const CrossEntropyArgs& a, uintptr_t loss, uintptr_t stream) {
  check_args(a);
  check_device_pointer(loss, a.n_rows, "cross_entropy", "loss");
  if (a.n_rows == 0) return;
  if (a.target_size == 8) {
    launch_forward<int64_t>(a, loss, as_stream(stream));
  } else {
    launch_forward<int32_t>(a, loss, as_stream(stream));
  }
}

void cross_entropy_backward_cuda(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits,
                                 uintptr_t stream) {
  check_args(a);
  check_device_pointer(grad_rows, a.n_rows, "cross_entropy", "grad_rows");
  check_device_pointer(grad_logits, a.n_rows * a.n_classes, "cross_entropy", "grad_logits");
  if (a.n_rows == 0) return;
  if (a.target_size == 8) {
    launch_backward<int64_t>(a, grad_rows, grad_logits, as_stream(stream));
  } else {
    launch_backward<int32_t>(a, grad_rows, grad_logits, as_stream(stream));
  }
}

}  // namespace minipt
