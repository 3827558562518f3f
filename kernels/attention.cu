// Masked softmax attention on the GPU, flash-style: the (T, T) scores never
// leave the chip. Readable SIMT code with float32 accumulation; no tensor cores.
//
// Layout of every kernel: a block of 4 warps owns 16 "rows" (queries in the
// forward and dQ kernels, keys in the dK/dV kernel), 4 per warp, held in shared
// memory row-major. It walks the other side in tiles of 32 (one per lane), held
// transposed as tile[d][j] with a row pitch of 33 floats, so both access
// patterns are free of bank conflicts: lane j reading tile[d][j] for its dot
// products, and lane d reading tile[d][j] when it accumulates an output column.
//
// Forward (per query row, online softmax in base 2 as in the Triton tutorial):
//   s_j = (q·k_j)·scale·log2(e);  m' = max(m, max_j s_j);  p_j = 2^(s_j - m')
//   l = l·2^(m - m') + Σ p_j;     o = o·2^(m - m') + Σ p_j v_j
// then out = o / l and lse = m + log2 l (+inf for a row with no visible key,
// which makes every p of that row 0 in the backward: zero output, zero grads).
// Backward, without atomics so that it is deterministic:
//   delta_i = Σ_d dO_i·O_i                                   (preprocess kernel)
//   p_ij = 2^(s_ij - lse_i),  dS_ij = p_ij·(dO_i·v_j - delta_i)
//   dV_j = Σ_i p_ij dO_i,  dK_j = scale·Σ_i dS_ij q_i          (one block per key block)
//   dQ_i = scale·Σ_j dS_ij k_j                                (one block per query block)
// Masking: key j is visible from query i iff key_mask[b, j] != 0, when causal
// j <= i, with packed documents both lie in one document, and with a window
// i - left <= j <= i + right. Tiles whose 32 keys are all padding are skipped,
// causal blocks stop at their diagonal, packed blocks walk only the span from
// their first row's document start to their last row's document end, and
// windowed blocks the span from their first row's window start to their last
// row's window end, so the work follows the real and the documents' lengths
// and the window's width.
// doc_span is (B, 2, T) int32: each position's document start, then its end.
//
// Memory traffic of the forward: each block reads its 16 query rows once and
// all K, V once: 2·BHTD·(T/16) element reads from L2 and BHTD from DRAM; the
// compute is 4·BHT²D flops in float32 on the SIMT cores.
//
// Layout: q, k, v, grad_q, grad_k and grad_v are dense (B, H, T, D); out and
// grad_out are dense (B, T, H, D), which Python sees as a (B, H, T, D) view, so
// that merging the heads afterwards (and splitting their gradient) copies nothing.
#include <climits>
#include <type_traits>
#include <utility>

#include "cuda_common.cuh"
#include "ops.h"

