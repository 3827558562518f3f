// What the C++ CPU kernels share: threading, SIMD dispatch, a vectorisable exp and a
// huge-page hint for large outputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __linux__
#include <sys/mman.h>
#endif

// The wheel must run on any x86-64, but the row loops are 2-4x faster with
// AVX2/AVX-512: GCC compiles each marked function three times and picks the
// best one for the CPU when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MINIPT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MINIPT_CPU_CLONES
#endif

namespace minipt {

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// A large output is usually fresh memory: torch maps big CPU tensors straight from
// the OS, so a kernel's first writes fault its pages in 4 KiB at a time. On our
// 2-core machines that costs about 2 µs a page, some 70 ms for a 4096 x 8192 float32
// gradient, several times the kernel that fills it (cross-entropy fwd+bwd went from
// 2.5x to 5x torch's speed with this hint). Transparent huge pages cut the faults
// 512-fold; where the system grants them only on request (enabled = madvise), ask.
// Only whole 2 MiB pages inside the buffer are advised, so no neighbouring
// allocation is touched. A hint: it changes no data, and a refusal (a file mapping,
// an old kernel) is ignored.
inline void advise_huge_pages(uintptr_t ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE_PAGE = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * HUGE_PAGE)) return;
  const uintptr_t begin = (ptr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  const uintptr_t end = (ptr + static_cast<uintptr_t>(bytes)) & ~(HUGE_PAGE - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t{1} << 15;

// e^r·2^n, |r| <= ln2/2, n an integer held in the low mantissa bits of
// shifted = n + 1.5·2^23: Cephes' degree-6 polynomial for e^r, and 2^n built in
// the exponent bits. The common tail of exp_approx and exp2_approx.
inline float exp_reduced(float r, float shifted) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, 4);
  bits = (bits - 0x4B400000 + 127) << 23;  // (n + 127) in the exponent field
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}

// exp(x) in float32 within 2 ulp, written so that a loop over it vectorises (no
// libm call, no float->int conversion). Cody-Waite reduction
// x = n·ln2 + r with |r| <= ln2/2, then exp_reduced. Loops over it vectorise
// without AVX-512 only with -fno-trapping-math (CMakeLists.txt says why).
//
// Inputs are clamped to [-88, 88]. Below about -87.68, where e^x is under 2^-126
// (the smallest normal float), n is -127, whose exponent field is 0: 2^n is built
// as +0 and e^x comes out exactly 0, as with flush-to-zero. So exp_approx(-inf)
// is 0, which a masked logit's softmax and gradient need, with no select per
// element. NaN passes through the clamp.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -88.0f), 88.0f);
  // Adding 1.5·2^23 rounds x·log2(e) to an integer held in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  return exp_reduced(r, shifted);
}

// 2^x in float32 within 2 ulp, vectorisable like exp_approx, for a softmax in
// base 2 (scores pre-scaled by log2(e)). With n = round(x), x - n is exact, so
// there is no Cody-Waite split: r = (x - n)·ln2. Clamped to [-127, 127]: below
// about 2^-126.5 the result is exactly 0, so exp2_approx(-inf) == 0, which masked
// scores rely on; NaN passes through.
inline float exp2_approx(float x) {
  x = std::min(std::max(x, -127.0f), 127.0f);
  const float shifted = x + 12582912.0f;
  const float n = shifted - 12582912.0f;
  return exp_reduced((x - n) * 0.693147180559945309f, shifted);
}

}  // namespace minipt
