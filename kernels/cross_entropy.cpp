// Cross-entropy on the CPU: rows in parallel (OpenMP), each row in SIMD.
//
// Forward, per row: one pass over the logits for max, Σ exp(x - max) and Σ x
// (online log-sum-exp, chunk by chunk: the chunk's max is taken first, and its exp
// pass re-reads it from L1, so memory sees one read of the row), then
//   loss = lse - (1 - ε)·x[t] - (ε / V)·Σ x.
// Backward, per row, from the saved lse: grad = (exp(x - lse) - ε/V)·g, then
// grad[t] -= (1 - ε)·g; one read and one write of the row.
//
// Soft-capping (softcap s > 0) is a template flag, so the plain loops stay as
// they were: the forward caps each 1024-column chunk into an L1 buffer (one
// tanh per logit) and runs the same two passes over it; the backward caps each
// logit as it reads it and multiplies its gradient by 1 - tanh². The z-loss needs
// no flag: the forward adds z·lse² per row, and the backward scales the softmax
// by k = 1 + 2z·lse, which is exactly 1 for z = 0, so the plain path's results
// keep their bits (and e·k - ε/V is one fused multiply-add).
//
// -inf logits (masked columns) never make NaN: a chunk that is all -inf is
// skipped rather than rescaled by exp(-inf - -inf), the smoothing term is left
// out rather than multiplied by 0 when ε = 0 (Σ x is -inf), and their gradient
// is exactly 0.
//
// Memory traffic: forward reads NV, backward reads NV and writes NV, against about
// three reads and two writes of NV for log_softmax + nll_loss and their backward.
// float16/bfloat16 rows are widened to float32 into a per-thread buffer (all maths
// is float32) and gradients narrowed back on the way out.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace minipt {
namespace {

// 4 KiB of float32: the chunk's max pass and exp pass both hit L1.
constexpr int64_t CHUNK = 1024;
// Rows are handed out a few at a time rather than in one static share per thread:
// on a shared machine a thread that loses its core would otherwise hold up the rest.
constexpr int ROWS_PER_GRAB = 8;

// Lane-wise partial results: GCC turns these loops into plain vector code, where
// `omp simd reduction(max)` over std::max compiled to a loop ten times slower.
constexpr int LANES = 16;

inline float tanh_approx(float y) { return tanh_from_exp(y, exp_approx(-2.0f * std::fabs(y))); }

// max, Σ exp(c - max) and Σ c over the row's (capped, with SOFTCAP) logits c.
template <bool SOFTCAP>
MINIPT_CPU_CLONES void row_stats(const float* x, int64_t V, float s_cap, float* lse, float* sum_x) {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.0f, sx = 0.0f;
  float capped[SOFTCAP ? CHUNK : 1];
  const float inv_cap = SOFTCAP ? 1.0f / s_cap : 0.0f;
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t len = std::min(CHUNK, V - c0);
    const float* xc = x + c0;
    if (SOFTCAP) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) capped[j] = s_cap * tanh_approx(xc[j] * inv_cap);
      xc = capped;
    }
    const int64_t body = len - len % LANES;
    float lane_max[LANES], lane_sum[LANES] = {}, lane_exp[LANES] = {};
    std::fill(lane_max, lane_max + LANES, -std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < body; j += LANES) {
#pragma omp simd
      for (int l = 0; l < LANES; ++l) {
        // Written as a comparison so that a NaN logit wins the max and reaches lse.
        lane_max[l] = lane_max[l] > xc[j + l] ? lane_max[l] : xc[j + l];
        lane_sum[l] += xc[j + l];
      }
    }
    float cm = -std::numeric_limits<float>::infinity();
    for (int64_t j = body; j < len; ++j) {
      cm = cm > xc[j] ? cm : xc[j];
      sx += xc[j];
    }
    for (int l = 0; l < LANES; ++l) {
      cm = cm > lane_max[l] ? cm : lane_max[l];
      sx += lane_sum[l];
    }
    // A chunk of -inf logits adds nothing; skipping it avoids exp(-inf - -inf) = NaN.
    if (cm == -std::numeric_limits<float>::infinity()) continue;
    if (cm > m) {
      s *= exp_approx(m - cm);
      m = cm;
    }
    for (int64_t j = 0; j < body; j += LANES) {
#pragma omp simd
      for (int l = 0; l < LANES; ++l) lane_exp[l] += exp_approx(xc[j + l] - m);
    }
    for (int64_t j = body; j < len; ++j) s += exp_approx(xc[j] - m);
    for (int l = 0; l < LANES; ++l) s += lane_exp[l];
  }
  *lse = std::isnan(m) || std::isnan(sx) ? std::numeric_limits<float>::quiet_NaN() : m + std::log(s);
  *sum_x = sx;
}

