// Masked softmax attention on the CPU, flash-style: the (T, T) scores never
// exist whole, only (BLOCK_K, BLOCK_Q) tiles of them, which stay in L1/L2.
//
// Tiles are stored transposed, one key per row and one query per column,
// S_t[j][i] = k_j · q_i, so that every product is one small GEMM whose output
// columns are contiguous and whose inner loop is a vector FMA (gemm() below):
//   scores    S_t  = K_blk · Q_tᵀ        Q_t: the query block transposed, (D, BLOCK_Q)
//   forward   O   += P · V_blk          P read from P_t with swapped strides
//   backward  dP_t = V_blk · dO_tᵀ,  dV += P_t · dO,  dK += dS_t · Q,  dQ += dS · K_blk
// Per-query statistics (max, sum, lse, delta) then run along a row of a tile,
// which vectorises too. Only the query side is ever transposed: once per query
// block in the forward, once per head in the backward.
//
// Forward, one task per (batch, head, block of BLOCK_Q queries), online softmax
// in base 2 as in the CUDA and Triton kernels: scores are pre-scaled by
// scale·log2(e) (folded into Q_t), then per key tile
//   m' = max(m, max_j s_j);  p_j = 2^(s_j - m');  l = l·2^(m - m') + Σ p_j;  o = o·2^(m - m') + Σ p_j v_j
// and finally out = o / l, lse = m + log2(l): +inf for a query with no visible
// key, whose output is then 0 and whose recomputed p are all 2^-inf = 0.
// Backward, one task per (batch, head), which owns the head's dQ, dK and dV, so
// that nothing is shared between threads: for each key tile, over the query
// tiles that can see it,
//   p = 2^(s - lse),  dP = dO·vᵀ,  dS = p·(dP - delta),  delta_i = Σ_d dO_i·O_i,
//   dV_j += Σ_i p_ij dO_i,  dK_j += scale·Σ_i dS_ij q_i,  dQ_i += scale·Σ_j dS_ij k_j.
// Five GEMMs per tile (S and dP computed once, as FlashAttention-2 does in one
// kernel), against seven for a separate dQ pass that recomputes them. Each
// output is accumulated by one thread in a fixed order: the results are the
// same bits for any thread count. The price is parallelism of B·H tasks.
//
// Masks. Key j is visible from query i iff key_mask[b, j] != 0, when causal
// j <= i, with packed documents both lie in one document, and with a window
// i - left <= j <= i + right. For a key those queries form one interval,
// [max(j if causal, doc_start(j), j - right), min(doc_end(j), j + left + 1)), so
// a tile row is masked by two fills at most. Tiles are never visited when their
// keys are all padding, lie after the causal bound, in other documents or
// outside the window: a query block walks keys from its first query's document
// start or window start to its last query's document end, diagonal or window
// end, a key block walks the queries from its first key's document start,
// diagonal or window start to its last key's document end or window end. Tiles
// start where those ranges start, not on multiples of the tile size, so a
// document's tiles begin at the document and a window's at the window.
//
// Layout. Q, K and V are read through their strides along B, H and T (D
// contiguous), so the heads a model splits from one (B, T, 3·H·D) projection
// need no copy; O, dO, dQ, dK and dV are dense (B, T, H, D) memory, so that
// heads merge as a view and their gradients reach the projection untransposed.
//
// Memory traffic of the forward: Q, O and lse once, K and V once per query
// block: (2·T/BLOCK_Q + 2)·BHTD elements; with BLOCK_Q = 64 and T = 1024 K and
// V come 16 times, from L2/L3 (one head's K and V is 2·T·D·4 bytes, 512 KiB).
// The backward reads Q, K, V (in place when dense float32 rows), O and dO once
// into per-thread float32 copies (Q and dO transposed as well), writes dQ, dK
// and dV once, and re-reads one head's copies from cache per key block.
// Compute: 4·BHT²D flops forward and 10·BHT²D backward before masking, halved
// when causal.
//
// Precision. All maths is float32 whatever the input dtype: float16/bfloat16
// elements are widened once as they are copied into tiles, so the GEMMs, the
// softmax statistics and the accumulators (o, l, dQ, dK, dV) never round to
// 16 bits, and each output is rounded once to its dtype at the end. lse stays
// float32 for the backward, and delta uses O as rounded to the output dtype,
// since that is the O whose gradient dO is. 2^x comes from exp2_approx
// (cpu_common.h, 2 ulp), which vectorises and gives exactly 0 for masked -inf.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace minipt {
namespace {

// Queries per tile: the vector dimension of the score tiles and the statistics.
constexpr int64_t BLOCK_Q = ATTENTION_CPU_BLOCK_Q;
// Keys per tile. 64×64 float32 tiles (16 KiB) keep S and dP in L1 beside the
// B operand's rows.
constexpr int64_t BLOCK_K = ATTENTION_CPU_BLOCK_K;
// gemm()'s register block: ROWS output rows of COLS floats, 12 AVX2 registers
// or 6 AVX-512 ones, plus the B row and a broadcast: no spills with 16 registers.
constexpr int ROWS = 6;
constexpr int64_t COLS = 16;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();

static_assert(BLOCK_Q % COLS == 0, "score tiles are whole register blocks wide");

// ----------------------------------------------------------------------------- GEMM
// C[r][c] (+)= Σ_k A[r·a_row + k·a_k]·B[k·ldb + c] on R rows and COLS columns, the
// accumulators in registers: each k loads one B row segment and broadcasts R
// values of A. The strides of A let one kernel read P or P transposed.
template <int R, bool ACCUMULATE>
inline __attribute__((always_inline)) void register_block(int64_t K, const float* __restrict__ A, int64_t a_row,
                                                          int64_t a_k, const float* __restrict__ B, int64_t ldb,
                                                          float* __restrict__ C, int64_t ldc) {
  // The pragmas keep GCC's vectoriser on the column loops: left to itself it
  // unrolls them completely and vectorises across k with shuffles, 4x slower.
  float acc[R][COLS];
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int c = 0; c < COLS; ++c) acc[r][c] = ACCUMULATE ? C[r * ldc + c] : 0.0f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = A[r * a_row + k * a_k];
#pragma omp simd
      for (int c = 0; c < COLS; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int c = 0; c < COLS; ++c) C[r * ldc + c] = acc[r][c];
  }
}

