// Quantized linear for x86-64 CPUs with AVX2 + FMA (no VNNI/AVX-512 needed): y = x @ W.T + b with W
// as integer codes + per-group fp32 scales (+ zero points), x fp32 or bf16, output in x's dtype.
//
// Small M (decode, and batches up to a measured crossover): W is streamed once, like cpu_linear's bf16
//   kernel, but multiplied in integers. x is quantized to int8 per block of QB inputs (the group size
//   when it is 64..256, 64 for groups of 32 (two scales per block), 128 when channel-wise), as llama.cpp
//   quantizes activations, so 32 weights cost one _mm256_maddubs_epi16 per x row instead of four FMAs
//   plus the conversions:
//   - 2/3/4-bit codes are stored as unsigned nibbles u = code + 8 and go straight into maddubs
//     (u <= 15, |q| <= 127, so int16 sums of up to 8 chunks cannot overflow); the zero (8, or
//     zero_point + 8) comes off at the end through per-group sums of the quantized x:
//     sum (u - zu) q = sum u q - zu sum q.
//   - 8-bit codes, and NF4 codes looked up by pshufb in round(127 * NF4_TABLE), are signed:
//     maddubs(|w|, sign(q, w)) (at most 2 * 128 * 127 per int16 lane: no saturation).
//   Each block's int32 sum times d_x * s_w goes into fp32 accumulators. The error is x's rounding
//   (absmax / 254 per input; NF4 adds the table's rounding): 6e-3 to 8e-3 relative on Gaussian x.
// W8A8: the signed kernel over whole rows of per-token int8 x, int32 sums, then (acc * d_x) * s_w
//   in fp32, with the reference's quantization of x: bit-exact with the reference.
// Large M (prefill): chunks of W rows are dequantized exactly as the reference does
//   ((code - zero) * scale, or NF4_TABLE[code] * scale, in fp32) into a reused buffer and
//   multiplied by sgemm (at::cpu::mm_out), as cpu_linear does for bf16; on AMX CPUs, bf16 x: the whole W
//   dequantized to bf16 and multiplied by oneDNN (bf16_gemm_path).
// AMX-INT8 CPUs: from just above decode sizes up to the vector kernel's range elsewhere, the integer scheme
//   runs on the tile unit (amx_rows below); W8A8 runs there at every larger M.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "int_kernels.h"
#include "../common/amx.h"
#include "../common/gil.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "../common/store.h"
// bf16 GEMM hardware (AMX tiles, or AVX512-BF16's vdpbf16ps): large M goes dequantize-to-bf16 + oneDNN, or, on
// AVX512-BF16 CPUs without AMX, up to DP_GEMM_MAX rows, panels dequantized one at a time into slimlm's own
// vdpbf16ps GEMM (cpu_linear/dp_gemm.h), so the bf16 copy of W is never written to memory whole.
#if SLIMLM_AMX || defined(__AVX512BF16__)
#define SLIMLM_QUANT_BF16_GEMM 1
#include "../common/avx512_bf16.h"
#else
#define SLIMLM_QUANT_BF16_GEMM 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !SLIMLM_AMX
#define SLIMLM_QUANT_DP_GEMM 1
#include "../cpu_linear/dp_gemm.h"
#else
#define SLIMLM_QUANT_DP_GEMM 0
#endif
// Measured on a 2-core Zen 4 VM (2 threads, cold weights, interleaved medians, time of the dequantized panels
// into the vdpbf16ps GEMM / dequantize whole W + oneDNN): int4 tinyllama gate_up, down, py-target gate_up M=128
// 0.92, 0.89, 0.92; M=512 0.98, 0.97, 0.96; M=1024 0.95, 1.00, 0.91; M=2048 1.01, 1.14, 0.96; int8 M=128-512
// 0.82-0.97.
#ifndef SLIMLM_QUANT_DP_GEMM_MAX
#define SLIMLM_QUANT_DP_GEMM_MAX 1024
#endif

#if !defined(__AVX2__) || !defined(__FMA__)
#error "slimlm cpu_quant needs AVX2 and FMA (build with -march=native on such a CPU)"
#endif

