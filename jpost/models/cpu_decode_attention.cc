// A decode step's attention over the KV cache on XLA:CPU, called through
// XLA's FFI (jpost/models/cpu_decode.py registers it).
//
// Each row's new queries attend over its cache's bfloat16 slots under the
// mask XLA made ([B, T, S]; slots not yet written are masked) and, with a
// shared prefix, first over its prompt's slots (keys [G, K, H, P] shared by
// B / G rows, under their own mask [B, T, P]): one softmax over both, as
// attention.shared_prefix_attention computes it. XLA runs that as some ten
// small operations a layer, whose fixed cost outweighs their arithmetic at a
// decode step's sizes; here it is one call, which reads each slot's key and
// value once for the key head's queries and skips the masked slots' values
// (and keys, 16 slots at a time). Scores, softmax and sums in float32; the
// output rounded to bfloat16. A query whose every slot is masked averages
// them all, as a softmax of equal scores does.
//
// Layouts are the decoder's: q [B, T, N, H] bfloat16, keys [B, K, H, S],
// values [B, K, S, H] (bfloat16 as their bits, uint16, as the cache stores
// them on CPU: decoder.cache_storage_dtype); query head
// n uses key head n / (N / K). Work is split over (row, key head) pairs on
// XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jpost;  // cpu_kernels.h: vectors, bfloat16, exp, parallel_for

