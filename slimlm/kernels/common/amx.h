// AMX tile basics shared by the kernels: the per-process permission and the one tile configuration they use.
// Defines SLIMLM_AMX (1 where the compiler targets AMX-TILE with INT8 and BF16).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define SLIMLM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

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

}  // namespace slimlm_kernels
#else
#define SLIMLM_AMX 0
#endif