namespace {

using namespace slimlm_quant;
using slimlm_kernels::aligned_scratch;
using slimlm_kernels::parallel_dynamic;
using slimlm_kernels::store_out;

// The prepared weight (see prepare() in __init__.py for the layouts).
struct QLinear {
  int64_t kind, N, K, Kp, G, GS, QB, NB, bpg, row_bytes, zu0;  // GS: inputs per scale (Kp: channel-wise)
  bool w8a8;
  at::Tensor packed;  // uint8 [N, row_bytes]
  at::Tensor scales;  // fp32 [N, G]
  at::Tensor zu;      // int32 [N, G] zero per group in stored units, or undefined (then zu0)
  at::Tensor szu;     // fp32 [N, G] scale * zu when zu is defined
  at::Tensor perm;    // int32 [K] input gather (act-order), or undefined
  int64_t small_max;     // largest M of the streaming (vector) kernel
  int64_t tile_max = 0;  // largest M of the AMX kernel (0: none)
  const uint8_t* wp = nullptr;  // raw pointers of the above (no checks in the hot loops)
  const float* sp = nullptr;
  const float* szup = nullptr;
};

// x rows (stride sx, optionally gathered through perm) -> XQ buffers. `exact`: the reference's
// per-token rule (scale = max(amax, 1e-8) / 127, q = round_half_even(x / scale)).
template <class XT>
static void quantize_x(const QLinear& L, const XT* x, int64_t sx, int64_t M, bool exact, float* xf, int8_t* q,
                       float* d, float* zs) {
  const int32_t* perm = L.perm.defined() ? L.perm.data_ptr<int32_t>() : nullptr;
  const int64_t K = L.K, Kp = L.Kp, QB = L.QB, NB = L.NB;
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    const XT* xr = x + m * sx;
    if (perm)
      for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xr[perm[k]]);
    else
      for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xr[k]);
    for (int64_t k = K; k < Kp; ++k) xf[k] = 0.f;
    float* zr = zs + m * L.G;
    for (int64_t g = 0; g < L.G; ++g) zr[g] = 0.f;
    for (int64_t b = 0; b < NB; ++b) {
      const float* xb = xf + b * QB;
      __m256 am = _mm256_setzero_ps();
      for (int64_t i = 0; i < QB; i += 8) am = _mm256_max_ps(am, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
      const float a = hmax(am);
      const float db = exact ? std::max(a, 1e-8f) / 127.0f : a / 127.0f;
      const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.0f / a : 0.f), dv = _mm256_set1_ps(db);
      __m256i qsum = _mm256_setzero_si256();
      int8_t* qb = q + m * Kp + b * QB;
      for (int64_t i = 0; i < QB; i += 32) {
        __m256i iv[4];
        for (int j = 0; j < 4; ++j) {
          __m256 v = _mm256_loadu_ps(xb + i + 8 * j);
          v = exact ? _mm256_div_ps(v, dv) : _mm256_mul_ps(v, inv);
          v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          iv[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, nlim), lim));
          qsum = _mm256_add_epi32(qsum, iv[j]);
        }
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + i), _mm256_permutevar8x32_epi32(p, order));
        if (i + 32 == QB || (b * QB + i + 32) % L.GS == 0) {  // a scale group ends: its zero-point sum
          zr[(b * QB + i) / L.GS] += db * static_cast<float>(hsum_i32(qsum));
          qsum = _mm256_setzero_si256();
        }
      }
      d[m * NB + b] = db;
    }
  }
}


struct Job {
  const QLinear* L;
  XQ xq;
  int64_t M;
  const float* bias;
  void* out;
};

// Finishes one output: the int kernels' partial sum -> y[m, n].
template <class WL>
static inline float finish(const Job& J, int64_t m, int64_t n, float v) {
  const QLinear& L = *J.L;
  if (L.w8a8) {
    v = (v * J.xq.d[m]) * L.sp[n];  // the reference's order
  } else {
    if constexpr (std::is_same_v<WL, NF4>) v *= 1.0f / 127.0f;
    if (L.szup)
      v -= dot(L.szup + n * L.G, J.xq.zs + m * L.G, L.G);
    else if (L.zu0)
      v -= static_cast<float>(L.zu0) * dot(L.sp + n * L.G, J.xq.zs + m * L.G, L.G);
  }
  return J.bias ? v + J.bias[n] : v;
}

template <class WL, int R, int MB>
static inline void run_block(const Job& J, int64_t n, int64_t stride, int64_t m0, float* res) {
  const QLinear& L = *J.L;
  const uint8_t* w = L.wp + n * L.row_bytes;
  const int64_t rs = stride * L.row_bytes, ss = stride * L.G;
  const float* s = L.sp + n * L.G;
  if (L.w8a8) return block_dot_i32<R, MB>(w, rs, J.xq, m0, L.Kp / 32, res);
  if (L.GS < L.QB) return block_dot<WL, R, MB, 2, true>(w, rs, s, ss, J.xq, m0, L.bpg, res);
  switch (L.QB) {
    case 64:
      return block_dot<WL, R, MB, 2, false>(w, rs, s, ss, J.xq, m0, L.bpg, res);
    case 128:
      return block_dot<WL, R, MB, 4, false>(w, rs, s, ss, J.xq, m0, L.bpg, res);
    default:
      return block_dot<WL, R, MB, 8, false>(w, rs, s, ss, J.xq, m0, L.bpg, res);
  }
}

// RR rows of W (n, n + stride, ...) for all M rows of x, in passes of up to MBMAX rows of x.
template <class WL, int RR, int MBMAX, class OutT>
static void rows_all_m(const Job& J, int64_t n, int64_t stride) {
  OutT* out = static_cast<OutT*>(J.out);
  const int64_t N = J.L->N, M = J.M;
  float res[MBMAX * RR];
  auto emit = [&](int mb, int64_t m0) {
    for (int m = 0; m < mb; ++m)
      for (int r = 0; r < RR; ++r) {
        const int64_t nn = n + r * stride;
        store_out(out + (m0 + m) * N + nn, finish<WL>(J, m0 + m, nn, res[m * RR + r]));
      }
  };
  int64_t m0 = 0;
  for (; m0 + MBMAX <= M; m0 += MBMAX) {
    run_block<WL, RR, MBMAX>(J, n, stride, m0, res);
    emit(MBMAX, m0);
  }
  static_assert(MBMAX <= 8, "remainders are handled in passes of 4 or fewer rows");
  for (int64_t rem = M - m0; rem > 0; rem = M - m0) {
    const int mb = static_cast<int>(std::min<int64_t>(rem, MBMAX > 4 ? 4 : MBMAX - 1));
    if (mb == 4) run_block<WL, RR, (MBMAX > 4 ? 4 : 1)>(J, n, stride, m0, res);
    if (mb == 3) run_block<WL, RR, (MBMAX > 3 ? 3 : 1)>(J, n, stride, m0, res);
    if (mb == 2) run_block<WL, RR, (MBMAX > 2 ? 2 : 1)>(J, n, stride, m0, res);
    if (mb == 1) run_block<WL, RR, 1>(J, n, stride, m0, res);
    emit(mb, m0);
    m0 += mb;
  }
}

