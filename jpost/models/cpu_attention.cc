// Packed causal self-attention for XLA:CPU, called through XLA's FFI
// (jpost/models/cpu_attention.py builds and registers it).
//
// Each real query sees the keys of its own segment up to itself and, where
// a row has one, the row's shared prefix (negative segment ids: a prompt
// under several packed completions); padding (segment 0) sees nothing and
// gets a zero output. Only those keys are computed: the cost follows the
// samples' lengths, not the row's. Scores, softmax and sums run in float32
// over bfloat16 inputs; the forward keeps each query's log-sum-exp so the
// backward recomputes the probabilities without a second softmax.
//
// Layouts are the decoder's: q [B, T, N, H], keys [B, K, H, T], values
// [B, K, T, H], segments [B, T]; query head n uses key head n / (N / K).
// The backward returns the keys' gradient as [B, K, T, H], like the
// values'. Work is split over pieces of rows (whole segments) and key
// heads on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jpost;  // cpu_kernels.h: vectors, bfloat16, exp, parallel_for

namespace {

struct Shape {
  int64_t b, t, n, k, h;  // rows, tokens (keys), query heads, key heads, head size
  int64_t tq;             // queries: the last tq of the t tokens
  int64_t g() const { return n / k; }
  int64_t first_query() const { return t - tq; }
  // Where token i's query (head n) starts in q [B, tq, N, H], and where its
  // log-sum-exp (query head g of key head kh) is in [B, K, G, tq].
  int64_t q_at(int64_t b, int64_t i, int64_t head) const {
    return ((b * tq + i - first_query()) * n + head) * h;
  }
  int64_t lse_at(int64_t b, int64_t kh, int64_t g_, int64_t i) const {
    return ((b * k + kh) * g() + g_) * tq + i - first_query();
  }
};

// The keys a row's queries may see: its shared prefix [prefix_lo,
// prefix_hi) (empty if none) and, per query, its segment's first token.
struct RowPlan {
  bool ok = true;
  int64_t prefix_lo = 0, prefix_hi = 0;
  std::vector<int64_t> seg_start;
};

// Rows this kernel runs: segments contiguous, at most one contiguous
// shared prefix whose positions come before every segment's.
RowPlan plan_row(const int32_t* seg, const int32_t* pos, int64_t t) {
  RowPlan plan;
  plan.seg_start.assign(t, 0);
  std::vector<int32_t> seen;
  int64_t start = 0, prefix_count = 0;
  int32_t prefix_pos = INT32_MIN, real_min_pos = INT32_MAX;
  for (int64_t i = 0; i < t; ++i) {
    if (i == 0 || seg[i] != seg[i - 1]) {
      if (seg[i] != 0 && std::find(seen.begin(), seen.end(), seg[i]) != seen.end())
        plan.ok = false;  // a segment in two pieces
      seen.push_back(seg[i]);
      start = i;
    }
    plan.seg_start[i] = start;
    if (seg[i] < 0) {
      if (prefix_count == 0) plan.prefix_lo = i;
      plan.prefix_hi = i + 1;
      ++prefix_count;
      prefix_pos = std::max(prefix_pos, pos[i]);
    } else if (seg[i] > 0) {
      real_min_pos = std::min(real_min_pos, pos[i]);
    }
  }
  if (prefix_count != plan.prefix_hi - plan.prefix_lo) plan.ok = false;  // not contiguous
  if (prefix_count > 0 && real_min_pos != INT32_MAX && prefix_pos >= real_min_pos)
    plan.ok = false;  // a prefix key after a query: not causal by index
  return plan;
}

// out[r][c] = sum_x a[r][x] * bt[x][cols[c]] for the block's key columns,
// R rows of a at once (R accumulators, one load of bt per x).
template <int64_t R>
void scores(const float* a, const float* bt, int64_t bt_ld, const Shape& s,
            const int64_t* ranges, int n_ranges, float* out, int64_t out_ld) {
  int64_t c0 = 0;
  for (int q = 0; q < n_ranges; ++q) {
    const int64_t lo = ranges[2 * q], len = ranges[2 * q + 1] - lo;
    for (int64_t jc = 0; jc < len; jc += 16) {
      V16 acc[R];
      for (int64_t r = 0; r < R; ++r) acc[r] = V16{};
      for (int64_t x = 0; x < s.h; ++x) {
        const V16 kv = load16(bt + x * bt_ld + lo + jc);
        for (int64_t r = 0; r < R; ++r) acc[r] += splat(a[r * s.h + x]) * kv;
      }
      for (int64_t r = 0; r < R; ++r) store16(out + r * out_ld + c0 + jc, acc[r]);
    }
    c0 += len;
  }
}

// out[r][x] = sum_c w[r][c] * rows[cols[c]][x], 32 columns of x at a time.
template <int64_t R>
void weighted_rows(const float* w, int64_t w_ld, const float* rows, const Shape& s,
                   const int64_t* ranges, int n_ranges, float* out) {
  for (int64_t xc = 0; xc < s.h; xc += 32) {
    V16 a0[R], a1[R];
    for (int64_t r = 0; r < R; ++r) a0[r] = a1[r] = V16{};
    int64_t c = 0;
    for (int q = 0; q < n_ranges; ++q)
      for (int64_t j = ranges[2 * q]; j < ranges[2 * q + 1]; ++j, ++c) {
        const V16 v0 = load16(rows + j * s.h + xc), v1 = load16(rows + j * s.h + xc + 16);
        for (int64_t r = 0; r < R; ++r) {
          const V16 p = splat(w[r * w_ld + c]);
          a0[r] += p * v0;
          a1[r] += p * v1;
        }
      }
    for (int64_t r = 0; r < R; ++r) {
      store16(out + r * s.h + xc, a0[r]);
      store16(out + r * s.h + xc + 16, a1[r]);
    }
  }
}

// The key columns of queries [i0, i1) (one segment): the row's shared
// prefix, if the segment is a real one, then the segment up to i1; counted
// from `base`, the first key the work item holds.
struct Block {
  int64_t ranges[4];
  int n_ranges = 0;
  int64_t columns = 0, prefix = 0;
};

Block block_keys(const RowPlan& plan, const int32_t* seg, int64_t i0, int64_t i1,
                 int64_t base) {
  Block blk;
  if (plan.prefix_hi > plan.prefix_lo && seg[i0] > 0) {  // base is 0: one piece a row
    blk.ranges[0] = plan.prefix_lo;
    blk.ranges[1] = plan.prefix_hi;
    blk.n_ranges = 1;
    blk.prefix = plan.prefix_hi - plan.prefix_lo;
  }
  blk.ranges[2 * blk.n_ranges] = plan.seg_start[i0] - base;
  blk.ranges[2 * blk.n_ranges + 1] = i1 - base;
  ++blk.n_ranges;
  blk.columns = blk.prefix + i1 - plan.seg_start[i0];
  return blk;
}

// A work item: one key head's tokens [lo, hi) of a row, whole segments
// (or the whole row), so that its queries see only its keys.
struct Piece {
  int64_t b, lo, hi;
};

// A work item's keys and values in float32, indexed from its first token:
// the keys transposed and the values as rows (the forward's operands), and
// for the backward also the keys as rows and the values transposed.
// Transposed rows are padded (`ld`) so that 16-wide loads stay inside.
struct KeyHead {
  int64_t lo, len, ld;
  std::vector<float> kt, vt, krows, vrows;
  KeyHead(const Shape& s, const Piece& piece, const uint16_t* k, const uint16_t* v,
          bool backward)
      : lo(piece.lo), len(piece.hi - piece.lo), ld(len + 16), kt(s.h * ld, 0.0f),
        vrows(len * s.h) {
    if (backward) {
      vt.assign(s.h * ld, 0.0f);
      krows.assign(len * s.h, 0.0f);
    }
    for (int64_t x = 0; x < s.h; ++x)
      for (int64_t j = 0; j < len; ++j) {
        const float kv = from_bf16(k[x * s.t + lo + j]);
        kt[x * ld + j] = kv;
        if (backward) krows[j * s.h + x] = kv;
      }
    for (int64_t j = 0; j < len; ++j)
      for (int64_t x = 0; x < s.h; ++x) {
        const float vv = from_bf16(v[(lo + j) * s.h + x]);
        vrows[j * s.h + x] = vv;
        if (backward) vt[x * ld + j] = vv;
      }
  }
};

// Queries per block for G query heads a key head: about 12 rows of
// accumulators, what AVX-512's 32 registers hold with the loads.
constexpr int64_t queries_per_block(int64_t g) { return g >= 12 ? 1 : 12 / g; }

// Calls padding(i) for each padding query of [lo, hi) and block(i0, i1) for
// each block of up to `per_block` queries [i0, i1) within one segment's
// run, in order.
template <typename Padding, typename BlockFn>
void for_each_query_block(const int32_t* seg, int64_t lo, int64_t hi, int64_t per_block,
                          Padding padding, BlockFn block) {
  for (int64_t i = lo; i < hi;) {
    if (seg[i] == 0) {
      padding(i++);
      continue;
    }
    int64_t end = i;
    while (end < hi && seg[end] == seg[i]) ++end;
    for (int64_t i0 = i; i0 < end; i0 += per_block) block(i0, std::min(i0 + per_block, end));
    i = end;
  }
}

template <int64_t G>
void forward_key_head(const Shape& s, const RowPlan& plan, const int32_t* seg,
                      const uint16_t* q, const KeyHead& kh_data, int64_t b, int64_t kh,
                      uint16_t* out, float* lse) {
  constexpr int64_t QB = queries_per_block(G), R = QB * G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.h));
  const int64_t sc_ld = s.t + 32;
  std::vector<float> qs(R * s.h), sc(R * sc_ld), o(R * s.h), inv(R);
  auto padding = [&](int64_t i) {  // a zero output
    for (int64_t g = 0; g < G; ++g) {
      std::memset(out + s.q_at(b, i, kh * G + g), 0, s.h * 2);
      lse[s.lse_at(b, kh, g, i)] = 0.0f;
    }
  };
  const int64_t lo = std::max(kh_data.lo, s.first_query()), hi = kh_data.lo + kh_data.len;
  for_each_query_block(seg, lo, hi, QB, padding, [&](int64_t i0, int64_t i1) {
    const int64_t rows = (i1 - i0) * G;
    const Block blk = block_keys(plan, seg, i0, i1, kh_data.lo);
    std::fill(qs.begin(), qs.end(), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* src = q + s.q_at(b, i0 + r / G, kh * G + r % G);
      for (int64_t x = 0; x < s.h; ++x) qs[r * s.h + x] = from_bf16(src[x]) * scale;
    }
    scores<R>(qs.data(), kh_data.kt.data(), kh_data.ld, s, blk.ranges, blk.n_ranges, sc.data(),
              sc_ld);
    for (int64_t r = 0; r < R; ++r) {
      float* row = sc.data() + r * sc_ld;
      const int64_t seen = r < rows ? blk.prefix + (i0 + r / G) - plan.seg_start[i0] + 1 : 0;
      const float m = row_max(row, seen);
      float l = 0.0f;
#pragma omp simd reduction(+ : l)
      for (int64_t c = 0; c < seen; ++c) {
        const float e = exp_nonpositive(row[c] - m);
        row[c] = e;
        l += e;
      }
      for (int64_t c = seen; c < blk.columns; ++c) row[c] = 0.0f;
      inv[r] = seen ? 1.0f / l : 0.0f;
      if (r < rows) lse[s.lse_at(b, kh, r % G, i0 + r / G)] = m + std::log(l);
    }
    weighted_rows<R>(sc.data(), sc_ld, kh_data.vrows.data(), s, blk.ranges, blk.n_ranges,
                     o.data());
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* dst = out + s.q_at(b, i0 + r / G, kh * G + r % G);
      for (int64_t x = 0; x < s.h; ++x) dst[x] = to_bf16(o[r * s.h + x] * inv[r]);
    }
  });
}

