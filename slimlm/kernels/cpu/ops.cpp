// Fused CPU kernels for slimlm's non-matmul ops; semantics: slimlm/kernels/reference.py.
//
// One code path written against a tiny 8-float vector type `V`: AVX2 + FMA (+ F16C) intrinsics when the
// compiler targets them (-march=native on any x86-64 from the last decade), plain loops otherwise
// (define SLIMLM_SCALAR to force those). Elementwise ops mimic the reference's intermediate roundings, so
// bf16/fp16 results match it bit for bit in almost every element; attention accumulates in fp32 and rounds
// once at the end.
//
// Bound to Python in bindings.cpp (kept apart so that the two files compile in parallel).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if (defined(__AVX2__) && defined(__FMA__)) && !defined(SLIMLM_SCALAR)
#define SLIM_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(SLIMLM_NO_ATTN512)
#define SLIM_ATTN512 1  // the 512-bit paged attention of attention_avx512.h
#include "../common/avx512_bf16.h"
#endif
#endif

namespace slim {

using bf16 = c10::BFloat16;
using f16 = c10::Half;

constexpr int W = 8;           // floats per vector
constexpr int kMaxDim = 1024;  // largest head_dim / rope dim handled

// The exp polynomial's constants (Cephes expf), shared by the 8-float vexp and attention_avx512.h's vexp16.
namespace exp_poly {
constexpr float kMin = -87.33654475f, kMax = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 in two parts
constexpr float kP[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                         4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
}  // namespace exp_poly

// ---------------------------------------------------------------------------------------------------------
// Vector layer
// ---------------------------------------------------------------------------------------------------------

#ifdef SLIM_AVX2

struct V {
  __m256 v;
};

inline V vzero() { return {_mm256_setzero_ps()}; }
inline V vset(float x) { return {_mm256_set1_ps(x)}; }
inline V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }

inline float hsum(V a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float hmax(V a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Lane j of the result is the sum of a[j]'s lanes.
inline V hsum8(const V* a) {
  __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v);
  __m256 t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v);
  __m256 t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  __m256 u0 = _mm256_hadd_ps(t0, t1);  // [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high halves)
  __m256 u1 = _mm256_hadd_ps(t2, t3);
  return {_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))};
}

// exp with ~1-2 ulp error (Cephes polynomial); 0 below -87.3, saturates (finite) above 88, NaN stays NaN.
inline V vexp(V x) {
  namespace e = exp_poly;
  const __m256 lo = _mm256_set1_ps(e::kMin);
  __m256 under = _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ);
  __m256 v = _mm256_min_ps(_mm256_set1_ps(e::kMax), x.v);  // second operand wins on NaN: keeps NaN
  v = _mm256_max_ps(lo, v);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(e::kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(e::kLn2Hi), v);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(e::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(e::kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(e::kP[i]));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvtps_epi32(fx);
  __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  return {_mm256_andnot_ps(under, _mm256_mul_ps(y, pow2))};
}

inline V load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, V a) { _mm256_storeu_ps(p, a.v); }

inline V load(const bf16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}

// float -> bf16 bits, round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16 does), in 32-bit lanes.
inline __m256i bf16_bits(__m256 a) {
  __m256i u = _mm256_castps_si256(a);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

inline void store(bf16* p, V a) {
  __m256i r = bf16_bits(a.v);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

#ifdef __F16C__
inline V load(const f16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void store(f16* p, V a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline V load(const f16* p) {
  alignas(32) float t[W];
  for (int i = 0; i < W; ++i) t[i] = static_cast<float>(p[i]);
  return load(t);
}
inline void store(f16* p, V a) {
  alignas(32) float t[W];
  store(t, a);
  for (int i = 0; i < W; ++i) p[i] = static_cast<f16>(t[i]);
}
#endif

// The value rounded to T's precision, kept in float (mimics the reference's intermediate roundings).
template <class T>
inline V rnd(V a);
template <>
inline V rnd<float>(V a) {
  return a;
}
template <>
inline V rnd<bf16>(V a) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(a.v), 16))};
}
template <>
inline V rnd<f16>(V a) {
  alignas(32) f16 t[W];
  store(t, a);
  return load(t);
}

// bf16 <-> fp32 for 16 values at a time by interleaving with zeros: half the work of load()/store(), but
// the 16 floats come out permuted as [0-3 8-11 | 4-7 12-15]. Dot products and axpys do not care as long
// as every operand uses the same order, and the pack on the way back restores it.
constexpr bool kHasPerm16 = true;
inline void bf16_to_perm16(const bf16* src, float* dst) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i z = _mm256_setzero_si256();
  _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x)));
  _mm256_storeu_ps(dst + W, _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x)));
}
inline void perm16_to_bf16(const float* src, V scale, bf16* dst) {
  const __m256i lo = bf16_bits((load(src) * scale).v), hi = bf16_bits((load(src + W) * scale).v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_packus_epi32(lo, hi));
}

#else  // portable fallback: plain loops the compiler may vectorise


struct V {
  float v[W];
};

inline V vzero() { return V{}; }
inline V vset(float x) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = x;
  return r;
}
#define SLIM_BINOP(OP)                               \
  inline V operator OP(V a, V b) {                   \
    V r;                                             \
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] OP b.v[i]; \
    return r;                                        \
  }
