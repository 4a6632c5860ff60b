// A decode step's draw from its logits on XLA:CPU, called through XLA's FFI
// (jpost/sampling.py's _pick, where decoding runs on the CPU kernels).
//
// Per row of float32 logits [R, V]: the log-softmax total at temperature 1
// (the raw log-prob of what is drawn), the softmax at temperature T, and a
// draw from it by inverse CDF with the row's uniform number u: the block of
// 256 tokens whose cumulative mass passes u x total, then the token within
// it (sampling._drawn, whose blocks and clamps these are); at temperature 0
// the first maximum (sampling.greedy_tokens). XLA ran that as
// some ten passes over [R, V] with a [R, V] array of exponentials written
// between them (~3.5 ms of a SmolLM2 decode step at 64 rows,
// bench/RESULTS.md); here it is one pass for the max, one for both sums
// and the block masses, and one block read again, each row on one thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 256;  // tokens a block of the draw holds (sampling._drawn's)

// exp(x) for x <= 0, and exactly 0 where it would underflow (XLA's exp
// gives 0 there too: a token of probability 0 is never drawn).
inline float exp_or_zero(float x) { return x < -87.0f ? 0.0f : jpost::exp_nonpositive(x); }

struct Drawn {
  int32_t token;
  float raw_logprob, sampled_logprob;
};

// Greedy (sampling.greedy_tokens): the first maximum, or the first NaN
// where the row has one; its log-prob at temperature 1.
Drawn greedy_row(const float* row, int64_t vocab) {
  const float top = jpost::row_max(row, vocab);
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < vocab; ++i) total += exp_or_zero(row[i] - top);
  int64_t token = 0;
  if (std::isnan(total)) {  // a NaN's exp is NaN: find the first
    while (token + 1 < vocab && !std::isnan(row[token])) ++token;
  } else {
    while (token + 1 < vocab && row[token] != top) ++token;
  }
  return {static_cast<int32_t>(token), row[token] - top - std::log(total), 0.0f};
}

Drawn draw_row(const float* row, int64_t vocab, float inv_temperature, float u,
               std::vector<float>& mass) {
  const float top = jpost::row_max(row, vocab);
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  float raw_total = 0.0f, total = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(vocab, lo + kBlock);
    float raw = 0.0f, scaled = 0.0f;
#pragma omp simd reduction(+ : raw, scaled)
    for (int64_t i = lo; i < hi; ++i) {
      const float d = row[i] - top;
      raw += exp_or_zero(d);
      scaled += exp_or_zero(d * inv_temperature);
    }
    raw_total += raw;
    mass[b] = scaled;
    total += scaled;
  }
  // The first block whose cumulative mass passes the target; where rounding
  // puts the target at the very end, the last block with any mass.
  const float target = u * total;
  int64_t chosen = -1, last_with_mass = 0;
  float before = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    if (mass[b] > 0.0f) last_with_mass = b;
    if (chosen < 0 && before + mass[b] > target) {
      chosen = b;
      break;
    }
    before += mass[b];
  }
  if (chosen < 0) {
    chosen = last_with_mass;
    before = 0.0f;
    for (int64_t b = 0; b < chosen; ++b) before += mass[b];
  }
  const int64_t lo = chosen * kBlock, hi = std::min(vocab, lo + kBlock);
  const float within = target - before;
  int64_t token = -1, last_positive = lo;
  float cumulative = 0.0f;
  for (int64_t i = lo; i < hi; ++i) {
    const float p = exp_or_zero((row[i] - top) * inv_temperature);
    if (p > 0.0f) last_positive = i;
    cumulative += p;
    if (cumulative > within) {
      token = i;
      break;
    }
  }
  if (token < 0) token = last_positive;
  const float d = row[token] - top;
  return {static_cast<int32_t>(token), d - std::log(raw_total),
          d * inv_temperature - std::log(total)};
}

ffi::Error Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> uniform,
                  ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> raw,
                  ffi::ResultBuffer<ffi::F32> sampled, float temperature) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || uniform.dimensions().size() != 1 || uniform.dimensions()[0] != d[0] ||
      !(temperature >= 0.0f))
    return ffi::Error::InvalidArgument(
        "jpost cpu_sample: expected logits [R, V], uniform numbers [R] and a temperature >= 0");
  const int64_t rows = d[0], vocab = d[1];
  const float* ls = logits.typed_data();
  const float* us = uniform.typed_data();
  int32_t* ts = tokens->typed_data();
  float* rs = raw->typed_data();
  float* ss = sampled->typed_data();
  jpost::parallel_for(pool, rows, [&](int64_t r) {
    std::vector<float> mass((vocab + kBlock - 1) / kBlock);
    const Drawn drawn = temperature == 0.0f
                            ? greedy_row(ls + r * vocab, vocab)
                            : draw_row(ls + r * vocab, vocab, 1.0f / temperature, us[r], mass);
    ts[r] = drawn.token;
    rs[r] = drawn.raw_logprob;
    ss[r] = drawn.sampled_logprob;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostSample, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits [R, V]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // uniform [R] in [0, 1)
                                                                 // (unread at temperature 0)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens [R]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // raw log-probs [R]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sampled log-probs [R]
                                  .Attr<float>("temperature"));
