// CPU linear: y = x @ W.T + b for bf16 or fp32 weights, fast at every batch size.
//
// Small M (decode): a hand-written AVX-512 (or AVX2/FMA) kernel that streams W exactly once from memory.
//   x is converted to fp32 once into a small zero-padded buffer that stays in cache; threads
//   claim tasks of up to 256 KB of W rows dynamically; a task is read as R (8 at M=1) long
//   contiguous streams, and each block of R rows meets all M rows of x while it sits in L1/L2.
//   bf16 -> fp32 is free of shuffles: one 512-bit (256-bit) load of 32 (16) bf16 values is split into
//   the even-index values (shift left 16) and the odd-index values (and 0xFFFF0000); x is packed in
//   the matching "even half, odd half" order per block, so no lane permutes are needed.
// Middle M with AVX-512 (batched decode, speculative verification of many sequences, short prefills):
//   the packed outer-product GEMM of packed_gemm.h.
// Large M (prefill): each thread converts its W rows in chunks into a reused fp32 scratch
//   buffer and calls the fp32 GEMM (MKL via at::cpu::addmm_out / mm_out) on each chunk, so
//   bf16 weights run at close to fp32 GEMM speed while only bf16 bytes live in memory.
//   fp32 weights at large M go straight to at::addmm.
// Math is fp32 throughout; the output has x's dtype (bf16 rounded to nearest even).

// Per-op headers instead of <torch/extension.h>: builds several times faster.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include "../common/gil.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "../common/store.h"
#include "amx_bf16.h"
#include "packed_gemm.h"
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "dp_gemm.h"
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "slimlm cpu_linear needs AVX2 and FMA (build with -march=native on such a CPU)"
#endif

