// AMX tile basics shared by the kernels: the per-process permission and the one tile configuration they use.
// Defines SLIMLM_AMX (1 where the compiler targets AMX-TILE with INT8 and BF16).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define SLIMLM_AMX 1
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace slimlm_kernels {

// Linux hands out the tile registers' state only after a process asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults. Asked once; false means "do not use AMX".
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Palette 1, all eight tiles 16 rows x 64 bytes. The kernels use 0-1 for W rows (A), 2-3 for x (B), 4-7 for sums.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// Tile state is per thread: every task that runs tiles loads the configuration first.
inline void amx_configure() {
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
}

// x's rows (M rows of `bytes` bytes, `stride` bytes apart) -> B tiles for W . x^T: out [Mp / 16][padded / 64]
// [16 units][16 rows] of 4-byte units (4 int8 inputs, or 2 bf16), so each 1 KB tile holds 16 rows x 64 bytes of
// inputs with a row's units down a column. Zero past M and past `bytes`.
inline void x_to_b_tiles(const uint8_t* x, int64_t stride, int64_t M, int64_t bytes, int64_t padded, uint32_t* out) {
  const int64_t MB = (M + 15) / 16, units = padded / 4, whole = bytes / 4;
  at::parallel_for(0, MB, 4, [&](int64_t mb0, int64_t mb1) {
    for (int64_t mb = mb0; mb < mb1; ++mb) {
      uint32_t* t = out + mb * units * 16;
      std::memset(t, 0, units * 16 * sizeof(uint32_t));
      for (int64_t i = 0; i < 16 && mb * 16 + i < M; ++i) {
        const uint8_t* row = x + (mb * 16 + i) * stride;
        for (int64_t u = 0; u < whole; ++u) std::memcpy(&t[(u / 16) * 256 + (u % 16) * 16 + i], row + 4 * u, 4);
        if (bytes > 4 * whole)
          std::memcpy(&t[(whole / 16) * 256 + (whole % 16) * 16 + i], row + 4 * whole, bytes - 4 * whole);
      }
    }
  });
}

// Prefetches share `part` of `parts` of [base, base + bytes) into L2: a task's next block of W rows, read as one
// sequential region while the tiles work on the current one (dozens of row streams at once are more than the
// hardware prefetcher follows).
inline void prefetch_share(const void* base, int64_t bytes, int64_t part, int64_t parts) {
  const int64_t per = (bytes + parts - 1) / parts;
  const char* p = static_cast<const char*>(base);
  for (int64_t o = part * per; o < std::min(bytes, (part + 1) * per); o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
}

// Runs block(n, next_rows) for the blocks of `rows` W rows covering [0, N), on the intra-op threads in tasks of
// consecutive blocks, `tasks_per_thread` per thread; next_rows: the rows of the task's next block (0 for its
// last), for prefetch_share. Each task loads the tile configuration first.
template <class F>
inline void for_row_blocks(int64_t N, int64_t rows, int64_t tasks_per_thread, bool adaptive, const F& block) {
  const int64_t nblocks = (N + rows - 1) / rows;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_task = std::max<int64_t>(1, nblocks / (tasks_per_thread * nt));
  parallel_dynamic(
      (nblocks + per_task - 1) / per_task,
      [&](int64_t t) {
        amx_configure();
        const int64_t b1 = std::min(nblocks, (t + 1) * per_task);
        for (int64_t b = t * per_task; b < b1; ++b) {
          const int64_t n = b * rows;
          block(n, b + 1 < b1 ? std::min(rows, N - n - rows) : int64_t{0});
        }
      },
      adaptive);
}

}  // namespace slimlm_kernels
#else
#define SLIMLM_AMX 0
#endif