template <bool ACCUMULATE>
inline __attribute__((always_inline)) void rows_of_blocks(int64_t M, int64_t K, const float* A, int64_t a_row,
                                                          int64_t a_k, const float* B, int64_t ldb, float* C,
                                                          int64_t ldc) {
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) {
    register_block<ROWS, ACCUMULATE>(K, A + m * a_row, a_row, a_k, B, ldb, C + m * ldc, ldc);
  }
  A += m * a_row;
  C += m * ldc;
  switch (M - m) {
    case 5: register_block<5, ACCUMULATE>(K, A, a_row, a_k, B, ldb, C, ldc); break;
    case 4: register_block<4, ACCUMULATE>(K, A, a_row, a_k, B, ldb, C, ldc); break;
    case 3: register_block<3, ACCUMULATE>(K, A, a_row, a_k, B, ldb, C, ldc); break;
    case 2: register_block<2, ACCUMULATE>(K, A, a_row, a_k, B, ldb, C, ldc); break;
    case 1: register_block<1, ACCUMULATE>(K, A, a_row, a_k, B, ldb, C, ldc); break;
    default: break;
  }
  static_assert(ROWS == 6, "the switch above handles ROWS - 1 remaining rows");
}

// C (M, N) = A·B, or += when accumulate; A is (M, K) with strides (a_row, a_k), B
// (K, N) and C (M, N) row-major. Columns go COLS at a time, a head dim that is
// not a multiple of COLS ends in a narrower loop.
MINIPT_CPU_CLONES void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_k,
                            const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + COLS <= N; n += COLS) {
    if (accumulate) {
      rows_of_blocks<true>(M, K, A, a_row, a_k, B + n, ldb, C + n, ldc);
    } else {
      rows_of_blocks<false>(M, K, A, a_row, a_k, B + n, ldb, C + n, ldc);
    }
  }
  const int64_t tail = N - n;
  if (tail == 0) return;
  for (int64_t m = 0; m < M; ++m) {
    float acc[COLS];
    for (int64_t c = 0; c < tail; ++c) acc[c] = accumulate ? C[m * ldc + n + c] : 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * a_row + k * a_k];
      const float* b = B + k * ldb + n;
      for (int64_t c = 0; c < tail; ++c) acc[c] += a * b[c];
    }
    for (int64_t c = 0; c < tail; ++c) C[m * ldc + n + c] = acc[c];
  }
}