// Rows [n0, n1) for all M rows of x. As in cpu_linear, the R rows of a register block come from R
// separate long runs of rows (row n0 + j + r * runs), so memory sees R sequential streams.
template <class WL, int R, int MBMAX, class OutT>
static void small_range(const Job& J, int64_t n0, int64_t n1) {
  const int64_t runs = (n1 - n0) / R;
  for (int64_t j = 0; j < runs; ++j) rows_all_m<WL, R, MBMAX, OutT>(J, n0 + j, runs);
  for (int64_t n = n0 + R * runs; n < n1; ++n) rows_all_m<WL, 1, MBMAX, OutT>(J, n, 0);
}

#ifndef SLIMLM_QUANT_R1
#define SLIMLM_QUANT_R1 4  // W rows per register block at M = 1 (4 measured 5-10% faster than 8)
#endif
// Register blocks at M > 1: R W rows x up to MB x rows, by weight kind. The W rows of a block share each x
// chunk's load, and the x rows share each W chunk's unpacking. Measured on the 2-core Ice Lake VM (2 threads,
// cold W, interleaved medians, us; the old block of 1 W row x 4 x rows / the new one), tinyllama 11264x2048
// and 2048x5632: int4 g128 (3 x 4) M=2 835 / 560 and 444 / 334, M=8 2261 / 1780 and 1372 / 1064, M=16 4467 /
// 4009 and 2623 / 1765; int8 (2 x 6) M=2 1309 / 1068 and 693 / 551, M=8 2188 / 1964 and 1211 / 1068, M=16
// 3845 / 3867 and 2168 / 2092. 3 x 4 for int8 lost at M=16 (4629 us), 2 x 6 for int4 gained less.
// Group size 32 (SPLIT: a second accumulator per pair) keeps 1 x 4: 3 x 4 would need 36 registers.
#ifndef SLIMLM_QUANT_RM_U4
#define SLIMLM_QUANT_RM_U4 3  // unsigned nibbles and NF4
#endif
#ifndef SLIMLM_QUANT_MB_U4
#define SLIMLM_QUANT_MB_U4 4
#endif
#ifndef SLIMLM_QUANT_RM_S8
#define SLIMLM_QUANT_RM_S8 2  // int8 codes, weight-only and W8A8
#endif
#ifndef SLIMLM_QUANT_MB_S8
#define SLIMLM_QUANT_MB_S8 6
#endif
#ifndef SLIMLM_QUANT_RM_SPLIT
#define SLIMLM_QUANT_RM_SPLIT 1
#endif
#ifndef SLIMLM_QUANT_MB_SPLIT
#define SLIMLM_QUANT_MB_SPLIT 4
#endif
#ifndef SLIMLM_TASK_BYTES
#define SLIMLM_TASK_BYTES 262144
#endif

static bool split_groups(const QLinear& L) { return !L.w8a8 && L.GS < L.QB; }

// The register block (W rows R x up to MB x rows) of a weight loader at M > 1 without split groups.
template <class WL>
struct BlockM {
  static constexpr int R = std::is_same_v<WL, S8> ? SLIMLM_QUANT_RM_S8 : SLIMLM_QUANT_RM_U4;
  static constexpr int MB = std::is_same_v<WL, S8> ? SLIMLM_QUANT_MB_S8 : SLIMLM_QUANT_MB_U4;
};

// W rows per register block (tasks hold whole blocks): the R that small_dispatch runs for L's loader.
static int64_t rows_per_block(const QLinear& L, int64_t M) {
  if (M == 1) return SLIMLM_QUANT_R1;
  if (split_groups(L)) return SLIMLM_QUANT_RM_SPLIT;
  return L.kind == kS8 ? BlockM<S8>::R : BlockM<U4>::R;  // NF4 blocks as U4 does
}

template <class WL, class OutT>
static void small_dispatch(const Job& J, int64_t n0, int64_t n1) {
  if (J.M == 1)
    small_range<WL, SLIMLM_QUANT_R1, 1, OutT>(J, n0, n1);
  else if (split_groups(*J.L))
    small_range<WL, SLIMLM_QUANT_RM_SPLIT, SLIMLM_QUANT_MB_SPLIT, OutT>(J, n0, n1);
  else
    small_range<WL, BlockM<WL>::R, BlockM<WL>::MB, OutT>(J, n0, n1);
}

template <class OutT>
static void small_kind(const Job& J, int64_t n0, int64_t n1) {
  switch (J.L->kind) {
    case kU4:
      return small_dispatch<U4, OutT>(J, n0, n1);
    case kNF4:
      return small_dispatch<NF4, OutT>(J, n0, n1);
    default:
      return small_dispatch<S8, OutT>(J, n0, n1);
  }
}


// x's rows quantized as L's kernels take them, in buffers of the calling thread (valid until its next call).
static XQ quantized_x(const QLinear& L, const at::Tensor& x2) {
  const int64_t M = x2.size(0);
  static thread_local std::vector<float> xf_buf, d_buf, zs_buf;
  static thread_local std::vector<int8_t> q_buf;
  float* xf = aligned_scratch(xf_buf, L.Kp);
  int8_t* q = aligned_scratch(q_buf, M * L.Kp);
  float* d = aligned_scratch(d_buf, M * L.NB);
  float* zs = aligned_scratch(zs_buf, M * L.G);
  if (x2.scalar_type() == at::kFloat)
    quantize_x(L, x2.data_ptr<float>(), x2.stride(0), M, L.w8a8, xf, q, d, zs);
  else
    quantize_x(L, x2.data_ptr<at::BFloat16>(), x2.stride(0), M, L.w8a8, xf, q, d, zs);
  return XQ{q, L.Kp, d, L.NB, zs, L.G};
}

