// Thread policy shared by the CPU kernels (cpu_linear, cpu_quant): dynamic work claiming, and a fallback
// to the calling thread alone after a parallel call that stalled on a descheduled worker.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>

#ifndef SLIMLM_SERIAL_BACKOFF
#define SLIMLM_SERIAL_BACKOFF 128
#endif
#ifndef SLIMLM_SERIAL_BACKOFF_MIN
#define SLIMLM_SERIAL_BACKOFF_MIN 8
#endif
#ifndef SLIMLM_LATE_STREAK
#define SLIMLM_LATE_STREAK 2
#endif

namespace slimlm_kernels {

inline std::atomic<int> g_serial_left{0};
inline std::atomic<int> g_backoff{SLIMLM_SERIAL_BACKOFF_MIN};
inline std::atomic<int64_t> g_late_events{0};
inline std::atomic<int> g_late_streak{0};

// Runs f(c) for c in [0, n) on up to get_num_threads() threads that claim items dynamically, so a
// thread the OS delays does not hold back a fixed share of the work.
//
// `adaptive`: on oversubscribed cores (another process busy) a 2-thread region can stall for whole
// scheduler slices, measured 8-12 ms per call against 0.3 ms of work on the 2-core VM: a worker starts
// late and the caller waits at the barrier, or a spinning worker pushes the caller off its core. When a
// call's wall time exceeds twice the CPU time its threads spent on the items (what the caller alone would
// need with half a core) plus 100 us, the next calls run on the caller alone (no OpenMP region, no spinning
// worker), then threads are tried again. Threads that merely share their cores (both progressing at half
// speed: wall ~ CPU time) keep running in parallel; on an idle machine nothing changes.
// How many calls go serial adapts (exponential backoff): it starts at SLIMLM_SERIAL_BACKOFF_MIN, doubles
// after each late parallel call up to SLIMLM_SERIAL_BACKOFF, and halves after each timely one. A process
// busy all the time makes nearly every retry late, so the backoff climbs to the maximum; a light, bursty
// neighbour (a server's event loop thread: ~10-25% of a core) only costs a few serial calls at a time.
// Measured on the 2-core VM, py-target at 16 concurrent sequences (offline engine, output tok/s, medians of
// 3 interleaved rounds): with a process burning 2 ms of every 12, this backoff 1192, a fixed 128 calls 950,
// no fallback 1069; with a process busy all the time, 363, 385 and 312.
// The fallback starts only after SLIMLM_LATE_STREAK late calls in a row: one late call alone is mostly a
// brief neighbour (a server's HTTP thread, woken for each streamed token), which the serial calls after it
// would outlast. Measured in one session, py-target, 16 streams through `slimlm serve` over the offline
// engine (`bench serve --offline-baseline`, medians of 3 interleaved rounds, each a separate run): streak 1
// 0.79 / 0.85 / 0.68, streak 2 0.92 / 0.82 / 0.86, no fallback 0.86; offline beside a process busy all the
// time, 3 runs each: streak 1 312-327 tok/s, streak 2 367-399, no fallback 299-424.
// CPU time of the calling thread: unlike wall time it excludes the time the thread was descheduled.
inline int64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

template <class F>
void parallel_dynamic(int64_t n, const F& f, bool adaptive) {
  const int64_t nt = std::min<int64_t>(n, at::get_num_threads());
  bool serial = nt <= 1 || at::in_parallel_region();
  if (!serial && adaptive && g_serial_left.load(std::memory_order_relaxed) > 0) {
    g_serial_left.fetch_sub(1, std::memory_order_relaxed);
    serial = true;
  }
  if (serial) {
    for (int64_t c = 0; c < n; ++c) f(c);
    return;
  }
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  std::atomic<int64_t> next{0}, busy_ns{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    const int64_t start = adaptive ? thread_cpu_ns() : 0;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(c);
    if (adaptive) busy_ns.fetch_add(thread_cpu_ns() - start, std::memory_order_relaxed);
  });
  if (adaptive && SLIMLM_SERIAL_BACKOFF > 0) {
    const int64_t wall = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
    const int backoff = g_backoff.load(std::memory_order_relaxed);
    if (wall > 2 * busy_ns.load() + 100000) {
      g_late_events.fetch_add(1, std::memory_order_relaxed);
      if (g_late_streak.fetch_add(1, std::memory_order_relaxed) + 1 >= SLIMLM_LATE_STREAK) {
        g_late_streak.store(0, std::memory_order_relaxed);
        g_serial_left.store(backoff, std::memory_order_relaxed);
        g_backoff.store(std::min(2 * backoff, SLIMLM_SERIAL_BACKOFF), std::memory_order_relaxed);
      }
    } else {
      g_late_streak.store(0, std::memory_order_relaxed);
      if (backoff > SLIMLM_SERIAL_BACKOFF_MIN) {
        g_backoff.store(std::max(backoff / 2, SLIMLM_SERIAL_BACKOFF_MIN), std::memory_order_relaxed);
      }
    }
  }
}

}  // namespace slimlm_kernels
