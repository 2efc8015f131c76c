// Packed AVX-512 GEMM for the middle and large M of cpu_linear: y[M, N] = x[M, K] @ W[N, K].T + b.
//
// It computes the transposed product C^T = W @ x^T with outer products: the accumulators are
// NR rows of W times MV 16-lane vectors of x^T columns (24 registers), each step broadcasts one fp32
// W element and FMAs it into MV x vectors. The orientation is chosen so that
//   - W needs no transpose: each thread converts its bf16 rows to fp32 row-major, a few hundred K
//     elements at a time, into a scratch buffer that stays in L1 (broadcast loads read it);
//   - only x, which is small or reused N / NR times, is transposed: once per call, into panels of
//     PW = 64 columns [K][64] that stream from L2;
//   - C^T is accumulated in a per-task buffer and transposed once into y with the bias.
// Blocking: per task (a range of W rows) x blocks of MC rows, K blocks of KC, groups of NR W rows,
// panels of 64 x rows. Measured against the streaming kernel and the convert + MKL sgemm path on a
// 2-core Ice Lake VM: see linear.cpp (crossovers).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include "../common/avx512_bf16.h"

namespace slimlm_gemm {

constexpr int PW = 64;       // x^T panel width: 4 vectors of 16 fp32 lanes
constexpr int64_t MC = 256;  // x rows per outer block: C^T scratch of a task is rows x 256 floats

// Cache lines of the next W block (rows of row_bytes, stride bytes apart), fetched one per call of
// next() while the current block computes. Without it each group's conversion waited for its W rows
// from memory (short row pieces that the hardware prefetcher does not ramp up on).
struct Prefetch {
  const char* p = nullptr;
  int64_t stride = 0, row_bytes = 0, rows = 0;
  int64_t row = 0, col = 0;
  inline void next() {
    if (row >= rows) return;
    _mm_prefetch(p + row * stride + col, _MM_HINT_T0);
    col += 64;
    if (col >= row_bytes) {
      col = 0;
      ++row;
    }
  }
};

// K elements per block for NR rows of W (about 24 KB of fp32 W: L1 holds it with the x^T lines in
// flight), and the row stride of the converted block: a compile-time constant, so that the NR broadcast
// addresses are one pointer plus fixed offsets (a run-time stride cost a chain of address arithmetic
// and register spills in the inner loop), and never a multiple of 4 KB (L1 set aliasing).
// (Budgets of 2048-6144 floats measured the same at M = 32; multiples of 16 keep rows 64-byte aligned.)
constexpr int64_t kc_max(int nr) { return (6144 / nr) & ~int64_t(15); }
constexpr int64_t ldw_for(int nr) { return kc_max(nr) + 16; }
// With several x panels (M > 64) the loops go the other way round (GotoBLAS): a K block of one x^T
// panel (128 x 64 floats, 32 KB) stays in L1 while all the task's W rows, converted for that K block
// into L2, pass by in groups of 6. Re-streaming a whole [K][64] panel from L2 for every group was
// slower than MKL at M = 2048.
constexpr int64_t kLargeKc = 128;
constexpr int64_t kLargeLd = kLargeKc + 16;
constexpr int kLargeNr = 6;

// NR rows of W (fp32, row stride LDS) x MV vectors of an x^T panel (row stride PW), kc steps:
// C^T[r][16 v + l] (row stride ldc) = (accumulate ? C^T : 0) + sum_k W[r][k] x^T[k][16 v + l].
// Never inlined: inside the big task loop GCC's register allocation spilled accumulators to the stack
// (measured 41 against ~95 GFLOP/s per core); on its own each instance keeps all 24 in registers.
template <int NR, int MV, int64_t LDS>
__attribute__((noinline)) static void micro(const float* __restrict ws, const float* __restrict xt, int64_t kc,
                         float* __restrict ct, int64_t ldc, bool accumulate, Prefetch& pf) {
  __m512 acc[NR][MV];
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(ct + r * ldc + 16 * v) : _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    __m512 xv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_load_ps(xt + k * PW + 16 * v);
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(ws[r * LDS + k]);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);
    }
  };
  // Two steps per iteration: measured 2-5% faster than one (more independent loads to schedule).
  int64_t k = 0;
  for (; k + 2 <= kc; k += 2) {
    step(k);
    step(k + 1);
    pf.next();
  }
  if (k < kc) step(k);
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(ct + r * ldc + 16 * v, acc[r][v]);
}

// micro<NR, MV, LDS> for a run-time 1 <= mv <= 4.
template <int NR, int64_t LDS>
static inline void micro_mv(int mv, const float* ws, const float* xt, int64_t kc, float* ct, int64_t ldc,
                            bool accumulate, Prefetch& pf) {
  switch (mv) {
    case 1: return micro<NR, 1, LDS>(ws, xt, kc, ct, ldc, accumulate, pf);
    case 2: return micro<NR, 2, LDS>(ws, xt, kc, ct, ldc, accumulate, pf);
    case 3: return micro<NR, 3, LDS>(ws, xt, kc, ct, ldc, accumulate, pf);
    default: return micro<NR, 4, LDS>(ws, xt, kc, ct, ldc, accumulate, pf);
  }
}

