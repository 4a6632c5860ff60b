// What jpost's CPU kernels share: 16-float vectors, bfloat16 conversions,
// a vectorisable exp for softmaxes, and running work on XLA's intra-op
// thread pool (the FFI's ThreadPool context).

#ifndef JPOST_MODELS_CPU_KERNELS_H_
#define JPOST_MODELS_CPU_KERNELS_H_

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace jpost {

typedef float V16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register

inline V16 load16(const float* p) { V16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }
inline V16 splat(float x) {  // a broadcast (V16{} + x would add a zero first)
  return V16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

inline float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// 16 bfloat16 values (their bits) as floats. With AVX-512 one widening
// load and a shift: the loop below compiles to two 256-bit halves stored to
// the stack and read back as one 512-bit value, a failed store forward.
inline V16 load16_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i wide = _mm512_cvtepu16_epi32(bits);
  return reinterpret_cast<V16>(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
#else
  V16 v;
  for (int i = 0; i < 16; ++i) v[i] = from_bf16(p[i]);
  return v;
#endif
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as XLA converts
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// exp(x) for the softmax's x <= 0, in a form the compiler vectorises:
// 2^n * p(f) with a degree-6 polynomial (relative error ~2e-7).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (nearbyint is a
  // library call the compiler does not vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float f = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}

// max(row[0:n]) 16 at a time (a scalar loop otherwise: the compiler keeps
// std::max's NaN order and does not vectorise it).
inline float row_max(const float* row, int64_t n) {
  V16 mv = splat(-INFINITY);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const V16 x = load16(row + c);
    mv = x > mv ? x : mv;
  }
  float m = -INFINITY;
  for (int i = 0; i < 16; ++i) m = std::max(m, mv[i]);
  for (; c < n; ++c) m = std::max(m, row[c]);
  return m;
}

// Runs fn(item) for item in [0, items) on the calling thread and XLA's pool.
// The caller waits for the items, not for the pool's tasks: a task that
// starts late (its thread busy with another of XLA's operations) finds every
// item taken and returns without touching `fn`, whose captures are gone by
// then; the counters it reads live as long as it does.
template <typename F>
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, F fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  std::function<void(int64_t)> body = fn;
  auto* body_ptr = &body;
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), items) - 1;
  for (int64_t w = 0; w < helpers; ++w)
    pool.Schedule([counters, body_ptr, items]() {
      for (int64_t item; (item = counters->next.fetch_add(1)) < items;) {
        (*body_ptr)(item);
        counters->done.fetch_add(1);
      }
    });
  for (int64_t item; (item = counters->next.fetch_add(1)) < items;) {
    fn(item);
    counters->done.fetch_add(1);
  }
  while (counters->done.load() < items) std::this_thread::yield();
}

// f(std::integral_constant<int64_t, g>) for g in 1..8 (query heads per key
// head), so a kernel's per-head accumulators are a fixed number of
// registers; false for any other g.
template <typename F>
bool dispatch_g(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int64_t, 1>{}); return true;
    case 2: f(std::integral_constant<int64_t, 2>{}); return true;
    case 3: f(std::integral_constant<int64_t, 3>{}); return true;
    case 4: f(std::integral_constant<int64_t, 4>{}); return true;
    case 5: f(std::integral_constant<int64_t, 5>{}); return true;
    case 6: f(std::integral_constant<int64_t, 6>{}); return true;
    case 7: f(std::integral_constant<int64_t, 7>{}); return true;
    case 8: f(std::integral_constant<int64_t, 8>{}); return true;
    default: return false;
  }
}

}  // namespace jpost

#endif  // JPOST_MODELS_CPU_KERNELS_H_
