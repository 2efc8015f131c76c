// AMX int8 tile helpers of the quantized linear: the tile configuration, the per-process permission, and x's
// quantized rows rearranged into the tile unit's B layout. Built only where the compiler targets AMX-INT8.
#pragma once

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define SLIMLM_QUANT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace slimlm_quant {

// Linux hands out the tile registers' state only after a process asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults. Asked once; false means "do not use AMX".
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Palette 1, all eight tiles 16 rows x 64 bytes: 0-1 W rows (A), 2-3 x columns (B), 4-7 the int32 sums (C).
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

// q [M, ldq] int8 -> xv [Mp / 16][Kp / 64][16 quads][16 x rows][4]: each (x block of 16 rows, 64 inputs) is one
// B tile, whose row j holds inputs 4j..4j+3 of its 16 x rows. Rows past M are zero.
inline void x_to_tiles(const int8_t* q, int64_t ldq, int64_t M, int64_t Kp, int8_t* xv) {
  const int64_t Mp = (M + 15) / 16 * 16, KC = Kp / 64;
  for (int64_t mb = 0; mb < Mp / 16; ++mb)
    for (int64_t kc = 0; kc < KC; ++kc) {
      int8_t* t = xv + (mb * KC + kc) * 1024;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t m = mb * 16 + i;
        if (m >= M) {
          for (int j = 0; j < 16; ++j) std::memset(t + j * 64 + i * 4, 0, 4);
          continue;
        }
        const int8_t* src = q + m * ldq + kc * 64;
        for (int j = 0; j < 16; ++j) std::memcpy(t + j * 64 + i * 4, src + 4 * j, 4);
      }
    }
}

}  // namespace slimlm_quant
#else
#define SLIMLM_QUANT_AMX 0
#endif
