// NTP-style estimate of this node's monotonic-clock offset to the scheduler's, from
// heartbeat round trips: a heartbeat leaves at local t0, the scheduler stamps its ack at
// ts, the ack arrives at local t3. Then offset = (t0 + t3) / 2 - ts with |error| <=
// (t3 - t0) / 2, provided ts was taken between t0 and t3. The estimate is the sample with
// the smallest round trip among the last kWindow (queueing only ever widens the bound).
// Thread-safe: the heartbeat thread adds samples, the trace writer reads.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>

namespace meshpost {

struct ClockOffset {
  int64_t offset_ns = 0;     // local - scheduler: scheduler time = local time - offset_ns
  uint64_t error_ns = 0;     // half the round trip of the sample used: |true - est| <= this
  uint64_t rtt_ns = 0;       // that sample's round trip
  uint64_t measured_at = 0;  // local time (t3) of that sample
  uint32_t samples = 0;      // samples seen so far (0: no estimate yet)
};

class ClockSync {
 public:
  static constexpr int kWindow = 8;

  // Returns false (and ignores the sample) when it is inconsistent: t3 < t0, or no stamp.
  bool AddSample(uint64_t t0, uint64_t scheduler_ns, uint64_t t3) {
    if (t3 < t0 || scheduler_ns == 0 || t0 == 0) return false;
    ClockOffset s;
    s.rtt_ns = t3 - t0;
    s.error_ns = s.rtt_ns / 2 + (s.rtt_ns & 1);
    const uint64_t mid = t0 + s.rtt_ns / 2;
    s.offset_ns = static_cast<int64_t>(mid - scheduler_ns);
    s.measured_at = t3;
    std::lock_guard<std::mutex> lock(mu_);
    window_[next_ % kWindow] = s;
    ++next_;
    const uint64_t n = next_ < kWindow ? next_ : kWindow;
    best_ = window_[0];
    for (uint64_t i = 1; i < n; ++i) {
      if (window_[i].rtt_ns < best_.rtt_ns) best_ = window_[i];
    }
    best_.samples = static_cast<uint32_t>(next_);
    return true;
  }

  ClockOffset Get() const {
    std::lock_guard<std::mutex> lock(mu_);
    return best_;
  }

 private:
  mutable std::mutex mu_;
  std::array<ClockOffset, kWindow> window_{};
  uint64_t next_ = 0;
  ClockOffset best_;
};

}  // namespace meshpost