SLIM_BINOP(+)
SLIM_BINOP(-)
SLIM_BINOP(*)
SLIM_BINOP(/)
#undef SLIM_BINOP
inline V fmadd(V a, V b, V c) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline V vmax(V a, V b) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return r;
}
inline float hsum(V a) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += a.v[i];
  return s;
}
inline float hmax(V a) {
  float s = a.v[0];
  for (int i = 1; i < W; ++i) s = a.v[i] > s ? a.v[i] : s;
  return s;
}
inline V hsum8(const V* a) {
  V r;
  for (int j = 0; j < W; ++j) r.v[j] = hsum(a[j]);
  return r;
}
inline V vexp(V x) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = std::exp(x.v[i]);
  return r;
}
template <class T>
inline V load(const T* p) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
template <class T>
inline void store(T* p, V a) {
  for (int i = 0; i < W; ++i) p[i] = static_cast<T>(a.v[i]);
}
template <class T>
inline V rnd(V a) {
  V r;
  for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(static_cast<T>(a.v[i]));
  return r;
}

constexpr bool kHasPerm16 = false;
inline void bf16_to_perm16(const bf16*, float*) {}
inline void perm16_to_bf16(const float*, V, bf16*) {}

#endif  // SLIM_AVX2

// First n (< W allowed) elements; the other lanes read as 0.
template <class T>
inline V load_n(const T* p, int n) {
  if (n >= W) return load(p);
  T t[W];
  std::memset(static_cast<void*>(t), 0, sizeof(t));
  std::memcpy(static_cast<void*>(t), p, sizeof(T) * n);
  return load(t);
}

template <class T>
inline void store_n(T* p, V a, int n) {
  if (n >= W) return store(p, a);
  T t[W];
  store(t, a);
  std::memcpy(static_cast<void*>(p), t, sizeof(T) * n);
}

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

#define SLIM_DISPATCH(STYPE, NAME, ...)                                          \
  switch (STYPE) {                                                               \
    case at::kFloat: {                                                           \
      using T = float;                                                           \
      __VA_ARGS__();                                                             \
      break;                                                                     \
    }                                                                            \
    case at::kBFloat16: {                                                        \
      using T = bf16;                                                            \
      __VA_ARGS__();                                                             \
      break;                                                                     \
    }                                                                            \
    case at::kHalf: {                                                            \
      using T = f16;                                                             \
      __VA_ARGS__();                                                             \
      break;                                                                     \
    }                                                                            \
    default:                                                                     \
      TORCH_CHECK(false, NAME ": unsupported dtype ", STYPE, " (float32, bfloat16, float16)"); \
  }

// An integer tensor read as int64 whether it holds int32 or int64 (1-D or 2-D, any strides).
struct Idx {
  const void* p = nullptr;
  bool i64 = false;
  int64_t s0 = 1, s1 = 1;

  Idx() = default;
  Idx(const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
    auto st = t.scalar_type();
    TORCH_CHECK(st == at::kInt || st == at::kLong, what, " must be int32 or int64, got ", st);
    i64 = st == at::kLong;
    p = t.data_ptr();
    s0 = t.dim() > 0 ? t.stride(0) : 1;
    s1 = t.dim() > 1 ? t.stride(1) : 1;
  }
  inline int64_t operator()(int64_t i) const {
    return i64 ? static_cast<const int64_t*>(p)[i * s0] : static_cast<const int32_t*>(p)[i * s0];
  }
  inline int64_t operator()(int64_t i, int64_t j) const {
    int64_t o = i * s0 + j * s1;
    return i64 ? static_cast<const int64_t*>(p)[o] : static_cast<const int32_t*>(p)[o];
  }
};

// Rows of a tensor whose last dim is contiguous, as an [A, B, N] grid with strides (sa, sb, 1).
struct Rows {
  int64_t A = 1, B = 1, N = 1, sa = 0, sb = 0;
  bool ok = false;
  inline int64_t count() const { return A * B; }
  inline int64_t offset(int64_t r) const { return A == 1 ? r * sb : (r / B) * sa + (r % B) * sb; }
};

inline Rows rows_of(const at::Tensor& x) {
  Rows r;
  const int64_t d = x.dim();
  if (d == 0) return r;
  r.N = x.size(d - 1);
  if (x.stride(d - 1) != 1 && r.N > 1) return r;
  if (d == 1) {
    r.ok = true;
    return r;
  }
  r.B = x.size(d - 2);
  r.sb = x.stride(d - 2);
  if (d == 2) {
    r.ok = true;
    return r;
  }
  // Collapse the dims before the last two into one when their strides allow it.
  int64_t a = 1, sa = 0;
  for (int64_t i = d - 3; i >= 0; --i) {
    if (x.size(i) == 1) continue;
    if (a == 1) {
      a = x.size(i);
      sa = x.stride(i);
    } else {
      if (x.stride(i) != sa * a) return r;
      a *= x.size(i);
    }
  }
  r.A = a;
  r.sa = sa;
  r.ok = true;
  return r;
}

inline float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n + 1024);
  return buf.data();
}

// Contiguous CPU tensor without a trip through the dispatcher.
inline at::Tensor new_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

alignas(64) static const float kZeros[kMaxDim] = {};

inline void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------------------

template <class T>
inline float sum_squares(const T* x, int64_t N) {
  V a0 = vzero(), a1 = vzero();
  int64_t i = 0;
  for (; i + 2 * W <= N; i += 2 * W) {
    V x0 = load(x + i), x1 = load(x + i + W);
    a0 = fmadd(x0, x0, a0);
    a1 = fmadd(x1, x1, a1);
  }
  for (; i < N; i += W) {
    V x0 = load_n(x + i, static_cast<int>(N - i));
    a0 = fmadd(x0, x0, a0);
  }
  return hsum(a0 + a1);
}