namespace {

constexpr float kMaskValue = -0.7f * 3.4028234663852886e38f;  // attention.MASK_VALUE
constexpr int kMaxGroup = 8;  // query heads per key head

struct Part {  // the slots of one key head a row reads: its prompt's or its own
  const uint16_t* keys;    // [H, len], bfloat16 bits
  const uint16_t* values;  // [len, H], bfloat16 bits
  const bool* mask;     // [len] for the query at hand
  int64_t len;
};

// Chunks of 16 slots a block of `part_scores` holds in registers for G
// query heads: G x chunks accumulators of the 32, at most 8 chunks.
constexpr int chunks_per_block(int g) { return g <= 3 ? 8 : 24 / g; }

// scores[g][c] = scale * q_g . keys[:, c] where mask[c], else kMaskValue.
// Blocks of up to 8 chunks of 16 slots go over the H key rows once, each
// row read as one run of the block's slots, and the next block's lines are
// asked into L2 meanwhile. Chunk by chunk (before), the H rows, part.len
// slots apart, were H streams that a chunk touched for 32 bytes each (at
// 512 slots the rows are 1 KB apart, so 64 of them share 4 of the L1's
// sets); `perf` put 58% of the scores' time on the key load. At 16 rows x
// 512 slots (256 filled) the call went 186-225 -> 161-212 us a layer, at
// 128 slots after a 200-slot prompt 149-169 -> 113-126 us (bench/RESULTS.md).
// Chunks with no visible slot are skipped at a block's ends; each visible
// score is the same sum, in the same order, as one chunk at a time.
template <int G>
void part_scores(const Part& part, const float* q, int64_t h, float scale, float* scores,
                 int64_t ld) {
  constexpr int kChunks = chunks_per_block(G);
  const int64_t whole = part.len / 16 * 16;  // slots in whole chunks
  auto visible = [&](int64_t c, int64_t width) {
    bool any = false;
    for (int64_t j = 0; j < width; ++j) any |= part.mask[c + j];
    return any;
  };
  auto masked = [&](int64_t c, int64_t width) {
    for (int i = 0; i < G; ++i)
      for (int64_t j = 0; j < width; ++j) scores[i * ld + c + j] = kMaskValue;
  };
  auto finish = [&](int64_t c, int64_t width, const V16* acc) {  // acc[i]: chunk c, head i
    for (int i = 0; i < G; ++i)
      for (int64_t j = 0; j < width; ++j)
        scores[i * ld + c + j] = part.mask[c + j] ? acc[i][j] * scale : kMaskValue;
  };
  for (int64_t b0 = 0; b0 < whole; b0 += 16 * kChunks) {
    const int64_t b1 = std::min<int64_t>(whole, b0 + 16 * kChunks);
    int64_t lo = b0, hi = b1;  // the block's chunks from its first to its last visible one
    while (lo < hi && !visible(lo, 16)) masked(lo, 16), lo += 16;
    while (hi > lo && !visible(hi - 16, 16)) masked(hi - 16, 16), hi -= 16;
    const int n = static_cast<int>((hi - lo) / 16);
    if (n == 0) continue;
    V16 acc[kChunks][G];
    for (int j = 0; j < kChunks; ++j)
      for (int i = 0; i < G; ++i) acc[j][i] = V16{};
    const int64_t next = std::min<int64_t>(b1 + 16 * kChunks, whole) - b1;  // its slots
    for (int64_t x = 0; x < h; ++x) {
      const uint16_t* row = part.keys + x * part.len + lo;
      for (int64_t ahead = 0; ahead < next; ahead += 32)  // the next block's lines, into L2
        _mm_prefetch(reinterpret_cast<const char*>(part.keys + x * part.len + b1 + ahead),
                     _MM_HINT_T1);
      V16 qx[G];
      for (int i = 0; i < G; ++i) qx[i] = splat(q[i * h + x]);
      for (int j = 0; j < kChunks; ++j) {
        if (j >= n) break;
        const V16 k = load16_bf16(row + 16 * j);
        for (int i = 0; i < G; ++i) acc[j][i] += qx[i] * k;
      }
    }
    for (int j = 0; j < n; ++j) finish(lo + 16 * j, 16, acc[j]);
  }
  if (whole < part.len) {  // the last, partial chunk of slots
    const int64_t c = whole, width = part.len - whole;
    if (!visible(c, width)) {
      masked(c, width);
      return;
    }
    V16 acc[G];
    for (int i = 0; i < G; ++i) acc[i] = V16{};
    for (int64_t x = 0; x < h; ++x) {
      V16 k = V16{};
      for (int64_t j = 0; j < width; ++j) k[j] = from_bf16(part.keys[x * part.len + c + j]);
      for (int i = 0; i < G; ++i) acc[i] += splat(q[i * h + x]) * k;
    }
    finish(c, width, acc);
  }
}

// out[g][:] += sum_c probs[g][c] * values[c, :] over the slots whose
// probability is not zero, 64 columns of H at a time.
template <int G>
void part_values(const Part& part, const float* probs, int64_t h, int64_t ld, float* out) {
  for (int64_t xc = 0; xc < h; xc += 64) {
    const int64_t vecs = std::min<int64_t>(4, (h - xc) / 16);
    V16 acc[G][4];
    for (int i = 0; i < G; ++i)
      for (int64_t j = 0; j < vecs; ++j) acc[i][j] = load16(out + i * h + xc + 16 * j);
    for (int64_t c = 0; c < part.len; ++c) {
      bool any = false;
      for (int i = 0; i < G; ++i) any |= probs[i * ld + c] != 0.0f;
      if (!any) continue;
      const uint16_t* v = part.values + c * h + xc;
      for (int64_t j = 0; j < vecs; ++j) {
        const V16 vj = load16_bf16(v + 16 * j);
        for (int i = 0; i < G; ++i) acc[i][j] += splat(probs[i * ld + c]) * vj;
      }
    }
    for (int i = 0; i < G; ++i)
      for (int64_t j = 0; j < vecs; ++j) store16(out + i * h + xc + 16 * j, acc[i][j]);
  }
}

struct Dims {
  int64_t b, t, n, k, h, s, groups, p;  // p = 0: no shared prefix
};

ffi::Error check(const Dims& d) {
  if (d.h % 16 != 0 || d.n % d.k != 0 || d.n / d.k > kMaxGroup || (d.p > 0 && d.b % d.groups))
    return ffi::Error::InvalidArgument(
        "jpost cpu decode attention: head size must be a multiple of 16, 1-8 query heads "
        "per key head, and the rows a whole number per prompt");
  return ffi::Error::Success();
}

// One (row, key head): its G query heads at each of the T new positions.
template <int G>
void row_head(const Dims& d, int64_t b, int64_t kh, const uint16_t* q, const uint16_t* keys,
              const uint16_t* values, const bool* mask, const uint16_t* pkeys,
              const uint16_t* pvalues, const bool* pmask, uint16_t* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.h));
  const int64_t ld = d.p + d.s;
  thread_local std::vector<float> qf, scores, acc;  // this thread's, reused call to call
  qf.resize(G * d.h);
  scores.resize(G * ld);
  acc.resize(G * d.h);
  const int64_t group = d.p > 0 ? b / (d.b / d.groups) : 0;
  for (int64_t t = 0; t < d.t; ++t) {
    for (int i = 0; i < G; ++i)
      for (int64_t x = 0; x < d.h; ++x)
        qf[i * d.h + x] = from_bf16(q[((b * d.t + t) * d.n + kh * G + i) * d.h + x]);
    Part own{keys + (b * d.k + kh) * d.h * d.s, values + (b * d.k + kh) * d.s * d.h,
             mask + (b * d.t + t) * d.s, d.s};
    Part shared{nullptr, nullptr, nullptr, 0};
    if (d.p > 0)
      shared = Part{pkeys + (group * d.k + kh) * d.h * d.p,
                    pvalues + (group * d.k + kh) * d.p * d.h, pmask + (b * d.t + t) * d.p, d.p};
    if (d.p > 0) part_scores<G>(shared, qf.data(), d.h, scale, scores.data(), ld);
    part_scores<G>(own, qf.data(), d.h, scale, scores.data() + d.p, ld);
    float total[G];
    for (int i = 0; i < G; ++i) {
      float* row = scores.data() + i * ld;
      const float top = row_max(row, ld);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < ld; ++c) {
        // Below e^-87 (float32's smallest normal) a probability is 0, as
        // XLA's exp of a masked score is: those slots' values are skipped.
        const float x = row[c] - top;
        row[c] = x < -87.0f ? 0.0f : exp_nonpositive(x);
        sum += row[c];
      }
      total[i] = sum;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (d.p > 0) part_values<G>(shared, scores.data(), d.h, ld, acc.data());
    part_values<G>(own, scores.data() + d.p, d.h, ld, acc.data());
    for (int i = 0; i < G; ++i)
      for (int64_t x = 0; x < d.h; ++x)
        out[((b * d.t + t) * d.n + kh * G + i) * d.h + x] = to_bf16(acc[i * d.h + x] / total[i]);
  }
}

