// The integer SIMD kernels of the quantized linear (see qlinear.cpp for the scheme): weight loaders, the
// blocked int8 dot products, and the small vector helpers they share. AVX2 + FMA, and AVX512-VNNI's vpdpbusd where the CPU has it.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace slimlm_quant {

enum Kind : int64_t { kU4 = 0, kS8 = 1, kNF4 = 2 };

// round(127 * NF4_TABLE): NF4 codes as int8 for the integer kernel (scales carry the 1/127).
alignas(16) constexpr int8_t kNf4Q[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};
// NF4_TABLE itself, for the exact dequantization of the large-M path.
alignas(32) constexpr float kNf4[16] = {-1.0f,
                                        -0.6961928009986877f,
                                        -0.5250730514526367f,
                                        -0.39491748809814453f,
                                        -0.28444138169288635f,
                                        -0.18477343022823334f,
                                        -0.09105003625154495f,
                                        0.0f,
                                        0.07958029955625534f,
                                        0.16093020141124725f,
                                        0.24611230194568634f,
                                        0.33791524171829224f,
                                        0.44070982933044434f,
                                        0.5626170039176941f,
                                        0.7229568362236023f,
                                        1.0f};

// Loaders of 64 weights of a row (two chunks of 32) -> two vectors of 32 bytes in input order.
struct U4 {  // byte j of a 32-byte unit holds weight j (low nibble) and weight j + 32 (high nibble)
  static constexpr int kPairBytes = 32;
  static constexpr bool kSigned = false;
  static inline void load2(const uint8_t* p, __m256i& lo, __m256i& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, m);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  }
};
struct S8 {
  static constexpr int kPairBytes = 64;
  static constexpr bool kSigned = true;
  static inline void load2(const uint8_t* p, __m256i& lo, __m256i& hi) {
    lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  }
};
struct NF4 {
  static constexpr int kPairBytes = 32;
  static constexpr bool kSigned = true;
  static inline void load2(const uint8_t* p, __m256i& lo, __m256i& hi) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kNf4Q)));
    U4::load2(p, lo, hi);
    lo = _mm256_shuffle_epi8(lut, lo);
    hi = _mm256_shuffle_epi8(lut, hi);
  }
};

static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline int32_t hsum_i32(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

static inline float hmax(__m256 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x quantized per block: q [M, Kp] int8, d [M, NB] scales, zs [M, G] per group sum of d * sum(q) (for zeros).
struct XQ {
  const int8_t* q;
  int64_t ldq;
  const float* d;
  int64_t NB;
  const float* zs;
  int64_t G;
};

// Keeps v in a register as it is: GCC otherwise reassociates the unrolled accumulation chains into trees of
// all products first, which spilled most of them to the stack (measured 1.5x slower than the W8A8 kernel).
// At MB = 1 the trees cost nothing and were faster (measured), so only MB > 1 pins.
template <int MB>
static inline void pin(__m256i& v) {
  if constexpr (MB > 1) __asm__("" : "+x"(v));
}

// Software prefetch distance (bytes) of each weight stream; 0: off. 1024 measured 0-5% faster than none at
// M = 1 (K = 5632 most) on a cold weight, one or two threads. At M >= 2, where a block's integer work slows
// the loads, prefetching was first left out, and measured since (2 threads, cold W, interleaved medians, us,
// M=1 only / every M): tinyllama gate_up 11264x2048 int8 M=2 1873 / 1595, M=4 2292 / 1928, M=8 4265 / 4153;
// int4 M=2 1495 / 1360, M=4 2197 / 2076; down 2048x5632 int4 M=2 764 / 652, M=8 2188 / 2200.
#ifndef SLIMLM_QUANT_PREFETCH
#define SLIMLM_QUANT_PREFETCH 1024
#endif

// Integer dot of one chunk of W (32 bytes as loaded) with one chunk of q, added to acc (int16 lanes for
// unsigned nibbles: at most 8 chunks per block; int32 for signed weights).
//
// With AVX512-VNNI (+VL), vpdpbusd does u8 x s8 -> int32 in one instruction where AVX2 needs maddubs (to int16
// pairs), madd (to int32) and add. The sums are the same: |w| <= 128 and |q| <= 127 keep maddubs' int16 pairs
// below saturation, so both paths give bit-identical integers; the unsigned path then accumulates in int32
// directly instead of int16.
#ifndef SLIMLM_QUANT_VNNI  // -DSLIMLM_QUANT_VNNI=0 builds the AVX2 path on a VNNI CPU (to compare them)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define SLIMLM_QUANT_VNNI 1
#else
#define SLIMLM_QUANT_VNNI 0
#endif
#endif

// u8 x s8 dot of 4-byte groups, added to int32 lanes.
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s, __m256i ones) {
#if SLIMLM_QUANT_VNNI
  (void)ones;
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
#endif
}

template <class WL>
static inline __m256i chunk_dot(__m256i acc, __m256i wv, __m256i aw, const int8_t* q, __m256i ones) {
  const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  if constexpr (WL::kSigned)
    return dot_u8s8(acc, aw, _mm256_sign_epi8(qv, wv), ones);
  else if constexpr (SLIMLM_QUANT_VNNI)
    return dot_u8s8(acc, wv, qv, ones);
  else
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(wv, qv));
}

template <class WL>
static inline __m256 to_f32(__m256i acc, __m256i ones) {
  return _mm256_cvtepi32_ps(WL::kSigned || SLIMLM_QUANT_VNNI ? acc : _mm256_madd_epi16(acc, ones));
}

