// bf16 <-> fp32 on 512-bit vectors, shared by the AVX-512 kernels (cpu_linear's streaming and packed
// linears, cpu ops' paged attention). Include only where AVX-512 F/BW/VL are enabled.
#pragma once

#include <immintrin.h>

namespace slimlm_avx512 {

// 32 bf16 at p -> fp32 even-index elements (lo: shift left 16) and odd-index elements (hi: mask off the
// low half). No shuffles; the other operand is stored in the matching "even half, odd half" order.
inline void split_bf16x32(const void* p, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 fp32 -> bf16 at p, the lanes in `mask`: round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16 does).
inline void store_bf16x16(void* p, __m512 v, __mmask16 mask = 0xFFFF) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(r));
}

}  // namespace slimlm_avx512
