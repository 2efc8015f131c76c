// AMX int8 tile helpers of the quantized linear: x's quantized rows rearranged into the tile unit's B layout.
// Built only where the compiler targets AMX (common/amx.h).
#pragma once

#include "../common/amx.h"

#if SLIMLM_AMX
#define SLIMLM_QUANT_AMX 1

#include <cstdint>
#include <cstring>

namespace slimlm_quant {

using slimlm_kernels::amx_configure;
using slimlm_kernels::amx_permitted;

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
