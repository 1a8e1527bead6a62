#include "common/waiter.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace meshpost {
namespace {

TEST(WaiterTest, ReturnsTrueWhenAlreadySatisfied) {
  Waiter w;
  EXPECT_TRUE(w.WaitUntil([] { return true; }, GetNanosecond()));
}

TEST(WaiterTest, TimesOutWhenNeverSatisfied) {
  Waiter w(WaitPolicy{1000, false});
  const uint64_t start = GetNanosecond();
  EXPECT_FALSE(w.WaitUntil([] { return false; }, start + 20'000'000));
  EXPECT_GE(GetNanosecond(), start + 20'000'000);
}

// A huge timeout (INT64_MAX is a common "forever") saturates to no deadline; it used to
// wrap around into the past, so a wait with it timed out at once.
TEST(DeadlineTest, HugeTimeoutSaturatesInsteadOfWrapping) {
  const uint64_t now = GetNanosecond();
  for (int64_t ms : {INT64_MAX, INT64_MAX / 2, int64_t{1} << 62, int64_t{1} << 45}) {
    const uint64_t deadline = DeadlineFromTimeoutMs(ms);
    EXPECT_GT(deadline, now + uint64_t{1000} * 1000000000ull) << ms;
  }
  EXPECT_EQ(DeadlineFromTimeoutMs(INT64_MAX), UINT64_MAX);
  EXPECT_EQ(DeadlineFromTimeoutMs(-1), UINT64_MAX);
  const uint64_t d = DeadlineFromTimeoutMs(1000);
  EXPECT_GE(d, now + 1000000000ull);
  EXPECT_LT(d, UINT64_MAX);
}

// A sleeper (past its spin phase) is woken by Notify from another thread.
TEST(WaiterTest, NotifyWakesBlockedWaiter) {
  for (bool busy : {false, true}) {
    Waiter w(WaitPolicy{0, busy});
    std::atomic<bool> flag{false};
    std::thread t([&] {
      flag.store(true);
      w.Notify();
    });
    EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
    t.join();
  }
}

TEST(WaiterTest, ManyNotifiesNoLostWakeup) {
  Waiter w(WaitPolicy{0, false});
  std::atomic<int> count{0};
  std::thread t([&] {
    for (int i = 0; i < 2000; ++i) {
      count.fetch_add(1);
      w.Notify();
    }
  });
  for (int i = 1; i <= 2000; ++i) {
    ASSERT_TRUE(w.WaitUntil([&] { return count.load() >= i; }, DeadlineFromTimeoutMs(10000)));
  }
  t.join();
}

}  // namespace
}  // namespace meshpost