namespace minipt {
namespace {

constexpr int TILE = 32;   // columns of a shared-memory tile: one per lane
constexpr int PAD = TILE + 1;
constexpr int WARPS = 4;
constexpr int ROWS = 4;    // rows per warp
constexpr int BLOCK_ROWS = WARPS * ROWS;
constexpr int THREADS = WARPS * 32;
// At least 4 blocks per SM lets ptxas use up to 128 registers per thread. Given
// only the thread count it chose 56-96 and spilled 4-76 bytes per thread in 9
// (sm_80) and 16 (sm_90) of the 24 kernels below; with the floor none spills.
// Shared memory (21-50 KB per block) allows 3-7 blocks per SM, so the floor
// costs no occupancy that shared memory would have given.
constexpr int MIN_BLOCKS_PER_SM = 4;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ bool key_is_real(const uint8_t* key_mask, int64_t j, int64_t T) {
  return j < T && (key_mask == nullptr || key_mask[j] != 0);
}

// The start of position i's document, which names it; -1 past T or without documents.
__device__ __forceinline__ int document_of(const int32_t* span, int64_t i, int64_t T) {
  return span != nullptr && i < T ? span[i] : -1;
}

// The tiles of `other` positions that rows [row0, last_row] can see: from the first
// row's document start (rounded down to a tile) to the last row's document end.
struct TileRange {
  int64_t begin, end;
};

__device__ __forceinline__ TileRange document_tiles(const int32_t* span, int64_t row0, int64_t last_row,
                                                    int64_t begin, int64_t end, int64_t T) {
  if (span == nullptr) return {begin, end};
  return {max(begin, static_cast<int64_t>(span[row0]) / TILE * TILE), min(end, static_cast<int64_t>(span[T + last_row]))};
}

// The tiles of `other` positions that rows [row0, last_row] can see through a window
// that reaches `before` positions back and `after` ahead of each row (T for an
// unbounded side): forward and dQ blocks look from queries at keys (left, right),
// dK/dV blocks from keys at queries (right, left).
__device__ __forceinline__ TileRange window_tiles(TileRange r, int64_t row0, int64_t last_row, int64_t before,
                                                  int64_t after) {
  return {max(r.begin, max(row0 - before, int64_t{0}) / TILE * TILE), min(r.end, last_row + after + 1)};
}

// Whether query i sees key j through the window [i - left, i + right].
__device__ __forceinline__ bool in_window(int64_t i, int64_t j, int64_t left, int64_t right) {
  return i - j <= left && j - i <= right;
}

// dst[d][r] = X[row0 + r][d] for the TILE rows of a tile, rows `stride` elements
// apart (D in (B, H, T, D), H·D in (B, T, H, D)); zeros past T.
template <typename T, int D>
__device__ __forceinline__ void load_tile_transposed(const T* X, int64_t stride, int64_t row0, int64_t T_len,
                                                     float* dst) {
  for (int idx = threadIdx.x; idx < TILE * D; idx += THREADS) {
    const int r = idx / D, d = idx % D;
    const int64_t row = row0 + r;
    dst[d * PAD + r] = row < T_len ? to_float(X[row * stride + d]) : 0.0f;
  }
}

// dst[r][d] = mul·X[row0 + r][d] for the BLOCK_ROWS rows of a block; zeros past T.
template <typename T, int D>
__device__ __forceinline__ void load_rows(const T* X, int64_t stride, int64_t row0, int64_t T_len, float mul,
                                          float* dst) {
  for (int idx = threadIdx.x; idx < BLOCK_ROWS * D; idx += THREADS) {
    const int r = idx / D, d = idx % D;
    const int64_t row = row0 + r;
    dst[r * D + d] = row < T_len ? mul * to_float(X[row * stride + d]) : 0.0f;
  }
}

// acc[r] = rows[r]·tile[:, lane] for this warp's ROWS rows: the row values are
// shared-memory broadcasts, the tile values one conflict-free load per d.
template <int D>
__device__ __forceinline__ void tile_dots(const float* rows, const float* tile, int lane, float (&acc)[ROWS]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    const float t0 = tile[(d + 0) * PAD + lane], t1 = tile[(d + 1) * PAD + lane];
    const float t2 = tile[(d + 2) * PAD + lane], t3 = tile[(d + 3) * PAD + lane];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float4 x = *reinterpret_cast<const float4*>(rows + r * D + d);
      acc[r] += x.x * t0 + x.y * t1 + x.z * t2 + x.w * t3;
    }
  }
}

// acc[r][c] += Σ_j w[r] (from lane j) · tile[lane + 32c][j]: lane d owns output columns d, d + 32, ...
template <int D>
__device__ __forceinline__ void accumulate(const float (&w)[ROWS], const float* tile, int lane,
                                           float (&acc)[ROWS][D / 32]) {
#pragma unroll 4
  for (int j = 0; j < TILE; ++j) {
    float wj[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wj[r] = __shfl_sync(FULL_WARP, w[r], j);
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const float t = tile[(lane + 32 * c) * PAD + j];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r][c] += wj[r] * t;
    }
  }
}