static void small_path(const QLinear& L, const at::Tensor& x2, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = x2.size(0), N = L.N;
  Job J{&L, quantized_x(L, x2), M, b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr()};
  // Tasks of 32-256 KB of packed W, fewer bytes when M is larger (more work per byte), at least 2 per thread.
  const int64_t R = rows_per_block(L, M);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cap = std::clamp<int64_t>(4 * SLIMLM_TASK_BYTES / M, 32768, SLIMLM_TASK_BYTES);
  const int64_t task_bytes = std::min<int64_t>(cap, std::max<int64_t>(32768, N * L.row_bytes / (2 * nt)));
  const int64_t task_rows = R * std::max<int64_t>(1, task_bytes / (R * L.row_bytes));
  const int64_t ntasks = (N + task_rows - 1) / task_rows;
  const bool f32 = out.scalar_type() == at::kFloat;
  parallel_dynamic(
      ntasks,
      [&](int64_t t) {
        const int64_t n0 = t * task_rows, n1 = std::min(N, n0 + task_rows);
        if (f32)
          small_kind<float>(J, n0, n1);
        else
          small_kind<c10::BFloat16>(J, n0, n1);
      },
      // Only short calls (M <= 4: memory-bound, well under a scheduler slice) go serial after a stall: a
      // stall costs them 10x, while compute-bound larger M lose 2x on one thread (measured at M = 16).
      /*adaptive=*/M <= 4);
}

#if SLIMLM_AMX
// AMX (Sapphire Rapids and later), M above the integer kernels' range: the same integer scheme on the tile unit.
// W's rows are the A tiles (their natural layout: int8 codes load straight from the packed weight, nibbles are
// unpacked once per x-block), x's quantized rows the B tiles (rearranged once per call), so one TDPB*D
// instruction does 16 W rows x 16 x rows x 64 inputs. Each x-block's int32 sums are folded into fp32 with
// d_x * s_w as the integer kernels do, and finish() applies zeros, NF4's 1/127 and the bias; W8A8 folds once
// over the whole row (one block), so it stays bit-exact with the reference.
// Tile layouts (8 tiles: A = W rows 0-1, B = x 2-3, C = sums 4-7), by M:
// - M <= 16: 64 W rows x one x tile, four C tiles, so four accumulation chains hide TDPB*D's latency;
// - M > 16: 32 W rows x two x tiles per pass (passes over pairs of x tiles).
// Measured on the 2-core AMX KVM guest (hot 1024x2048 int8 W, 1 thread, M = 2): 32 rows x one x tile
// 123-135 us, that is ~170 cycles per 64-input step, bound by the two chains.
#ifndef SLIMLM_QUANT_AMX_PREFETCH
#define SLIMLM_QUANT_AMX_PREFETCH 1  // 0: off
#endif
#ifndef SLIMLM_QUANT_AMX_TASKS
#define SLIMLM_QUANT_AMX_TASKS 4  // per thread
#endif
constexpr int64_t kAmxMaxRows = 64;

// The tiles take every layout but split groups (group size 32: two scales per x-block).
static bool amx_supported(const QLinear& L) {
  return !split_groups(L) && L.QB % 64 == 0 && slimlm_kernels::amx_permitted();
}

// `rows` rows of W from row n (rows past N zero), inputs [k0, k0 + len), as tile rows of len bytes.
static void unpack_rows(const QLinear& L, int64_t n, int64_t rows, int64_t k0, int64_t len, uint8_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* o = dst + r * len;
    if (n + r >= L.N) {
      std::memset(o, 0, len);
      continue;
    }
    const uint8_t* p = L.wp + (n + r) * L.row_bytes;
    if (L.kind == kS8) {
      std::memcpy(o, p + k0, len);
      continue;
    }
    for (int64_t k = k0; k < k0 + len; k += 64) {
      __m256i lo, hi;
      if (L.kind == kNF4)
        NF4::load2(p + k / 2, lo, hi);
      else
        U4::load2(p + k / 2, lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k - k0), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k - k0 + 32), hi);
    }
  }
}

// One stored C tile (16 W rows from row n + r0, 16 x rows from m0; x-block scales dv) -> acc [rows][Mp].
static void amx_fold(const QLinear& L, int64_t n, int64_t r0, int64_t g, const float* dv, const int32_t* c,
                     float* acc, int64_t Mp, int64_t m0) {
  const __m512 d = L.w8a8 ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(dv);
  for (int i = 0; i < 16; ++i) {
    const int64_t r = r0 + i;
    const float s = L.w8a8 || n + r >= L.N ? 1.f : L.sp[(n + r) * L.G + g];
    float* o = acc + r * Mp + m0;
    const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + 16 * i));
    _mm512_storeu_ps(o, _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(s)), _mm512_loadu_ps(o)));
  }
}

// C[4 + t] += A(tile a) . B(tile b) with the instruction of L's code signedness.
#define SLIMLM_TDP(U, c, a, b) \
  do {                         \
    if (U)                     \
      _tile_dpbusd(c, a, b);   \
    else                       \
      _tile_dpbssd(c, a, b);   \
  } while (0)