// out = round(round(x * r) * w), the reference's order of roundings.
template <class T>
inline void scale_row(const T* x, const T* w, T* out, int64_t N, float r) {
  const V rv = vset(r);
  for (int64_t i = 0; i < N; i += W) {
    int n = static_cast<int>(std::min<int64_t>(W, N - i));
    V y = rnd<T>(load_n(x + i, n) * rv);
    store_n(out + i, y * load_n(w + i, n), n);
  }
}

inline float inv_rms(float ss, int64_t N, float eps) {
  float mean = ss / static_cast<float>(N);
  return 1.0f / std::sqrt(mean + eps);
}

// Elementwise row ops are memory-bound and take microseconds at decode sizes; a parallel region costs
// more than that to open, and when another process holds a core its barrier waits a scheduler slice
// (milliseconds). So split only work large enough to repay it (prefill-sized batches).
inline int64_t row_grain(int64_t N) { return std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(N, 1)); }

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_cpu(x_in, "rms_norm: x");
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "rms_norm: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x_in.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.stride(0) == 1 && weight.size(0) == x_in.size(-1),
              "rms_norm: weight must be a contiguous [hidden] tensor matching x's last dim");
  Rows rx = rows_of(x_in);
  at::Tensor x = x_in;
  if (!rx.ok) {
    x = x_in.contiguous();
    rx = rows_of(x);
  }
  at::Tensor out = new_empty(x.sizes(), x.scalar_type());
  const int64_t N = rx.N, R = rx.count();
  const float feps = static_cast<float>(eps);
  SLIM_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* wp = static_cast<const T*>(weight.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, R, row_grain(N), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* xr = xp + rx.offset(r);
        scale_row(xr, wp, op + r * N, N, inv_rms(sum_squares(xr, N), N, feps));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_cpu(x, "fused_add_rms_norm: x");
  check_cpu(residual, "fused_add_rms_norm: residual");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "fused_add_rms_norm: x, residual and weight must share a dtype");
  TORCH_CHECK(x.sizes() == residual.sizes(), "fused_add_rms_norm: x and residual shapes differ");
  TORCH_CHECK(weight.dim() == 1 && weight.stride(0) == 1 && weight.size(0) == x.size(-1),
              "fused_add_rms_norm: weight must be a contiguous [hidden] tensor matching x's last dim");
  Rows rx = rows_of(x), rr = rows_of(residual);
  if (!rx.ok || !rr.ok || rx.B != rr.B) {
    // Odd layouts: do the work on contiguous copies and write back (in place semantics kept).
    at::Tensor xc = x.contiguous(), rc = residual.contiguous();
    fused_add_rms_norm(xc, rc, weight, eps);
    if (!xc.is_same(x)) const_cast<at::Tensor&>(x).copy_(xc);
    if (!rc.is_same(residual)) const_cast<at::Tensor&>(residual).copy_(rc);
    return {x, residual};
  }
  const int64_t N = rx.N, R = rx.count();
  const float feps = static_cast<float>(eps);
  SLIM_DISPATCH(x.scalar_type(), "fused_add_rms_norm", [&] {
    T* xp = static_cast<T*>(x.data_ptr());
    T* rp = static_cast<T*>(residual.data_ptr());
    const T* wp = static_cast<const T*>(weight.data_ptr());
    at::parallel_for(0, R, row_grain(N), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* xr = xp + rx.offset(r);
        T* rr_ = rp + rr.offset(r);
        V a0 = vzero();
        for (int64_t i = 0; i < N; i += W) {
          int n = static_cast<int>(std::min<int64_t>(W, N - i));
          V s = rnd<T>(load_n(rr_ + i, n) + load_n(xr + i, n));
          store_n(rr_ + i, s, n);
          a0 = fmadd(s, s, a0);
        }
        scale_row<T>(rr_, wp, xr, N, inv_rms(hsum(a0), N, feps));
      }
    });
  });
  return {x, residual};
}

// ---------------------------------------------------------------------------------------------------------
// Rotary embedding (+ paged KV cache write)
// ---------------------------------------------------------------------------------------------------------

// Rotate one head in place: x1' = x1 c - x2 s, x2' = x2 c + x1 s with the reference's roundings.
template <class T>
inline void rope_head(T* x, const float* c, const float* s, int half) {
  for (int i = 0; i < half; i += W) {
    int n = std::min(W, half - i);
    V x1 = load_n(x + i, n), x2 = load_n(x + half + i, n);
    V cv = load(c + i), sv = load(s + i);
    V o1 = rnd<T>(rnd<T>(x1 * cv) - rnd<T>(x2 * sv));
    V o2 = rnd<T>(rnd<T>(x2 * cv) + rnd<T>(x1 * sv));
    store_n(x + i, o1, n);
    store_n(x + half + i, o2, n);
  }
}

struct Heads {  // a [T, H, D] view with strides (s0, s1, 1)
  void* p;
  int64_t T, H, D, s0, s1;
};

