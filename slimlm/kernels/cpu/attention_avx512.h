// Paged attention with 512-bit vectors for bf16 caches with head_dim = 32, 64, 96 or 128 (the common
// case: every model this project ships and most published ones). Included by ops.cpp inside namespace slim,
// after the portable attend() it replaces there; same work items, same online softmax over chunks of
// kChunk keys, same split-K partial format (in natural element order, merged by combine<T, false>).
//
// Why a second kernel: the portable one works on 8-float vectors and 8-key tiles, converts each key row
// through pointer tables and reduces every 8 scores with AVX2 horizontal adds; in 32-sequence decode it took
// about a fifth of the step (the KV read floor is about a third of that). Here:
//   - a tile is up to 16 keys of one cache block; its K (then V) rows are converted once to fp32 in the
//     split order of the streaming linear (32 bf16 -> even elements via a shift, odd ones via a mask: no
//     shuffles), then every query row of the item reads them from L1;
//   - the 16 dot products of a query row against a tile end in one transposing reduction tree (15 adds) that
//     leaves the 16 scores in one vector;
//   - P V keeps the query row's accumulator (2 * D / 32 vectors) in registers across the tile.
// Must be included only where AVX-512 F/BW/DQ/VL are enabled (after ../common/avx512_bf16.h).

constexpr int kTile = 16;  // keys per tile: one vector of scores

using slimlm_avx512::split_bf16x32;

// Lane L of the result is the sum of the lanes of a[L]. Four levels of "pair up halves and add"; the
// levels leave lanes in the order 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15 (an involution), so the input is
// read in that order and the output comes out natural.
inline __m512 reduce16(const __m512* a) {
  constexpr int P[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 t[8], u[4], v[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m512 x = a[P[i]], y = a[P[i + 8]];
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88), _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44), _mm512_shuffle_ps(u[i], u[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}

// exp of 16 lanes: vexp()'s polynomial and limits (0 below -87.3, finite above 88, NaN stays NaN).
inline __m512 vexp16(__m512 x) {
  namespace e = exp_poly;
  const __m512 lo = _mm512_set1_ps(e::kMin);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  __m512 v = _mm512_min_ps(_mm512_set1_ps(e::kMax), x);
  v = _mm512_max_ps(lo, v);
  const __m512 fx =
      _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(e::kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(e::kLn2Hi), v);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(e::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(e::kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(e::kP[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i n = _mm512_cvtps_epi32(fx);
  const __m512 pow2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), y, pow2);
}

// Rows [0, n) of a tile (row stride `stride` bf16) -> fp32 split order [kTile][D]; rows n.. zeroed, so that
// the scores past the tile's end are finite (never read).
template <int DB>
inline void load_tile(const bf16* rows, int64_t stride, int n, float* tile) {
  constexpr int D = 32 * DB;
  for (int j = 0; j < n; ++j) {
#pragma GCC unroll 4
    for (int b = 0; b < DB; ++b) {
      __m512 lo, hi;
      split_bf16x32(rows + j * stride + 32 * b, lo, hi);
      _mm512_store_ps(tile + j * D + 32 * b, lo);
      _mm512_store_ps(tile + j * D + 32 * b + 16, hi);
    }
  }
  for (int j = n; j < kTile; ++j)
    for (int c = 0; c < D; c += 16) _mm512_store_ps(tile + j * D + c, _mm512_setzero_ps());
}

// Requests the cache lines of rows [0, n) of a tile (D bf16 each, row stride `stride`) into L1. Inline asm:
// GCC dropped _mm_prefetch from this translation unit.
template <int DB>
inline void prefetch_tile(const bf16* rows, int64_t stride, int n) {
  for (int j = 0; j < n; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < 32 * DB; c += 32) asm volatile("prefetcht0 %0" : : "m"(rows[j * stride + c]));
}

// Split order [32 b + (0..15 even, 16..31 odd)] -> natural order, times `scale`, into 32 floats at dst.
inline void unsplit32(const float* src, __m512 scale, float* dst) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
  _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale));
  _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale));
}