template <int64_t G>
void backward_key_head(const Shape& s, const RowPlan& plan, const int32_t* seg,
                       const uint16_t* q, const uint16_t* out, const float* lse,
                       const uint16_t* d_out, const KeyHead& kh_data, int64_t b, int64_t kh,
                       uint16_t* dq, std::vector<float>& dk, std::vector<float>& dv) {
  constexpr int64_t QB = queries_per_block(G), R = QB * G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.h));
  const int64_t sc_ld = s.t + 32;
  std::vector<float> qs(R * s.h), dor(R * s.h), delta(R), lrow(R), p(R * sc_ld), ds(R * sc_ld),
      dqr(R * s.h), o32(s.h);
  auto padding = [&](int64_t i) {  // no gradient
    for (int64_t g = 0; g < G; ++g) std::memset(dq + s.q_at(b, i, kh * G + g), 0, s.h * 2);
  };
  const int64_t lo = std::max(kh_data.lo, s.first_query()), hi = kh_data.lo + kh_data.len;
  for_each_query_block(seg, lo, hi, QB, padding, [&](int64_t i0, int64_t i1) {
    const int64_t rows = (i1 - i0) * G;
    const Block blk = block_keys(plan, seg, i0, i1, kh_data.lo);
    std::fill(qs.begin(), qs.end(), 0.0f);
    std::fill(dor.begin(), dor.end(), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = s.q_at(b, i0 + r / G, kh * G + r % G);
      for (int64_t x = 0; x < s.h; ++x) {
        qs[r * s.h + x] = from_bf16(q[at + x]) * scale;
        dor[r * s.h + x] = from_bf16(d_out[at + x]);
        o32[x] = from_bf16(out[at + x]);
      }
      V16 dl = V16{};  // sum(dO * O): the softmax's backward, per query
      for (int64_t x = 0; x < s.h; x += 16)
        dl += load16(dor.data() + r * s.h + x) * load16(o32.data() + x);
      float total = 0.0f;
      for (int i = 0; i < 16; ++i) total += dl[i];
      delta[r] = total;
      lrow[r] = lse[s.lse_at(b, kh, r % G, i0 + r / G)];
    }
    scores<R>(qs.data(), kh_data.kt.data(), kh_data.ld, s, blk.ranges, blk.n_ranges, p.data(),
              sc_ld);
    scores<R>(dor.data(), kh_data.vt.data(), kh_data.ld, s, blk.ranges, blk.n_ranges, ds.data(),
              sc_ld);
    for (int64_t r = 0; r < R; ++r) {
      float* pr = p.data() + r * sc_ld;
      float* dsr = ds.data() + r * sc_ld;
      const int64_t seen = r < rows ? blk.prefix + (i0 + r / G) - plan.seg_start[i0] + 1 : 0;
      const float lr = lrow[r], dr = delta[r];
#pragma omp simd
      for (int64_t c = 0; c < seen; ++c) {
        const float pc = exp_nonpositive(pr[c] - lr);
        pr[c] = pc;
        dsr[c] = pc * (dsr[c] - dr);
      }
      for (int64_t c = seen; c < blk.columns; ++c) pr[c] = dsr[c] = 0.0f;
    }
    weighted_rows<R>(ds.data(), sc_ld, kh_data.krows.data(), s, blk.ranges, blk.n_ranges,
                     dqr.data());
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* dst = dq + s.q_at(b, i0 + r / G, kh * G + r % G);
      for (int64_t x = 0; x < s.h; ++x) dst[x] = to_bf16(dqr[r * s.h + x] * scale);
    }
    // dK[j] += sum_r dS[r][j] * (scale * q[r]); dV[j] += sum_r P[r][j] * dO[r],
    // 16 columns of x at a time with the block's rows of q and dO held in
    // registers (rows past the block's are zeros, so all R are summed).
    for (int64_t xc = 0; xc < s.h; xc += 16) {
      V16 qx[R], dx[R];
      for (int64_t r = 0; r < R; ++r) {
        qx[r] = load16(qs.data() + r * s.h + xc);
        dx[r] = load16(dor.data() + r * s.h + xc);
      }
      int64_t c = 0;
      for (int qr = 0; qr < blk.n_ranges; ++qr)
        for (int64_t j = blk.ranges[2 * qr]; j < blk.ranges[2 * qr + 1]; ++j, ++c) {
          V16 ak = load16(dk.data() + j * s.h + xc), av = load16(dv.data() + j * s.h + xc);
          for (int64_t r = 0; r < R; ++r) {
            ak += splat(ds[r * sc_ld + c]) * qx[r];
            av += splat(p[r * sc_ld + c]) * dx[r];
          }
          store16(dk.data() + j * s.h + xc, ak);
          store16(dv.data() + j * s.h + xc, av);
        }
    }
  });
}