namespace {

using slimlm_kernels::store_out;

// The vector width of the streaming kernel and whether the packed GEMM exists (see below).
#ifndef SLIMLM_LINEAR_AVX512
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define SLIMLM_LINEAR_AVX512 1
#else
#define SLIMLM_LINEAR_AVX512 0
#endif
#endif

// Largest M served by the streaming kernel (above it: convert-chunks + sgemm), by W dtype and
// K. Measured on a 2-core Zen 3 VM (AVX2, 2 threads, cold W, p10 of interleaved runs):
//   bf16 W: K=576 streaming = GEMM path at M=48, GEMM ahead at 64; K=2048 streaming ahead at 96,
//           behind at 128; K=5632 equal at 128, behind at 192.
//   fp32 W (GEMM path = MKL sgemm): K=576 equal at 128-192, MKL ahead at 256; K=2048 streaming
//           ahead at 192, behind at 256.
// With AVX-512 the packed GEMM (packed_gemm.h) takes bf16 W from M = 29 to SLIMLM_PACKED_MAX_M. Measured on
// the 2-core Ice Lake VM (whole-layer linears, interleaved medians, GFLOP/s, stream / packed / convert + MKL):
//   smollm2 (K 576-1536): M=24 160/130/75, M=32 163/174/96, M=64 165/215/126, M=128 170/214/169,
//                         M=512 -/206/220, M=1024 -/153-165/169-172, M=2048 -/169-199/178-211;
//   tinyllama (K 2048-5632): M=24 155/121/74, M=32 162/166/94, M=64 181/242/148, M=512 -/221/209.
//
// With AMX (Sapphire Rapids and later) oneDNN's bf16 GEMM runs on the tile unit and beats both the packed
// GEMM and the streaming kernel from small M on; the packed GEMM is never used there. (bf16 x and W take the
// tile kernel below first; these crossovers serve the rest, e.g. an OS that refuses AMX.) Measured on a 2-core
// AMX KVM guest (2 threads, weights cycled beyond cache, interleaved medians, us, stream / oneDNN):
//   K=576 smollm2 gate_up 3072x576: M=12 270/331, M=16 341/341, M=24 478/345; lm_head 49152x576:
//         M=12 3859/4547, M=16 5159/4660; K=384 py-target 2048x384: M=12 144/170, M=16 176/167;
//   K>=1024 tinyllama gate_up 11264x2048: M=6 2126/2510, M=8 2354/2399, M=12 3193/2494; down 2048x5632:
//         M=6 1099/1202, M=8 1293/1207, M=12 1805/1284; smollm2 down 576x1536: M=8 121/166, M=12 164/169.
//   The packed GEMM at M=32..512 took 1.6-4.4x oneDNN's time (smollm2 gate_up M=64 813/306 us).
// bf16 x and W with AMX: the streaming kernel up to AMX_STREAM_MAX rows of x, the tile kernel (amx_bf16.h) up to
// AMX_TILE_MAX, oneDNN above (both by K, see kAmxLongK). Measured on the 2-core AMX KVM guest (2 threads,
// weights cycled beyond cache, interleaved medians, us, stream / tiles / oneDNN):
//   M=6: smollm2 gate_up 3072x576 180/174/382, py-target gate_up 2048x384 85/83/194, tinyllama gate_up
//        11264x2048 2079/1964/2809, down 2048x5632 1129/1374/1677 (M=4: tiles 1.2-1.6x the stream's time);
//   M=16: 364/176/367, 174/82/189, 4223/2088/3215, 2257/1173/1805;
//   tiles / oneDNN at M=256: 960/1177, 380/421, smollm2 lm_head 49152x576 14054/14396, 7468/8647, 5670/4417;
//   at M=512: 1175/1091, 712/508, 37780/34747, 17982/19742, 11047/8048; down at M=96 2592/2772, M=128 3269/2900.
//   So the tiles run up to 256 rows for K <= 2048 (smollm2 down, K=1536, M=256: 457/541) and to 96 above.
#ifndef SLIMLM_AMX_TILE_MAX
#define SLIMLM_AMX_TILE_MAX 256
#endif
#ifndef SLIMLM_AMX_TILE_MAX_LONG_K
#define SLIMLM_AMX_TILE_MAX_LONG_K 96
#endif
// At M=6 the streaming kernel makes a second pass for the sixth row (5-row register blocks) and the tiles win
// for K <= 2048; longer K stays with the stream one row further. Measured on the same guest (all of a model's
// matrices cycled, interleaved medians, stream / tiles, M=6): py-target 1.69 / 1.23 ms, smollm2's five shapes
// 6.18 / 5.75 ms (lm_head 2398 / 2077 us, 576x576 418 / 449); M=5: py-target 1.21-1.28 / 1.15-1.18, smollm2
// stream ahead on every shape (lm_head 1974 / 2128), so the stream keeps M=5.
#ifndef SLIMLM_AMX_STREAM_MAX
#define SLIMLM_AMX_STREAM_MAX 5
#endif
#ifndef SLIMLM_AMX_STREAM_MAX_LONG_K
#define SLIMLM_AMX_STREAM_MAX_LONG_K 6  // tinyllama down 2048x5632 at M=6: stream 1129 / tiles 1374 us
#endif
// "Long K" for both AMX crossovers: K > kAmxLongK.
constexpr int64_t kAmxLongK = 2048;
// CPUs with AVX512-BF16 but no AMX (Zen 4, Zen 5, Cooper Lake): bf16 x and W stream (with vdpbf16ps, see
// DotBf16) up to NATIVE_STREAM_MAX rows, take the vdpbf16ps GEMM of dp_gemm.h up to DP_GEMM_MAX rows and
// oneDNN's bf16 GEMM above; the packed fp32 GEMM is not used for them. Measured on a 2-core Zen 4 VM (2 threads,
// all of a model's matrices cycled through 150 MB, interleaved medians, GFLOP/s, stream / dp GEMM / oneDNN):
// M=16 py-target 196/137/113, smollm2 264/183/169, tinyllama 230/190/182; M=32 197/213/171, 270/261/244,
// 281/279/267; M=64 232/278/253, 297/316/303, 344/343/348; M=128 263/360/349, 307/361/347, 365/396/395;
// M=256 -/388/359, -/389/388, -/413/414; one hot matrix at M=512 and 2048: dp GEMM 388-435, oneDNN 385-433.
// (Before vdpbf16ps the fp32-FMA stream crossed oneDNN at M=14 for K < 2048 and M=6 above; oneDNN reached
// 1.5-2.7x the packed fp32 GEMM's GFLOP/s at M=32-512 on smollm2's and tinyllama's shapes.)
#ifndef SLIMLM_NATIVE_STREAM_MAX
#define SLIMLM_NATIVE_STREAM_MAX 32
#endif
#ifndef SLIMLM_DP_GEMM_MAX
#define SLIMLM_DP_GEMM_MAX 512  // largest M of the vdpbf16ps GEMM (even K only; odd K goes to oneDNN)
#endif
#ifndef SLIMLM_PACKED_MAX_M
#define SLIMLM_PACKED_MAX_M (SLIMLM_AMX ? 0 : 512)
#endif
#ifndef SLIMLM_SMALL_MAX_BF16_SHORT_K
#define SLIMLM_SMALL_MAX_BF16_SHORT_K (SLIMLM_AMX ? 16 : SLIMLM_LINEAR_AVX512 ? 28 : 48)
#endif
#ifndef SLIMLM_SMALL_MAX_BF16_LONG_K
#define SLIMLM_SMALL_MAX_BF16_LONG_K (SLIMLM_AMX ? 8 : SLIMLM_LINEAR_AVX512 ? 28 : 112)
#endif
#ifndef SLIMLM_SMALL_MAX_F32_SHORT_K
#define SLIMLM_SMALL_MAX_F32_SHORT_K 128
#endif
#ifndef SLIMLM_SMALL_MAX_F32_LONG_K
#define SLIMLM_SMALL_MAX_F32_LONG_K 192
#endif
constexpr int64_t kLongK = 1024;  // "long K" from here on

static int64_t small_max(at::ScalarType wt, int64_t K) {
  if (wt == at::kBFloat16) return K < kLongK ? SLIMLM_SMALL_MAX_BF16_SHORT_K : SLIMLM_SMALL_MAX_BF16_LONG_K;
  return K < kLongK ? SLIMLM_SMALL_MAX_F32_SHORT_K : SLIMLM_SMALL_MAX_F32_LONG_K;
}

// How far ahead of its loads the streaming kernel prefetches each of its R row streams (AVX-512 build). The
// hardware prefetcher alone leaves the R streams short of bandwidth once a block's FMAs slow the loads
// down (M >= 2). Measured on the 2-core Ice Lake VM (2 threads, cold W, interleaved medians, bf16 W, us,
// none / 1 KB ahead): py-target gate_up 2048x384 M=1 85 / 75, M=2 97 / 83, M=5 118 / 99, M=8 163 / 151;
// lm_head 8192x384 M=1 287 / 257, M=5 328 / 264; smollm2 gate_up 3072x576 M=5 232 / 199; tinyllama
// gate_up 11264x2048 M=1 2078 / 1920, M=5 2760 / 2608, M=8 3680 / 3728. 512 bytes ahead gained less at
// M >= 3; 1.5 and 2 KB about the same as 1 KB or slightly slower.
#ifndef SLIMLM_PREFETCH_BYTES
#define SLIMLM_PREFETCH_BYTES 1024
#endif

// ---------------------------------------------------------------------------------------------
// The streaming kernel's vector width. With AVX-512 (F + BW + DQ) one step covers KB = 32 K-elements in
// 512-bit registers, otherwise KB = 16 in 256-bit ones. Measured on a 2-core Ice Lake VM: 512-bit FMAs
// run at 176 GFLOP/s per core against 110 for 256-bit ones, so the compute-bound M >= 2 shapes gain and
// M = 1 stays bound by memory. SLIMLM_LINEAR_AVX512=0 forces the 256-bit kernel (tests compare both).

#if SLIMLM_LINEAR_AVX512
using VF = __m512;
constexpr int KB = 32;
static inline VF vzero() { return _mm512_setzero_ps(); }
static inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
static inline VF vfmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline __m256 vhalf(VF a) {  // 16 lanes -> 8 lanes whose sum is the same
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
#else
using VF = __m256;
constexpr int KB = 16;
static inline VF vzero() { return _mm256_setzero_ps(); }
static inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
static inline VF vfmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline __m256 vhalf(VF a) { return a; }
#endif
constexpr int VW = KB / 2;  // fp32 lanes per vector

// Loading KB K-elements of one W row as two fp32 vectors (lo, hi).
//   bf16: lo = even-index elements, hi = odd-index elements (x is packed to match).
//   fp32: lo = elements 0..VW-1, hi = elements VW..KB-1 (x packed in natural order).
struct LoadBf16 {
  using T = uint16_t;
  using XT = float;  // x as packed for this loader
  static constexpr bool kDot = false;
  static inline void load(const T* p, VF& lo, VF& hi) {
#if SLIMLM_LINEAR_AVX512
    slimlm_avx512::split_bf16x32(p, lo, hi);
#else
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
  }
};

struct LoadF32 {
  using T = float;
  using XT = float;
  static constexpr bool kDot = false;
  static inline void load(const T* p, VF& lo, VF& hi) {
    lo = vload(p);
    hi = vload(p + VW);
  }
};

// bf16 x and W on CPUs with AVX512-BF16: one vdpbf16ps multiplies 16 pairs of bf16 (exact products) and adds
// them to 16 fp32 lanes, where the fp32 kernel needs a split and two FMAs per 32 K-elements. x is packed as bf16
// in natural order. The products are exact; the sums are rounded in fp32 (denormals flushed), so results
// differ from the fp32 kernel's by summation order only.
#ifndef SLIMLM_LINEAR_DP
#if SLIMLM_LINEAR_AVX512 && defined(__AVX512BF16__)
#define SLIMLM_LINEAR_DP 1
#else
#define SLIMLM_LINEAR_DP 0
#endif
#endif
#if SLIMLM_LINEAR_DP
struct DotBf16 {
  using T = uint16_t;
  using XT = uint16_t;
  static constexpr bool kDot = true;
};
#endif

// Sums of 4 vectors -> 4 floats.
static inline __m128 hsum4(VF a4, VF b4, VF c4, VF d4) {
  const __m256 a = vhalf(a4), b = vhalf(b4), c = vhalf(c4), d = vhalf(d4);
  const __m256 ab = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0123 b0123 c0123 d0123 | a4567 ...
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline float hsum1(VF a4) {
  const __m256 a = vhalf(a4);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows of W (row r at w + r * rs) x MB rows of packed x (xf, row stride ldx, zero padded to a
// multiple of KB) -> res[m * R + r]. When there are few accumulators, even and odd halves get
// separate accumulators so that enough independent FMA chains are in flight.
template <class L, int R, int MB>
static inline void block_dot(const typename L::T* __restrict w, int64_t K, int64_t rs,
                             const typename L::XT* __restrict xf, int64_t ldx, float* __restrict res) {
  constexpr bool kSplit = R * MB < 8;
  constexpr int A = kSplit ? 2 : 1;
  VF acc[MB][R][A];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int a = 0; a < A; ++a) acc[m][r][a] = vzero();

  const int64_t Kfull = K & ~int64_t(KB - 1);
  auto step = [&](const typename L::T* const* rows, int64_t k, int64_t xk) {
#if SLIMLM_LINEAR_AVX512 && SLIMLM_PREFETCH_BYTES > 0
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + k) + SLIMLM_PREFETCH_BYTES, _MM_HINT_T0);
#endif
#if SLIMLM_LINEAR_DP
    if constexpr (L::kDot) {
      __m512i wv[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(rows[r] + k);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xf + m * ldx + xk);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], (__m512bh)wv[r], xv);
      }
      return;
    } else
#endif
    {
#if SLIMLM_LINEAR_AVX512
    // 32 registers hold all R rows' W halves: each x vector is loaded once per step, not R times
    // (with x reloaded per row, loads outnumbered FMAs and capped M >= 4 at ~115 GFLOP/s).
    VF wlo[R], whi[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) L::load(rows[r] + k, wlo[r], whi[r]);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const float* xp = xf + m * ldx + xk;
      const VF xlo = vload(xp), xhi = vload(xp + VW);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        acc[m][r][0] = vfmadd(wlo[r], xlo, acc[m][r][0]);
        acc[m][r][A - 1] = vfmadd(whi[r], xhi, acc[m][r][A - 1]);
      }
    }