// Where a block sits: blockIdx.x runs over (batch·head, row block) with the row
// blocks of one head adjacent, so they share K and V in L2.
struct Place {
  int64_t bh, b, row0;
  int64_t base;      // offset of this head's (T, D) matrix in the (B, H, T, D) tensors
  int64_t out_base;  // offset of its first row in the (B, T, H, D) tensors, whose rows are H·D apart
};

template <int D>
__device__ __forceinline__ Place place(int64_t T, int64_t heads, int64_t n_row_blocks) {
  Place p;
  p.bh = blockIdx.x / n_row_blocks;
  p.b = p.bh / heads;
  p.row0 = (blockIdx.x % n_row_blocks) * BLOCK_ROWS;
  p.base = p.bh * T * D;  // int64: B·H·T·D passes 2^31 at real sizes
  p.out_base = (p.b * T * heads + p.bh % heads) * D;
  return p;
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM)
    attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             T* __restrict__ out, float* __restrict__ lse, const uint8_t* __restrict__ key_mask,
                             const int32_t* __restrict__ doc_span, int64_t T_len, int64_t heads,
                             int64_t n_row_blocks, bool causal, int64_t left, int64_t right, float scale_log2) {
  extern __shared__ float smem[];
  float* kT = smem;                // [D][PAD]
  float* vT = kT + D * PAD;        // [D][PAD]
  float* q_s = vT + D * PAD;       // [BLOCK_ROWS][D], pre-scaled by scale·log2(e)
  __shared__ bool tile_key_real[TILE];
  __shared__ int tile_key_doc[TILE];

  const Place at = place<D>(T_len, heads, n_row_blocks);
  const uint8_t* mask = key_mask == nullptr ? nullptr : key_mask + at.b * T_len;
  const int32_t* span = doc_span == nullptr ? nullptr : doc_span + at.b * 2 * T_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* my_rows = q_s + warp * ROWS * D;
  load_rows<T, D>(q + at.base, D, at.row0, T_len, scale_log2, q_s);

  float m[ROWS], l[ROWS], o[ROWS][D / 32];
  int row_doc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    row_doc[r] = document_of(span, at.row0 + warp * ROWS + r, T_len);
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) o[r][c] = 0.0f;
  }

  const int64_t last_row = min(at.row0 + BLOCK_ROWS, T_len) - 1;
  // causal: nothing right of the diagonal
  const TileRange keys = window_tiles(
      document_tiles(span, at.row0, last_row, 0, causal ? last_row + 1 : T_len, T_len), at.row0, last_row, left, right);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += TILE) {
    __syncthreads();  // the previous tile is consumed (and q_s is written)
    const bool real = threadIdx.x < TILE && key_is_real(mask, j0 + threadIdx.x, T_len);
    if (threadIdx.x < TILE) {
      tile_key_real[threadIdx.x] = real;
      tile_key_doc[threadIdx.x] = document_of(span, j0 + threadIdx.x, T_len);
    }
    if (!__syncthreads_or(real)) continue;  // all padding: uniform across the block
    load_tile_transposed<T, D>(k + at.base, D, j0, T_len, kT);
    load_tile_transposed<T, D>(v + at.base, D, j0, T_len, vT);
    __syncthreads();

    float s[ROWS], p[ROWS];
    tile_dots<D>(my_rows, kT, lane, s);
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = at.row0 + warp * ROWS + r;
      const bool visible = tile_key_real[lane] && i < T_len && (!causal || j <= i) &&
                           tile_key_doc[lane] == row_doc[r] && in_window(i, j, left, right);
      const float score = visible ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(score));
      float alpha = 1.0f;
      p[r] = 0.0f;
      if (m_new != -INFINITY) {  // warp-uniform: nothing visible yet keeps l = o = 0
        p[r] = exp2f(score - m_new);
        alpha = exp2f(m[r] - m_new);
      }
      l[r] = l[r] * alpha + warp_sum(p[r]);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) o[r][c] *= alpha;
    }
    accumulate<D>(p, vT, lane, o);
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t i = at.row0 + warp * ROWS + r;
    if (i >= T_len) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      out[at.out_base + i * heads * D + lane + 32 * c] = from_float<T>(o[r][c] * inv);
    }
    if (lane == 0) lse[at.bh * T_len + i] = l[r] > 0.0f ? m[r] + log2f(l[r]) : INFINITY;
  }
}

