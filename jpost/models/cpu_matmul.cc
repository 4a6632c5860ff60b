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

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512BF16__)
#error "this kernel needs a CPU with AVX512-BF16 (vdpbf16ps)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // output columns a packed block holds
constexpr int64_t kMaxRows = 6;  // rows a tile holds: 6 x 4 accumulators of 32

template <int R, bool kFloat32Out>
void tile(const uint16_t* x, int64_t k, const uint16_t* block, void* y, int64_t n) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < k / 2; ++pair) {
    const uint16_t* w = block + pair * 2 * kBlock;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    for (int r = 0; r < R; ++r) {
      uint32_t inputs;  // x[r, 2 pair], x[r, 2 pair + 1]
      std::memcpy(&inputs, x + r * k + 2 * pair, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(inputs));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], b, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], b, w3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      if constexpr (kFloat32Out) {
        _mm512_storeu_ps(static_cast<float*>(y) + r * n + 16 * c, acc[r][c]);
      } else {
        const __m256bh rounded = _mm512_cvtneps_pbh(acc[r][c]);
        std::memcpy(static_cast<uint16_t*>(y) + r * n + 16 * c, &rounded, 32);
      }
    }
}

// Rows [0, m) of x times one block of columns, in tiles of up to 6 rows of
// near-equal size (16 rows: 6, 5, 5), so no tile runs a row at a time.
template <bool kFloat32Out>
void block_rows(const uint16_t* x, int64_t m, int64_t k, const uint16_t* block, void* y,
                int64_t n) {
  const int64_t esize = kFloat32Out ? 4 : 2;
  const int64_t tiles = (m + kMaxRows - 1) / kMaxRows;
  for (int64_t t = 0, row = 0; t < tiles; ++t) {
    const int64_t left = m - row, rows = (left + (tiles - t) - 1) / (tiles - t);
    const uint16_t* xr = x + row * k;
    void* yr = static_cast<char*>(y) + row * n * esize;
    switch (rows) {
      case 1: tile<1, kFloat32Out>(xr, k, block, yr, n); break;
      case 2: tile<2, kFloat32Out>(xr, k, block, yr, n); break;
      case 3: tile<3, kFloat32Out>(xr, k, block, yr, n); break;
      case 4: tile<4, kFloat32Out>(xr, k, block, yr, n); break;
      case 5: tile<5, kFloat32Out>(xr, k, block, yr, n); break;
      default: tile<6, kFloat32Out>(xr, k, block, yr, n); break;
    }
    row += rows;
  }
}

template <ffi::DataType kOut>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                  ffi::ResultBuffer<kOut> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || wd[2] != kBlock || wd[3] != 2 ||
      xd[1] != 2 * wd[1] || yd[0] != xd[0] || yd[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument(
        "jpost cpu_matmul: expected x [M, K], a weight packed as [N/64, K/2, 64, 2] "
        "(cpu_decode.pack) and a result [M, N]");
  constexpr bool kFloat32Out = kOut == ffi::DataType::F32;
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  const auto* xs = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.typed_data());
  char* ys = reinterpret_cast<char*>(y->typed_data());
  if (m == 0) return ffi::Error::Success();
  jpost::parallel_for(pool, wd[0], [&](int64_t b) {
    block_rows<kFloat32Out>(xs, m, k, ws + b * k * kBlock,
                            ys + b * kBlock * (kFloat32Out ? 4 : 2), n);
  });
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
