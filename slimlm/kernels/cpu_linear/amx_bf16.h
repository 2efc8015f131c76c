// bf16 linear on AMX tiles, y = x @ W.T + b for bf16 x and W, reading W in its own row-major layout.
//
// oneDNN wants W re-laid out for the tile unit (pairs of inputs interleaved across 16 columns) and torch
// hands it a plain weight, so every oneDNN call first copies the whole weight: at decode batch sizes that
// copy costs as much as the product. Here W's rows are the A tiles as they lie in memory (16 rows x 32
// inputs, one 64-byte line per row) and x is the one rearranged (x^T's pairs as B tiles, once per call,
// M x K elements): C = W . x^T, 16 W rows x 16 x rows per tile, fp32 sums over the whole K, one rounding to
// bf16 at the end (plus the bias in fp32 first).
//
// Tile layouts (tiles 0-1 W, 2-3 x, 4-7 sums), by M: up to 16 rows of x, 64 W rows per block against one x
// tile, so four independent accumulation chains hide TDPBF16PS's latency; above, 32 W rows against pairs of
// x tiles, the block's W (32 rows x K) staying in L2 across the pairs. Each task prefetches its next block as
// one sequential region: the tiles' dozens of row streams are more than the hardware prefetcher follows.
#pragma once

#include "../common/amx.h"

#if SLIMLM_AMX
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/avx512_bf16.h"
#include "../common/scratch.h"

namespace slimlm_linear_amx {

using slimlm_kernels::aligned_scratch;

#ifndef SLIMLM_LINEAR_AMX_TASKS
#define SLIMLM_LINEAR_AMX_TASKS 4  // tasks per thread
#endif

// 16-row x 16-column fp32 sums (W rows n0.., x rows m0..) + bias -> out (bf16, row stride N): per x row, its
// column of sums gathered, the bias added, one rounding, 16 consecutive outputs stored.
inline void store_tile(const float* c, int64_t n0, int64_t m0, int64_t N, int64_t M, const float* bias,
                       c10::BFloat16* out) {
  const int64_t nn = std::min<int64_t>(16, N - n0);
  if (nn <= 0) return;  // a block's last tiles may lie wholly past N
  const __mmask16 k = static_cast<__mmask16>((1u << nn) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n0) : _mm512_setzero_ps();
  const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(16));
  for (int64_t j = 0; j < 16 && m0 + j < M; ++j) {
    const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(col, c + j, 4), b);
    slimlm_avx512::store_bf16x16(out + (m0 + j) * N + n0, v, k);
  }
}

struct Job {
  const uint16_t* w;  // [N, K]
  int64_t N, K, Kp, M;
  const uint32_t* xv;
  const float* bias;
  c10::BFloat16* out;
};

// W rows [n, n + rows) -> A-tile source: the weight itself where the block is whole (rows inside N, K a multiple
// of 32), else a zero-padded copy (the last tile must not read past the rows).
inline const uint16_t* block_source(const Job& J, int64_t n, int64_t rows, int64_t& ld, std::vector<uint16_t>& buf) {
  if (n + rows <= J.N && J.K == J.Kp) {
    ld = J.K;
    return J.w + n * J.K;
  }
  uint16_t* s = aligned_scratch(buf, rows * J.Kp);
  std::memset(s, 0, rows * J.Kp * sizeof(uint16_t));
  for (int64_t r = 0; r < rows && n + r < J.N; ++r) std::memcpy(s + r * J.Kp, J.w + (n + r) * J.K, J.K * 2);
  ld = J.Kp;
  return s;
}

