// Matmuls of a few rows by a packed bfloat16 weight, for decoding on
// XLA:CPU, called through XLA's FFI (jpost/models/cpu_decode.py packs the
// weights and registers it).
//
// A decode step multiplies one row per sequence by every weight of the
// model: it streams the weights from memory once and does little arithmetic
// on each, and XLA:CPU's bfloat16 matmuls read them at well under the
// machine's bandwidth at those shapes (bench/RESULTS.md). Here the weight
// comes packed once per generate call as [N/64, K/2, 64, 2]: for each block
// of 64 output columns, the K inputs in pairs. One AVX512-BF16 dot
// instruction (vdpbf16ps) then multiplies a pair of a row's inputs,
// broadcast, by 16 columns' pairs of weights and adds both products into
// float32 accumulators. A tile of up to 6 rows x 64 columns holds 24
// accumulators; the first tile of rows reads a block's weights from memory,
// the others from cache. Blocks of columns are split over XLA's intra-op
// threads. The result is float32 or rounded to bfloat16 (nearest even, as
// XLA's convert).
//
// Two variants take in the operations a decode step runs around its
// matmuls, each a few microseconds of arithmetic that XLA:CPU ran as
// operations of their own at a fixed cost each (with RoPE and the cache
// writes, a quarter of a SmolLM2 decode step at 64 rows ran outside the
// kernels; bench/RESULTS.md):
//  - NormMatmul: RMSNorm of the rows first (decoder.rms_norm's roundings:
//    float32 statistics, normed rounded to bfloat16, then times the weight
//    rounded again); Gated, SwiGLU after it as well (decoder.swiglu over a
//    weight whose first half of column blocks is the gate's, the second the up's).
//  - MatmulAdd: the residual added to the rounded product (x + dense(...)).
//
// Pack writes the packed layout itself, from float32 or bfloat16 weights,
// one layer of a stack and several weights side by side (q, k, v) in one
// pass: a generate call packs every weight once, and XLA's slice, convert,
// transpose and concatenate took 170 ms of it for SmolLM2 (bench/RESULTS.md).

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512BF16__)
#error "this kernel needs a CPU with AVX512-BF16 (vdpbf16ps)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // output columns a packed block holds
constexpr int64_t kMaxRows = 6;  // rows a tile holds: 6 x 4 accumulators of 32

// 16 floats rounded to bfloat16 (nearest even, as XLA's convert), as bits
// and back as floats.
inline __m256i to_bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 from_bf16x16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load_bf16x16(const uint16_t* p) {
  return from_bf16x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store_bf16x16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v));
}
inline __m512 round_bf16x16(__m512 v) { return from_bf16x16(to_bf16x16(v)); }

// What a tile does with its float32 sums: epilogue(row, column, 16 sums).
struct StoreF32 {
  float* y;
  int64_t n;
  void operator()(int64_t row, int64_t col, __m512 v) const {
    _mm512_storeu_ps(y + row * n + col, v);
  }
};

struct StoreBf16 {
  uint16_t* y;
  int64_t n;
  void operator()(int64_t row, int64_t col, __m512 v) const { store_bf16x16(y + row * n + col, v); }
};

// y = residual + the product rounded to bfloat16, rounded again.
struct AddResidual {
  const uint16_t* residual;
  uint16_t* y;
  int64_t n;
  void operator()(int64_t row, int64_t col, __m512 v) const {
    const int64_t at = row * n + col;
    store_bf16x16(y + at, _mm512_add_ps(round_bf16x16(v), load_bf16x16(residual + at)));
  }
};

// The gate's half of a gated tile: its product rounded to bfloat16, kept in
// `gate` [6][64] for the up's half (rows relative to the tile's first).
struct KeepGate {
  float (*gate)[kBlock];
  int64_t row0, col0;
  void operator()(int64_t row, int64_t col, __m512 v) const {
    _mm512_storeu_ps(&gate[row - row0][col - col0], round_bf16x16(v));
  }
};

// The up's half: y = silu(gate) * up in float32, rounded once.
struct SwiGlu {
  float (*gate)[kBlock];
  uint16_t* y;
  int64_t n;  // the output's columns: half the weight's
  int64_t row0, col0;  // the tile's first row, the up block's first column
  int64_t up_offset;  // the up's columns start here in the weight
  void operator()(int64_t row, int64_t col, __m512 v) const {
    const float* g = &gate[row - row0][col - col0];
    // sigmoid(g) from e = exp(-|g|) <= 1 (jpost::exp_nonpositive, a loop
    // the compiler vectorises): 1 / (1 + e) for g >= 0, e / (1 + e) below.
    alignas(64) float silu[16];
    for (int i = 0; i < 16; ++i) {
      const float e = jpost::exp_nonpositive(-std::fabs(g[i]));
      silu[i] = g[i] * (g[i] >= 0.0f ? 1.0f : e) / (1.0f + e);
    }
    store_bf16x16(y + row * n + (col - up_offset),
                  _mm512_mul_ps(_mm512_load_ps(silu), round_bf16x16(v)));
  }
};

