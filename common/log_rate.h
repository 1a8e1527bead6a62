// Rate limiting for error lines a peer can provoke (malformed frames, refused
// connections): the first few per window are logged, the rest are counted and the count
// is reported on the next line that gets through, so a flood costs a bounded number of
// lines and nothing is silently lost. Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

#include "common/clock.h"

namespace meshpost {

class LogRateLimiter {
 public:
  // At most `burst` lines per `window_ms`.
  explicit LogRateLimiter(int burst = 10, int64_t window_ms = 10'000)
      : burst_(burst), window_ns_(static_cast<uint64_t>(window_ms) * 1'000'000ull) {}

  // Returns true when the caller should log now; *suppressed receives how many lines were
  // held back since the last line that was logged (0 if none).
  bool Allow(uint64_t* suppressed) { return AllowAt(GetNanosecond(), suppressed); }

  bool AllowAt(uint64_t now_ns, uint64_t* suppressed) {
    std::lock_guard<std::mutex> lock(mu_);
    if (now_ns - window_start_ns_ >= window_ns_ || window_start_ns_ == 0) {
      window_start_ns_ = now_ns;
      in_window_ = 0;
    }
    if (in_window_ >= burst_) {
      ++suppressed_;
      return false;
    }
    ++in_window_;
    *suppressed = suppressed_;
    suppressed_ = 0;
    return true;
  }

 private:
  std::mutex mu_;
  const int burst_;
  const uint64_t window_ns_;
  uint64_t window_start_ns_ = 0;
  int in_window_ = 0;
  uint64_t suppressed_ = 0;
};

}  // namespace meshpost

// Logs an error through `limiter`, appending "(N similar lines suppressed)" when needed.
#define MP_LOG_ERROR_LIMITED(limiter, layer, fmt_str, ...)                                  \
  do {                                                                                      \
    uint64_t mp_suppressed_ = 0;                                                            \
    if ((limiter).Allow(&mp_suppressed_)) {                                                 \
      if (mp_suppressed_ == 0) {                                                            \
        ::meshpost::Log(layer).error(fmt_str, __VA_ARGS__);                                 \
      } else {                                                                              \
        ::meshpost::Log(layer).error(fmt_str " ({} similar lines suppressed)", __VA_ARGS__, \
                                     mp_suppressed_);                                       \
      }                                                                                     \
    }                                                                                       \
  } while (0)