// ----------------------------------------------------------------------------- loads and stores
// dst[r·D + d] = mul·src[r·stride + d] in float32, for n rows.
MINIPT_CPU_CLONES void rows_to_float(const void* src, FloatType t, int64_t stride, int64_t n, int64_t D, float mul,
                                     float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    float* out = dst + r * D;
    if (t == FloatType::f32) {
      const float* x = static_cast<const float*>(src) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = mul * x[d];
    } else if (t == FloatType::bf16) {
      const uint16_t* x = static_cast<const uint16_t*>(src) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = mul * bf16_to_float(x[d]);
    } else {
      const uint16_t* x = static_cast<const uint16_t*>(src) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = mul * f16_to_float(x[d]);
    }
  }
}

// dst[d·ld + r] = src[r·D + d] for r < n, and 0 for r in [n, n_pad): rows become columns.
void transpose(const float* src, int64_t n, int64_t n_pad, int64_t D, float* dst, int64_t ld) {
  for (int64_t d = 0; d < D; ++d) {
    float* out = dst + d * ld;
    for (int64_t r = 0; r < n; ++r) out[r] = src[r * D + d];
    std::fill(out + n, out + n_pad, 0.0f);
  }
}

// dst[r·stride + d] = mul·src[r·D + d], rounded once to t.
MINIPT_CPU_CLONES void store_rows(const float* src, int64_t n, int64_t D, float mul, FloatType t, void* dst,
                                  int64_t stride) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = src + r * D;
    if (t == FloatType::f32) {
      float* out = static_cast<float*>(dst) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = mul * x[d];
    } else if (t == FloatType::bf16) {
      uint16_t* out = static_cast<uint16_t*>(dst) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = float_to_bf16(mul * x[d]);
    } else {
      uint16_t* out = static_cast<uint16_t*>(dst) + r * stride;
      for (int64_t d = 0; d < D; ++d) out[d] = float_to_f16(mul * x[d]);
    }
  }
}

// The address of element `offset` of a tensor of dtype t at address base.
char* element(uintptr_t base, FloatType t, int64_t offset) {
  return reinterpret_cast<char*>(base) + offset * (t == FloatType::f32 ? 4 : 2);
}

// n rows, stride apart, of a tensor as float32 rows D apart: in place for dense
// float32 rows, else copied (and widened) into buf.
const float* rows_as_float(uintptr_t base, FloatType t, int64_t offset, int64_t stride, int64_t n, int64_t D,
                           float* buf) {
  if (t == FloatType::f32 && stride == D) return reinterpret_cast<const float*>(base) + offset;
  rows_to_float(element(base, t, offset), t, stride, n, D, 1.0f, buf);
  return buf;
}

// The offset of row 0 of head (b, h) in q, k and v.
int64_t head_offset(const AttentionArgs& a, int64_t b, int64_t h) { return b * a.stride_b + h * a.stride_h; }

// ----------------------------------------------------------------------------- masks
// The view of one batch row: its key mask and document spans, either may be null,
// and the window, whose unbounded sides are T: no query and key are further apart.
struct Visibility {
  const uint8_t* key_mask;  // (T,)
  const int32_t* span;      // (2, T): document starts, then ends
  int64_t T;
  bool causal;
  int64_t left, right;  // query i sees keys [i - left, i + right]

  // The queries [lo, hi) that can see key j; empty for a padding key.
  void queries_of(int64_t j, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(causal ? j : 0, j - right);
    *hi = std::min<int64_t>(T, j + left + 1);
    if (span != nullptr) {
      *lo = std::max<int64_t>(*lo, span[j]);
      *hi = std::min<int64_t>(*hi, span[T + j]);
    }
    if (key_mask != nullptr && key_mask[j] == 0) *hi = *lo;
  }

  // The keys a block of queries [i0, i1) can see lie in [lo, hi).
  void keys_of(int64_t i0, int64_t i1, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(span != nullptr ? span[i0] : 0, i0 - left);
    *hi = std::min<int64_t>(causal ? i1 : T, i1 + right);
    if (span != nullptr) *hi = std::min<int64_t>(*hi, span[T + i1 - 1]);
  }