ffi::Error check(const Shape& s) {
  if (s.h % 32 != 0 || s.g() < 1 || s.g() > 8 || s.n % s.k != 0)
    return ffi::Error::InvalidArgument(
        "jpost CPU attention: head size must be a multiple of 32 and 1-8 query heads per key "
        "head; use attention='blockwise'");
  if (s.tq < 1 || s.tq > s.t)
    return ffi::Error::InvalidArgument(
        "jpost CPU attention: the queries must be the last 1..T of the T key tokens");
  return ffi::Error::Success();
}

const char kRowError[] =
    "jpost CPU attention: a row whose segments are split or whose shared prefix is not one "
    "contiguous run before them; use attention='blockwise'";

// Splits row b into about `pieces` runs of whole segments of about equal
// work (a segment of n tokens costs about n * n), so that a batch of few
// long rows still gives every thread work. Pieces share no keys; a row with
// a shared prefix, which all its segments see, stays one piece.
void split_row(const RowPlan& plan, const int32_t* seg, const Shape& s, int64_t b,
               int64_t pieces, std::vector<Piece>& out) {
  if (pieces <= 1 || plan.prefix_hi > plan.prefix_lo) {
    out.push_back({b, 0, s.t});
    return;
  }
  double total = 0.0;
  for (int64_t i = 0; i < s.t; ++i)
    if (seg[i] != 0) total += 2.0 * (i - plan.seg_start[i]) + 1.0;  // n * n over a segment
  double done = 0.0;
  int64_t lo = 0, made = 0;
  for (int64_t i = 0; i < s.t; ++i) {
    if (seg[i] != 0) done += 2.0 * (i - plan.seg_start[i]) + 1.0;
    const bool run_ends = i + 1 < s.t && seg[i + 1] != seg[i];
    if (run_ends && done >= total * (made + 1) / pieces) {
      out.push_back({b, lo, i + 1});
      lo = i + 1;
      ++made;
    }
  }
  out.push_back({b, lo, s.t});
}