// delta_i = Σ_d dO_i[d]·O_i[d], one warp per row. Rows go in (B, T, H) order, the
// order of out and grad_out in memory; delta is (B, H, T).
template <typename T, int D>
__global__ void __launch_bounds__(THREADS)
    attention_delta_kernel(const T* __restrict__ out, const T* __restrict__ grad_out, float* __restrict__ delta,
                           int64_t T_len, int64_t heads, int64_t n_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  if (row >= n_rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < D / 32; ++c) {
    const int64_t idx = row * D + lane + 32 * c;
    acc += to_float(out[idx]) * to_float(grad_out[idx]);
  }
  acc = warp_sum(acc);
  const int64_t bt = row / heads, h = row % heads, b = bt / T_len, i = bt % T_len;
  if (lane == 0) delta[(b * heads + h) * T_len + i] = acc;
}

// dK and dV of 16 keys, over every query tile that can see them.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM)
    attention_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ grad_out, const float* __restrict__ lse,
                          const float* __restrict__ delta, const uint8_t* __restrict__ key_mask,
                          const int32_t* __restrict__ doc_span, T* __restrict__ grad_k, T* __restrict__ grad_v,
                          int64_t T_len, int64_t heads, int64_t n_row_blocks, bool causal, int64_t left,
                          int64_t right, float scale, float scale_log2) {
  extern __shared__ float smem[];
  float* qT = smem;                // [D][PAD]
  float* doT = qT + D * PAD;       // [D][PAD]
  float* k_s = doT + D * PAD;      // [BLOCK_ROWS][D]
  float* v_s = k_s + BLOCK_ROWS * D;
  __shared__ float lse_s[TILE], delta_s[TILE];
  __shared__ int query_doc[TILE];

  const Place at = place<D>(T_len, heads, n_row_blocks);
  const uint8_t* mask = key_mask == nullptr ? nullptr : key_mask + at.b * T_len;
  const int32_t* span = doc_span == nullptr ? nullptr : doc_span + at.b * 2 * T_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_rows<T, D>(k + at.base, D, at.row0, T_len, 1.0f, k_s);
  load_rows<T, D>(v + at.base, D, at.row0, T_len, 1.0f, v_s);

  bool real[ROWS];
  int key_doc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    real[r] = key_is_real(mask, at.row0 + warp * ROWS + r, T_len);
    key_doc[r] = document_of(span, at.row0 + warp * ROWS + r, T_len);
  }
  const bool block_has_key =
      __syncthreads_or(threadIdx.x < BLOCK_ROWS && key_is_real(mask, at.row0 + threadIdx.x, T_len));

  float dk[ROWS][D / 32], dv[ROWS][D / 32];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int c = 0; c < D / 32; ++c) dk[r][c] = dv[r][c] = 0.0f;
  }

  // Causal: queries before the block's first key see none of its keys. Packed: the
  // queries that see these keys are the keys' own documents (one document is symmetric).
  const int64_t last_key = min(at.row0 + BLOCK_ROWS, T_len) - 1;
  TileRange queries = window_tiles(
      document_tiles(span, at.row0, last_key, causal ? (at.row0 / TILE) * TILE : 0, T_len, T_len), at.row0, last_key,
      right, left);
  if (!block_has_key) queries.end = queries.begin;  // all padding: write zeros
  for (int64_t i0 = queries.begin; i0 < queries.end; i0 += TILE) {
    __syncthreads();  // the previous tile is consumed
    load_tile_transposed<T, D>(q + at.base, D, i0, T_len, qT);
    load_tile_transposed<T, D>(grad_out + at.out_base, heads * D, i0, T_len, doT);
    if (threadIdx.x < TILE) {
      const int64_t i = i0 + threadIdx.x;
      lse_s[threadIdx.x] = i < T_len ? lse[at.bh * T_len + i] : INFINITY;
      delta_s[threadIdx.x] = i < T_len ? delta[at.bh * T_len + i] : 0.0f;
      query_doc[threadIdx.x] = document_of(span, i, T_len);
    }
    __syncthreads();

    float s[ROWS], dp[ROWS], p[ROWS], ds[ROWS];
    tile_dots<D>(k_s + warp * ROWS * D, qT, lane, s);   // k_j · q_i, i = i0 + lane
    tile_dots<D>(v_s + warp * ROWS * D, doT, lane, dp);  // v_j · dO_i
    const int64_t i = i0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t j = at.row0 + warp * ROWS + r;
      const bool visible = real[r] && i < T_len && (!causal || j <= i) && query_doc[lane] == key_doc[r] &&
                           in_window(i, j, left, right);
      p[r] = visible ? exp2f(s[r] * scale_log2 - lse_s[lane]) : 0.0f;
      ds[r] = p[r] * (dp[r] - delta_s[lane]);
    }
    accumulate<D>(p, doT, lane, dv);
    accumulate<D>(ds, qT, lane, dk);
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t j = at.row0 + warp * ROWS + r;
    if (j >= T_len) continue;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const int64_t idx = at.base + j * D + lane + 32 * c;
      grad_k[idx] = from_float<T>(dk[r][c] * scale);
      grad_v[idx] = from_float<T>(dv[r][c]);
    }
  }
}

