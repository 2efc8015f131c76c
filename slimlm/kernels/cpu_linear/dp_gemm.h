// bf16 GEMM on vdpbf16ps for the middle batch sizes (batched decode, speculative verification of many
// sequences): y[M, N] = x[M, K] @ W[N, K]^T + b with bf16 x and W (K even), fp32 accumulation.
//
// W is read once from memory, one panel of kNr = 64 rows at a time: each thread packs a panel's K block into
// pairs [K/2][64] (32-bit words: the two bf16 of W[n][2p], W[n][2p + 1]) with 16x16 transposes, then every
// group of kMr x rows meets it from L1/L2 in an outer-product micro-kernel: per pair of K, 4 loads of W, kMr
// broadcasts of an x pair and 4 * kMr vdpbf16ps into 4 * kMr accumulators, with no horizontal sums (the
// streaming kernel's dot-product form needs them per output). Used by cpu_linear (bf16 weights) and cpu_quant
// (quantized weights, dequantized to bf16 one panel at a time); include only where AVX512-BF16 is enabled.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/parallel.h"
#include "../common/scratch.h"
#include "../common/store.h"

namespace dp_gemm {

constexpr int kNr = 64;    // W rows (output columns) per panel: 4 vectors of 16
constexpr int kMr = 6;     // x rows per micro-kernel call: 24 accumulators + 4 W vectors + 1 broadcast
constexpr int kKc = 512;   // K elements per packed block: 64 x 512 x 2 bytes = 64 KB, in L2

// 16 rows of 16 32-bit words -> their transpose, in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Rows [n0, n0 + rows) of W (row length K bf16, K even), pairs [p0, p0 + np) -> dst[p][j] (np x kNr words);
// rows past `rows` are zero. np is a multiple of 16 except at the end of K, where the pairs past it are zero.
inline void pack_panel(const uint16_t* w, int64_t K, int64_t n0, int rows, int64_t p0, int np, uint32_t* dst) {
  for (int jb = 0; jb < kNr; jb += 16) {
    for (int pb = 0; pb < np; pb += 16) {
      const int pn = std::min(16, np - pb);
      const __mmask16 mask = static_cast<__mmask16>(pn == 16 ? 0xFFFF : (1u << pn) - 1u);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int j = jb + i;
        r[i] = j < rows ? _mm512_maskz_loadu_epi32(mask, reinterpret_cast<const uint32_t*>(w + (n0 + j) * K) + p0 + pb)
                        : _mm512_setzero_si512();
      }
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i < pn) _mm512_store_si512(dst + (pb + i) * kNr + jb, r[i]);
    }
  }
}

// MR rows of x (bf16, row stride ldx, starting at pair p0) against a packed block of np pairs -> c[MR][kNr]
// (accumulated onto c unless `first`).
template <int MR>
inline void micro(const uint16_t* x, int64_t ldx, const uint32_t* wp, int np, float* c, bool first) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[m][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + m * kNr + 16 * v);
  const uint32_t* xw[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) xw[m] = reinterpret_cast<const uint32_t*>(x + m * ldx);
  for (int p = 0; p < np; ++p) {
    const uint32_t* wr = wp + p * kNr;
    const __m512bh w0 = (__m512bh)_mm512_load_si512(wr), w1 = (__m512bh)_mm512_load_si512(wr + 16),
                   w2 = (__m512bh)_mm512_load_si512(wr + 32), w3 = (__m512bh)_mm512_load_si512(wr + 48);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xw[m][p]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xb, w3);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(c + m * kNr + 16 * v, acc[m][v]);
}

inline void micro_any(int mr, const uint16_t* x, int64_t ldx, const uint32_t* wp, int np, float* c, bool first) {
  switch (mr) {
    case 1: return micro<1>(x, ldx, wp, np, c, first);
    case 2: return micro<2>(x, ldx, wp, np, c, first);
    case 3: return micro<3>(x, ldx, wp, np, c, first);
    case 4: return micro<4>(x, ldx, wp, np, c, first);
    case 5: return micro<5>(x, ldx, wp, np, c, first);
    default: return micro<kMr>(x, ldx, wp, np, c, first);
  }
}

// The whole product. x: bf16 [M, K] (row stride ldx elements, K even); bias: fp32 [N] or null; out: [M, N]
// contiguous (fp32 or bf16). W's rows come from `rows_of(n0, rows)`: a pointer to rows [n0, n0 + rows) as bf16
// [rows, K], valid until the calling thread's next call (the weight itself, or a thread's dequantized copy).
template <class OutT, class RowsOf>
void gemm(const uint16_t* x, int64_t ldx, int64_t M, int64_t N, int64_t K, const float* bias, OutT* out,
          const RowsOf& rows_of) {
  const int64_t panels = (N + kNr - 1) / kNr;
  slimlm_kernels::parallel_dynamic(
      panels,
      [&](int64_t pi) {
        static thread_local std::vector<uint32_t> wbuf;
        static thread_local std::vector<float> cbuf_v;
        uint32_t* wp = slimlm_kernels::aligned_scratch(wbuf, kKc / 2 * kNr);
        float* cbuf = slimlm_kernels::aligned_scratch(cbuf_v, M * kNr);
        const int64_t n0 = pi * kNr;
        const int rows = static_cast<int>(std::min<int64_t>(kNr, N - n0));
        const uint16_t* w = rows_of(n0, rows);
        for (int64_t k0 = 0; k0 < K; k0 += kKc) {
          const int np = static_cast<int>(std::min<int64_t>(kKc, K - k0) / 2);
          pack_panel(w, K, 0, rows, k0 / 2, np, wp);
          for (int64_t m0 = 0; m0 < M; m0 += kMr) {
            const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m0));
            micro_any(mr, x + m0 * ldx + k0, ldx, wp, np, cbuf + m0 * kNr, k0 == 0);
          }
        }
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < rows; ++j)
            slimlm_kernels::store_out(out + m * N + n0 + j, cbuf[m * kNr + j] + (bias ? bias[n0 + j] : 0.f));
      },
      /*adaptive=*/false);
}

}  // namespace dp_gemm
