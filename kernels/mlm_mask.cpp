// BERT's MLM masking on the CPU: one pass over the ids, groups of four elements
// over OpenMP threads, randomness from Philox keyed on (seed, element index).
//
// Memory traffic: read n ids (+ n special flags), write n ids and n labels. The
// cost is the generator: one Philox call per group of four for the selection,
// plus one per selected element for its action and random id (philox.h).
#include "cpu_common.h"
#include "ops.h"
#include "philox.h"

namespace minipt {
namespace {

// Groups are handed out in slices (see cross_entropy.cpp on dynamic scheduling).
constexpr int GROUPS_PER_GRAB = 1024;

template <typename Flag>
bool any_special(const Flag* special, int64_t i) {
  return special != nullptr && special[i] != 0;
}

template <typename Id, typename Flag>
void mask(const MlmMaskArgs& a, const Flag* special, int num_threads) {
  const Id* ids = reinterpret_cast<const Id*>(a.input_ids);
  Id* masked = reinterpret_cast<Id*>(a.masked);
  Id* labels = reinterpret_cast<Id*>(a.labels);
  const int64_t n = a.numel;
  const int64_t n_groups = (n + MLM_GROUP - 1) / MLM_GROUP;
  const Id mask_token = static_cast<Id>(a.mask_token_id);
  const uint64_t vocab = static_cast<uint64_t>(a.vocab_size);
  const uint32_t select_below = mlm_select_below(a.mlm_probability);
  const bool parallel = num_threads > 1 && n >= PARALLEL_MIN_ELEMENTS;

#pragma omp parallel for schedule(dynamic, GROUPS_PER_GRAB) num_threads(num_threads) if (parallel)
  for (int64_t g = 0; g < n_groups; ++g) {
    const Philox4 select = mlm_select_draw(static_cast<uint64_t>(g), a.seed);
    const int64_t first = g * MLM_GROUP;
    const int64_t count = n - first < MLM_GROUP ? n - first : MLM_GROUP;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = first + k;
      const bool selected = !any_special(special, i) && uniform24(select.v[k]) < select_below;
      mlm_apply(ids[i], selected, static_cast<uint64_t>(i), a.seed, mask_token, vocab, masked + i, labels + i);
    }
  }
}

template <typename Id>
void dispatch_special(const MlmMaskArgs& a, int num_threads) {
  switch (a.special == 0 ? 0 : a.special_size) {
    case 1: return mask<Id>(a, reinterpret_cast<const uint8_t*>(a.special), num_threads);
    case 4: return mask<Id>(a, reinterpret_cast<const int32_t*>(a.special), num_threads);
    case 8: return mask<Id>(a, reinterpret_cast<const int64_t*>(a.special), num_threads);
    default: return mask<Id>(a, static_cast<const uint8_t*>(nullptr), num_threads);
  }
}

}  // namespace

void mlm_mask_cpu(const MlmMaskArgs& a, int num_threads) {
  if (a.id_size == 8) {
    dispatch_special<int64_t>(a, num_threads);
  } else {
    dispatch_special<int32_t>(a, num_threads);
  }
}

}  // namespace minipt
