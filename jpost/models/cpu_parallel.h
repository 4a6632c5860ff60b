// What jpost's CPU kernels share: running their work on XLA's intra-op
// thread pool (the FFI's ThreadPool context).

#ifndef JPOST_MODELS_CPU_PARALLEL_H_
#define JPOST_MODELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jpost {

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

}  // namespace jpost

#endif  // JPOST_MODELS_CPU_PARALLEL_H_