// Runs body(piece, kh, plan, segments, key head data) for every piece of a
// row and key head on the pool, after checking the shape and planning each
// row once. Rows are split so that there are at least 8 items a thread.
template <typename Body>
ffi::Error for_each_key_head(ffi::ThreadPool& pool, const Shape& s, const int32_t* seg,
                             const int32_t* pos, const uint16_t* k, const uint16_t* v,
                             bool backward, Body body) {
  if (ffi::Error e = check(s); e.failure()) return e;
  std::vector<RowPlan> plans;
  for (int64_t b = 0; b < s.b; ++b) {
    plans.push_back(plan_row(seg + b * s.t, pos + b * s.t, s.t));
    if (!plans.back().ok) return ffi::Error::InvalidArgument(kRowError);
  }
  const int64_t wanted = 8 * std::max<int64_t>(pool.num_threads(), 1);
  const int64_t per_row = (wanted + s.b * s.k - 1) / (s.b * s.k);
  std::vector<Piece> pieces;
  for (int64_t b = 0; b < s.b; ++b) split_row(plans[b], seg + b * s.t, s, b, per_row, pieces);
  const int64_t items = static_cast<int64_t>(pieces.size()) * s.k;
  parallel_for(pool, items, [&](int64_t item) {
    const Piece& piece = pieces[item / s.k];
    const int64_t kh = item % s.k;
    const KeyHead data(s, piece, k + (piece.b * s.k + kh) * s.h * s.t,
                       v + (piece.b * s.k + kh) * s.t * s.h, backward);
    body(piece.b, kh, plans[piece.b], seg + piece.b * s.t, data);
  });
  return ffi::Error::Success();
}