// W rows per register block for a panel of mv vectors: 24 accumulators whatever the width.
static inline int nr_for(int mv) { return mv == 1 ? 24 : (mv == 2 ? 12 : (mv == 3 ? 8 : 6)); }

// One x panel (M <= 64): W blocks of nr rows with row stride ldw_for(nr).
static inline void micro_any(int nr, int mv, const float* ws, const float* xt, int64_t kc, float* ct, int64_t ldc,
                             bool accumulate, Prefetch& pf) {
  switch (nr) {
    case 24: return micro_mv<24, ldw_for(24)>(mv, ws, xt, kc, ct, ldc, accumulate, pf);
    case 12: return micro_mv<12, ldw_for(12)>(mv, ws, xt, kc, ct, ldc, accumulate, pf);
    case 8: return micro_mv<8, ldw_for(8)>(mv, ws, xt, kc, ct, ldc, accumulate, pf);
    default: return micro_mv<6, ldw_for(6)>(mv, ws, xt, kc, ct, ldc, accumulate, pf);
  }
}

// In-place transpose of the 16 x 16 floats in r[0..15] (r[i] = row i): pairs, then quads within 128-bit
// lanes, then the lanes themselves.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

// Up to 16 elements of one x row as fp32 (the lanes past n zero).
static inline __m512 load_row16(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
template <class BF16>
static inline __m512 load_row16(const BF16* p, int n) {
  const __m256i v = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// x [M, K] (row stride sx; float or bf16) -> x^T panels: panel p holds rows 64 p .. 64 p + 63 as [K][64] fp32,
// zero padded past M. 64-byte aligned dst of npanels * K * 64 floats. 16 x 16 blocks transposed in registers
// (the scalar loop it replaces cost ~0.6-0.9 ns per element: ~3% of a 32-sequence decode step).
template <class XT>
static void pack_xt(const XT* x, int64_t sx, int64_t M, int64_t K, float* dst) {
  const int64_t np = (M + PW - 1) / PW;
  for (int64_t p = 0; p < np; ++p) {
    float* d = dst + p * K * PW;
    const int64_t m0 = p * PW, rows = std::min<int64_t>(PW, M - m0);
    for (int64_t j0 = 0; j0 < PW; j0 += 16) {
      if (j0 >= rows) {
        for (int64_t k = 0; k < K; ++k) _mm512_store_ps(d + k * PW + j0, _mm512_setzero_ps());
        continue;
      }
      const int jn = static_cast<int>(std::min<int64_t>(16, rows - j0));
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int kn = static_cast<int>(std::min<int64_t>(16, K - k0));
        __m512 r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = i < jn ? load_row16(x + (m0 + j0 + i) * sx + k0, kn) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < kn; ++i) _mm512_store_ps(d + (k0 + i) * PW + j0, r[i]);
      }
    }
  }
}

// W rows [n0, n0 + rows) x columns [k0, k0 + kc) (bf16 as uint16_t, or fp32) -> fp32 dst (row stride
// ld); rows past the weight's end zeroed up to nr.
static inline void convert_block(const uint16_t* w, int64_t K, int64_t n0, int64_t rows, int nr, int64_t k0,
                                 int64_t kc, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = w + (n0 + r) * K + k0;
    float* d = dst + r * ld;
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k));
      _mm512_store_ps(d + k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
    }
    for (; k < kc; ++k) {
      const uint32_t u = static_cast<uint32_t>(s[k]) << 16;
      std::memcpy(d + k, &u, 4);
    }
  }
  for (int64_t r = rows; r < nr; ++r) std::memset(dst + r * ld, 0, kc * sizeof(float));
}
static inline void convert_block(const float* w, int64_t K, int64_t n0, int64_t rows, int nr, int64_t k0,
                                 int64_t kc, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, w + (n0 + r) * K + k0, kc * sizeof(float));
  for (int64_t r = rows; r < nr; ++r) std::memset(dst + r * ld, 0, kc * sizeof(float));
}

// 16 fp32 -> y (fp32, or bf16 as c10::BFloat16 rounds), the lanes in `mask` only.
static inline void store16(float* o, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(o, mask, v); }
template <class BF16>
static inline void store16(BF16* o, __m512 v, __mmask16 mask) {
  slimlm_avx512::store_bf16x16(o, v, mask);
}

// C^T rows [0, n1 - n0) x columns [0, mrows) (row stride ldc) + bias[n0..n1) -> y rows m0.. columns
// n0..n1 (row stride ldo): 16 W rows at a time, one gather per y row segment.
template <class OutT>
static inline void store_transposed(const float* ct, int64_t ldc, const float* bias, int64_t n0, int64_t n1,
                                    int64_t mrows, OutT* y, int64_t ldo, int64_t m0) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(ldc)));
  for (int64_t n = n0; n < n1; n += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n1 - n));
    const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    const float* c = ct + (n - n0) * ldc;
    for (int64_t m = 0; m < mrows; ++m) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, c + m, 4);
      store16(y + (m0 + m) * ldo + n, _mm512_add_ps(v, b), mask);
    }
  }
}

}  // namespace slimlm_gemm
#endif  // AVX-512 F/BW/DQ/VL