#else
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      VF lo, hi;
      L::load(rows[r] + k, lo, hi);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const float* xp = xf + m * ldx + xk;
        acc[m][r][0] = vfmadd(lo, vload(xp), acc[m][r][0]);
        acc[m][r][A - 1] = vfmadd(hi, vload(xp + VW), acc[m][r][A - 1]);
      }
    }
#endif
    }
  };
  const typename L::T* rows[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) rows[r] = w + r * rs;
  for (int64_t k = 0; k < Kfull; k += KB) step(rows, k, k);
  if (Kfull < K) {
    // Tail: copy the last K % KB elements of each row into zeroed buffers (never read past
    // the row: the next row may hold Inf/NaN and the last row ends the allocation).
    alignas(64) typename L::T tail[R][KB];
    std::memset(tail, 0, sizeof(tail));
    const typename L::T* trows[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      std::memcpy(tail[r], rows[r] + Kfull, (K - Kfull) * sizeof(typename L::T));
      trows[r] = tail[r];
    }
    step(trows, 0, Kfull);
  }
  if constexpr (kSplit) {
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[m][r][0] = vadd(acc[m][r][0], acc[m][r][A - 1]);
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    if constexpr (R % 4 == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < R; r += 4)
        _mm_storeu_ps(res + m * R + r, hsum4(acc[m][r][0], acc[m][r + 1][0], acc[m][r + 2][0], acc[m][r + 3][0]));
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) res[m * R + r] = hsum1(acc[m][r][0]);
    }
  }
}