  // The queries a block of keys [j0, j1) is seen from lie in [lo, hi).
  void queries_of_block(int64_t j0, int64_t j1, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(causal ? j0 : 0, j0 - right);
    *hi = std::min<int64_t>(T, j1 + left);
    if (span != nullptr) {
      *lo = std::max<int64_t>(*lo, span[j0]);
      *hi = std::min<int64_t>(*hi, span[T + j1 - 1]);
    }
  }

  bool any_real(int64_t j0, int64_t j1) const {
    if (key_mask == nullptr) return true;
    for (int64_t j = j0; j < j1; ++j) {
      if (key_mask[j] != 0) return true;
    }
    return false;
  }

  // Per row of a tile whose columns are queries i0, i0 + 1, ...: the columns
  // [lo, hi) that see the row's key, clipped to [0, n_cols).
  void tile_columns(int64_t j0, int64_t n_rows, int64_t i0, int64_t n_cols, int64_t* lo, int64_t* hi) const {
    for (int64_t r = 0; r < n_rows; ++r) {
      int64_t a, b;
      queries_of(j0 + r, &a, &b);
      lo[r] = std::clamp<int64_t>(a - i0, 0, n_cols);
      hi[r] = std::clamp<int64_t>(b - i0, lo[r], n_cols);
    }
  }
};

Visibility visibility(const AttentionArgs& a, int64_t b) {
  const int64_t T = a.seq_len;
  return Visibility{a.key_mask == 0 ? nullptr : reinterpret_cast<const uint8_t*>(a.key_mask) + b * T,
                    a.doc_span == 0 ? nullptr : reinterpret_cast<const int32_t*>(a.doc_span) + b * 2 * T, T,
                    a.is_causal, a.window_left < 0 ? T : a.window_left, a.window_right < 0 ? T : a.window_right};
}

// ----------------------------------------------------------------------------- forward
// One key tile of the online softmax: s (n_keys, BLOCK_Q) scores become p, with
// the columns outside [lo[r], hi[r]) of row r masked; m and l are updated and
// alpha receives each query's rescaling of o.
MINIPT_CPU_CLONES void softmax_tile(float* s, int64_t n_keys, const int64_t* lo, const int64_t* hi, float* m, float* l,
                                    float* alpha) {
  float tile_max[BLOCK_Q], m_use[BLOCK_Q], sum[BLOCK_Q];
  std::fill(tile_max, tile_max + BLOCK_Q, NEG_INF);
  std::fill(sum, sum + BLOCK_Q, 0.0f);
  for (int64_t r = 0; r < n_keys; ++r) {
    float* row = s + r * BLOCK_Q;
    const int64_t a = lo[r], b = hi[r];
    for (int64_t c = 0; c < BLOCK_Q; ++c) {
      const float x = c >= a && c < b ? row[c] : NEG_INF;
      row[c] = x;
      tile_max[c] = tile_max[c] > x ? tile_max[c] : x;
    }
  }
  for (int64_t c = 0; c < BLOCK_Q; ++c) {
    const float m_new = m[c] > tile_max[c] ? m[c] : tile_max[c];
    // While a query has seen no key, m stays -inf: subtracting 0 instead keeps
    // 2^(-inf - -inf) = NaN out, and its p, l and o stay 0.
    m_use[c] = m_new == NEG_INF ? 0.0f : m_new;
    alpha[c] = exp2_approx(m[c] - m_use[c]);
    m[c] = m_new;
  }
  for (int64_t r = 0; r < n_keys; ++r) {
    float* row = s + r * BLOCK_Q;
    for (int64_t c = 0; c < BLOCK_Q; ++c) {
      const float p = exp2_approx(row[c] - m_use[c]);
      row[c] = p;
      sum[c] += p;
    }
  }
  for (int64_t c = 0; c < BLOCK_Q; ++c) l[c] = l[c] * alpha[c] + sum[c];
}

MINIPT_CPU_CLONES void scale_rows(float* o, int64_t n, int64_t D, const float* factor) {
  for (int64_t r = 0; r < n; ++r) {
    const float f = factor[r];
    for (int64_t d = 0; d < D; ++d) o[r * D + d] *= f;
  }
}

// Consecutive pieces of one thread's float32 scratch. A layout is carved once
// from no memory to count its floats, then from each thread's share.
struct Carve {
  float* base;
  int64_t used = 0;
  float* take(int64_t n) {
    float* piece = base == nullptr ? nullptr : base + used;
    used += n;
    return piece;
  }
};