// W rows [n, n + rows) (rows = 64 for M <= 16, else 32) for all M rows of x (as tiles in xv; dT: x-block scales
// [NB][Mp]) -> out.
template <class OutT>
static void amx_rows(const Job& J, const int8_t* xv, const float* dT, int64_t n, int64_t rows, int64_t next_rows) {
  const QLinear& L = *J.L;
  const int64_t M = J.M, Mp = (M + 15) / 16 * 16, KC = L.Kp / 64, steps = L.QB / 64;
  const bool wide = rows == 64, u = L.kind == kU4;
  static thread_local std::vector<float> acc_buf;
  static thread_local std::vector<uint8_t> w_buf;
  static thread_local std::vector<int32_t> c_buf;
  float* acc = aligned_scratch(acc_buf, rows * Mp);
  int32_t* cbuf = aligned_scratch(c_buf, 1024);
  std::fill(acc, acc + rows * Mp, 0.f);
  const bool direct = L.kind == kS8 && n + rows <= L.N;
  uint8_t* wbuf = direct ? nullptr : aligned_scratch(w_buf, rows * L.QB);
  const int64_t lda = direct ? L.row_bytes : L.QB;
  const int64_t live = std::min(rows, L.N - n);
  for (int64_t b = 0; b < L.NB; ++b) {
    const uint8_t* a = direct ? L.wp + n * L.row_bytes + b * L.QB : wbuf;
    // The tiles' row streams alone measured ~11-17 GB/s: the task's next block comes prefetched, a share per x-block.
    if (SLIMLM_QUANT_AMX_PREFETCH)
      slimlm_kernels::prefetch_share(L.wp + (n + rows) * L.row_bytes, next_rows * L.row_bytes, b, L.NB);
    if (!direct) unpack_rows(L, n, rows, b * L.QB, L.QB, wbuf);
    const int64_t g = L.w8a8 ? 0 : b / L.bpg;
    if (wide) {  // one x tile (M <= 16), four 16-row W blocks
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t s = 0; s < steps; ++s) {
        const uint8_t* as = a + s * 64;
        _tile_loadd(2, xv + (b * steps + s) * 1024, 64);
        _tile_loadd(0, as, lda);
        SLIMLM_TDP(u, 4, 0, 2);
        _tile_loadd(1, as + 16 * lda, lda);
        SLIMLM_TDP(u, 5, 1, 2);
        _tile_loadd(0, as + 32 * lda, lda);
        SLIMLM_TDP(u, 6, 0, 2);
        _tile_loadd(1, as + 48 * lda, lda);
        SLIMLM_TDP(u, 7, 1, 2);
      }
      _tile_stored(4, cbuf, 64);
      _tile_stored(5, cbuf + 256, 64);
      _tile_stored(6, cbuf + 512, 64);
      _tile_stored(7, cbuf + 768, 64);
      for (int t = 0; t < 4; ++t) amx_fold(L, n, 16 * t, g, dT + b * Mp, cbuf + 256 * t, acc, Mp, 0);
      continue;
    }
    for (int64_t mb = 0; mb < Mp / 16; mb += 2) {  // 32 W rows x pairs of x tiles
      const bool two = mb + 1 < Mp / 16;
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t kc = b * steps + s;
        _tile_loadd(0, a + s * 64, lda);
        _tile_loadd(1, a + 16 * lda + s * 64, lda);
        _tile_loadd(2, xv + (mb * KC + kc) * 1024, 64);
        SLIMLM_TDP(u, 4, 0, 2);
        SLIMLM_TDP(u, 5, 1, 2);
        if (two) {
          _tile_loadd(3, xv + ((mb + 1) * KC + kc) * 1024, 64);
          SLIMLM_TDP(u, 6, 0, 3);
          SLIMLM_TDP(u, 7, 1, 3);
        }
      }
      _tile_stored(4, cbuf, 64);
      _tile_stored(5, cbuf + 256, 64);
      const float* dv = dT + b * Mp + mb * 16;
      amx_fold(L, n, 0, g, dv, cbuf, acc, Mp, mb * 16);
      amx_fold(L, n, 16, g, dv, cbuf + 256, acc, Mp, mb * 16);
      if (two) {
        _tile_stored(6, cbuf + 512, 64);
        _tile_stored(7, cbuf + 768, 64);
        amx_fold(L, n, 0, g, dv + 16, cbuf + 512, acc, Mp, mb * 16 + 16);
        amx_fold(L, n, 16, g, dv + 16, cbuf + 768, acc, Mp, mb * 16 + 16);
      }
    }
  }
  OutT* out = static_cast<OutT*>(J.out);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < live; ++r) {
      const float v = acc[r * Mp + m];
      store_out(out + m * L.N + n + r, L.kind == kNF4 ? finish<NF4>(J, m, n + r, v) : finish<S8>(J, m, n + r, v));
    }
}
#undef SLIMLM_TDP

static void amx_path(const QLinear& L, const at::Tensor& x2, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = x2.size(0), N = L.N, Mp = (M + 15) / 16 * 16;
  static thread_local std::vector<float> dt_buf;
  static thread_local std::vector<int8_t> xv_buf;
  const XQ xq = quantized_x(L, x2);
  int8_t* xv = aligned_scratch(xv_buf, Mp * L.Kp);
  slimlm_kernels::x_to_b_tiles(reinterpret_cast<const uint8_t*>(xq.q), L.Kp, M, L.Kp, L.Kp,
                               reinterpret_cast<uint32_t*>(xv));
  float* dT = aligned_scratch(dt_buf, L.NB * Mp);
  for (int64_t bk = 0; bk < L.NB; ++bk)
    for (int64_t m = 0; m < Mp; ++m) dT[bk * Mp + m] = m < M ? xq.d[m * L.NB + bk] : 0.f;
  Job J{&L, xq, M, b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr()};
  const bool f32 = out.scalar_type() == at::kFloat;
  // Tasks of consecutive row blocks, 4 per thread (each block but a task's first comes prefetched).
  const int64_t rows = M <= 16 ? kAmxMaxRows : 32;
  slimlm_kernels::for_row_blocks(N, rows, SLIMLM_QUANT_AMX_TASKS, /*adaptive=*/false, [&](int64_t n, int64_t next) {
    if (f32)
      amx_rows<float>(J, xv, dT, n, rows, next);
    else
      amx_rows<c10::BFloat16>(J, xv, dT, n, rows, next);
  });
}
#endif

