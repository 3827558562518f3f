// Philox4x32-10, the counter-based generator of Salmon et al. (SC'11, "Parallel
// random numbers: as easy as 1, 2, 3"), for host and device code alike.
//
// A draw is a pure function of (key, counter): no state, so every element of a
// tensor gets its own stream from its index, in any order, on any number of
// threads, and the CPU and CUDA kernels produce the same bits as minipt's torch
// reference and Triton kernel, which compute the same function.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"  // MINIPT_HOST_DEVICE

namespace minipt {

struct Philox4 {
  uint32_t v[4];
};

MINIPT_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds of the Philox4x32 bijection on counter c under key (k0, k1); the
// constants are the ones of the paper and of Random123.
MINIPT_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(M0, c.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(M1, c.v[2], &hi1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// The top 24 bits of a word, uniform on [0, 2^24). Every probability becomes an
// integer threshold t on them (u < t with probability t / 2^24), so the selection
// and the action are integer compares that every backend makes alike.
MINIPT_HOST_DEVICE uint32_t uniform24(uint32_t bits) { return bits >> 8; }

// Uniform integer in [0, n) from 64 random bits by Lemire's multiply-shift; the
// bias is below n / 2^64, far beneath anything a test could see.
MINIPT_HOST_DEVICE uint64_t uniform_below(uint32_t hi, uint32_t lo, uint64_t n) {
  const uint64_t r = (static_cast<uint64_t>(hi) << 32) | lo;
#if defined(__CUDA_ARCH__)
  return __umul64hi(r, n);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
#endif
}

// The MLM draw layout. The torch reference (minipt.ops.mlm_mask.mlm_mask_ref)
// defines it, and the Triton, C++ and CUDA kernels reproduce it bit for bit:
// key (seed mod 2^32, seed >> 32); element i is the flat index of the tensor.
//  * Selection: elements go in groups of four; counter (g mod 2^32, g >> 32, 0, 0)
//    of group g = i / 4 draws the group's four selection words, word i % 4 for i.
//  * Action: counter (i mod 2^32, i >> 32, 1, 0) draws the action (word 0) and the
//    random id (words 1, 2) of element i; only a selected element uses them.
// Why: here a kernel branches per element, so it runs one call per group and a
// second only for the ~15% it selects, 0.4 Philox calls per element where one
// draw per element for everything would take 1 (Philox is most of the kernel's
// time). The reference and Triton, which do not branch, draw the action for every
// element and let unselected ones ignore it: the same bits.
constexpr int MLM_GROUP = 4;

MINIPT_HOST_DEVICE Philox4 mlm_select_draw(uint64_t group, uint64_t seed) {
  return philox4x32_10(Philox4{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

MINIPT_HOST_DEVICE Philox4 mlm_action_draw(uint64_t index, uint64_t seed) {
  return philox4x32_10(Philox4{{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 1u, 0u}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The selection threshold for probability p: u < ceil(p * 2^24). p * 2^24 is exact
// in float, and the Python wrapper passes p as round(p * 2^24) / 2^24, so this is
// the reference's integer threshold round(p * 2^24) exactly.
MINIPT_HOST_DEVICE uint32_t mlm_select_below(float p) { return static_cast<uint32_t>(ceilf(p * 16777216.0f)); }

// What a selected element becomes: 80% [MASK], 10% a random id, 10% unchanged.
constexpr uint32_t MLM_MASK_BELOW = 13421773u;    // round(0.8 * 2^24): below, [MASK]
constexpr uint32_t MLM_RANDOM_BELOW = 15099494u;  // round(0.9 * 2^24): below, a random id; else unchanged

// Apply the MLM rule to one element. `selected` comes from the group draw.
template <typename Id>
MINIPT_HOST_DEVICE void mlm_apply(Id id, bool selected, uint64_t index, uint64_t seed, Id mask_token_id,
                                  uint64_t vocab_size, Id* masked, Id* label) {
  if (!selected) {
    *masked = id;
    *label = static_cast<Id>(-100);
    return;
  }
  const Philox4 r = mlm_action_draw(index, seed);
  const uint32_t action = uniform24(r.v[0]);
  *label = id;
  if (action < MLM_MASK_BELOW) {
    *masked = mask_token_id;
  } else if (action < MLM_RANDOM_BELOW) {
    *masked = static_cast<Id>(uniform_below(r.v[1], r.v[2], vocab_size));
  } else {
    *masked = id;
  }
}

}  // namespace minipt