// Rows [row0, row0 + R) of x [M, K] times one packed block (columns
// [col0, col0 + 64)), handed to the epilogue.
template <int R, typename Epilogue>
void tile(const uint16_t* x, int64_t k, const uint16_t* block, int64_t row0, int64_t col0,
          const Epilogue& epilogue) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint16_t* xr = x + row0 * k;
  for (int64_t pair = 0; pair < k / 2; ++pair) {
    const uint16_t* w = block + pair * 2 * kBlock;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    for (int r = 0; r < R; ++r) {
      uint32_t inputs;  // x[r, 2 pair], x[r, 2 pair + 1]
      std::memcpy(&inputs, xr + r * k + 2 * pair, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(inputs));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], b, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], b, w3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) epilogue(row0 + r, col0 + 16 * c, acc[r][c]);
}

// fn(first row, rows) for rows [0, m) in tiles of up to 6 rows of
// near-equal size (16 rows: 6, 5, 5), so no tile runs a row at a time.
template <typename F>
void for_each_tile(int64_t m, F fn) {
  const int64_t tiles = (m + kMaxRows - 1) / kMaxRows;
  for (int64_t t = 0, row = 0; t < tiles; ++t) {
    const int64_t left = m - row, rows = (left + (tiles - t) - 1) / (tiles - t);
    fn(row, rows);
    row += rows;
  }
}

template <typename Epilogue>
void run_tile(int64_t rows, const uint16_t* x, int64_t k, const uint16_t* block, int64_t row0,
              int64_t col0, const Epilogue& epilogue) {
  switch (rows) {
    case 1: tile<1>(x, k, block, row0, col0, epilogue); break;
    case 2: tile<2>(x, k, block, row0, col0, epilogue); break;
    case 3: tile<3>(x, k, block, row0, col0, epilogue); break;
    case 4: tile<4>(x, k, block, row0, col0, epilogue); break;
    case 5: tile<5>(x, k, block, row0, col0, epilogue); break;
    default: tile<6>(x, k, block, row0, col0, epilogue); break;
  }
}

// x [M, K] times every block of the packed weight, blocks split over
// XLA's intra-op threads, each tile's sums to the epilogue.
template <typename Epilogue>
void matmul_blocks(ffi::ThreadPool& pool, const uint16_t* x, int64_t m, int64_t k,
                   const uint16_t* packed, int64_t blocks, const Epilogue& epilogue) {
  jpost::parallel_for(pool, blocks, [&](int64_t b) {
    for_each_tile(m, [&](int64_t row0, int64_t rows) {
      run_tile(rows, x, k, packed + b * k * kBlock, row0, b * kBlock, epilogue);
    });
  });
}

// decoder.rms_norm of x's rows: float32 statistics, normed rounded to
// bfloat16, times the weight rounded again; into `out` [M, K] (bits).
void rms_norm_rows(ffi::ThreadPool& pool, const uint16_t* x, int64_t m, int64_t k,
                   const uint16_t* weight, float eps, uint16_t* out) {
  jpost::parallel_for(pool, (m + 7) / 8, [&](int64_t rows) {
    for (int64_t row = 8 * rows; row < std::min(m, 8 * rows + 8); ++row) {
      const uint16_t* xr = x + row * k;
      uint16_t* o = out + row * k;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = load_bf16x16(xr + i);
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const float mean = _mm512_reduce_add_ps(squares) / static_cast<float>(k);
      const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(xr + i), scale));
        store_bf16x16(o + i, _mm512_mul_ps(normed, load_bf16x16(weight + i)));
      }
    }
  });
}

// 16 values of a float32 or bfloat16 array as bfloat16 bits in 32-bit lanes
// (rounded to nearest even, as XLA's convert).
template <bool kF32>
inline __m512i bf16_lanes(const void* p, int64_t at) {
  if constexpr (kF32) {
    return _mm512_cvtepu16_epi32(to_bf16x16(_mm512_loadu_ps(static_cast<const float*>(p) + at)));
  } else {
    return _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + at)));
  }
}

