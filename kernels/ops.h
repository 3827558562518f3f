// Entry points of the kernels, called by bindings.cpp once it has checked the
// arguments. Addresses are uintptr_t, streams are cudaStream_t passed as uintptr_t,
// so this header needs neither pybind11 nor the CUDA headers.
#pragma once

#include <cstdint>

#include "common.h"

namespace minipt {

// ---------------------------------------------------------------- cross-entropy
// Per row i of the (N, V) logits x, capped to c = s·tanh(x / s) when softcap s > 0
// (else c = x): lse[i] = logsumexp(c_i) and
//   loss[i] = lse - (1 - ε)·c_i[t_i] - (ε / V)·Σ_j c_ij + z·lse²,   0 where t_i == ignore_index.
// Forward writes loss (N,) and lse (N,) in float32.
struct CrossEntropyArgs {
  uintptr_t logits;       // (N, V), FloatType
  uintptr_t target;       // (N,), int32 or int64
  uintptr_t lse;          // (N,) float32: written by the forward, read by the backward
  int64_t n_rows;
  int64_t n_classes;
  FloatType dtype;
  int64_t target_size;  // 4 or 8 bytes
  int64_t ignore_index;
  float label_smoothing;
  float softcap;  // s > 0, or 0 for no cap
  float z_loss;   // z >= 0
};

// Returns the number of rows whose target is outside [0, V) and not ignore_index
// (their loss is NaN and their gradient zero); `first_bad` receives one of them.
int64_t cross_entropy_forward_cpu(const CrossEntropyArgs& a, uintptr_t loss, int num_threads, int64_t* first_bad);

// grad_logits[i, j] = (softmax(c_i)_j·(1 + 2z·lse_i) - (1 - ε)·[j == t_i] - ε / V)·(1 - (c_ij / s)²)·grad_rows[i]
// (the last factor only with a cap), zero on ignored rows. grad_rows (N,) is float32, grad_logits has the logits' dtype.
void cross_entropy_backward_cpu(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits,
                                int num_threads);

#ifdef MINIPT_WITH_CUDA
// Out-of-range targets cannot raise from a kernel: their row's loss is NaN.
void cross_entropy_forward_cuda(const CrossEntropyArgs& a, uintptr_t loss, uintptr_t stream);
void cross_entropy_backward_cuda(const CrossEntropyArgs& a, uintptr_t grad_rows, uintptr_t grad_logits,
                                 uintptr_t stream);
#endif

// ---------------------------------------------------------------- MLM masking
struct MlmMaskArgs {
  uintptr_t input_ids;  // (n,), int32 or int64
  uintptr_t special;    // (n,) or 0; nonzero marks a special token
  uintptr_t masked;     // (n,), dtype of input_ids
  uintptr_t labels;     // (n,), dtype of input_ids
  int64_t numel;
  int64_t id_size;       // 4 or 8 bytes
  int64_t special_size;  // 1, 4 or 8 bytes
  int64_t mask_token_id;
  int64_t vocab_size;
  float mlm_probability;
  uint64_t seed;
};

void mlm_mask_cpu(const MlmMaskArgs& a, int num_threads);
#ifdef MINIPT_WITH_CUDA
void mlm_mask_cuda(const MlmMaskArgs& a, uintptr_t stream);
#endif

// ---------------------------------------------------------------- attention
struct AttentionArgs {
  uintptr_t q, k, v;   // (B, H, T, D), FloatType, laid out by the strides below
  uintptr_t out;       // dense (B, T, H, D) memory, FloatType: heads merge for free
  uintptr_t lse;       // (B, H, T) float32, base-2 log-sum-exp of the scaled scores; +inf for a row with no key
  uintptr_t key_mask;  // (B, T) uint8, nonzero = real token, or 0 for no padding
  uintptr_t doc_span;  // (B, 2, T) int32, each position's document [start, end) (starts, then ends), or 0
  int64_t batch, heads, seq_len, head_dim;
  FloatType dtype;
  bool is_causal;
  float scale;
  // Sliding window: query i sees keys i - window_left <= j <= i + window_right; -1 leaves a side unbounded.
  int64_t window_left, window_right;
  // Element strides of q, k and v (one set for all three) along B, H and T; D is contiguous. The C++
  // kernels take any, so a model's heads split from one (B, T, 3·H·D) projection need no copy; the
  // CUDA kernels take dense (B, H, T, D) only: H·T·D, T·D and D.
  int64_t stride_b, stride_h, stride_t;
};

struct AttentionGrads {
  uintptr_t grad_out;          // dense (B, T, H, D) memory (the gradient of the out view), FloatType
  uintptr_t delta;             // (B, H, T) float32 scratch: rowsum(dO · O)
  // FloatType; dense (B, T, H, D) memory like out from the C++ kernels (so that the heads of a
  // model's projection merge their gradients without a transpose), dense (B, H, T, D) from CUDA's.
  uintptr_t grad_q, grad_k, grad_v;
};

// The C++ kernels' tiles (queries, keys), bound as _C.attention_cpu_tile for tests
// that poison what a skipped tile would read. Any head_dim >= 1.
constexpr int64_t ATTENTION_CPU_BLOCK_Q = 64;
constexpr int64_t ATTENTION_CPU_BLOCK_K = 64;
void attention_forward_cpu(const AttentionArgs& a, int num_threads);
void attention_backward_cpu(const AttentionArgs& a, const AttentionGrads& g, int num_threads);

// head_dim 64 or 128.
#ifdef MINIPT_WITH_CUDA
void attention_forward_cuda(const AttentionArgs& a, uintptr_t stream);
void attention_backward_cuda(const AttentionArgs& a, const AttentionGrads& g, uintptr_t stream);
#endif

}  // namespace minipt