// dQ of 16 queries, over every key tile they can see.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM)
    attention_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ grad_out, const float* __restrict__ lse,
                        const float* __restrict__ delta, const uint8_t* __restrict__ key_mask,
                        const int32_t* __restrict__ doc_span, T* __restrict__ grad_q, int64_t T_len, int64_t heads,
                        int64_t n_row_blocks, bool causal, int64_t left, int64_t right, float scale,
                        float scale_log2) {
  extern __shared__ float smem[];
  float* kT = smem;                // [D][PAD]
  float* vT = kT + D * PAD;        // [D][PAD]
  float* q_s = vT + D * PAD;       // [BLOCK_ROWS][D]
  float* do_s = q_s + BLOCK_ROWS * D;
  __shared__ bool tile_key_real[TILE];
  __shared__ int tile_key_doc[TILE];

  const Place at = place<D>(T_len, heads, n_row_blocks);
  const uint8_t* mask = key_mask == nullptr ? nullptr : key_mask + at.b * T_len;
  const int32_t* span = doc_span == nullptr ? nullptr : doc_span + at.b * 2 * T_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_rows<T, D>(q + at.base, D, at.row0, T_len, 1.0f, q_s);
  load_rows<T, D>(grad_out + at.out_base, heads * D, at.row0, T_len, 1.0f, do_s);

  float row_lse[ROWS], row_delta[ROWS], dq[ROWS][D / 32];
  int row_doc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t i = at.row0 + warp * ROWS + r;
    row_doc[r] = document_of(span, i, T_len);
    row_lse[r] = i < T_len ? lse[at.bh * T_len + i] : INFINITY;
    row_delta[r] = i < T_len ? delta[at.bh * T_len + i] : 0.0f;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) dq[r][c] = 0.0f;
  }

  const int64_t last_row = min(at.row0 + BLOCK_ROWS, T_len) - 1;
  const TileRange keys = window_tiles(
      document_tiles(span, at.row0, last_row, 0, causal ? last_row + 1 : T_len, T_len), at.row0, last_row, left, right);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += TILE) {
    __syncthreads();
    const bool real = threadIdx.x < TILE && key_is_real(mask, j0 + threadIdx.x, T_len);
    if (threadIdx.x < TILE) {
      tile_key_real[threadIdx.x] = real;
      tile_key_doc[threadIdx.x] = document_of(span, j0 + threadIdx.x, T_len);
    }
    if (!__syncthreads_or(real)) continue;
    load_tile_transposed<T, D>(k + at.base, D, j0, T_len, kT);
    load_tile_transposed<T, D>(v + at.base, D, j0, T_len, vT);
    __syncthreads();

    float s[ROWS], dp[ROWS], ds[ROWS];
    tile_dots<D>(q_s + warp * ROWS * D, kT, lane, s);
    tile_dots<D>(do_s + warp * ROWS * D, vT, lane, dp);
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = at.row0 + warp * ROWS + r;
      const bool visible = tile_key_real[lane] && i < T_len && (!causal || j <= i) &&
                           tile_key_doc[lane] == row_doc[r] && in_window(i, j, left, right);
      const float p = visible ? exp2f(s[r] * scale_log2 - row_lse[r]) : 0.0f;
      ds[r] = p * (dp[r] - row_delta[r]);
    }
    accumulate<D>(ds, kT, lane, dq);
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t i = at.row0 + warp * ROWS + r;
    if (i >= T_len) continue;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) grad_q[at.base + i * D + lane + 32 * c] = from_float<T>(dq[r][c] * scale);
  }
}