ffi::Error Attend(ffi::ThreadPool& pool, const Dims& d, ffi::Buffer<ffi::BF16>& q,
                  ffi::Buffer<ffi::U16>& keys, ffi::Buffer<ffi::U16>& values,
                  ffi::Buffer<ffi::PRED>& mask, const uint16_t* pkeys, const uint16_t* pvalues,
                  const bool* pmask, ffi::ResultBuffer<ffi::BF16>& out) {
  if (ffi::Error e = check(d); e.failure()) return e;
  const auto* qs = reinterpret_cast<const uint16_t*>(q.typed_data());
  auto* os = reinterpret_cast<uint16_t*>(out->typed_data());
  parallel_for(pool, d.b * d.k, [&](int64_t item) {
    dispatch_g(d.n / d.k, [&](auto g) {
      row_head<decltype(g)::value>(d, item / d.k, item % d.k, qs, keys.typed_data(),
                                   values.typed_data(), mask.typed_data(), pkeys, pvalues,
                                   pmask, os);
    });
  });
  return ffi::Error::Success();
}

Dims dims_of(ffi::Buffer<ffi::BF16>& q, ffi::Buffer<ffi::U16>& keys) {
  const auto qd = q.dimensions(), kd = keys.dimensions();
  return Dims{qd[0], qd[1], qd[2], kd[1], qd[3], kd[3], 1, 0};
}

ffi::Error Own(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U16> keys,
               ffi::Buffer<ffi::U16> values, ffi::Buffer<ffi::PRED> mask,
               ffi::ResultBuffer<ffi::BF16> out) {
  return Attend(pool, dims_of(q, keys), q, keys, values, mask, nullptr, nullptr, nullptr, out);
}

ffi::Error Shared(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U16> pkeys,
                  ffi::Buffer<ffi::U16> pvalues, ffi::Buffer<ffi::PRED> pmask,
                  ffi::Buffer<ffi::U16> keys, ffi::Buffer<ffi::U16> values,
                  ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::BF16> out) {
  Dims d = dims_of(q, keys);
  d.groups = pkeys.dimensions()[0];
  d.p = pkeys.dimensions()[3];
  return Attend(pool, d, q, keys, values, mask, pkeys.typed_data(), pvalues.typed_data(),
                pmask.typed_data(), out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostDecodeAttention, Own,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // keys [B, K, H, S]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // values [B, K, S, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, T, S]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // [B, T, N, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostDecodeAttentionShared, Shared,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // prompt keys [G, K, H, P]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // prompt values [G, K, P, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // prompt mask [B, T, P]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // keys [B, K, H, S]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // values [B, K, S, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, T, S]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // [B, T, N, H]