// block_dot for a run-time number of x rows 1 <= mb <= MB.
template <class L, int R, int MB>
static inline void block_dot_rem(int mb, const typename L::T* w, int64_t K, int64_t rs,
                                 const typename L::XT* xf, int64_t ldx, float* res) {
  if constexpr (MB >= 1) {
    if (mb == MB) return block_dot<L, R, MB>(w, K, rs, xf, ldx, res);
    block_dot_rem<L, R, MB - 1>(mb, w, K, rs, xf, ldx, res);
  }
}

// Rows [n0, n1) of the output for all M rows. The R rows of a register block are R separate
// streams through memory: with J = (n1 - n0) / R, block j takes rows n0 + j + r * J, so stream r
// walks rows n0 + r * J .. n0 + r * J + J - 1, i.e. one long contiguous run of J rows. Passes of up
// to MBMAX rows of x reuse each block from L1/L2, so W is read from memory once.
// Measured (cold W, 2 threads, M=1): 8 runs of ~32 KB beat 8 adjacent rows per block (rows only
// 1-4 KB long, too short for the hardware prefetcher) by 10-45% for bf16: smollm2 lm_head
// 19.2 -> 28.9 GB/s, tinyllama gate_up 20.2 -> 26.8 GB/s, and by 0-10% for fp32.
template <class L, int R, int MBMAX, class OutT>
static void small_range(const typename L::T* w, int64_t K, const typename L::XT* xf, int64_t ldx, int64_t M,
                        const float* bias, OutT* out, int64_t ldo, int64_t n0, int64_t n1) {
  float res[MBMAX * R];
  // Results for x rows m0.. (mb of them) and W rows n, n + stride, ... (RR of them).
  auto emit = [&](int RR, int mb, int64_t m0, int64_t n, int64_t stride) {
    for (int m = 0; m < mb; ++m)
      for (int r = 0; r < RR; ++r) {
        const int64_t nn = n + r * stride;
        store_out(out + (m0 + m) * ldo + nn, res[m * RR + r] + (bias ? bias[nn] : 0.f));
      }
  };
  const int64_t J = (n1 - n0) / R;
  for (int64_t j = 0; j < J; ++j) {
    const typename L::T* wb = w + (n0 + j) * K;
    const int64_t rs = J * K;
    int64_t m0 = 0;
    for (; m0 + MBMAX <= M; m0 += MBMAX) {
      block_dot<L, R, MBMAX>(wb, K, rs, xf + m0 * ldx, ldx, res);
      emit(R, MBMAX, m0, n0 + j, J);
    }
    const int64_t rem = M - m0;
    if (rem > 0) {
      block_dot_rem<L, R, MBMAX - 1>(static_cast<int>(rem), wb, K, rs, xf + m0 * ldx, ldx, res);
      emit(R, static_cast<int>(rem), m0, n0 + j, J);
    }
  }
  for (int64_t n = n0 + R * J; n < n1; ++n) {  // leftover rows, one at a time
    const typename L::T* wb = w + n * K;
    for (int64_t m0 = 0; m0 < M; ++m0) {
      block_dot<L, 1, 1>(wb, K, K, xf + m0 * ldx, ldx, res);
      emit(1, 1, m0, n, 0);
    }
  }
}

// Register blocking by M (measured, single thread, K=2048, W in L3): M=1: 8 W rows per block
// (memory bound; 8 accumulator chains, 8 row streams); M=2,3: 4 rows x up to 3 x rows; M>=4:
// 256-bit: 3 rows x 4 x rows (12 accumulators, ~70 GFLOP/s per Zen 3 core for bf16 and fp32 W);
// 512-bit (32 registers): SLIMLM_BLOCK_R rows x SLIMLM_BLOCK_MB x rows.
#if SLIMLM_LINEAR_AVX512
#ifndef SLIMLM_BLOCK_R
#define SLIMLM_BLOCK_R 4
#endif
#ifndef SLIMLM_BLOCK_MB
#define SLIMLM_BLOCK_MB 5
#endif
#else
#ifndef SLIMLM_BLOCK_R
#define SLIMLM_BLOCK_R 3
#endif
#ifndef SLIMLM_BLOCK_MB
#define SLIMLM_BLOCK_MB 4
#endif
#endif

template <class L, class OutT>
static void small_dispatch(const typename L::T* w, int64_t K, const typename L::XT* xf, int64_t ldx, int64_t M,
                           const float* bias, OutT* out, int64_t ldo, int64_t n0, int64_t n1) {
  if (M == 1)
    small_range<L, 8, 1>(w, K, xf, ldx, M, bias, out, ldo, n0, n1);
  else if (M <= 3)
    small_range<L, 4, 3>(w, K, xf, ldx, M, bias, out, ldo, n0, n1);
  else
    small_range<L, SLIMLM_BLOCK_R, SLIMLM_BLOCK_MB>(w, K, xf, ldx, M, bias, out, ldo, n0, n1);
}

static int rows_per_block(int64_t M) { return M == 1 ? 8 : (M <= 3 ? 4 : SLIMLM_BLOCK_R); }