inline void block(const Job& J, int64_t n, int64_t rows, int64_t next_rows) {
  static thread_local std::vector<uint16_t> wbuf;
  alignas(64) float c[4][256];
  int64_t ld;
  const uint16_t* a = block_source(J, n, rows, ld, wbuf);
  const int64_t KC = J.Kp / 32, lda = ld * 2;
  const uint16_t* next = J.w + (n + rows) * J.K;
  auto prefetch = [&](int64_t kc) { slimlm_kernels::prefetch_share(next, next_rows * J.K * 2, kc, KC); };
  if (rows == 64) {  // one x tile, four 16-row W blocks
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kc = 0; kc < KC; ++kc) {
      prefetch(kc);
      const uint16_t* ak = a + kc * 32;
      _tile_loadd(2, J.xv + kc * 256, 64);
      _tile_loadd(0, ak, lda);
      _tile_dpbf16ps(4, 0, 2);
      _tile_loadd(1, ak + 16 * ld, lda);
      _tile_dpbf16ps(5, 1, 2);
      _tile_loadd(0, ak + 32 * ld, lda);
      _tile_dpbf16ps(6, 0, 2);
      _tile_loadd(1, ak + 48 * ld, lda);
      _tile_dpbf16ps(7, 1, 2);
    }
    _tile_stored(4, c[0], 64);
    _tile_stored(5, c[1], 64);
    _tile_stored(6, c[2], 64);
    _tile_stored(7, c[3], 64);
    for (int t = 0; t < 4; ++t) store_tile(c[t], n + 16 * t, 0, J.N, J.M, J.bias, J.out);
    return;
  }
  const int64_t MB = (J.M + 15) / 16;
  for (int64_t mb = 0; mb < MB; mb += 2) {  // 32 W rows x pairs of x tiles
    const bool two = mb + 1 < MB;
    const uint32_t* x0 = J.xv + mb * KC * 256;
    const uint32_t* x1 = x0 + KC * 256;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kc = 0; kc < KC; ++kc) {
      if (mb == 0) prefetch(kc);
      const uint16_t* ak = a + kc * 32;
      _tile_loadd(0, ak, lda);
      _tile_loadd(1, ak + 16 * ld, lda);
      _tile_loadd(2, x0 + kc * 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 1, 2);
      if (two) {
        _tile_loadd(3, x1 + kc * 256, 64);
        _tile_dpbf16ps(6, 0, 3);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
    _tile_stored(4, c[0], 64);
    _tile_stored(5, c[1], 64);
    store_tile(c[0], n, mb * 16, J.N, J.M, J.bias, J.out);
    store_tile(c[1], n + 16, mb * 16, J.N, J.M, J.bias, J.out);
    if (two) {
      _tile_stored(6, c[2], 64);
      _tile_stored(7, c[3], 64);
      store_tile(c[2], n, mb * 16 + 16, J.N, J.M, J.bias, J.out);
      store_tile(c[3], n + 16, mb * 16 + 16, J.N, J.M, J.bias, J.out);
    }
  }
}

// x [M, K] bf16 (row stride sx), w [N, K] bf16 contiguous, bias fp32 [N] or null -> out [M, N] bf16.
inline void linear(const uint16_t* x, int64_t sx, int64_t M, const uint16_t* w, int64_t N, int64_t K,
                   const float* bias, c10::BFloat16* out) {
  const int64_t Kp = (K + 31) / 32 * 32, Mp = (M + 15) / 16 * 16;
  static thread_local std::vector<uint32_t> xbuf;
  uint32_t* xv = aligned_scratch(xbuf, Mp * Kp / 2);
  slimlm_kernels::x_to_b_tiles(reinterpret_cast<const uint8_t*>(x), sx * 2, M, K * 2, Kp * 2, xv);
  const Job J{w, N, K, Kp, M, xv, bias, out};
  const int64_t rows = M <= 16 ? 64 : 32;
  slimlm_kernels::for_row_blocks(N, rows, SLIMLM_LINEAR_AMX_TASKS, /*adaptive=*/M <= 4,
                                 [&](int64_t n, int64_t next_rows) { block(J, n, rows, next_rows); });
}

}  // namespace slimlm_linear_amx
#endif
