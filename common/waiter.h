// Adaptive waiting (DESIGN §4): spin on a predicate for a short, configurable time,
// then block on a condition variable until notified or the deadline passes. In busy-poll
// mode the waiter never blocks (for dedicated cores). Notify() is cheap when nobody sleeps.
// With a ProgressEngine (common/progress.h) the waiting thread receives the messages it
// waits for itself, when the transport lets it, instead of sleeping until another thread
// delivered them and woke it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "common/clock.h"
#include "common/progress.h"

namespace meshpost {

struct WaitPolicy {
  int64_t spin_ns = 50'000;  // spin this long before blocking
  bool busy_poll = false;    // never block (dedicated cores)
};

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Waiter {
 public:
  explicit Waiter(WaitPolicy policy = {}, ProgressEngine* engine = nullptr)
      : spin_ns_(policy.spin_ns), busy_poll_(policy.busy_poll), engine_(engine) {}

  // May change while other threads wait (they see it from their next wait on).
  void set_policy(WaitPolicy policy) {
    spin_ns_.store(policy.spin_ns, std::memory_order_relaxed);
    busy_poll_.store(policy.busy_poll, std::memory_order_relaxed);
  }
  // The engine must outlive every WaitUntil and Notify on this waiter; null: none.
  void set_engine(ProgressEngine* engine) { engine_ = engine; }

  // Returns true once pred() holds, false if deadline_ns (GetNanosecond clock) passed first.
  // pred must read state that the notifier publishes before calling Notify().
  // After a wait that timed out (nothing is arriving: an idle server's get_batch slices),
  // the next wait blocks without spinning, until a wait is satisfied again: an idle node
  // costs no spin per slice.
  template <typename Pred>
  bool WaitUntil(Pred pred, uint64_t deadline_ns) {
    const bool result = WaitOnce(pred, deadline_ns);
    idle_.store(!result, std::memory_order_relaxed);
    return result;
  }

  // Whether the next wait skips its spin phase (the last one timed out).
  bool idle() const { return idle_.load(std::memory_order_relaxed); }

  void Notify() {
    // Pairs with the seq_cst increment in WaitUntil: either the sleeper sees the new state
    // in its pred() check, or we see it counted and wake it once it is inside the wait.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (engine_ != nullptr) engine_->Wake();
    if (sleepers_.load(std::memory_order_seq_cst) == 0) return;
    // Taking and dropping mu_ orders us after a sleeper's pred() check (it holds mu_ from
    // that check until it is inside the wait), so the notify cannot be lost. Notifying
    // after the unlock, not under it, keeps the woken thread from running straight into
    // the mutex we still hold and sleeping a second time (an extra futex wait + wake, a
    // few microseconds on a loaded 2-core host). Like every member, Notify must not race
    // with the Waiter's destruction: owners stop the notifying threads first.
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
  }

 private:
  template <typename Pred>
  bool WaitOnce(Pred pred, uint64_t deadline_ns) {
    if (pred()) return true;
    const uint64_t start = GetNanosecond();
    const uint64_t spin_end =
        start + (idle_.load(std::memory_order_relaxed)
                     ? 0
                     : static_cast<uint64_t>(spin_ns_.load(std::memory_order_relaxed)));
    const bool busy_poll = busy_poll_.load(std::memory_order_relaxed);
    if (engine_ != nullptr && engine_->Begin()) {
      // Begin() is seq_cst: a Notify() after it sees the engine held and wakes our
      // Progress; one before it published the state our pred() reads next.
      bool result = false;
      bool lent = true;
      for (;;) {
        if (pred()) {
          result = true;
          break;
        }
        const uint64_t now = GetNanosecond();
        if (now >= deadline_ns) break;
        const bool spin = busy_poll || now < spin_end;
        // Slices of at most 100 ms, as below.
        if (!engine_->Progress(spin ? 0 : std::min<uint64_t>(deadline_ns, now + 100'000'000ull))) {
          lent = false;
          break;
        }
      }
      engine_->End();
      if (lent || result) return result || pred();
      // The transport stopped lending progress: wait for its thread to deliver.
    }
    for (;;) {
      if (pred()) return true;
      const uint64_t now = GetNanosecond();
      if (now >= deadline_ns) return false;
      if (!busy_poll && now >= spin_end) break;
      CpuRelax();
    }
    std::unique_lock<std::mutex> lock(mu_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    bool result = true;
    while (!pred()) {
      const uint64_t now = GetNanosecond();
      if (now >= deadline_ns) {
        result = pred();
        break;
      }
      // Sleep in slices of at most 100 ms so a lost wakeup can never stall a waiter long,
      // and so callers that wait in a loop can check for interruption.
      const uint64_t slice = std::min<uint64_t>(deadline_ns - now, 100'000'000ull);
      cv_.wait_for(lock, std::chrono::nanoseconds(slice));
    }
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return result;
  }

  std::atomic<int64_t> spin_ns_;
  std::atomic<bool> idle_{false};  // the last wait timed out (WaitUntil)
  std::atomic<bool> busy_poll_;
  ProgressEngine* engine_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

}  // namespace meshpost
