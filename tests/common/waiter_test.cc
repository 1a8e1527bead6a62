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

// An engine that counts its calls and "delivers" (sets the flag) on its n-th Progress.
class FakeEngine : public ProgressEngine {
 public:
  bool Begin() override {
    ++begins;
    return lend;
  }
  bool Progress(uint64_t deadline_ns) override {
    ++progresses;
    if (deadline_ns == 0) ++polls;
    if (progresses == deliver_on) flag->store(true);
    return !stopping;
  }
  void End() override { ++ends; }
  void Wake() override { ++wakes; }

  bool lend = true;
  bool stopping = false;
  int deliver_on = 3;
  std::atomic<bool>* flag = nullptr;
  int begins = 0, progresses = 0, polls = 0, ends = 0;
  std::atomic<int> wakes{0};
};

// The waiting thread receives itself: the predicate comes true inside Progress, the
// engine is ended once, and no Notify was needed.
TEST(WaiterProgressTest, WaitingThreadDrivesTheEngine) {
  std::atomic<bool> flag{false};
  FakeEngine e;
  e.flag = &flag;
  Waiter w(WaitPolicy{0, false});
  w.set_engine(&e);
  EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
  EXPECT_EQ(e.begins, 1);
  EXPECT_EQ(e.progresses, 3);
  EXPECT_EQ(e.polls, 0);  // no spin phase: every Progress may block
  EXPECT_EQ(e.ends, 1);
}

// A wait that timed out makes the next one block at once (an idle get_batch slice does not
// spin); a satisfied wait brings the spin back.
TEST(WaiterProgressTest, NoSpinAfterAWaitTimedOut) {
  std::atomic<bool> flag{false};
  FakeEngine e;
  e.flag = &flag;
  e.deliver_on = -1;
  Waiter w(WaitPolicy{10'000'000'000, false});  // 10 s of spin
  w.set_engine(&e);
  EXPECT_FALSE(w.WaitUntil([&] { return flag.load(); }, GetNanosecond() + 2'000'000));
  EXPECT_EQ(e.polls, e.progresses) << "the first wait spins (polls) to its deadline";
  EXPECT_TRUE(w.idle());
  e.progresses = e.polls = 0;
  e.deliver_on = 2;
  EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
  EXPECT_EQ(e.polls, 0) << "after a timeout every Progress may block";
  EXPECT_FALSE(w.idle());
  flag = false;
  e.progresses = e.polls = 0;
  EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
  EXPECT_EQ(e.polls, e.progresses) << "satisfied again: the spin is back";
}

// Within the spin phase the engine is only polled (deadline 0), never blocked in.
TEST(WaiterProgressTest, SpinPhasePollsTheEngine) {
  std::atomic<bool> flag{false};
  FakeEngine e;
  e.flag = &flag;
  Waiter w(WaitPolicy{10'000'000'000, false});  // 10 s of spin: the flag comes first
  w.set_engine(&e);
  EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
  EXPECT_EQ(e.polls, e.progresses);
  EXPECT_EQ(e.ends, 1);
}

// An engine that declines (another thread holds it) or stops lending mid-wait leaves the
// waiter with its ordinary wait, which a Notify from another thread ends.
TEST(WaiterProgressTest, FallsBackWhenTheEngineDeclinesOrStops) {
  for (bool declines : {true, false}) {
    std::atomic<bool> flag{false};
    FakeEngine e;
    e.lend = !declines;
    e.stopping = !declines;
    e.deliver_on = -1;
    Waiter w(WaitPolicy{0, false});
    w.set_engine(&e);
    std::thread t([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      flag.store(true);
      w.Notify();
    });
    EXPECT_TRUE(w.WaitUntil([&] { return flag.load(); }, DeadlineFromTimeoutMs(10000)));
    t.join();
    EXPECT_EQ(e.begins, 1);
    EXPECT_EQ(e.ends, declines ? 0 : 1);  // End only after a successful Begin
    EXPECT_EQ(e.progresses, declines ? 0 : 1);
    EXPECT_GE(e.wakes.load(), 1);  // Notify tells the engine too
  }
}

// A deadline ends a wait inside the engine, with End called.
TEST(WaiterProgressTest, DeadlineEndsTheEngineWait) {
  std::atomic<bool> flag{false};
  FakeEngine e;
  e.flag = &flag;
  e.deliver_on = -1;
  Waiter w(WaitPolicy{0, false});
  w.set_engine(&e);
  EXPECT_FALSE(w.WaitUntil([&] { return flag.load(); }, GetNanosecond() + 5'000'000));
  EXPECT_EQ(e.ends, 1);
}

}  // namespace
}  // namespace meshpost