inline Heads heads_of(const at::Tensor& t, const char* what) {
  check_cpu(t, what);
  TORCH_CHECK(t.dim() == 3, what, " must be [tokens, heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, what, " must have a contiguous last dim");
  return {t.data_ptr(), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
}

template <class T>
void rope_cache_impl(const Heads& q, const Heads& k, const Heads* v, const Idx& pos, const at::Tensor& cos_sin,
                     T* kc, T* vc, const int64_t* kcs, const int64_t* vcs, int64_t bs, int64_t nblocks,
                     const Idx* slots) {
  const int64_t D = q.D, half = D / 2;
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t cs0 = cos_sin.stride(0), max_pos = cos_sin.size(0);
  const int64_t work = (q.H + k.H) * D;
  at::parallel_for(0, q.T, std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(work, 1)), [&](int64_t b, int64_t e) {
    alignas(32) float c[kMaxDim / 2 + W], s[kMaxDim / 2 + W];
    for (int64_t t = b; t < e; ++t) {
      const int64_t p = pos(t);
      TORCH_CHECK(p >= 0 && p < max_pos, "rope: position ", p, " outside the cos/sin table (", max_pos, ")");
      const float* row = cs + p * cs0;
      for (int64_t i = 0; i < half; i += W) {
        int n = static_cast<int>(std::min<int64_t>(W, half - i));
        store(c + i, rnd<T>(load_n(row + i, n)));
        store(s + i, rnd<T>(load_n(row + half + i, n)));
      }
      T* qt = static_cast<T*>(q.p) + t * q.s0;
      for (int64_t h = 0; h < q.H; ++h) rope_head(qt + h * q.s1, c, s, static_cast<int>(half));
      T* kt = static_cast<T*>(k.p) + t * k.s0;
      for (int64_t h = 0; h < k.H; ++h) rope_head(kt + h * k.s1, c, s, static_cast<int>(half));
      if (slots == nullptr) continue;
      const int64_t slot = (*slots)(t);
      if (slot < 0) continue;
      const int64_t blk = slot / bs, off = slot - blk * bs;
      TORCH_CHECK(blk < nblocks, "rope_and_cache: slot ", slot, " outside the cache");
      const T* vt = static_cast<const T*>(v->p) + t * v->s0;
      T* kdst = kc + blk * kcs[0] + off * kcs[2];
      T* vdst = vc + blk * vcs[0] + off * vcs[2];
      for (int64_t h = 0; h < k.H; ++h) {
        std::memcpy(static_cast<void*>(kdst + h * kcs[1]), kt + h * k.s1, sizeof(T) * D);
        std::memcpy(static_cast<void*>(vdst + h * vcs[1]), vt + h * v->s1, sizeof(T) * D);
      }
    }
  });
}

inline void check_rope(const at::Tensor& q, const Heads& hq, const Heads& hk, const at::Tensor& positions,
                       const at::Tensor& cos_sin) {
  TORCH_CHECK(hq.T == hk.T && hq.D == hk.D, "rope: q and k disagree on tokens / head_dim");
  TORCH_CHECK(hq.D % 2 == 0 && hq.D <= kMaxDim, "rope: head_dim must be even and <= ", kMaxDim);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == hq.T, "rope: positions must be [tokens]");
  check_cpu(cos_sin, "rope: cos_sin");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.size(1) == hq.D &&
                  cos_sin.stride(1) == 1,
              "rope: cos_sin must be float32 [max_positions, head_dim] with a contiguous last dim");
  (void)q;
}