Shape shape_of(const ffi::Buffer<ffi::BF16>& q, const ffi::Buffer<ffi::BF16>& k) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], kd[3], qd[2], kd[1], qd[3], qd[1]};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                   ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> seg,
                   ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::BF16> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Shape s = shape_of(q, k);
  return for_each_key_head(
      pool, s, seg.typed_data(), pos.typed_data(), k.typed_data(), v.typed_data(), false,
      [&](int64_t b, int64_t kh, const RowPlan& plan, const int32_t* srow, const KeyHead& data) {
        dispatch_g(s.g(), [&](auto g) {
          forward_key_head<decltype(g)::value>(s, plan, srow, q.typed_data(), data, b, kh,
                                               out->typed_data(), lse->typed_data());
        });
      });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                    ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> seg,
                    ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::BF16> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::BF16> d_out,
                    ffi::ResultBuffer<ffi::BF16> dq, ffi::ResultBuffer<ffi::BF16> dk,
                    ffi::ResultBuffer<ffi::BF16> dv) {
  const Shape s = shape_of(q, k);
  return for_each_key_head(
      pool, s, seg.typed_data(), pos.typed_data(), k.typed_data(), v.typed_data(), true,
      [&](int64_t b, int64_t kh, const RowPlan& plan, const int32_t* srow, const KeyHead& data) {
        const int64_t len = data.len;
        std::vector<float> dk_rows((len + 16) * s.h, 0.0f), dv_rows((len + 16) * s.h, 0.0f);
        dispatch_g(s.g(), [&](auto g) {
          backward_key_head<decltype(g)::value>(s, plan, srow, q.typed_data(), out.typed_data(),
                                                lse.typed_data(), d_out.typed_data(), data, b,
                                                kh, dq->typed_data(), dk_rows, dv_rows);
        });
        // The piece's keys' and values' gradients as rows of tokens, [T, H]
        // each. In the keys' own [H, T] layout the write went down columns
        // 2T bytes apart (4 KB in a 2048-token row: every store in one cache
        // set; the forward and backward took 1.25x as long), and XLA's next
        // fusion, RoPE's backward over rows of tokens, read it transposed
        // again (39 against 3.6 ms a step; bench/RESULTS.md).
        const int64_t first = ((b * s.k + kh) * s.t + data.lo) * s.h;
        for (int64_t j = 0; j < len * s.h; ++j) {
          dk->typed_data()[first + j] = to_bf16(dk_rows[j]);
          dv->typed_data()[first + j] = to_bf16(dv_rows[j]);
        }
      });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // keys
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segments
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // log-sum-exp

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // keys
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segments
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // d out
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // dq
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // d keys, [B, K, T, H]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // d values