// A task's scratch: the per-query statistics and per-key bounds on the stack,
// the tiles and head copies in the thread's share of the heap.
struct ForwardScratch {
  float *q_t, *o, *s, *k, *v;  // (D, BLOCK_Q), (BLOCK_Q, D), (BLOCK_K, BLOCK_Q), (BLOCK_K, D) twice
  float m[BLOCK_Q], l[BLOCK_Q], alpha[BLOCK_Q];
  int64_t lo[BLOCK_K], hi[BLOCK_K];

  ForwardScratch(Carve& c, int64_t D)
      : q_t(c.take(D * BLOCK_Q)), o(c.take(BLOCK_Q * D)), s(c.take(BLOCK_K * BLOCK_Q)), k(c.take(BLOCK_K * D)),
        v(c.take(BLOCK_K * D)) {}
};

void forward_block(const AttentionArgs& a, int64_t task, ForwardScratch& w) {
  const int64_t T = a.seq_len, D = a.head_dim, H = a.heads;
  const int64_t n_blocks = (T + BLOCK_Q - 1) / BLOCK_Q;
  const int64_t bh = task / n_blocks, b = bh / H, h = bh % H;
  const int64_t i0 = (task % n_blocks) * BLOCK_Q, nq = std::min(BLOCK_Q, T - i0);
  const int64_t base = head_offset(a, b, h), st = a.stride_t;  // int64: offsets pass 2^31 at real sizes
  const Visibility vis = visibility(a, b);

  // Q_t = scale·log2(e)·Q_blkᵀ, (D, BLOCK_Q); the o buffer holds Q_blk meanwhile.
  rows_to_float(element(a.q, a.dtype, base + i0 * st), a.dtype, st, nq, D, a.scale * LOG2E, w.o);
  transpose(w.o, nq, BLOCK_Q, D, w.q_t, BLOCK_Q);
  std::fill(w.o, w.o + BLOCK_Q * D, 0.0f);
  std::fill(w.m, w.m + BLOCK_Q, NEG_INF);
  std::fill(w.l, w.l + BLOCK_Q, 0.0f);

  int64_t lo, hi;
  vis.keys_of(i0, i0 + nq, &lo, &hi);
  for (int64_t j0 = lo; j0 < hi; j0 += BLOCK_K) {
    const int64_t nk = std::min(BLOCK_K, hi - j0);
    if (!vis.any_real(j0, j0 + nk)) continue;
    const float* k = rows_as_float(a.k, a.dtype, base + j0 * st, st, nk, D, w.k);
    const float* v = rows_as_float(a.v, a.dtype, base + j0 * st, st, nk, D, w.v);
    gemm(nk, BLOCK_Q, D, k, D, 1, w.q_t, BLOCK_Q, w.s, BLOCK_Q, false);  // S_t = K_blk·Q_t
    vis.tile_columns(j0, nk, i0, nq, w.lo, w.hi);
    softmax_tile(w.s, nk, w.lo, w.hi, w.m, w.l, w.alpha);
    scale_rows(w.o, nq, D, w.alpha);
    gemm(nq, D, nk, w.s, 1, BLOCK_Q, v, D, w.o, D, true);  // O += P·V_blk, P = P_tᵀ
  }

  float* lse = reinterpret_cast<float*>(a.lse) + bh * T + i0;
  for (int64_t c = 0; c < nq; ++c) {
    const bool seen = w.l[c] > 0.0f;
    lse[c] = seen ? w.m[c] + std::log2(w.l[c]) : POS_INF;
    w.alpha[c] = seen ? 1.0f / w.l[c] : 0.0f;
  }
  scale_rows(w.o, nq, D, w.alpha);
  store_rows(w.o, nq, D, 1.0f, a.dtype, element(a.out, a.dtype, ((b * T + i0) * H + h) * D), H * D);  // (B, T, H, D)
}

// ----------------------------------------------------------------------------- backward
// One (key tile, query tile) of the backward: s (n_keys, BLOCK_Q) scores become p
// and dp becomes dS = p·(dp - delta), both 0 outside each row's [lo[r], hi[r]).
MINIPT_CPU_CLONES void gradient_tile(float* s, float* dp, int64_t n_keys, const int64_t* lo, const int64_t* hi,
                                     const float* lse, const float* delta) {
  for (int64_t r = 0; r < n_keys; ++r) {
    float* srow = s + r * BLOCK_Q;
    float* dprow = dp + r * BLOCK_Q;
    const int64_t a = lo[r], b = hi[r];
    for (int64_t c = 0; c < BLOCK_Q; ++c) {
      const float p = c >= a && c < b ? exp2_approx(srow[c] - lse[c]) : 0.0f;
      srow[c] = p;
      dprow[c] = p * (dprow[c] - delta[c]);
    }
  }
}