// x [M, K] (row stride sx, unit column stride) -> fp32 [M, Kp] (row stride ldx) zero padded; `pair_order`
// packs each KB-block as its KB/2 even-index elements followed by its KB/2 odd-index ones.
template <class XT>
static void pack_x(const XT* x, int64_t sx, int64_t M, int64_t K, int64_t Kp, int64_t ldx, bool pair_order,
                   float* dst) {
  for (int64_t m = 0; m < M; ++m) {
    const XT* xr = x + m * sx;
    float* d = dst + m * ldx;
    if (!pair_order) {
      for (int64_t k = 0; k < K; ++k) d[k] = static_cast<float>(xr[k]);
      for (int64_t k = K; k < Kp; ++k) d[k] = 0.f;
    } else {
      for (int64_t b = 0; b < Kp; b += KB)
        for (int j = 0; j < KB; ++j) {
          const int64_t k = b + 2 * (j % VW) + j / VW;
          d[b + j] = k < K ? static_cast<float>(xr[k]) : 0.f;
        }
    }
  }
}

using slimlm_kernels::parallel_dynamic;

// Bytes of W per task of the streaming path: up to 256 KB at M <= 4 (long runs per stream: 256 KB
// beat 128 KB by 0-10% and 64 KB by more), 1 MB / M above, but at least 2 tasks per thread, and
// no task under 32 KB.
#ifndef SLIMLM_TASK_BYTES
#define SLIMLM_TASK_BYTES 262144
#endif

static at::Tensor bias_f32(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear: bias must have shape [", N, "]");
  TORCH_CHECK(bias->device().is_cpu(), "linear: bias must be on the CPU");
  return bias->to(at::kFloat).contiguous();
}

// The streaming kernel over all of W for packed x: tasks of whole register blocks, claimed dynamically.
template <class L>
static void small_run(const at::Tensor& w, const at::Tensor& b, at::Tensor& out, const typename L::XT* xf,
                      int64_t ldx, int64_t M, int64_t K, int64_t N) {
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t R = rows_per_block(M);
  const int64_t row_bytes = K * w.element_size();
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  // Larger M means more work per byte: shrink tasks (down to 32 KB) so that they stay short.
  const int64_t cap = std::clamp<int64_t>(4 * SLIMLM_TASK_BYTES / M, 32768, SLIMLM_TASK_BYTES);
  const int64_t task_bytes = std::min<int64_t>(cap, std::max<int64_t>(32768, N * row_bytes / (2 * nt)));
  const int64_t task_rows = R * std::max<int64_t>(1, task_bytes / std::max<int64_t>(1, R * row_bytes));
  const int64_t ntasks = (N + task_rows - 1) / task_rows;
  const auto* wp = reinterpret_cast<const typename L::T*>(w.data_ptr());
  auto run = [&](auto* optr) {
    parallel_dynamic(ntasks, [&](int64_t t) {
      small_dispatch<L>(wp, K, xf, ldx, M, bp, optr, N, t * task_rows, std::min(N, (t + 1) * task_rows));
    }, /*adaptive=*/true);
  };
  if (out.scalar_type() == at::kFloat) run(out.data_ptr<float>());
  else run(reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>()));
}

static void small_path(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const bool wbf16 = w.scalar_type() == at::kBFloat16;
  const int64_t Kp = (K + KB - 1) & ~int64_t(KB - 1);
  const int64_t ldx = Kp;
  // The packed x lives in a per-thread buffer reused across calls (no page faults per call),
  // 64-byte aligned: unaligned x rows (malloc gives 16) make half the 32-byte x loads straddle
  // cache lines, measured 20-35% slower at M=2..16.
  static thread_local std::vector<float> xbuf;
#if SLIMLM_LINEAR_DP
  if (wbf16 && x2.scalar_type() == at::kBFloat16) {
    // bf16 x as it is, each row zero padded to Kp (half the floats of the fp32 packing).
    auto* xb = reinterpret_cast<uint16_t*>(slimlm_kernels::aligned_scratch(xbuf, (M * ldx + 1) / 2));
    const auto* src = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(xb + m * ldx, src + m * x2.stride(0), K * sizeof(uint16_t));
      std::memset(xb + m * ldx + K, 0, (Kp - K) * sizeof(uint16_t));
    }
    return small_run<DotBf16>(w, b, out, xb, ldx, M, K, N);
  }
#endif
  float* xf = slimlm_kernels::aligned_scratch(xbuf, M * ldx);
  if (x2.scalar_type() == at::kFloat)
    pack_x(x2.data_ptr<float>(), x2.stride(0), M, K, Kp, ldx, wbf16, xf);
  else
    pack_x(x2.data_ptr<at::BFloat16>(), x2.stride(0), M, K, Kp, ldx, wbf16, xf);

  if (wbf16) small_run<LoadBf16>(w, b, out, xf, ldx, M, K, N);
  else small_run<LoadF32>(w, b, out, xf, ldx, M, K, N);
}

