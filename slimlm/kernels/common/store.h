// Storing one fp32 result in the output's dtype, shared by the CPU kernels' output loops.
#pragma once

#include <c10/util/BFloat16.h>

#include <type_traits>

namespace slimlm_kernels {

template <class OutT>
inline void store_out(OutT* out, float v) {
  if constexpr (std::is_same_v<OutT, float>) {
    *out = v;
  } else {
    *out = c10::BFloat16(v);  // round to nearest even, like torch
  }
}

}  // namespace slimlm_kernels