// Row n of W, exactly as the reference dequantizes it, -> dst[0, K) (in the packed, possibly permuted, order).
static void dequant_row(const QLinear& L, int64_t n, float* dst) {
  const uint8_t* p = L.wp + n * L.row_bytes;
  const float* s = L.sp + n * L.G;
  const int32_t* zu = L.zu.defined() ? L.zu.data_ptr<int32_t>() + n * L.G : nullptr;
  const __m256 lo = _mm256_load_ps(kNf4), hi = _mm256_load_ps(kNf4 + 8);
  alignas(32) float tmp[64];
  for (int64_t k0 = 0; k0 < L.K; k0 += 64) {
    __m256i v[2];
    if (L.kind == kS8)
      S8::load2(p + k0, v[0], v[1]);
    else
      U4::load2(p + k0 / 2, v[0], v[1]);
    float* o = k0 + 64 <= L.K ? dst + k0 : tmp;
    for (int j = 0; j < 8; ++j) {
      const int64_t g = (k0 + 8 * j) / L.GS;
      const __m128i part = (j & 2) ? _mm256_extracti128_si256(v[j >> 2], 1) : _mm256_castsi256_si128(v[j >> 2]);
      const __m256i i = _mm256_cvtepi8_epi32((j & 1) ? _mm_srli_si128(part, 8) : part);
      __m256 f;
      if (L.kind == kNF4) {
        const __m256 big = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7)));
        f = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i), big);
      } else {
        f = _mm256_cvtepi32_ps(_mm256_sub_epi32(i, _mm256_set1_epi32(zu ? zu[g] : static_cast<int32_t>(L.zu0))));
      }
      _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(f, _mm256_set1_ps(s[g])));
    }
    if (o == tmp) std::memcpy(dst + k0, tmp, (L.K - k0) * sizeof(float));
  }
}

// W rows per chunk of the GEMM path (MKL re-packs x per call: fewer than ~256 rows is slow).
static int64_t g_chunk_rows = 512;

static void gemm_path(const QLinear& L, const at::Tensor& xf, const at::Tensor& b, at::Tensor& out) {
  const int64_t N = L.N, K = L.K;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t ch = std::min<int64_t>(g_chunk_rows, (N + 2 * nt - 1) / (2 * nt));
  ch = std::max<int64_t>(std::min<int64_t>(N, 128), ch);
  const int64_t nchunks = (N + ch - 1) / ch;
  parallel_dynamic(
      nchunks,
      [&](int64_t c) {
        static thread_local std::vector<float> scratch;
        float* ws = aligned_scratch(scratch, ch * K);
        const int64_t n0 = c * ch, rows = std::min(ch, N - n0);
        for (int64_t r = 0; r < rows; ++r) dequant_row(L, n0 + r, ws + r * K);
        at::Tensor wc = at::from_blob(ws, {rows, K}, at::TensorOptions().dtype(at::kFloat));
        at::Tensor oc = out.narrow(1, n0, rows);
        if (b.defined())
          at::cpu::addmm_out(oc, b.narrow(0, n0, rows), xf, wc.t());
        else
          at::cpu::mm_out(oc, xf, wc.t());
      },
      /*adaptive=*/false);
}

#if SLIMLM_QUANT_BF16_GEMM
// bf16 x on CPUs with bf16 GEMM hardware: W is dequantized as above, rounded to bf16 (what a bf16 model's
// reference computes: compressed-tensors decompresses to the model's dtype), into a buffer reused across calls,
// and multiplied by oneDNN's bf16 GEMM (AMX tiles, or vdpbf16ps on Zen 4/5), several times the sgemm path's rate.
static at::Tensor bf16_gemm_path(const QLinear& L, const at::Tensor& xb, const c10::optional<at::Tensor>& bias) {
  const int64_t N = L.N, K = L.K;
  static thread_local at::Tensor buf;  // one per calling thread: engines on several threads do not share it
  if (!buf.defined() || buf.numel() < N * K) buf = at::empty({N * K}, xb.options());
  auto* w = buf.data_ptr<at::BFloat16>();
  constexpr int64_t kRows = 64;
  parallel_dynamic(
      (N + kRows - 1) / kRows,
      [&](int64_t c) {
        static thread_local std::vector<float> row_buf;
        float* row = aligned_scratch(row_buf, L.Kp + 64);
        for (int64_t n = c * kRows; n < std::min(N, (c + 1) * kRows); ++n) {
          dequant_row(L, n, row);
          for (int64_t k = 0; k < K; k += 16)
            slimlm_avx512::store_bf16x16(w + n * K + k, _mm512_loadu_ps(row + k),
                                         static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1));
        }
      },
      /*adaptive=*/false);
  return at::linear(xb, buf.narrow(0, 0, N * K).view({N, K}), bias);
}
#endif