// One block of 64 output columns of w [K, N] (columns col0..col0+63) as
// [K/2, 64, 2]: for each pair of rows, the two rows' values interleaved.
template <bool kF32>
void pack_block_kn(const void* w, int64_t k, int64_t n, int64_t col0, uint16_t* out) {
  for (int64_t pair = 0; pair < k / 2; ++pair) {
    const int64_t even = 2 * pair * n + col0, odd = even + n;
    for (int64_t c = 0; c < kBlock; c += 16) {
      const __m512i both = _mm512_or_si512(bf16_lanes<kF32>(w, even + c),
                                           _mm512_slli_epi32(bf16_lanes<kF32>(w, odd + c), 16));
      _mm512_storeu_si512(out + (pair * kBlock + c) * 2, both);
    }
  }
}

// The same from w [N, K] (rows row0..row0+63 are the block's columns): each
// row's K values as K/2 pairs, written 64 pairs apart.
template <bool kF32>
void pack_block_nk(const void* w, int64_t k, int64_t row0, uint16_t* out) {
  auto* pairs = reinterpret_cast<uint32_t*>(out);  // [K/2, 64] pairs of bfloat16
  alignas(64) uint16_t row[16];
  for (int64_t c = 0; c < kBlock; ++c) {
    const int64_t at = (row0 + c) * k;
    for (int64_t i = 0; i < k; i += 16) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(row),
                         _mm512_cvtepi32_epi16(bf16_lanes<kF32>(w, at + i)));
      for (int64_t j = 0; j < 16; j += 2)
        pairs[((i + j) / 2) * kBlock + c] = row[j] | (static_cast<uint32_t>(row[j + 1]) << 16);
    }
  }
}

// parts: [L, K, N_i] (or [L, N_i, K] `w_is_fd`), float32 or bfloat16; the
// result [sum N_i / 64, K/2, 64, 2]: layer `layer` of each, packed, side by side.
ffi::Error Pack(ffi::ThreadPool pool, ffi::RemainingArgs parts,
                ffi::ResultBuffer<ffi::BF16> out, int64_t layer, bool w_is_fd) {
  struct Part { const void* data; bool f32; int64_t n, first_block; };
  std::vector<Part> list;
  const auto od = out->dimensions();
  if (od.size() != 4 || od[2] != kBlock || od[3] != 2)
    return ffi::Error::InvalidArgument("jpost cpu_pack: the result is [N/64, K/2, 64, 2]");
  const int64_t k = 2 * od[1];
  int64_t blocks = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    auto part = parts.get<ffi::AnyBuffer>(i);
    if (!part.has_value()) return part.error();
    const auto d = part->dimensions();
    const auto type = part->element_type();
    const int64_t rank = d.size(), n = w_is_fd ? d[rank - 2] : d[rank - 1];
    const int64_t layers = rank == 3 ? d[0] : 1;
    if ((rank != 2 && rank != 3) || (type != ffi::DataType::F32 && type != ffi::DataType::BF16) ||
        (w_is_fd ? d[rank - 1] : d[rank - 2]) != k || n % kBlock != 0 || k % 16 != 0 ||
        layer < 0 || layer >= layers)
      return ffi::Error::InvalidArgument(
          "jpost cpu_pack: each weight is float32 or bfloat16 [(L,) K, N] ([(L,) N, K] "
          "transposed) with N a multiple of 64 and K of 16, and the layer one of its L");
    const int64_t esize = type == ffi::DataType::F32 ? 4 : 2;
    const char* data = static_cast<const char*>(part->untyped_data()) + layer * k * n * esize;
    list.push_back({data, type == ffi::DataType::F32, n, blocks});
    blocks += n / kBlock;
  }
  if (blocks != od[0])
    return ffi::Error::InvalidArgument("jpost cpu_pack: the result's blocks are not the parts'");
  auto* result = reinterpret_cast<uint16_t*>(out->untyped_data());
  jpost::parallel_for(pool, blocks, [&](int64_t b) {
    size_t p = 0;
    while (p + 1 < list.size() && list[p + 1].first_block <= b) ++p;
    const Part& part = list[p];
    const int64_t col0 = (b - part.first_block) * kBlock;
    uint16_t* block = result + b * k * kBlock;
    if (w_is_fd) {
      part.f32 ? pack_block_nk<true>(part.data, k, col0, block)
               : pack_block_nk<false>(part.data, k, col0, block);
    } else {
      part.f32 ? pack_block_kn<true>(part.data, k, part.n, col0, block)
               : pack_block_kn<false>(part.data, k, part.n, col0, block);
    }
  });
  return ffi::Error::Success();
}

bool packed_weight_takes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd) {
  return xd.size() == 2 && wd.size() == 4 && wd[2] == kBlock && wd[3] == 2 &&
         xd[1] == 2 * wd[1];
}

const uint16_t* bits(const void* data) { return reinterpret_cast<const uint16_t*>(data); }