// out = (softmax(c)·k - ε/V)·g, times 1 - tanh² with SOFTCAP, where k = 1 + 2z·lse.
// out may alias x: each element is read before it is written, at the same index.
// A masked (-inf) logit gets exactly zero softmax, as in torch, because exp_approx
// flushes to 0 below 2^-126; no branch here, so the loop stays vector code.
template <bool SOFTCAP>
MINIPT_CPU_CLONES void row_grad(const float* x, int64_t V, float lse, float k, float smooth_per_class, float g,
                                float s_cap, float* out) {
  if (!SOFTCAP) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) out[j] = (exp_approx(x[j] - lse) * k - smooth_per_class) * g;
    return;
  }
  const float inv_cap = 1.0f / s_cap;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float t = tanh_approx(x[j] * inv_cap);
    out[j] = (exp_approx(s_cap * t - lse) * k - smooth_per_class) * g * (1.0f - t * t);
  }
}

MINIPT_CPU_CLONES void widen_row(const uint16_t* src, FloatType dtype, int64_t V, float* dst) {
  if (dtype == FloatType::bf16) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) dst[j] = bf16_to_float(src[j]);
  } else {
    for (int64_t j = 0; j < V; ++j) dst[j] = f16_to_float(src[j]);
  }
}

MINIPT_CPU_CLONES void narrow_row(const float* src, FloatType dtype, int64_t V, uint16_t* dst) {
  if (dtype == FloatType::bf16) {
    for (int64_t j = 0; j < V; ++j) dst[j] = float_to_bf16(src[j]);
  } else {
    for (int64_t j = 0; j < V; ++j) dst[j] = float_to_f16(src[j]);
  }
}

// Row i of the logits as float32: in place for float32, else widened into buf.
inline const float* row_as_float(const CrossEntropyArgs& a, int64_t i, float* buf) {
  const int64_t offset = i * a.n_classes;  // int64: N·V exceeds 2^31 for a real LM batch
  if (a.dtype == FloatType::f32) return reinterpret_cast<const float*>(a.logits) + offset;
  widen_row(reinterpret_cast<const uint16_t*>(a.logits) + offset, a.dtype, a.n_classes, buf);
  return buf;
}

template <typename Target, bool SOFTCAP>
int64_t forward(const CrossEntropyArgs& a, float* loss, int num_threads, int64_t* first_bad) {
  const Target* target = reinterpret_cast<const Target*>(a.target);
  float* lse = reinterpret_cast<float*>(a.lse);
  const int64_t N = a.n_rows, V = a.n_classes;
  const float eps = a.label_smoothing;
  const bool parallel = num_threads > 1 && N > 1 && N * V >= PARALLEL_MIN_ELEMENTS;
  // Allocated here, not in the parallel region, so that bad_alloc reaches Python.
  std::vector<float> buffers(a.dtype == FloatType::f32 ? 0 : static_cast<size_t>(num_threads) * V);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int64_t n_bad = 0, first = -1;

#pragma omp parallel for schedule(dynamic, ROWS_PER_GRAB) num_threads(num_threads) if (parallel) reduction(+ : n_bad)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (t == a.ignore_index) {
      loss[i] = 0.0f;
      lse[i] = 0.0f;
      continue;
    }
    if (t < 0 || t >= V) {
      loss[i] = nan;
      lse[i] = nan;
      ++n_bad;
#pragma omp critical(minipt_ce_first_bad)
      if (first < 0 || i < first) first = i;
      continue;
    }
    float* buf = buffers.empty() ? nullptr : buffers.data() + static_cast<size_t>(thread_index()) * V;
    const float* x = row_as_float(a, i, buf);
    float row_lse, sum_x;
    row_stats<SOFTCAP>(x, V, a.softcap, &row_lse, &sum_x);
    lse[i] = row_lse;
    // With ε = 0 the smoothing term is skipped, not multiplied by 0: Σ x may be -inf.
    const float smooth = eps > 0.0f ? eps / static_cast<float>(V) * sum_x : 0.0f;
    const float x_t = SOFTCAP ? a.softcap * tanh_approx(x[t] * (1.0f / a.softcap)) : x[t];
    loss[i] = row_lse - (1.0f - eps) * x_t - smooth;
    if (a.z_loss != 0.0f) loss[i] += a.z_loss * row_lse * row_lse;
  }
  *first_bad = first;
  return n_bad;
}