// R rows of W (row r at w + r * rs bytes, its scales at s + r * ss) x MB rows of XQ (from m0), x-blocks of
// CPB chunks of 32: res[m * R + r] = sum over blocks of d_x * s_w * (int dot of the block). bpg: x-blocks per
// scale group. SPLIT (group size 32 in 64-input x-blocks): each chunk has its own scale, CPB == 2.
template <class WL, int R, int MB, int CPB, bool SPLIT>
static inline void block_dot(const uint8_t* __restrict w, int64_t rs, const float* __restrict s, int64_t ss,
                             const XQ& xq, int64_t m0, int64_t bpg, float* res) {
  static_assert(CPB % 2 == 0 && (!SPLIT || CPB == 2), "x-blocks hold pairs of chunks");
  __m256 facc[MB][R];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) facc[m][r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr int64_t kBlockBytes = CPB / 2 * WL::kPairBytes;
  const int64_t groups = SPLIT ? xq.NB : xq.G;  // SPLIT: two scales per x-block, indexed in the block
  const int64_t per = SPLIT ? 1 : bpg;
  // Scales are broadcast from memory where used: hoisting R of them into registers spilled the accumulators.
  // All R x MB accumulator chains advance together, chunk by chunk (each (W row, x row) pair sums its chunks in
  // order), so R * MB independent vpdpbusd chains hide the instruction's latency. Measured on a 2-core Zen 4 VM
  // (2 threads, cold W, interleaved medians) against one W row's MB chains at a time (the same integers and
  // floats): tinyllama gate_up and down int8 M=16 0.95 and 0.95, M=32 0.91 and 0.90; int4 M=16 0.98 and 0.97,
  // M=32 0.97 and 0.96; M=4 0.96-1.04.
  for (int64_t g = 0, b = 0; g < groups; ++g) {
    for (int64_t bb = 0; bb < per; ++bb, ++b) {
      const int8_t* qb = xq.q + m0 * xq.ldq + b * CPB * 32;
      const float* db = xq.d + m0 * xq.NB + b;
      __m256i acc[R][MB], acc1[R][MB];  // acc1: SPLIT's second chunk of each pair
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[r][m] = acc1[r][m] = _mm256_setzero_si256();
      if constexpr (SLIMLM_QUANT_PREFETCH > 0)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          for (int64_t o = 0; o < kBlockBytes; o += 64)
            _mm_prefetch(reinterpret_cast<const char*>(w + r * rs + b * kBlockBytes + SLIMLM_QUANT_PREFETCH + o),
                         _MM_HINT_T0);
#pragma GCC unroll 4
      for (int c = 0; c < CPB; c += 2) {
        __m256i w0[R], w1[R], a0[R], a1[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          WL::load2(w + r * rs + b * kBlockBytes + c / 2 * WL::kPairBytes, w0[r], w1[r]);
          a0[r] = w0[r];
          a1[r] = w1[r];
          if constexpr (WL::kSigned) {
            a0[r] = _mm256_sign_epi8(w0[r], w0[r]);
            a1[r] = _mm256_sign_epi8(w1[r], w1[r]);
          }
        }
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const int8_t* qm = qb + m * xq.ldq + c * 32;
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            acc[r][m] = chunk_dot<WL>(acc[r][m], w0[r], a0[r], qm, ones);
            pin<MB>(acc[r][m]);
          }
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            __m256i& second = SPLIT ? acc1[r][m] : acc[r][m];
            second = chunk_dot<WL>(second, w1[r], a1[r], qm + 32, ones);
            pin<MB>(second);
          }
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m256 d = _mm256_broadcast_ss(db + m * xq.NB);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          if constexpr (SPLIT) {
            const float* sr = s + r * ss + 2 * b;
            facc[m][r] =
                _mm256_fmadd_ps(to_f32<WL>(acc[r][m], ones), _mm256_mul_ps(d, _mm256_broadcast_ss(sr)), facc[m][r]);
            facc[m][r] = _mm256_fmadd_ps(to_f32<WL>(acc1[r][m], ones), _mm256_mul_ps(d, _mm256_broadcast_ss(sr + 1)),
                                         facc[m][r]);
          } else {
            const __m256 sw = _mm256_broadcast_ss(s + r * ss + g);
            facc[m][r] = _mm256_fmadd_ps(to_f32<WL>(acc[r][m], ones), _mm256_mul_ps(d, sw), facc[m][r]);
          }
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) res[m * R + r] = hsum(facc[m][r]);
}

// W8A8: exact int32 dot of R whole rows with MB rows of q (chunk-outer, so the R rows stream together).
template <int R, int MB>
static inline void block_dot_i32(const uint8_t* __restrict w, int64_t rs, const XQ& xq, int64_t m0, int64_t chunks,
                                 float* res) {
  __m256i acc[MB][R];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q0 = xq.q + m0 * xq.ldq;
  for (int64_t c = 0; c < chunks; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rs + c * 32));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + m * xq.ldq + c * 32));
        acc[m][r] = dot_u8s8(acc[m][r], aw, _mm256_sign_epi8(qv, wv), ones);
        pin<MB>(acc[m][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) res[m * R + r] = static_cast<float>(hsum_i32(acc[m][r]));  // int32 -> fp32 RNE
}

}  // namespace slimlm_quant