#if SLIMLM_QUANT_DP_GEMM
// bf16 x, M above the integer kernels' range: each panel of W rows is dequantized as the reference does, rounded
// to bf16 (as bf16_gemm_path does) into a per-thread buffer, and multiplied there by the vdpbf16ps GEMM.
static void dp_gemm_path(const QLinear& L, const at::Tensor& xb, const at::Tensor& b, at::Tensor& out) {
  const int64_t K = L.K;
  auto rows_of = [&](int64_t n0, int rows) {
    static thread_local std::vector<float> row_buf;
    static thread_local std::vector<uint16_t> panel_buf;
    float* row = aligned_scratch(row_buf, L.Kp + 64);
    uint16_t* panel = aligned_scratch(panel_buf, rows * K + 32);
    for (int r = 0; r < rows; ++r) {
      dequant_row(L, n0 + r, row);
      for (int64_t k = 0; k < K; k += 16)
        slimlm_avx512::store_bf16x16(panel + r * K + k, _mm512_loadu_ps(row + k),
                                     static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1));
    }
    return static_cast<const uint16_t*>(panel);
  };
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (out.scalar_type() == at::kFloat)
    dp_gemm::gemm(xp, xb.stride(0), xb.size(0), L.N, K, bp, out.data_ptr<float>(), rows_of);
  else
    dp_gemm::gemm(xp, xb.stride(0), xb.size(0), L.N, K, bp, reinterpret_cast<c10::BFloat16*>(out.data_ptr()),
                  rows_of);
}
#endif

static at::Tensor bias_f32(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "quantized linear: bias must have shape [", N, "]");
  TORCH_CHECK(bias->device().is_cpu(), "quantized linear: bias must be on the CPU");
  return bias->to(at::kFloat).contiguous();
}

// path: 0 picks by M, 1 forces the integer kernel, 2 the dequantize + sgemm path, 3 the AMX kernel, 4 the
// dequantized panels into the vdpbf16ps GEMM (bf16 x, even K; AVX512-BF16 without AMX) (tests,
// benchmarks).
at::Tensor forward(const QLinear& L, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t path) {
  TORCH_CHECK(x.device().is_cpu(), "quantized linear: x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == L.K, "quantized linear: x has ", x.size(-1), " features, expected ", L.K);
  const auto xt = x.scalar_type();
  if (xt != at::kFloat && xt != at::kBFloat16) return forward(L, x.to(at::kFloat), bias, path).to(xt);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(L.N);
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, L.K});
  if (L.K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  at::Tensor b = bias_f32(bias, L.N);
  if (M == 0) return at::zeros(out_shape, x.options());
#if SLIMLM_AMX
  if (path == 3 || (path == 0 && M > L.small_max && M <= L.tile_max && amx_supported(L))) {
    TORCH_CHECK(amx_supported(L), "quantized linear: no AMX path for this weight (group size 32, or no permission)");
    at::Tensor out = at::empty({M, L.N}, x.options().memory_format(at::MemoryFormat::Contiguous));
    amx_path(L, x2, b, out);
    return out.view(out_shape);
  }
#else
  TORCH_CHECK(path != 3, "quantized linear: path 3 needs a CPU with AMX-INT8");
#endif
  if (L.w8a8) path = 1;  // the GEMM path would not be exact
  if (path == 1 || (path == 0 && M <= L.small_max)) {
    at::Tensor out = at::empty({M, L.N}, x.options().memory_format(at::MemoryFormat::Contiguous));
    small_path(L, x2, b, out);
    return out.view(out_shape);
  }
#if SLIMLM_QUANT_DP_GEMM
  if (xt == at::kBFloat16 && (path == 4 || (path == 0 && M <= SLIMLM_QUANT_DP_GEMM_MAX)) && L.K % 2 == 0) {
    at::Tensor xb = (L.perm.defined() ? at::index_select(x2, 1, L.perm) : x2).contiguous();
    at::Tensor out = at::empty({M, L.N}, x.options().memory_format(at::MemoryFormat::Contiguous));
    dp_gemm_path(L, xb, b, out);
    return out.view(out_shape);
  }
#endif
  TORCH_CHECK(path != 4, "quantized linear: path 4 (dequantized panels into the vdpbf16ps GEMM) needs bf16 x, an "
                          "even K and a CPU with AVX512-BF16 but no AMX");
#if SLIMLM_QUANT_BF16_GEMM
  if (xt == at::kBFloat16 && (!b.defined() || bias->scalar_type() == at::kBFloat16)) {
    at::Tensor xb = L.perm.defined() ? at::index_select(x2, 1, L.perm) : x2;
    return bf16_gemm_path(L, xb.contiguous(), b.defined() ? bias : c10::nullopt).view(out_shape);
  }
#endif
  at::Tensor xf = xt == at::kFloat ? x2 : x2.to(at::kFloat);
  if (L.perm.defined()) xf = at::index_select(xf, 1, L.perm);
  xf = xf.contiguous();
  at::Tensor out = at::empty({M, L.N}, xf.options().memory_format(at::MemoryFormat::Contiguous));
  gemm_path(L, xf, b, out);
  if (xt != at::kFloat) out = out.to(xt);
  return out.view(out_shape);
}