template <typename Target, bool SOFTCAP>
void backward(const CrossEntropyArgs& a, const float* grad_rows, uintptr_t grad_logits, int num_threads) {
  const Target* target = reinterpret_cast<const Target*>(a.target);
  const float* lse = reinterpret_cast<const float*>(a.lse);
  const int64_t N = a.n_rows, V = a.n_classes;
  const float eps = a.label_smoothing;
  const float smooth_per_class = eps / static_cast<float>(V);
  const bool parallel = num_threads > 1 && N > 1 && N * V >= PARALLEL_MIN_ELEMENTS;
  const bool wide = a.dtype == FloatType::f32;
  std::vector<float> buffers(wide ? 0 : static_cast<size_t>(num_threads) * V);
  advise_huge_pages(grad_logits, N * V * (wide ? 4 : 2));

#pragma omp parallel for schedule(dynamic, ROWS_PER_GRAB) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = static_cast<int64_t>(target[i]);
    const int64_t offset = i * V;
    float* buf = wide ? reinterpret_cast<float*>(grad_logits) + offset
                      : buffers.data() + static_cast<size_t>(thread_index()) * V;
    if (t == a.ignore_index || t < 0 || t >= V) {
      std::fill(buf, buf + V, 0.0f);
    } else {
      const float g = grad_rows[i];
      const float* x = row_as_float(a, i, buf);
      // The target's own 1 - tanh², from its logit read before the row is overwritten (buf may be x).
      const float t_t = SOFTCAP ? tanh_approx(x[t] * (1.0f / a.softcap)) : 0.0f;
      const float target_scale = 1.0f - t_t * t_t;
      row_grad<SOFTCAP>(x, V, lse[i], 1.0f + 2.0f * a.z_loss * lse[i], smooth_per_class, g, a.softcap, buf);
      buf[t] -= (1.0f - eps) * g * target_scale;
    }
    if (!wide) narrow_row(buf, a.dtype, V, reinterpret_cast<uint16_t*>(grad_logits) + offset);
  }
}

}  // namespace

int64_t cross_entropy_forward_cpu(const CrossEntropyArgs& a, uintptr_t loss, int num_threads, int64_t* first_bad) {
  float* out = reinterpret_cast<float*>(loss);
  const bool cap = a.softcap > 0.0f;
  if (a.target_size == 8) {
    return cap ? forward<int64_t, true>(a, out, num_threads, first_bad)
               : forward<int64_t, false>(a, out, num_threads, first_bad);
  }
  return cap ? forward<int32_t, true>(a, out, num_threads, first_bad)
             : forward<int32_t, false>(a, out, num_threads, first_bad);
}

void cross_entropy_backward_cpu(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits,
                                int num_threads) {
  const float* g = reinterpret_cast<const float*>(grad_rows);
  const bool cap = a.softcap > 0.0f;
  if (a.target_size == 8) {
    cap ? backward<int64_t, true>(a, g, grad_logits, num_threads)
        : backward<int64_t, false>(a, g, grad_logits, num_threads);
  } else {
    cap ? backward<int32_t, true>(a, g, grad_logits, num_threads)
        : backward<int32_t, false>(a, g, grad_logits, num_threads);
  }
}

}  // namespace minipt