// bf16 rows [0, rows) of w (row stride K) -> fp32 dst [rows, K].
static void bf16_rows_to_f32(const uint16_t* w, int64_t rows, int64_t K, float* dst) {
  const int64_t n = rows * K;  // rows are contiguous: one flat conversion
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16);
    const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 8), hi);
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(w[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

// W rows per chunk at large M. MKL re-packs x for every call, so narrow chunks are slow
// (16-64 rows: -20..-60%); 256-1024 rows match sgemm on a whole fp32 weight.
static int64_t g_chunk_rows = 512;  // tunable for benchmarks (set_chunk_rows)

// Large M, bf16 W: each thread converts chunks of its W rows to fp32 and runs sgemm on them.
static void large_path_bf16(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  // Up to g_chunk_rows rows, and at least 2 chunks per thread for balance when N allows it.
  int64_t ch = std::min<int64_t>(g_chunk_rows, (N + 2 * nt - 1) / (2 * nt));
  ch = std::max<int64_t>(std::min<int64_t>(N, 128), ch);
  const int64_t nchunks = (N + ch - 1) / ch;
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  parallel_dynamic(nchunks, [&](int64_t c) {
    static thread_local std::vector<float> scratch;
    float* ws = slimlm_kernels::aligned_scratch(scratch, ch * K);
    {
      const int64_t n0 = c * ch, rows = std::min(ch, N - n0);
      bf16_rows_to_f32(wp + n0 * K, rows, K, ws);
      at::Tensor wc = at::from_blob(ws, {rows, K}, at::TensorOptions().dtype(at::kFloat));
      at::Tensor oc = out.narrow(1, n0, rows);
      if (b.defined())
        at::cpu::addmm_out(oc, b.narrow(0, n0, rows), xf, wc.t());
      else
        at::cpu::mm_out(oc, xf, wc.t());
    }
  }, /*adaptive=*/false);
}

#if SLIMLM_LINEAR_AVX512
// Middle and large M: the packed outer-product GEMM of packed_gemm.h, W converted to fp32 a block at a
// time into L1 (see there). Tasks are ranges of NR-row groups of W, claimed dynamically.
static void packed_path(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
  using namespace slimlm_gemm;
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const int64_t np = (M + PW - 1) / PW;
  static thread_local std::vector<float> xbuf;
  float* xt = slimlm_kernels::aligned_scratch(xbuf, np * K * PW);
  if (x2.scalar_type() == at::kFloat)
    pack_xt(x2.data_ptr<float>(), x2.stride(0), M, K, xt);
  else
    pack_xt(reinterpret_cast<const c10::BFloat16*>(x2.data_ptr<at::BFloat16>()), x2.stride(0), M, K, xt);

  const bool one_panel = np == 1;
  const int mv_one = static_cast<int>((M + 15) / 16);  // x vectors of the single panel (M <= 64)
  const int nr = one_panel ? nr_for(mv_one) : kLargeNr;
  // Equal K blocks of at most kc_max(nr) (one panel) or kLargeKc (several).
  const int64_t kcm = one_panel ? kc_max(nr) : kLargeKc;
  const int64_t nkb = (K + kcm - 1) / kcm;
  const int64_t KC = std::min(kcm, ((K + nkb - 1) / nkb + 15) & ~int64_t(15));
  const int64_t ldw = one_panel ? ldw_for(nr) : kLargeLd;
  const int64_t groups = (N + nr - 1) / nr;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t gpt = std::clamp<int64_t>(groups / (4 * nt), 1, 16);
  const int64_t ntasks = (groups + gpt - 1) / gpt;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;

  auto run = [&](const auto* wp, auto* optr) {
    const int64_t esz = sizeof(*wp);
    // Prefetch of rows [r0, r0 + rows) at column k0 (nothing when k0 is past the end).
    auto prefetch_of = [&](int64_t r0, int64_t rows, int64_t k0) {
      Prefetch pf;
      if (k0 < K && rows > 0) {
        pf.p = reinterpret_cast<const char*>(wp + r0 * K + k0);
        pf.stride = K * esz;
        pf.row_bytes = std::min(KC, K - k0) * esz;
        pf.rows = rows;
      }
      return pf;
    };
    parallel_dynamic(ntasks, [&](int64_t t) {
      static thread_local std::vector<float> wbuf, cbuf;
      const int64_t wrows = one_panel ? nr : gpt * nr;
      if (static_cast<int64_t>(cbuf.size()) < gpt * nr * MC) cbuf.resize(gpt * nr * MC);
      float* ws = slimlm_kernels::aligned_scratch(wbuf, wrows * ldw);
      float* ct = cbuf.data();
      const int64_t g0 = t * gpt, g1 = std::min(groups, g0 + gpt);
      const int64_t n0 = g0 * nr, n1 = std::min(N, g1 * nr);
      for (int64_t mc0 = 0; mc0 < M; mc0 += MC) {
        const int64_t mrows = std::min(MC, M - mc0);
        const int64_t p0 = mc0 / PW, p1 = (mc0 + mrows + PW - 1) / PW;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0);
          if (one_panel) {
            // Per group: convert its rows into L1 and prefetch the next group's (after the last group, the
            // first group's next K block). Prefetching 2 or 3 groups ahead measured the same.
            for (int64_t g = g0; g < g1; ++g) {
              const int64_t gn = g * nr;
              convert_block(wp, K, gn, std::min<int64_t>(nr, N - gn), nr, k0, kc, ws, ldw);
              const bool last = g + 1 == g1;
              const int64_t next = last ? n0 : gn + nr;
              Prefetch pf = prefetch_of(next, std::min<int64_t>(nr, N - next), last ? k0 + KC : k0);
              micro_any(nr, mv_one, ws, xt + k0 * PW, kc, ct + (g - g0) * nr * MC, MC, k0 > 0, pf);
            }
          } else {
            // The task's rows for this K block into L2, then each x panel block (L1) meets all of them.
            for (int64_t g = g0; g < g1; ++g)
              convert_block(wp, K, g * nr, std::min<int64_t>(nr, N - g * nr), nr, k0, kc, ws + (g - g0) * nr * ldw,
                            ldw);
            Prefetch pf = prefetch_of(n0, n1 - n0, k0 + KC);
            for (int64_t p = p0; p < p1; ++p) {
              const int mv = static_cast<int>(std::min<int64_t>(4, (M - p * PW + 15) / 16));
              for (int64_t g = g0; g < g1; ++g)
                micro_mv<kLargeNr, kLargeLd>(mv, ws + (g - g0) * nr * ldw, xt + p * K * PW + k0 * PW, kc,
                                             ct + (g - g0) * nr * MC + (p - p0) * PW, MC, k0 > 0, pf);
            }
          }
        }
        store_transposed(ct, MC, bp, n0, n1, mrows, optr, N, mc0);
      }
    }, /*adaptive=*/true);
  };
  auto with_w = [&](auto* optr) {
    if (w.scalar_type() == at::kBFloat16) run(reinterpret_cast<const uint16_t*>(w.data_ptr()), optr);
    else run(w.data_ptr<float>(), optr);
  };
  if (out.scalar_type() == at::kFloat) with_w(out.data_ptr<float>());
  else with_w(reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>()));
}
#endif