void apply_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                const at::Tensor& cos_sin) {
  Heads hq = heads_of(q, "apply_rope: q"), hk = heads_of(k, "apply_rope: k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "apply_rope: q and k dtypes differ");
  check_rope(q, hq, hk, positions, cos_sin);
  Idx pos(positions, "apply_rope: positions");
  SLIM_DISPATCH(q.scalar_type(), "apply_rope", [&] {
    rope_cache_impl<T>(hq, hk, nullptr, pos, cos_sin, nullptr, nullptr, nullptr, nullptr, 1, 0, nullptr);
  });
}

void rope_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  Heads hq = heads_of(q, "rope_and_cache: q"), hk = heads_of(k, "rope_and_cache: k"),
        hv = heads_of(v, "rope_and_cache: v");
  check_rope(q, hq, hk, positions, cos_sin);
  const auto st = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st && k_cache.scalar_type() == st &&
                  v_cache.scalar_type() == st,
              "rope_and_cache: q, k, v and the caches must share a dtype");
  TORCH_CHECK(hv.T == hk.T && hv.H == hk.H && hv.D == hk.D, "rope_and_cache: k and v shapes differ");
  check_cpu(k_cache, "rope_and_cache: k_cache");
  check_cpu(v_cache, "rope_and_cache: v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == hk.H &&
                  k_cache.size(3) == hk.D && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "rope_and_cache: caches must be [num_blocks, num_kv_heads, block_size, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == hk.T, "rope_and_cache: slot_mapping must be [tokens]");
  Idx pos(positions, "rope_and_cache: positions"), slots(slot_mapping, "rope_and_cache: slot_mapping");
  const int64_t kcs[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vcs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  SLIM_DISPATCH(st, "rope_and_cache", [&] {
    rope_cache_impl<T>(hq, hk, &hv, pos, cos_sin, static_cast<T*>(k_cache.data_ptr()),
                       static_cast<T*>(v_cache.data_ptr()), kcs, vcs, k_cache.size(2), k_cache.size(0),
                       &slots);
  });
}

// ---------------------------------------------------------------------------------------------------------
// SiLU(gate) * up
// ---------------------------------------------------------------------------------------------------------

#ifndef SLIMLM_SILU_GRAIN
#define SLIMLM_SILU_GRAIN (1 << 13)
#endif

at::Tensor silu_and_mul(const at::Tensor& x_in) {
  check_cpu(x_in, "silu_and_mul: x");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, "silu_and_mul: last dim must be even");
  Rows rx = rows_of(x_in);
  at::Tensor x = x_in;
  if (!rx.ok) {
    x = x_in.contiguous();
    rx = rows_of(x);
  }
  auto sizes = x.sizes().vec();
  const int64_t I = sizes.back() / 2, R = rx.count();
  sizes.back() = I;
  at::Tensor out = new_empty(sizes, x.scalar_type());
  SLIM_DISPATCH(x.scalar_type(), "silu_and_mul", [&] {
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    const V one = vset(1.0f), zero = vzero();
    // An exp and a division per element make this compute-bound, unlike the other row ops, so it splits
    // from SLIMLM_SILU_GRAIN elements on. Measured (2 threads, bf16, interleaved medians): 32 x 1536
    // 74.6 -> 39.1 us, 32 x 5632 275 -> 148 us, 16 x 1536 36.6 -> 20.8 us; 5 x 1536 stays serial (12 us).
    at::parallel_for(0, R, std::max<int64_t>(1, SLIMLM_SILU_GRAIN / std::max<int64_t>(I, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* g = xp + rx.offset(r);
        const T* u = g + I;
        T* o = op + r * I;
        for (int64_t i = 0; i < I; i += W) {
          int n = static_cast<int>(std::min<int64_t>(W, I - i));
          V gv = load_n(g + i, n);
          V s = rnd<T>(gv / (one + vexp(zero - gv)));
          store_n(o + i, s * load_n(u + i, n), n);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Paged attention
// ---------------------------------------------------------------------------------------------------------

constexpr int kChunk = 128;              // keys per softmax chunk
constexpr int kChunkPad = kChunk + W;    // score row stride (room for a full-vector store past the end)
constexpr int kMaxRows = 16;             // query vectors (rows x heads of one kv group) per work item
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which one thread does everything
constexpr int64_t kSplitKeys = 256;         // fewest keys per split when cutting a long context

struct Item {
  int32_t seq, h, r0, r1, g0, g1;
  int64_t cost;
};

template <class T>
struct Attn {
  const T* q;
  int64_t qs0, qs1;
  const T* kc;
  const T* vc;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  T* out;
  int64_t os0, os1;
  Idx bt, sl, qsl;
  int D, Dp, G, bs;
  float scale;
  int64_t window, nblocks;
};

// The keys the query vectors of an item may see (causal, sliding window), within [kb, ke): all of them span
// [kmin, kmax]; lo/hi give each vector's range inside a chunk. Shared by attend() and attend512().
struct KeyRange {
  int64_t window, qp0, r0;  // qp0: position of the sequence's first query row
  int gn;                   // query vectors per row (the item's heads)
  int64_t kmin, kmax;

  template <class T>
  KeyRange(const Attn<T>& a, const Item& it, int64_t kb, int64_t ke)
      : window(a.window),
        qp0(a.sl(it.seq) - (a.qsl(it.seq + 1) - a.qsl(it.seq))),
        r0(it.r0),
        gn(it.g1 - it.g0),
        kmin(std::max(first(qp0 + it.r0), kb)),
        kmax(std::min(qp0 + it.r1 - 1, ke - 1)) {}

  int64_t first(int64_t qp) const { return window > 0 ? std::max<int64_t>(0, qp - window + 1) : 0; }

  // Query vector m sees chunk positions lo[m] ..= hi[m] of the chunk [cs, ce) (hi < lo: none).
  void in_chunk(int M, int64_t cs, int64_t ce, int* lo, int* hi) const {
    for (int m = 0; m < M; ++m) {
      const int64_t qp = qp0 + r0 + m / gn;
      lo[m] = static_cast<int>(std::max(first(qp), cs) - cs);
      hi[m] = static_cast<int>(std::min(qp, ce - 1) - cs);
    }
  }
};

// Pointers to n (<= W) cache rows as float rows of Dp entries; missing rows point at zeros. PERM: bf16
// rows converted 16 at a time in the permuted order of bf16_to_perm16 (needs D % 16 == 0).
template <class T, bool PERM>
inline void tile_rows(const T* base, int64_t stride, int n, int D, int Dp, float* tile, const float** rows) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) {
      for (int j = 0; j < W; ++j) rows[j] = j < n ? base + j * stride : kZeros;
      return;
    }
  }
  for (int j = 0; j < W; ++j) {
    if (j >= n) {
      rows[j] = kZeros;
      continue;
    }
    const T* src = base + j * stride;
    float* dst = tile + j * Dp;
    if constexpr (PERM) {
      for (int c = 0; c < D; c += 2 * W) bf16_to_perm16(src + c, dst + c);
    } else {
      for (int c = 0; c < Dp; c += W) store(dst + c, load_n(src + c, D - c));
    }
    rows[j] = dst;
  }
}

// Lane j: dot(q, rows[j]) over Dp floats.
inline V dot8(const float* q, const float* const* rows, int Dp) {
  V a[W];
  for (int j = 0; j < W; ++j) a[j] = vzero();
  for (int c = 0; c < Dp; c += W) {
    V qv = load(q + c);
#pragma GCC unroll 8
    for (int j = 0; j < W; ++j) a[j] = fmadd(qv, load(rows[j] + c), a[j]);
  }
  return hsum8(a);
}

// acc[0 : NC*W] += sum_j p[j] * rows[j][off : off + NC*W]
template <int NC>
inline void axpy_rows(float* acc, const float* p, const float* const* rows, int off, int n) {
  V a[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) a[c] = load(acc + c * W);
  for (int j = 0; j < n; ++j) {
    const V pj = vset(p[j]);
    const float* r = rows[j] + off;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) a[c] = fmadd(pj, load(r + c * W), a[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) store(acc + c * W, a[c]);
}

inline void accumulate(float* acc, const float* p, const float* const* rows, int n, int Dp) {
  for (int c0 = 0; c0 < Dp; c0 += 8 * W) {
    switch (std::min(8, (Dp - c0) / W)) {
      case 1: axpy_rows<1>(acc + c0, p, rows, c0, n); break;
      case 2: axpy_rows<2>(acc + c0, p, rows, c0, n); break;
      case 3: axpy_rows<3>(acc + c0, p, rows, c0, n); break;
      case 4: axpy_rows<4>(acc + c0, p, rows, c0, n); break;
      case 5: axpy_rows<5>(acc + c0, p, rows, c0, n); break;
      case 6: axpy_rows<6>(acc + c0, p, rows, c0, n); break;
      case 7: axpy_rows<7>(acc + c0, p, rows, c0, n); break;
      default: axpy_rows<8>(acc + c0, p, rows, c0, n); break;
    }
  }
}

template <class T, bool PERM>
inline void write_row(const Attn<T>& a, const Item& it, int m, const float* acc, float l);

// Query vectors of `it` against the keys at positions [kb, ke) (all of them by default). With `partial`
// null, writes the normalised output rows; otherwise stores, per query vector, {running max, sum of
// exponentials, unnormalised accumulator[Dp]} there for combine() (split-K over a long context).
template <class T, bool PERM>
void attend(const Attn<T>& a, const Item& it, int64_t kb = 0,
            int64_t ke = std::numeric_limits<int64_t>::max(), float* partial = nullptr) {
  const int D = a.D, Dp = a.Dp, gn = it.g1 - it.g0, M = (it.r1 - it.r0) * gn;
  const int64_t s = a.qsl(it.seq);  // the sequence's first query row
  float* buf = scratch(static_cast<size_t>(M) * (2 * Dp + kChunkPad + 2) + 2 * W * Dp + 2 * M);
  float* qb = buf;
  float* acc = qb + M * Dp;
  float* sc = acc + M * Dp;
  float* mx = sc + M * kChunkPad;
  float* l = mx + M;
  float* ktile = l + M;
  float* vtile = ktile + W * Dp;
  int* lo = reinterpret_cast<int*>(vtile + W * Dp);  // per query: visible range within the current chunk
  int* hi = lo + M;

  const V vscale = vset(a.scale);
  for (int m = 0; m < M; ++m) {
    const int r = it.r0 + m / gn, g = it.g0 + m % gn;
    const T* qr = a.q + (s + r) * a.qs0 + (static_cast<int64_t>(it.h) * a.G + g) * a.qs1;
    float* qm = qb + m * Dp;
    if constexpr (PERM) {
      for (int c = 0; c < D; c += 2 * W) bf16_to_perm16(qr + c, qm + c);
      for (int c = 0; c < Dp; c += W) store(qm + c, load(qm + c) * vscale);
    } else {
      for (int c = 0; c < Dp; c += W) store(qm + c, load_n(qr + c, D - c) * vscale);
    }
    for (int c = 0; c < Dp; c += W) store(acc + m * Dp + c, vzero());
    mx[m] = -std::numeric_limits<float>::infinity();
    l[m] = 0.f;
  }
  const KeyRange keys(a, it, kb, ke);
  const int64_t kmin = keys.kmin, kmax = keys.kmax;
  const T* kbase = a.kc + it.h * a.ks1;
  const T* vbase = a.vc + it.h * a.vs1;
  const float* rows[W];

  for (int64_t cs = kmin; cs <= kmax; cs += kChunk) {
    const int64_t ce = std::min<int64_t>(cs + kChunk, kmax + 1);
    keys.in_chunk(M, cs, ce, lo, hi);
    // Scores.
    for (int64_t kp = cs; kp < ce;) {
      const int64_t bi = kp / a.bs, off = kp - bi * a.bs;
      const int n = static_cast<int>(std::min<int64_t>({W, ce - kp, a.bs - off}));
      const int64_t blk = a.bt(it.seq, bi);
      TORCH_CHECK(blk >= 0 && blk < a.nblocks, "paged_attention: block id ", blk, " out of range");
      tile_rows<T, PERM>(kbase + blk * a.ks0 + off * a.ks2, a.ks2, n, D, Dp, ktile, rows);
      const int j0 = static_cast<int>(kp - cs);
      for (int m = 0; m < M; ++m) {
        if (j0 > hi[m] || j0 + n - 1 < lo[m]) continue;
        store(sc + m * kChunkPad + j0, dot8(qb + m * Dp, rows, Dp));
      }
      kp += n;
    }
    // Online softmax over the chunk: probabilities overwrite the scores.
    for (int m = 0; m < M; ++m) {
      if (lo[m] > hi[m]) continue;
      float* row = sc + m * kChunkPad;
      const int i0 = lo[m], i1 = hi[m] + 1;
      V vm = vset(-std::numeric_limits<float>::infinity());
      int i = i0;
      for (; i + W <= i1; i += W) vm = vmax(vm, load(row + i));
      float cmax = hmax(vm);
      for (; i < i1; ++i) cmax = std::max(cmax, row[i]);
      const float mnew = std::max(mx[m], cmax);
      const float alpha = std::exp(mx[m] - mnew);
      const V vmn = vset(mnew);
      V vs = vzero();
      for (i = i0; i + W <= i1; i += W) {
        V p = vexp(load(row + i) - vmn);
        store(row + i, p);
        vs = vs + p;
      }
      float sum = hsum(vs);
      for (; i < i1; ++i) {
        row[i] = std::exp(row[i] - mnew);
        sum += row[i];
      }
      l[m] = l[m] * alpha + sum;
      mx[m] = mnew;
      if (alpha != 1.0f) {
        const V va = vset(alpha);
        float* ar = acc + m * Dp;
        for (int c = 0; c < Dp; c += W) store(ar + c, load(ar + c) * va);
      }
    }
    // Values.
    for (int64_t kp = cs; kp < ce;) {
      const int64_t bi = kp / a.bs, off = kp - bi * a.bs;
      const int n = static_cast<int>(std::min<int64_t>({W, ce - kp, a.bs - off}));
      const int64_t blk = a.bt(it.seq, bi);
      TORCH_CHECK(blk >= 0 && blk < a.nblocks, "paged_attention: block id ", blk, " out of range");
      tile_rows<T, PERM>(vbase + blk * a.vs0 + off * a.vs2, a.vs2, n, D, Dp, vtile, rows);
      const int j0 = static_cast<int>(kp - cs);
      for (int m = 0; m < M; ++m) {
        const int ja = std::max(lo[m] - j0, 0), jb = std::min(hi[m] - j0 + 1, n);
        if (ja >= jb) continue;
        accumulate(acc + m * Dp, sc + m * kChunkPad + j0 + ja, rows + ja, jb - ja, Dp);
      }
      kp += n;
    }
  }
  if (partial != nullptr) {
    for (int m = 0; m < M; ++m) {
      float* p = partial + m * (Dp + 2);
      p[0] = mx[m];
      p[1] = l[m];
      std::memcpy(p + 2, acc + m * Dp, sizeof(float) * Dp);
    }
    return;
  }
  for (int m = 0; m < M; ++m) write_row<T, PERM>(a, it, m, acc + m * Dp, l[m]);
}

// Output row of query vector m of `it`: acc / l, in T (acc in the permuted order when PERM).
template <class T, bool PERM>
inline void write_row(const Attn<T>& a, const Item& it, int m, const float* acc, float l) {
  const int gn = it.g1 - it.g0, r = it.r0 + m / gn, g = it.g0 + m % gn;
  T* orow = a.out + (a.qsl(it.seq) + r) * a.os0 + (static_cast<int64_t>(it.h) * a.G + g) * a.os1;
  const V inv = vset(l > 0.f ? 1.0f / l : 0.f);
  if constexpr (PERM) {
    for (int c = 0; c < a.D; c += 2 * W) perm16_to_bf16(acc + c, inv, orow + c);
  } else {
    for (int c = 0; c < a.Dp; c += W) store_n(orow + c, load(acc + c) * inv, a.D - c);
  }
}

// Merge the `splits` partial results of `it` (consecutive blocks of M * (Dp + 2) floats) into its output.
template <class T, bool PERM>
void combine(const Attn<T>& a, const Item& it, const float* partials, int splits) {
  const int Dp = a.Dp, M = (it.r1 - it.r0) * (it.g1 - it.g0);
  const size_t stride = static_cast<size_t>(M) * (Dp + 2);
  float* acc = scratch(Dp);
  for (int m = 0; m < M; ++m) {
    float mmax = -std::numeric_limits<float>::infinity();
    for (int sp = 0; sp < splits; ++sp) mmax = std::max(mmax, partials[sp * stride + m * (Dp + 2)]);
    float l = 0.f;
    for (int c = 0; c < Dp; c += W) store(acc + c, vzero());
    for (int sp = 0; sp < splits; ++sp) {
      const float* p = partials + sp * stride + m * (Dp + 2);
      if (p[1] == 0.f) continue;  // no visible key in this split
      const float w = std::exp(p[0] - mmax);
      l += w * p[1];
      const V wv = vset(w);
      for (int c = 0; c < Dp; c += W) store(acc + c, fmadd(wv, load(p + 2 + c), load(acc + c)));
    }
    write_row<T, PERM>(a, it, m, acc, l);
  }
}

#ifdef SLIM_ATTN512
#include "attention_avx512.h"
#endif

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  Heads hq = heads_of(q, "paged_attention: q");
  check_cpu(k_cache, "paged_attention: k_cache");
  check_cpu(v_cache, "paged_attention: v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == hq.D &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: caches must be [num_blocks, num_kv_heads, block_size, head_dim] with q's "
              "head_dim, got ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  const int64_t Hk = k_cache.size(1);
  TORCH_CHECK(Hk > 0 && hq.H % Hk == 0, "paged_attention: query heads (", hq.H,
              ") must be a multiple of kv heads (", Hk, ")");
  TORCH_CHECK(hq.D <= kMaxDim, "paged_attention: head_dim > ", kMaxDim);
  TORCH_CHECK(block_tables.dim() == 2, "paged_attention: block_tables must be [num_seqs, max_blocks]");
  const int64_t nseq = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == nseq + 1 &&
                  block_tables.size(0) >= nseq,
              "paged_attention: need query_start_loc [num_seqs + 1] and block_tables [num_seqs, ...]");

  at::Tensor out = new_empty({hq.T, hq.H, hq.D}, q.scalar_type());
  Idx bt(block_tables, "paged_attention: block_tables"), sl(seq_lens, "paged_attention: seq_lens"),
      qsl(query_start_loc, "paged_attention: query_start_loc");
  const int G = static_cast<int>(hq.H / Hk);
  const int gsub = std::min(G, kMaxRows);
  const int R = std::max(1, kMaxRows / gsub);
  const int64_t bs = k_cache.size(2), max_blocks = block_tables.size(1);

  std::vector<Item> items;
  items.reserve(static_cast<size_t>(nseq * Hk));
  int64_t total = 0;
  for (int64_t i = 0; i < nseq; ++i) {
    const int64_t st = qsl(i), ql = qsl(i + 1) - st, L = sl(i);
    if (ql <= 0) continue;
    TORCH_CHECK(L >= ql, "paged_attention: seq_lens[", i, "] = ", L, " < its ", ql, " query rows");
    TORCH_CHECK(st >= 0 && st + ql <= hq.T, "paged_attention: query_start_loc out of range");
    TORCH_CHECK((L + bs - 1) / bs <= max_blocks, "paged_attention: block_tables too short for seq_lens[", i, "]");
    for (int64_t r0 = 0; r0 < ql; r0 += R) {
      const int64_t r1 = std::min<int64_t>(ql, r0 + R);
      const int64_t qlast = L - ql + r1 - 1;
      const int64_t keys = sliding_window > 0 ? std::min<int64_t>(qlast + 1, sliding_window + (r1 - r0))
                                              : qlast + 1;
      for (int64_t h = 0; h < Hk; ++h) {
        for (int g0 = 0; g0 < G; g0 += gsub) {
          const int g1 = std::min(G, g0 + gsub);
          const int64_t cost = keys * (r1 - r0) * (g1 - g0) + 64;
          items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(h), static_cast<int32_t>(r0),
                           static_cast<int32_t>(r1), g0, g1, cost});
          total += cost;
        }
      }
    }
  }
  if (items.empty()) return out;

  SLIM_DISPATCH(q.scalar_type(), "paged_attention", [&] {
    Attn<T> a{static_cast<const T*>(hq.p),
              hq.s0,
              hq.s1,
              static_cast<const T*>(k_cache.data_ptr()),
              static_cast<const T*>(v_cache.data_ptr()),
              k_cache.stride(0),
              k_cache.stride(1),
              k_cache.stride(2),
              v_cache.stride(0),
              v_cache.stride(1),
              v_cache.stride(2),
              static_cast<T*>(out.data_ptr()),
              out.stride(0),
              out.stride(1),
              bt,
              sl,
              qsl,
              static_cast<int>(hq.D),
              static_cast<int>((hq.D + W - 1) / W * W),
              G,
              static_cast<int>(bs),
              static_cast<float>(scale),
              sliding_window,
              k_cache.size(0)};
    constexpr bool kPermType = std::is_same_v<T, bf16> && kHasPerm16;
    const bool perm = kPermType && hq.D % (2 * W) == 0;
#ifdef SLIM_ATTN512
    const bool wide = std::is_same_v<T, bf16> && hq.D % 32 == 0 && hq.D <= 128;
#else
    const bool wide = false;
#endif
    auto run = [&](const Item& it, int64_t kb, int64_t ke, float* partial) {
#ifdef SLIM_ATTN512
      if (wide) return attend_wide(a, it, kb, ke, partial);
#endif
      if constexpr (kPermType) {
        if (perm) return attend<T, true>(a, it, kb, ke, partial);
      }
      attend<T, false>(a, it, kb, ke, partial);
    };
    constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
    const int nth = at::get_num_threads();
    if (nth <= 1 || total * hq.D < kParallelWork || at::in_parallel_region()) {
      for (const Item& it : items) run(it, 0, kAll, nullptr);
      return;
    }
    // Tasks: whole items, or, when there are too few items to keep the threads busy (a few long
    // decodes), items cut into key ranges whose partial results are merged afterwards (split-K).
    struct Task {
      int32_t item;
      int64_t kb, ke, cost;
      float* partial;
    };
    struct Split {
      int32_t item, splits;
      float* partials;
    };
    std::vector<Task> tasks;
    std::vector<Split> split_items;
    std::vector<float> partials;
    const int64_t nitems = static_cast<int64_t>(items.size()), target = 2 * static_cast<int64_t>(nth);
    std::vector<int64_t> nsplit(items.size(), 1), kfirst(items.size(), 0), klast(items.size(), 0);
    size_t floats = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      const int64_t L = sl(it.seq), qp0 = L - (qsl(it.seq + 1) - qsl(it.seq));
      kfirst[i] = sliding_window > 0 ? std::max<int64_t>(0, qp0 + it.r0 - sliding_window + 1) : 0;
      klast[i] = qp0 + it.r1 - 1;
      if (nitems < target) {
        const int64_t want = (target + nitems - 1) / nitems, keys = klast[i] - kfirst[i] + 1;
        nsplit[i] = std::max<int64_t>(1, std::min(want, keys / kSplitKeys));
      }
      if (nsplit[i] > 1) floats += nsplit[i] * (it.r1 - it.r0) * (it.g1 - it.g0) * (a.Dp + 2);
    }
    partials.resize(floats);
    float* base = partials.data();
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      if (nsplit[i] == 1) {
        tasks.push_back({static_cast<int32_t>(i), 0, kAll, it.cost, nullptr});
        continue;
      }
      const size_t stride = static_cast<size_t>(it.r1 - it.r0) * (it.g1 - it.g0) * (a.Dp + 2);
      const int64_t keys = klast[i] - kfirst[i] + 1;
      const int64_t step = ((keys + nsplit[i] - 1) / nsplit[i] + 15) / 16 * 16;
      int32_t n = 0;
      for (int64_t kb = kfirst[i]; kb <= klast[i]; kb += step, ++n) {
        tasks.push_back({static_cast<int32_t>(i), kb, std::min(kb + step, klast[i] + 1),
                         it.cost * std::min(step, klast[i] + 1 - kb) / keys, base + n * stride});
      }
      split_items.push_back({static_cast<int32_t>(i), n, base});
      base += nsplit[i] * stride;
    }
    // Longest first, handed out one at a time: balances causal prefill chunks and mixed batches.
    std::sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
    std::atomic<size_t> next{0};
    at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
      for (size_t i = next.fetch_add(1); i < tasks.size(); i = next.fetch_add(1)) {
        const Task& t = tasks[i];
        run(items[t.item], t.kb, t.ke, t.partial);
      }
    });
    for (const Split& sp : split_items) {
      if constexpr (kPermType) {
        if (perm && !wide) {  // the wide kernel leaves its partials in natural order
          combine<T, true>(a, items[sp.item], sp.partials, sp.splits);
          continue;
        }
      }
      combine<T, false>(a, items[sp.item], sp.partials, sp.splits);
    }
  });
  return out;
}

}  // namespace slim
