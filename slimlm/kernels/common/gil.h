// When a kernel call lets go of the GIL: only when it is long. In the server, a released GIL is taken by the
// HTTP thread's event loop, and when a short kernel returns the engine thread waits for that thread's
// Python to finish while the OpenMP worker idles. Measured on the 2-core VM, py-target, 16 streams through
// `slimlm serve` over the offline engine (`bench serve --offline-baseline --rounds 3`, runs alternated;
// noisy, so every run): linear releasing the GIL on every call 0.750 0.757 0.803 0.820 0.771 0.861 0.761
// (median 0.771); never releasing it 0.855 0.951 0.885 0.857 0.781 (median 0.857); releasing it from 2^25
// multiply-adds (~0.5 ms, so during that benchmark's prefill steps) 0.759 0.855 0.797 0.751 (median 0.778).
// Hence a high limit (~20-40 ms of work here): decode and chunked-prefill calls keep the GIL, and only
// calls long enough to stall the event loop noticeably (long prefills of large models) release it.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <cstdint>

#ifndef SLIMLM_GIL_RELEASE_MACS
#define SLIMLM_GIL_RELEASE_MACS (int64_t(1) << 31)
#endif

namespace slimlm_kernels {

// Runs f() with the GIL released when the call does at least SLIMLM_GIL_RELEASE_MACS multiply-adds.
template <class F>
auto gil_released_if_long(int64_t macs, F&& f) {
  if (macs >= SLIMLM_GIL_RELEASE_MACS) {
    pybind11::gil_scoped_release release;
    return f();
  }
  return f();
}

}  // namespace slimlm_kernels