// Kernels whose dynamic shared memory passes 48 KiB must opt in to it.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, size_t smem_bytes, cudaStream_t stream, const char* name,
            Args... args) {
  check(blocks <= INT_MAX, "attention", "too many blocks for one launch: " + std::to_string(blocks));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
             name);
  kernel<<<static_cast<unsigned>(blocks), THREADS, smem_bytes, stream>>>(args...);
  check_launch(name);
}

// A window side as the kernels compare it: -1 (unbounded) becomes T, which every pair meets.
int64_t window_side(int64_t side, int64_t T) { return side < 0 ? T : side; }

template <int D>
constexpr size_t forward_smem() { return (2 * D * PAD + BLOCK_ROWS * D) * sizeof(float); }
template <int D>
constexpr size_t backward_smem() { return (2 * D * PAD + 2 * BLOCK_ROWS * D) * sizeof(float); }

template <typename T, int D>
void forward(const AttentionArgs& a, cudaStream_t stream) {
  const int64_t n_row_blocks = (a.seq_len + BLOCK_ROWS - 1) / BLOCK_ROWS;
  launch(attention_forward_kernel<T, D>, a.batch * a.heads * n_row_blocks, forward_smem<D>(), stream,
         "attention_forward_kernel", reinterpret_cast<const T*>(a.q), reinterpret_cast<const T*>(a.k),
         reinterpret_cast<const T*>(a.v), reinterpret_cast<T*>(a.out), reinterpret_cast<float*>(a.lse),
         reinterpret_cast<const uint8_t*>(a.key_mask), reinterpret_cast<const int32_t*>(a.doc_span), a.seq_len,
         a.heads, n_row_blocks, a.is_causal, window_side(a.window_left, a.seq_len),
         window_side(a.window_right, a.seq_len), a.scale * LOG2E);
}