MINIPT_CPU_CLONES void row_dots(const void* x, const void* y, FloatType t, int64_t n, int64_t stride, int64_t D,
                                float* out) {
  for (int64_t r = 0; r < n; ++r) {
    float acc = 0.0f;
    if (t == FloatType::f32) {
      const float* a = static_cast<const float*>(x) + r * stride;
      const float* b = static_cast<const float*>(y) + r * stride;
      for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
    } else {
      const uint16_t* a = static_cast<const uint16_t*>(x) + r * stride;
      const uint16_t* b = static_cast<const uint16_t*>(y) + r * stride;
      for (int64_t d = 0; d < D; ++d) {
        acc += t == FloatType::bf16 ? bf16_to_float(a[d]) * bf16_to_float(b[d])
                                    : f16_to_float(a[d]) * f16_to_float(b[d]);
      }
    }
    out[r] = acc;
  }
}

// One head's operands in float32, its dQ, one key tile's dK and dV, and the tiles.
struct BackwardScratch {
  float *q, *k, *v, *dout;  // (T, D) each; q, k and v only for 16-bit or strided inputs
  float *q_t, *dout_t;      // (D, T + BLOCK_Q), zero past T
  float *dq, *dk, *dv;      // (T, D), (BLOCK_K, D), (BLOCK_K, D)
  float *s, *dp;            // (BLOCK_K, BLOCK_Q)
  float lse[BLOCK_Q], delta[BLOCK_Q];  // of the current query tile, padded
  int64_t lo[BLOCK_K], hi[BLOCK_K];

  BackwardScratch(Carve& c, int64_t T, int64_t D, bool widen)
      : q(c.take(widen ? T * D : 0)), k(c.take(widen ? T * D : 0)), v(c.take(widen ? T * D : 0)),
        dout(c.take(T * D)), q_t(c.take(D * (T + BLOCK_Q))), dout_t(c.take(D * (T + BLOCK_Q))), dq(c.take(T * D)),
        dk(c.take(BLOCK_K * D)), dv(c.take(BLOCK_K * D)), s(c.take(BLOCK_K * BLOCK_Q)), dp(c.take(BLOCK_K * BLOCK_Q)) {}
};

