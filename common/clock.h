// One monotonic nanosecond clock per host, used for every trace stamp and deadline.
#pragma once

#include <cstdint>
#include <ctime>

namespace meshpost {

inline uint64_t GetNanosecond() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// Deadline helper: timeout_ms < 0 means "no deadline". A timeout too large to add to the
// clock (e.g. INT64_MAX, a common "forever") saturates to "no deadline" instead of
// wrapping into the past.
inline uint64_t DeadlineFromTimeoutMs(int64_t timeout_ms) {
  if (timeout_ms < 0) return UINT64_MAX;
  const uint64_t now = GetNanosecond();
  const uint64_t ms = static_cast<uint64_t>(timeout_ms);
  if (ms > (UINT64_MAX - now) / 1000000ull) return UINT64_MAX;
  return now + ms * 1000000ull;
}

}  // namespace meshpost