template <typename T, int D>
void backward(const AttentionArgs& a, const AttentionGrads& g, cudaStream_t stream) {
  const auto* q = reinterpret_cast<const T*>(a.q);
  const auto* k = reinterpret_cast<const T*>(a.k);
  const auto* v = reinterpret_cast<const T*>(a.v);
  const auto* grad_out = reinterpret_cast<const T*>(g.grad_out);
  const auto* lse = reinterpret_cast<const float*>(a.lse);
  auto* delta = reinterpret_cast<float*>(g.delta);
  const auto* mask = reinterpret_cast<const uint8_t*>(a.key_mask);
  const auto* span = reinterpret_cast<const int32_t*>(a.doc_span);
  const int64_t rows = a.batch * a.heads * a.seq_len;
  launch(attention_delta_kernel<T, D>, (rows + WARPS - 1) / WARPS, 0, stream, "attention_delta_kernel",
         reinterpret_cast<const T*>(a.out), grad_out, delta, a.seq_len, a.heads, rows);
  const int64_t n_row_blocks = (a.seq_len + BLOCK_ROWS - 1) / BLOCK_ROWS;
  const int64_t blocks = a.batch * a.heads * n_row_blocks;
  const int64_t left = window_side(a.window_left, a.seq_len), right = window_side(a.window_right, a.seq_len);
  launch(attention_dkdv_kernel<T, D>, blocks, backward_smem<D>(), stream, "attention_dkdv_kernel", q, k, v,
         grad_out, lse, static_cast<const float*>(delta), mask, span, reinterpret_cast<T*>(g.grad_k),
         reinterpret_cast<T*>(g.grad_v), a.seq_len, a.heads, n_row_blocks, a.is_causal, left, right, a.scale,
         a.scale * LOG2E);
  launch(attention_dq_kernel<T, D>, blocks, backward_smem<D>(), stream, "attention_dq_kernel", q, k, v, grad_out,
         lse, static_cast<const float*>(delta), mask, span, reinterpret_cast<T*>(g.grad_q), a.seq_len, a.heads,
         n_row_blocks, a.is_causal, left, right, a.scale, a.scale * LOG2E);
}

template <typename F>
void dispatch(const AttentionArgs& a, F&& f) {
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.head_dim == 64) {
      f(T{}, std::integral_constant<int, 64>{});
    } else {
      f(T{}, std::integral_constant<int, 128>{});
    }
  });
}

void check_pointers(const AttentionArgs& a) {
  const int64_t n = a.batch * a.heads * a.seq_len * a.head_dim;
  for (const auto& [ptr, name] :
       {std::pair{a.q, "q"}, std::pair{a.k, "k"}, std::pair{a.v, "v"}, std::pair{a.out, "out"}}) {
    check_device_pointer(ptr, n, "attention", name);
  }
  check_device_pointer(a.lse, a.batch * a.heads * a.seq_len, "attention", "lse");
  if (a.key_mask != 0) check_device_pointer(a.key_mask, a.batch * a.seq_len, "attention", "attention_mask");
  if (a.doc_span != 0) check_device_pointer(a.doc_span, a.batch * 2 * a.seq_len, "attention", "document_ids");
}

}  // namespace

void attention_forward_cuda(const AttentionArgs& a, uintptr_t stream) {
  check_pointers(a);
  if (a.batch * a.heads * a.seq_len == 0) return;
  dispatch(a, [&](auto tag, auto dim) { forward<decltype(tag), decltype(dim)::value>(a, as_stream(stream)); });
}

void attention_backward_cuda(const AttentionArgs& a, const AttentionGrads& g, uintptr_t stream) {
  check_pointers(a);
  const int64_t n = a.batch * a.heads * a.seq_len * a.head_dim;
  for (const auto& [ptr, name] : {std::pair{g.grad_out, "grad_out"}, std::pair{g.grad_q, "grad_q"},
                                  std::pair{g.grad_k, "grad_k"}, std::pair{g.grad_v, "grad_v"}}) {
    check_device_pointer(ptr, n, "attention", name);
  }
  check_device_pointer(g.delta, a.batch * a.heads * a.seq_len, "attention", "delta");
  if (a.batch * a.heads * a.seq_len == 0) return;
  dispatch(a, [&](auto tag, auto dim) { backward<decltype(tag), decltype(dim)::value>(a, g, as_stream(stream)); });
}

}  // namespace minipt