// path: 0 = pick by M, 1 = force the streaming kernel, 2 = force the convert + sgemm path, 3 = force the
// packed GEMM (AVX-512 builds only), 4 = the AMX tiles, 5 = the vdpbf16ps GEMM (AVX512-BF16 without AMX; bf16
// x and W, even K) (benchmarks/tests).
at::Tensor linear_path(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t path) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be 2-D [N, K]");
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "linear: x must be float32 or bfloat16, got ", xt);
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "linear: weight must be float32 or bfloat16, got ", wt);
  TORCH_CHECK(x.dim() >= 1, "linear: x must have at least one dimension");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "linear: x has ", x.size(-1), " features, weight expects ", K);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor w = weight.is_contiguous() ? weight : weight.contiguous();
  // 2-D x is used as is (any row stride); otherwise a view whenever possible.
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  if (K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  at::Tensor b = bias_f32(bias, N);

  if (M == 0 || N == 0 || K == 0) {
    at::Tensor out = b.defined() ? b.expand({M, N}).to(xt) : at::zeros({M, N}, x.options());
    return out.reshape(out_shape);
  }
  // The output of the paths that write [M, N] themselves, and its view in x's leading shape.
  auto new_out = [&] { return at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous)); };
  auto shaped = [&](const at::Tensor& out) { return x.dim() == 2 ? out : out.view(out_shape); };

  // bf16 x and W (and bias, as oneDNN wants it) on AVX512-BF16 CPUs without AMX ("native"): their own stream
  // limit, the vdpbf16ps GEMM above it, and oneDNN's bf16 GEMM (the branch at the end) instead of the packed GEMM.
#if defined(__AVX512BF16__) && !SLIMLM_AMX
  const bool native = xt == at::kBFloat16 && wt == at::kBFloat16 && (!b.defined() || bias->scalar_type() == at::kBFloat16);
#else
  constexpr bool native = false;
#endif
  const int64_t stream_limit = native ? SLIMLM_NATIVE_STREAM_MAX : small_max(wt, K);
#if SLIMLM_LINEAR_DP && !SLIMLM_AMX
  if (path == 5 || (path == 0 && native && M > stream_limit && M <= SLIMLM_DP_GEMM_MAX && K % 2 == 0)) {
    TORCH_CHECK(xt == at::kBFloat16 && wt == at::kBFloat16 && K % 2 == 0,
                "linear: the vdpbf16ps GEMM path takes bf16 x and weight with an even K");
    at::Tensor out = new_out();
    const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    dp_gemm::gemm(xp, x2.stride(0), M, N, K, bp, reinterpret_cast<c10::BFloat16*>(out.data_ptr()),
                  [&](int64_t n0, int) { return wp + n0 * K; });
    return shaped(out);
  }
#else
  TORCH_CHECK(path != 5, "linear: the vdpbf16ps GEMM path needs a CPU with AVX512-BF16 (and no AMX)");
#endif
#if SLIMLM_LINEAR_AVX512
  if (path == 3 || (path == 0 && !native && wt == at::kBFloat16 && M > stream_limit && M <= SLIMLM_PACKED_MAX_M)) {
    at::Tensor out = new_out();
    packed_path(x2, w, b, out);
    return shaped(out);
  }
#else
  TORCH_CHECK(path != 3, "linear: the packed GEMM path needs an AVX-512 build");
#endif
#if SLIMLM_AMX
  const bool tiles_fit = xt == at::kBFloat16 && wt == at::kBFloat16 && slimlm_kernels::amx_permitted();
  const bool long_k = K > kAmxLongK;
  const int64_t stream_max = long_k ? SLIMLM_AMX_STREAM_MAX_LONG_K : SLIMLM_AMX_STREAM_MAX;
  const int64_t tile_max = long_k ? SLIMLM_AMX_TILE_MAX_LONG_K : SLIMLM_AMX_TILE_MAX;
  if (path == 4 || (path == 0 && tiles_fit && M > stream_max && M <= tile_max)) {
    TORCH_CHECK(tiles_fit, "linear: the AMX path takes bf16 x and weight (and the OS must allow AMX)");
    at::Tensor out = new_out();
    slimlm_linear_amx::linear(reinterpret_cast<const uint16_t*>(x2.data_ptr()), x2.stride(0), M,
                              reinterpret_cast<const uint16_t*>(w.data_ptr()), N, K,
                              b.defined() ? b.data_ptr<float>() : nullptr,
                              reinterpret_cast<c10::BFloat16*>(out.data_ptr()));
    return shaped(out);
  }
#else
  TORCH_CHECK(path != 4, "linear: the AMX path needs a CPU with AMX");
#endif
  if (path == 1 || (path == 0 && M <= stream_limit)) {
    at::Tensor out = new_out();
    small_path(x2, w, b, out);
    return shaped(out);
  }

#if defined(__AMX_BF16__) || defined(__AVX512BF16__)
  // Native bf16 GEMM hardware: oneDNN's bf16 path beats converting to fp32. It takes the bias in bf16 only,
  // so an fp32 bias (not a bf16 model's) goes the fp32 way below rather than be rounded first.
  const bool bias_ok = !b.defined() || bias->scalar_type() == at::kBFloat16;
  if (xt == at::kBFloat16 && wt == at::kBFloat16 && bias_ok) {
    return at::linear(x2, w, b.defined() ? c10::optional<at::Tensor>(*bias) : c10::nullopt).view(out_shape);
  }
