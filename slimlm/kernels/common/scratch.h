// Per-thread scratch buffers of the kernels: grown on demand, reused across calls (no page faults per call).
#pragma once

#include <cstdint>
#include <vector>

namespace slimlm_kernels {

// n elements of v, 64-byte aligned (whole cache lines, aligned vector loads).
template <class T>
inline T* aligned_scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + 64) v.resize(n + 64);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

}  // namespace slimlm_kernels