QLinear make(at::Tensor packed, at::Tensor scales, c10::optional<at::Tensor> zu, c10::optional<at::Tensor> perm,
             int64_t kind, int64_t K, int64_t Kp, int64_t gs, int64_t qb, int64_t zu0, bool w8a8, int64_t small_max) {
  QLinear L;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "packed: uint8 [N, B]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.is_contiguous(), "scales: f32 [N, G]");
  TORCH_CHECK(kind >= kU4 && kind <= kNF4 && qb > 0 && Kp % qb == 0 && Kp >= K, "bad kernel parameters");
  TORCH_CHECK(w8a8 ? qb == Kp && Kp % 32 == 0 : (qb == 64 || qb == 128 || qb == 256), "bad x-block size ", qb);
  TORCH_CHECK(gs > 0 && Kp % gs == 0 && (gs % qb == 0 || (gs == 32 && qb == 64)), "bad group size ", gs);
  L.kind = kind;
  L.N = packed.size(0);
  L.K = K;
  L.Kp = Kp;
  L.GS = gs;
  L.QB = qb;
  L.NB = Kp / qb;
  L.bpg = std::max<int64_t>(1, gs / qb);
  L.G = scales.size(1);
  TORCH_CHECK(scales.size(0) == L.N && L.G == Kp / gs, "scales must have shape [N, ", Kp / gs, "]");
  L.row_bytes = kind == kS8 ? L.Kp : L.Kp / 2;
  TORCH_CHECK(packed.size(1) == L.row_bytes, "packed rows must hold ", L.row_bytes, " bytes");
  TORCH_CHECK(!w8a8 || (kind == kS8 && L.NB == 1 && !zu.has_value()), "W8A8 needs symmetric int8, one block");
  L.w8a8 = w8a8;
  L.zu0 = zu0;
  L.packed = packed;
  L.scales = scales;
  if (zu.has_value() && zu->defined()) {
    TORCH_CHECK(zu->scalar_type() == at::kInt && zu->sizes() == scales.sizes() && zu->is_contiguous(),
                "zu: int32 [N, G]");
    L.zu = *zu;
    L.szu = at::mul(scales, zu->to(at::kFloat)).contiguous();
  }
  if (perm.has_value() && perm->defined()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->dim() == 1 && perm->size(0) == K, "perm: int32 [K]");
    L.perm = perm->contiguous();
  }
  L.small_max = small_max;
  L.wp = L.packed.data_ptr<uint8_t>();
  L.sp = L.scales.data_ptr<float>();
  L.szup = L.szu.defined() ? L.szu.data_ptr<float>() : nullptr;
  return L;
}

// Benchmark helper: read-bandwidth probe as in cpu_linear (8 interleaved 4 KB streams per block).
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

py::dict config() {
  py::dict d;
  d["r1"] = SLIMLM_QUANT_R1;
  d["rm_u4"] = SLIMLM_QUANT_RM_U4;
  d["mb_u4"] = SLIMLM_QUANT_MB_U4;
  d["rm_s8"] = SLIMLM_QUANT_RM_S8;
  d["mb_s8"] = SLIMLM_QUANT_MB_S8;
  d["rm_split"] = SLIMLM_QUANT_RM_SPLIT;
  d["mb_split"] = SLIMLM_QUANT_MB_SPLIT;
  d["task_bytes"] = SLIMLM_TASK_BYTES;
  d["prefetch"] = SLIMLM_QUANT_PREFETCH;
  d["vnni"] = bool(SLIMLM_QUANT_VNNI);
  d["dp_gemm"] = bool(SLIMLM_QUANT_DP_GEMM);
  d["dp_gemm_max"] = SLIMLM_QUANT_DP_GEMM ? SLIMLM_QUANT_DP_GEMM_MAX : 0;
  d["chunk_rows"] = g_chunk_rows;
  d["amx"] = bool(SLIMLM_AMX);
  d["serial_backoff"] = SLIMLM_SERIAL_BACKOFF;
  d["serial_backoff_min"] = SLIMLM_SERIAL_BACKOFF_MIN;
  d["late_streak"] = SLIMLM_LATE_STREAK;
  d["gil_release_macs"] = SLIMLM_GIL_RELEASE_MACS;
  d["late_helper_events"] = slimlm_kernels::g_late_events.load();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<QLinear>(m, "QLinear")
      .def(py::init(&make), py::arg("packed"), py::arg("scales"), py::arg("zu"), py::arg("perm"), py::arg("kind"),
           py::arg("K"), py::arg("Kp"), py::arg("gs"), py::arg("qb"), py::arg("zu0"), py::arg("w8a8"),
           py::arg("small_max"))
      // Prefill-sized calls release the GIL, decode-sized ones keep it (see common/gil.h).
      .def(
          "__call__",
          [](const QLinear& L, const at::Tensor& x, const c10::optional<at::Tensor>& b) {
            return slimlm_kernels::gil_released_if_long(x.numel() * L.N, [&] { return forward(L, x, b, 0); });
          },
          py::arg("x"), py::arg("bias") = py::none())
      .def(
          "forward_path",
          [](const QLinear& L, const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t path) {
            return slimlm_kernels::gil_released_if_long(x.numel() * L.N,
                                                        [&] { return forward(L, x, b, path); });
          },
          py::arg("x"), py::arg("bias"), py::arg("path"))
      // Copies share the (read-only) packed tensors, so modules holding a kernel can be deep-copied.
      .def("__copy__", [](const QLinear& L) { return L; })
      .def("__deepcopy__", [](const QLinear& L, py::dict) { return L; }, py::arg("memo"))
      .def_readwrite("small_max", &QLinear::small_max)
      .def_readwrite("tile_max", &QLinear::tile_max)
      // Whether this weight can run on the AMX kernel here (the build, the OS's permission and the layout).
      .def_property_readonly("tiles_fit",
                             [](const QLinear& L) {
#if SLIMLM_AMX
                               return amx_supported(L);
#else
                               return false;
#endif
                             })
      .def_readonly("N", &QLinear::N)
      .def_readonly("K", &QLinear::K)
      .def_property_readonly("nbytes", [](const QLinear& L) {
        int64_t n = L.packed.nbytes() + L.scales.nbytes();
        if (L.szu.defined()) n += L.szu.nbytes();
        return n;
      });
  m.def("set_chunk_rows", [](int64_t r) { g_chunk_rows = std::max<int64_t>(1, r); });
  m.def("read_probe", &read_probe, "benchmark helper: reads a contiguous tensor with all threads, returns bytes");
  m.def("config", &config, "compile-time constants of this build");
}