// attend() for bf16, D = 32 * DB: the query vectors of `it` against keys [kb, ke).
template <int DB>
void attend512(const Attn<bf16>& a, const Item& it, int64_t kb, int64_t ke, float* partial) {
  constexpr int D = 32 * DB;
  constexpr int kScoreStride = kChunk + kTile;  // room for a full tile of scores past the chunk's end
  const int gn = it.g1 - it.g0, M = (it.r1 - it.r0) * gn;
  const int64_t s = a.qsl(it.seq);  // the sequence's first query row
  float* buf = scratch(static_cast<size_t>(M) * (2 * D + kScoreStride + 4) + kTile * D + 16);
  float* qb = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf) + 63) & ~uintptr_t(63));
  float* tile = qb + M * D;  // 64-byte aligned: D is a multiple of 32
  float* acc = tile + kTile * D;
  float* sc = acc + M * D;
  float* mx = sc + M * kScoreStride;
  float* l = mx + M;
  int* lo = reinterpret_cast<int*>(l + M);
  int* hi = lo + M;

  const __m512 vscale = _mm512_set1_ps(a.scale);
  for (int m = 0; m < M; ++m) {
    const int r = it.r0 + m / gn, g = it.g0 + m % gn;
    const bf16* qr = a.q + (s + r) * a.qs0 + (static_cast<int64_t>(it.h) * a.G + g) * a.qs1;
    for (int b = 0; b < DB; ++b) {
      __m512 x, y;
      split_bf16x32(qr + 32 * b, x, y);
      _mm512_store_ps(qb + m * D + 32 * b, _mm512_mul_ps(x, vscale));
      _mm512_store_ps(qb + m * D + 32 * b + 16, _mm512_mul_ps(y, vscale));
    }
    for (int c = 0; c < D; c += 16) _mm512_store_ps(acc + m * D + c, _mm512_setzero_ps());
    mx[m] = -std::numeric_limits<float>::infinity();
    l[m] = 0.f;
  }
  const KeyRange keys(a, it, kb, ke);
  const int64_t kmin = keys.kmin, kmax = keys.kmax;
  const bf16* kbase = a.kc + it.h * a.ks1;
  const bf16* vbase = a.vc + it.h * a.vs1;
  // Each tile: up to kTile keys inside one cache block.
  auto for_tiles = [&](int64_t cs, int64_t ce, auto&& f) {
    for (int64_t kp = cs; kp < ce;) {
      const int64_t bi = kp / a.bs, off = kp - bi * a.bs;
      const int n = static_cast<int>(std::min<int64_t>({kTile, ce - kp, a.bs - off}));
      const int64_t blk = a.bt(it.seq, bi);
      TORCH_CHECK(blk >= 0 && blk < a.nblocks, "paged_attention: block id ", blk, " out of range");
      f(blk, off, static_cast<int>(kp - cs), n, kp + n);
      kp += n;
    }
  };
  // Blocks sit anywhere in the cache, so the hardware prefetcher cannot guess the next one: while a tile's
  // scores are computed, the next tile's K rows and this tile's V rows are requested. 32-sequence decode,
  // smollm2 shape (9/3 heads, D 64, 200 keys), 30 layers, 2 threads, interleaved medians: no prefetch
  // 17.5-18.5 ms, this 13-14.5 ms (the 8-float kernel 21-25 ms; reading the KV alone 5.6-6.1 ms). Also
  // measured and dropped: K and V 2-8 tiles ahead into L2 (no gain: the prefetches themselves then stall
  // on the core's fill buffers), block sizes 32-128 (no gain), transparent huge pages (no gain).
  auto prefetch_next = [&](int64_t blk, int64_t off, int n, int64_t next) {
    prefetch_tile<DB>(vbase + blk * a.vs0 + off * a.vs2, a.vs2, n);
    if (next > kmax) return;
    const int64_t bi = next / a.bs, noff = next - bi * a.bs;
    const int64_t nblk = a.bt(it.seq, bi);
    if (nblk < 0 || nblk >= a.nblocks) return;  // reported when the tile is reached
    prefetch_tile<DB>(kbase + nblk * a.ks0 + noff * a.ks2, a.ks2,
                      static_cast<int>(std::min<int64_t>({kTile, kmax + 1 - next, a.bs - noff})));
  };

  for (int64_t cs = kmin; cs <= kmax; cs += kChunk) {
    const int64_t ce = std::min<int64_t>(cs + kChunk, kmax + 1);
    keys.in_chunk(M, cs, ce, lo, hi);
    // Scores.
    for_tiles(cs, ce, [&](int64_t blk, int64_t off, int j0, int n, int64_t next) {
      prefetch_next(blk, off, n, next);
      load_tile<DB>(kbase + blk * a.ks0 + off * a.ks2, a.ks2, n, tile);
      for (int m = 0; m < M; ++m) {
        if (j0 > hi[m] || j0 + n - 1 < lo[m]) continue;
        __m512 q[2 * DB];
#pragma GCC unroll 8
        for (int c = 0; c < 2 * DB; ++c) q[c] = _mm512_load_ps(qb + m * D + 16 * c);
        __m512 dots[kTile];
#pragma GCC unroll 16
        for (int j = 0; j < kTile; ++j) {
          __m512 d = _mm512_mul_ps(q[0], _mm512_load_ps(tile + j * D));
#pragma GCC unroll 8
          for (int c = 1; c < 2 * DB; ++c) d = _mm512_fmadd_ps(q[c], _mm512_load_ps(tile + j * D + 16 * c), d);
          dots[j] = d;
        }
        _mm512_storeu_ps(sc + m * kScoreStride + j0, reduce16(dots));
      }
    });
    // Online softmax over the chunk: probabilities overwrite the scores.
    for (int m = 0; m < M; ++m) {
      if (lo[m] > hi[m]) continue;
      float* row = sc + m * kScoreStride;
      const int i0 = lo[m], i1 = hi[m] + 1;
      __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int i = i0; i < i1; i += 16) {
        const __mmask16 k = static_cast<__mmask16>(i1 - i >= 16 ? 0xFFFF : (1u << (i1 - i)) - 1u);
        vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, row + i));
      }
      const float mnew = std::max(mx[m], _mm512_reduce_max_ps(vm));
      const float alpha = std::exp(mx[m] - mnew);
      const __m512 vmn = _mm512_set1_ps(mnew);
      __m512 vs = _mm512_setzero_ps();
      for (int i = i0; i < i1; i += 16) {
        const __mmask16 k = static_cast<__mmask16>(i1 - i >= 16 ? 0xFFFF : (1u << (i1 - i)) - 1u);
        const __m512 p = _mm512_maskz_mov_ps(k, vexp16(_mm512_sub_ps(_mm512_loadu_ps(row + i), vmn)));
        _mm512_mask_storeu_ps(row + i, k, p);
        vs = _mm512_add_ps(vs, p);
      }
      l[m] = l[m] * alpha + _mm512_reduce_add_ps(vs);
      mx[m] = mnew;
      if (alpha != 1.0f) {
        const __m512 va = _mm512_set1_ps(alpha);
        for (int c = 0; c < D; c += 16) _mm512_store_ps(acc + m * D + c, _mm512_mul_ps(_mm512_load_ps(acc + m * D + c), va));
      }
    }
    // Values.
    for_tiles(cs, ce, [&](int64_t blk, int64_t off, int j0, int n, int64_t) {
      load_tile<DB>(vbase + blk * a.vs0 + off * a.vs2, a.vs2, n, tile);
      for (int m = 0; m < M; ++m) {
        const int ja = std::max(lo[m] - j0, 0), jb = std::min(hi[m] - j0 + 1, n);
        if (ja >= jb) continue;
        __m512 o[2 * DB];
#pragma GCC unroll 8
        for (int c = 0; c < 2 * DB; ++c) o[c] = _mm512_load_ps(acc + m * D + 16 * c);
        const float* p = sc + m * kScoreStride + j0;
        for (int j = ja; j < jb; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j]);
#pragma GCC unroll 8
          for (int c = 0; c < 2 * DB; ++c) o[c] = _mm512_fmadd_ps(pj, _mm512_load_ps(tile + j * D + 16 * c), o[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 2 * DB; ++c) _mm512_store_ps(acc + m * D + 16 * c, o[c]);
      }
    });
  }
  if (partial != nullptr) {  // {max, sum, accumulator in natural order} per query vector, for combine()
    for (int m = 0; m < M; ++m) {
      float* p = partial + m * (D + 2);
      p[0] = mx[m];
      p[1] = l[m];
      for (int b = 0; b < DB; ++b) unsplit32(acc + m * D + 32 * b, _mm512_set1_ps(1.0f), p + 2 + 32 * b);
    }
    return;
  }
  for (int m = 0; m < M; ++m) {
    const int r = it.r0 + m / gn, g = it.g0 + m % gn;
    bf16* orow = a.out + (a.qsl(it.seq) + r) * a.os0 + (static_cast<int64_t>(it.h) * a.G + g) * a.os1;
    const __m512 inv = _mm512_set1_ps(l[m] > 0.f ? 1.0f / l[m] : 0.f);
    alignas(64) float nat[32];
    for (int b = 0; b < DB; ++b) {
      unsplit32(acc + m * D + 32 * b, inv, nat);
      slimlm_avx512::store_bf16x16(orow + 32 * b, _mm512_load_ps(nat));
      slimlm_avx512::store_bf16x16(orow + 32 * b + 16, _mm512_load_ps(nat + 16));
    }
  }
}

// attend512<D / 32> for D in {32, 64, 96, 128}.
inline void attend512_any(const Attn<bf16>& a, const Item& it, int64_t kb, int64_t ke, float* partial) {
  switch (a.D / 32) {
    case 1: return attend512<1>(a, it, kb, ke, partial);
    case 2: return attend512<2>(a, it, kb, ke, partial);
    case 3: return attend512<3>(a, it, kb, ke, partial);
    default: return attend512<4>(a, it, kb, ke, partial);
  }
}

// attend512_any for bf16 (the only type it serves); a template so that the dispatcher compiles for all T.
template <class T>
inline void attend_wide(const Attn<T>& a, const Item& it, int64_t kb, int64_t ke, float* partial) {
  if constexpr (std::is_same_v<T, bf16>) attend512_any(a, it, kb, ke, partial);
}
