// BERT's MLM masking on the GPU: one thread per group of four ids.
//
// A thread draws the group's four selection uniforms with one Philox call, loads
// its four ids (and special flags) with one vector load where the addresses allow,
// and draws a second Philox block only for the ~15% of elements it selects. The
// draw layout is philox.h's, which the torch reference defines and the CPU and
// Triton kernels share: all give the same bits.
//
// Memory traffic: read n ids (+ n flags), write n ids and n labels; a (256, 512)
// int64 batch moves 3 MiB, about a microsecond of H100 bandwidth, so the launch
// dominates: the point is to replace a CPU collator, not to beat a bandwidth roof.
#include <climits>
#include <utility>
#include <type_traits>

#include "cuda_common.cuh"
#include "ops.h"
#include "philox.h"

namespace minipt {
namespace {

constexpr int THREADS = 256;

// Four consecutive elements in one or two 16-byte transactions (4 bytes for
// uint8 flags). Only used when the caller checked the alignment.
template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&v)[MLM_GROUP]) {
  static_assert(sizeof(T) == 1 || sizeof(T) == 4 || sizeof(T) == 8, "ids and flags are 1, 4 or 8 bytes");
  if constexpr (sizeof(T) == 1) {
    *reinterpret_cast<uchar4*>(v) = *reinterpret_cast<const uchar4*>(p);
  } else if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<int4*>(v) = *reinterpret_cast<const int4*>(p);
  } else {
    reinterpret_cast<int4*>(v)[0] = reinterpret_cast<const int4*>(p)[0];
    reinterpret_cast<int4*>(v)[1] = reinterpret_cast<const int4*>(p)[1];
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const T (&v)[MLM_GROUP]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(v);
  } else {
    reinterpret_cast<int4*>(p)[0] = reinterpret_cast<const int4*>(v)[0];
    reinterpret_cast<int4*>(p)[1] = reinterpret_cast<const int4*>(v)[1];
  }
}

// Flag = void: no special-tokens mask.
template <typename Id, typename Flag, bool VECTOR>
__global__ void __launch_bounds__(THREADS)
    mlm_mask_kernel(const Id* __restrict__ ids, const Flag* __restrict__ special, Id* __restrict__ masked,
                    Id* __restrict__ labels, int64_t n, Id mask_token, uint64_t vocab, uint32_t select_below,
                    uint64_t seed) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  const int64_t first = group * MLM_GROUP;
  if (first >= n) return;
  const Philox4 select = mlm_select_draw(static_cast<uint64_t>(group), seed);
  const bool full = first + MLM_GROUP <= n;

  alignas(16) Id id[MLM_GROUP] = {};
  alignas(16) Id out_ids[MLM_GROUP], out_labels[MLM_GROUP];
  bool is_special[MLM_GROUP] = {};
  if (VECTOR && full) {
    load4(ids + first, id);
    if constexpr (!std::is_void_v<Flag>) {
      alignas(16) Flag flag[MLM_GROUP];
      load4(special + first, flag);
#pragma unroll
      for (int k = 0; k < MLM_GROUP; ++k) is_special[k] = flag[k] != 0;
    }
  } else {
#pragma unroll
    for (int k = 0; k < MLM_GROUP; ++k) {
      if (first + k < n) {
        id[k] = ids[first + k];
        if constexpr (!std::is_void_v<Flag>) is_special[k] = special[first + k] != 0;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < MLM_GROUP; ++k) {
    const bool selected = !is_special[k] && uniform24(select.v[k]) < select_below;
    mlm_apply(id[k], selected, static_cast<uint64_t>(first + k), seed, mask_token, vocab, &out_ids[k],
              &out_labels[k]);
  }
  if (VECTOR && full) {
    store4(masked + first, out_ids);
    store4(labels + first, out_labels);
  } else {
#pragma unroll
    for (int k = 0; k < MLM_GROUP; ++k) {
      if (first + k < n) {
        masked[first + k] = out_ids[k];
        labels[first + k] = out_labels[k];
      }
    }
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

template <typename Id, typename Flag>
void launch(const MlmMaskArgs& a, cudaStream_t stream) {
  const int64_t groups = (a.numel + MLM_GROUP - 1) / MLM_GROUP;
  const int64_t blocks = (groups + THREADS - 1) / THREADS;
  check(blocks <= INT_MAX, "mlm_mask", "input of " + std::to_string(a.numel) + " ids is too large for one launch");
  // Vector loads need every group's first element on a 16-byte boundary (4 for
  // uint8 flags): true for whole tensors from the caching allocator, not for
  // every view, so it is checked rather than assumed.
  bool vector = aligned16(a.input_ids) && aligned16(a.masked) && aligned16(a.labels);
  if constexpr (!std::is_void_v<Flag>) {
    constexpr uintptr_t flag_alignment = sizeof(Flag) == 1 ? 4 : 16;
    vector = vector && a.special % flag_alignment == 0;
  }
  const auto* ids = reinterpret_cast<const Id*>(a.input_ids);
  const auto* special = reinterpret_cast<const Flag*>(a.special);
  auto* masked = reinterpret_cast<Id*>(a.masked);
  auto* labels = reinterpret_cast<Id*>(a.labels);
  const auto kernel = vector ? mlm_mask_kernel<Id, Flag, true> : mlm_mask_kernel<Id, Flag, false>;
  kernel<<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(ids, special, masked, labels, a.numel,
                                                               static_cast<Id>(a.mask_token_id),
                                                               static_cast<uint64_t>(a.vocab_size),
                                                               mlm_select_below(a.mlm_probability), a.seed);
  check_launch("mlm_mask_kernel");
}

template <typename Id>
void dispatch_special(const MlmMaskArgs& a, cudaStream_t stream) {
  switch (a.special == 0 ? 0 : a.special_size) {
    case 1: return launch<Id, uint8_t>(a, stream);
    case 4: return launch<Id, int32_t>(a, stream);
    case 8: return launch<Id, int64_t>(a, stream);
    default: return launch<Id, void>(a, stream);
  }
}

}  // namespace

void mlm_mask_cuda(const MlmMaskArgs& a, uintptr_t stream) {
  for (const auto& [ptr, name] : {std::pair{a.input_ids, "input_ids"}, std::pair{a.masked, "masked"},
                                  std::pair{a.labels, "labels"}, std::pair{a.special, "special_tokens_mask"}}) {
    if (ptr != 0) check_device_pointer(ptr, a.numel, "mlm_mask", name);
  }
  if (a.numel == 0) return;
  if (a.id_size == 8) {
    dispatch_special<int64_t>(a, as_stream(stream));
  } else {
    dispatch_special<int32_t>(a, as_stream(stream));
  }
}

}  // namespace minipt