#endif

  at::Tensor xf = xt == at::kFloat ? x2 : x2.to(at::kFloat);
  at::Tensor out;
  if (wt == at::kFloat) {
    out = b.defined() ? at::addmm(b, xf, w.t()) : at::mm(xf, w.t());
  } else {
    out = at::empty({M, N}, xf.options().memory_format(at::MemoryFormat::Contiguous));
    large_path_bf16(xf, w, b, out);
  }
  if (xt != at::kFloat) out = out.to(xt);
  return out.view(out_shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_path(x, weight, bias, 0);
}

// Benchmark helpers (not part of the op's contract).

// Read-bandwidth reference: reads the tensor's first nbytes rounded down to 32 KB (the count is
// returned) as blocks of 8 interleaved 4 KB streams on all intra-op threads. This pattern
// measured faster than one sequential stream per thread (2 threads: 26.4 vs 23.6 GB/s).
int64_t read_probe(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "read_probe: contiguous CPU tensor");
  const auto* p = reinterpret_cast<const uint8_t*>(t.data_ptr());
  const int64_t nblk = static_cast<int64_t>(t.nbytes()) / (8 * 4096);
  std::atomic<int64_t> sink{0};
  at::parallel_for(0, nblk, 4, [&](int64_t b0, int64_t b1) {
    __m256i a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* base = p + b * 8 * 4096;
      for (int64_t o = 0; o < 4096; o += 32)
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r)
          a[r] = _mm256_xor_si256(a[r], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + r * 4096 + o)));
    }
    for (int i = 1; i < 8; ++i) a[0] = _mm256_xor_si256(a[0], a[i]);
    sink.fetch_add(_mm256_extract_epi32(a[0], 3) & 1, std::memory_order_relaxed);
  });
  return nblk * 8 * 4096 + (sink.load() & 0);
}

void set_chunk_rows(int64_t r) { g_chunk_rows = std::max<int64_t>(1, r); }

py::dict config() {
  py::dict d;
  d["long_k"] = kLongK;
  d["small_max_bf16_short_k"] = SLIMLM_SMALL_MAX_BF16_SHORT_K;
  d["small_max_bf16_long_k"] = SLIMLM_SMALL_MAX_BF16_LONG_K;
  d["small_max_f32_short_k"] = SLIMLM_SMALL_MAX_F32_SHORT_K;
  d["small_max_f32_long_k"] = SLIMLM_SMALL_MAX_F32_LONG_K;
  d["chunk_rows"] = g_chunk_rows;
  d["avx512"] = SLIMLM_LINEAR_AVX512 != 0;
  d["block_r"] = SLIMLM_BLOCK_R;
  d["prefetch_bytes"] = SLIMLM_LINEAR_AVX512 ? SLIMLM_PREFETCH_BYTES : 0;
  d["block_mb"] = SLIMLM_BLOCK_MB;
  d["packed_max_m"] = SLIMLM_LINEAR_AVX512 ? SLIMLM_PACKED_MAX_M : 0;
  d["amx"] = SLIMLM_AMX != 0;
  d["amx_long_k"] = kAmxLongK;
  d["amx_stream_max"] = SLIMLM_AMX ? SLIMLM_AMX_STREAM_MAX : 0;
  d["amx_stream_max_long_k"] = SLIMLM_AMX ? SLIMLM_AMX_STREAM_MAX_LONG_K : 0;
  d["amx_tile_max"] = SLIMLM_AMX ? SLIMLM_AMX_TILE_MAX : 0;
  d["amx_tile_max_long_k"] = SLIMLM_AMX ? SLIMLM_AMX_TILE_MAX_LONG_K : 0;
  d["serial_backoff"] = SLIMLM_SERIAL_BACKOFF;
  d["serial_backoff_min"] = SLIMLM_SERIAL_BACKOFF_MIN;
  d["late_streak"] = SLIMLM_LATE_STREAK;
  d["gil_release_macs"] = SLIMLM_GIL_RELEASE_MACS;
  d["late_helper_events"] = slimlm_kernels::g_late_events.load();
#if defined(__AVX512BF16__) && !SLIMLM_AMX
  d["native_stream_max"] = SLIMLM_NATIVE_STREAM_MAX;
  d["stream_dot_bf16"] = SLIMLM_LINEAR_DP != 0;
  d["dp_gemm_max"] = SLIMLM_LINEAR_DP ? SLIMLM_DP_GEMM_MAX : 0;
#else
  d["native_stream_max"] = 0;
  d["stream_dot_bf16"] = false;
  d["dp_gemm_max"] = 0;
#endif
#if defined(__AMX_BF16__) || defined(__AVX512BF16__)
  d["native_bf16_gemm"] = true;
#else
  d["native_bf16_gemm"] = false;
#endif
  return d;
}

// `(linear)`: the parentheses stop argument-dependent lookup from also finding at::linear.
at::Tensor linear_entry(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return slimlm_kernels::gil_released_if_long(x.numel() * weight.size(0), [&] { return (linear)(x, weight, bias); });
}

at::Tensor linear_path_entry(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t path) {
  return slimlm_kernels::gil_released_if_long(x.numel() * weight.size(0),
                                              [&] { return linear_path(x, weight, bias, path); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Prefill-sized calls release the GIL, decode-sized ones keep it (see common/gil.h).
  m.def("linear", &linear_entry, "y = x @ W.T + b (x fp32/bf16, W bf16/fp32, fp32 math, output in x's dtype)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("linear_path", &linear_path_entry,
        "linear with a forced path: 0 auto, 1 streaming kernel, 2 sgemm, 3 packed GEMM, 4 AMX tiles, 5 vdpbf16ps GEMM",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("path"));
  m.def("read_probe", &read_probe, "benchmark helper: read a contiguous tensor with all threads, returns bytes read");
  m.def("set_chunk_rows", &set_chunk_rows, "benchmark helper: W rows per chunk on the GEMM path");
  m.def("config", &config, "compile-time constants of this build");
}
