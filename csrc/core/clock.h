// The one clock of the native code: CLOCK_MONOTONIC in nanoseconds, the clock of Python's
// time.monotonic_ns(). Deadlines and enqueue times cross the Python/C++ boundary as values of
// this clock, so every native component (core, front end, load generator) reads it here.
#pragma once

#include <time.h>

#include <cstdint>

namespace swapserve {

// Nanoseconds since an arbitrary fixed point; never goes backwards; same values as
// time.monotonic_ns() in the same process. Header-only so the front end and swapserve-loadgen
// (separate binaries) share it without linking the core.
inline int64_t MonotonicNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

}  // namespace swapserve