void backward_head(const AttentionArgs& a, const AttentionGrads& g, int64_t bh, BackwardScratch& w) {
  const int64_t T = a.seq_len, D = a.head_dim, H = a.heads, b = bh / H, h = bh % H;
  const int64_t base = head_offset(a, b, h), st = a.stride_t, out_base = (b * T * H + h) * D, ld_t = T + BLOCK_Q;
  const Visibility vis = visibility(a, b);
  const float* lse_head = reinterpret_cast<const float*>(a.lse) + bh * T;
  float* delta_head = reinterpret_cast<float*>(g.delta) + bh * T;

  const float* q = rows_as_float(a.q, a.dtype, base, st, T, D, w.q);
  const float* k = rows_as_float(a.k, a.dtype, base, st, T, D, w.k);
  const float* v = rows_as_float(a.v, a.dtype, base, st, T, D, w.v);
  const char* dout_head = element(g.grad_out, a.dtype, out_base);
  rows_to_float(dout_head, a.dtype, H * D, T, D, 1.0f, w.dout);
  row_dots(element(a.out, a.dtype, out_base), dout_head, a.dtype, T, H * D, D, delta_head);
  // Q_t carries scale·log2(e), so that S_t is in the forward's base-2 units.
  rows_to_float(q, FloatType::f32, D, T, D, a.scale * LOG2E, w.dq);
  transpose(w.dq, T, ld_t, D, w.q_t, ld_t);
  transpose(w.dout, T, ld_t, D, w.dout_t, ld_t);
  std::fill(w.dq, w.dq + T * D, 0.0f);

  for (int64_t j0 = 0; j0 < T; j0 += BLOCK_K) {
    const int64_t nk = std::min(BLOCK_K, T - j0);
    std::fill(w.dk, w.dk + nk * D, 0.0f);
    std::fill(w.dv, w.dv + nk * D, 0.0f);
    int64_t lo = 0, hi = 0;
    if (vis.any_real(j0, j0 + nk)) vis.queries_of_block(j0, j0 + nk, &lo, &hi);
    for (int64_t i0 = lo; i0 < hi; i0 += BLOCK_Q) {
      const int64_t nq = std::min(BLOCK_Q, hi - i0);
      const int64_t n_cols = (nq + COLS - 1) / COLS * COLS;  // Q_t and dO_t are zero past T
      gemm(nk, n_cols, D, k + j0 * D, D, 1, w.q_t + i0, ld_t, w.s, BLOCK_Q, false);        // S_t = K_blk·Q_t
      gemm(nk, n_cols, D, v + j0 * D, D, 1, w.dout_t + i0, ld_t, w.dp, BLOCK_Q, false);  // dP_t = V_blk·dO_t
      std::copy(lse_head + i0, lse_head + i0 + nq, w.lse);
      std::copy(delta_head + i0, delta_head + i0 + nq, w.delta);
      std::fill(w.lse + nq, w.lse + BLOCK_Q, POS_INF);
      std::fill(w.delta + nq, w.delta + BLOCK_Q, 0.0f);
      vis.tile_columns(j0, nk, i0, nq, w.lo, w.hi);
      gradient_tile(w.s, w.dp, nk, w.lo, w.hi, w.lse, w.delta);
      gemm(nk, D, nq, w.s, BLOCK_Q, 1, w.dout + i0 * D, D, w.dv, D, true);  // dV += P_t·dO
      gemm(nk, D, nq, w.dp, BLOCK_Q, 1, q + i0 * D, D, w.dk, D, true);      // dK += dS_t·Q
      gemm(nq, D, nk, w.dp, 1, BLOCK_Q, k + j0 * D, D, w.dq + i0 * D, D, true);  // dQ += dS·K_blk
    }
    // dK, dV and dQ go to dense (B, T, H, D) memory, as out does.
    store_rows(w.dk, nk, D, a.scale, a.dtype, element(g.grad_k, a.dtype, out_base + j0 * H * D), H * D);
    store_rows(w.dv, nk, D, 1.0f, a.dtype, element(g.grad_v, a.dtype, out_base + j0 * H * D), H * D);
  }
  store_rows(w.dq, T, D, a.scale, a.dtype, element(g.grad_q, a.dtype, out_base), H * D);
}

// body(task, scratch) for every task, over OpenMP threads when the work is worth
// it, each thread with its own Scratch(carve, layout...). Tasks are handed out one
// at a time: causal query blocks, and heads of padded rows, differ widely in cost.
template <class Scratch, class Body, class... Layout>
void for_each_task(const AttentionArgs& a, int64_t tasks, int num_threads, Body body, Layout... layout) {
  Carve count{nullptr};
  const Scratch counted(count, layout...);  // carves no memory: counts the floats
  // Allocated here, not in the parallel region, so that bad_alloc reaches Python.
  std::vector<float> scratch(static_cast<size_t>(num_threads * count.used));
  const bool parallel =
      num_threads > 1 && tasks > 1 && a.batch * a.heads * a.seq_len * a.head_dim >= PARALLEL_MIN_ELEMENTS;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    Carve share{scratch.data() + thread_index() * count.used};
    Scratch w(share, layout...);
    body(task, w);
  }
}

}  // namespace

void attention_forward_cpu(const AttentionArgs& a, int num_threads) {
  const int64_t tasks = a.batch * a.heads * ((a.seq_len + BLOCK_Q - 1) / BLOCK_Q);
  for_each_task<ForwardScratch>(
      a, tasks, num_threads, [&](int64_t task, ForwardScratch& w) { forward_block(a, task, w); }, a.head_dim);
}

void attention_backward_cpu(const AttentionArgs& a, const AttentionGrads& g, int num_threads) {
  const int64_t tasks = a.seq_len == 0 ? 0 : a.batch * a.heads;
  for_each_task<BackwardScratch>(
      a, tasks, num_threads, [&](int64_t bh, BackwardScratch& w) { backward_head(a, g, bh, w); }, a.seq_len,
      a.head_dim, a.dtype != FloatType::f32 || a.stride_t != a.head_dim);
}

}  // namespace minipt