template <ffi::DataType kOut>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                  ffi::ResultBuffer<kOut> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!packed_weight_takes(xd, wd) || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument(
        "jpost cpu_matmul: expected x [M, K], a weight packed as [N/64, K/2, 64, 2] "
        "(cpu_decode.pack) and a result [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (m == 0) return ffi::Error::Success();
  if constexpr (kOut == ffi::DataType::F32) {
    matmul_blocks(pool, bits(x.untyped_data()), m, k, bits(w.untyped_data()), wd[0],
                  StoreF32{reinterpret_cast<float*>(y->untyped_data()), n});
  } else {
    matmul_blocks(pool, bits(x.untyped_data()), m, k, bits(w.untyped_data()), wd[0],
                  StoreBf16{reinterpret_cast<uint16_t*>(y->untyped_data()), n});
  }
  return ffi::Error::Success();
}

ffi::Error MatmulAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                     ffi::Buffer<ffi::BF16> residual, ffi::ResultBuffer<ffi::BF16> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), rd = residual.dimensions(),
             yd = y->dimensions();
  if (!packed_weight_takes(xd, wd) || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != wd[0] * kBlock || rd.size() != 2 || rd[0] != yd[0] || rd[1] != yd[1])
    return ffi::Error::InvalidArgument(
        "jpost cpu_matmul_add: expected x [M, K], a weight packed as [N/64, K/2, 64, 2], "
        "a residual [M, N] and a result [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (m == 0) return ffi::Error::Success();
  matmul_blocks(pool, bits(x.untyped_data()), m, k, bits(w.untyped_data()), wd[0],
                AddResidual{bits(residual.untyped_data()),
                            reinterpret_cast<uint16_t*>(y->untyped_data()), n});
  return ffi::Error::Success();
}

template <bool kGated>
ffi::Error NormMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                      ffi::Buffer<ffi::BF16> norm_weight, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::BF16> y, float eps) {
  const auto xd = x.dimensions(), nd = norm_weight.dimensions(), wd = w.dimensions(),
             yd = y->dimensions();
  const int64_t out_blocks = kGated ? wd[0] / 2 : wd[0];
  if (!packed_weight_takes(xd, wd) || nd.size() != 1 || nd[0] != xd[1] || xd[1] % 16 != 0 ||
      (kGated && wd[0] % 2 != 0) || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != out_blocks * kBlock)
    return ffi::Error::InvalidArgument(
        "jpost cpu_norm_matmul: expected x [M, K] (K a multiple of 16), a norm weight [K], "
        "a weight packed as [N/64, K/2, 64, 2] (N/64 even when gated) and a result [M, N] "
        "([M, N/2] gated)");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (m == 0) return ffi::Error::Success();
  std::vector<uint16_t> normed(m * k);
  rms_norm_rows(pool, bits(x.untyped_data()), m, k, bits(norm_weight.untyped_data()), eps,
                normed.data());
  const uint16_t* packed = bits(w.untyped_data());
  auto* out = reinterpret_cast<uint16_t*>(y->untyped_data());
  if constexpr (!kGated) {
    matmul_blocks(pool, normed.data(), m, k, packed, wd[0], StoreBf16{out, n});
  } else {
    // Block b of the gate and block b of the up (b + N/128 in the weight)
    // in one task, a tile of rows at a time.
    jpost::parallel_for(pool, out_blocks, [&](int64_t b) {
      for_each_tile(m, [&](int64_t row0, int64_t rows) {
        alignas(64) float gate[kMaxRows][kBlock];
        run_tile(rows, normed.data(), k, packed + b * k * kBlock, row0, b * kBlock,
                 KeepGate{gate, row0, b * kBlock});
        const int64_t up = b + out_blocks;
        run_tile(rows, normed.data(), k, packed + up * k * kBlock, row0, up * kBlock,
                 SwiGlu{gate, out, n, row0, up * kBlock, out_blocks * kBlock});
      });
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostMatmulBf16, Matmul<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N/64, K/2, 64, 2]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostMatmulF32, Matmul<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N/64, K/2, 64, 2]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostMatmulAddBf16, MatmulAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N/64, K/2, 64, 2]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // residual [M, N]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostNormMatmulBf16, NormMatmul<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // norm weight [K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N/64, K/2, 64, 2]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // [M, N]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostNormMatmulGatedBf16, NormMatmul<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // norm weight [K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N/64, K/2, 64, 2]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // [M, N/2]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpostPack, Pack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()  // the weights, side by side
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // [N/64, K/2, 64, 2]
                                  .Attr<int64_t>("layer")
                                  .Attr<bool>("w_is_fd"));
