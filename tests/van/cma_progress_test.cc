// Caller-driven progress in the cma van (common/progress.h, docs/threads.md): a thread
// that holds progress receives and delivers every data-set event itself (messages,
// handshakes of new connections, acks), the receive thread leaves them alone meanwhile
// and takes over again after EndProgress, WakeProgress and Stop end a blocking Progress,
// and only one thread holds progress at a time. Both payload paths (CMA, shared-memory
// staging) run every test.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "support/cma_pair.h"
#include "support/recording_receiver.h"
#include "van/cma/cma_van.h"

namespace meshpost {
namespace {

constexpr int kIdA = 8;
constexpr int kIdB = 9;
constexpr int kIdC = 10;

// Records which thread delivered each message.
class ThreadRecordingReceiver : public support::RecordingReceiver {
 public:
  void OnMessage(InMessage&& msg) override {
    {
      std::lock_guard<std::mutex> lock(tids_mu_);
      tids_.push_back(std::this_thread::get_id());
    }
    support::RecordingReceiver::OnMessage(std::move(msg));
  }
  std::vector<std::thread::id> tids() {
    std::lock_guard<std::mutex> lock(tids_mu_);
    return tids_;
  }

 private:
  std::mutex tids_mu_;
  std::vector<std::thread::id> tids_;
};

VanOptions TestOptions(bool cma) {
  VanOptions o;
  o.wait.spin_ns = 0;
  o.connect_timeout_ms = 30'000;
  o.cma_disable = !cma;
  return o;
}

OutMessage Request(int from, int to, uint64_t id, const void* data = nullptr, size_t size = 0,
                   std::shared_ptr<const void> owner = nullptr) {
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = from;
  m.meta.recipient = to;
  m.meta.id = id;
  if (data != nullptr) {
    TensorDesc d;
    d.key = 1;
    d.shape = {static_cast<int64_t>(size)};
    d.nbytes = size;
    m.meta.data.push_back(d);
    m.segments.push_back({data, size, std::move(owner)});
  }
  return m;
}

// Calls Progress until pred holds or 30 s passed (a hang guard, not a timing check).
template <typename Pred>
bool ProgressUntil(Van* van, Pred pred) {
  const uint64_t give_up = GetNanosecond() + 30'000'000'000ull;
  while (!pred()) {
    if (GetNanosecond() > give_up) return false;
    if (!van->Progress(GetNanosecond() + 100'000'000ull)) return false;
  }
  return true;
}

class CmaProgressTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    support::StartConnectedCmaPair(TestOptions(GetParam()), TestOptions(GetParam()), kIdA, kIdB,
                                   &ra_, &rb_, &a_, &b_);
  }
  void TearDown() override {
    if (a_) a_->Stop();
    if (b_) b_->Stop();
  }

  std::unique_ptr<Van> a_, b_;
  ThreadRecordingReceiver ra_, rb_;
};

TEST_P(CmaProgressTest, HolderReceivesOnItsOwnThreadThenTheReceiveThreadAgain) {
  ASSERT_TRUE(b_->SupportsProgress());
  ASSERT_TRUE(b_->BeginProgress());
  // Only one holder at a time.
  std::thread other([&] { EXPECT_FALSE(b_->BeginProgress()); });
  other.join();
  // A payload big enough to be read remotely (CMA) or staged, not inlined.
  std::vector<uint8_t> payload(1 << 20);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE(a_->Send(Request(kIdA, kIdB, 1, payload.data(), payload.size())).ok());
  // The receive thread leaves it to the holder: nothing is delivered while we do not
  // progress.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(rb_.tids().empty());
  ASSERT_TRUE(ProgressUntil(b_.get(), [&] { return !rb_.tids().empty(); }));
  b_->EndProgress();
  ASSERT_EQ(rb_.tids().size(), 1u);
  EXPECT_EQ(rb_.tids()[0], std::this_thread::get_id());
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].segments.size(), 1u);
  ASSERT_EQ(got[0].segments[0].size, payload.size());
  EXPECT_EQ(std::memcmp(got[0].segments[0].data, payload.data(), payload.size()), 0);

  // After EndProgress the receive thread delivers again.
  ASSERT_TRUE(a_->Send(Request(kIdA, kIdB, 2)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  ASSERT_EQ(rb_.tids().size(), 2u);
  EXPECT_NE(rb_.tids()[1], std::this_thread::get_id());
  // And progress can be taken again, by another thread.
  std::thread again([&] {
    ASSERT_TRUE(b_->BeginProgress());
    b_->EndProgress();
  });
  again.join();
}

// Messages that arrived while the holder was not inside Progress are delivered by the
// receive thread once it ends: nothing is stranded in the data set.
TEST_P(CmaProgressTest, EndProgressHandsPendingDataBack) {
  ASSERT_TRUE(b_->BeginProgress());
  ASSERT_TRUE(a_->Send(Request(kIdA, kIdB, 1)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  b_->EndProgress();
  ASSERT_TRUE(rb_.WaitFor(1));
  EXPECT_NE(rb_.tids()[0], std::this_thread::get_id());
}

// The sender's acks (which release its segments' owners) are read by whoever holds the
// sender's progress.
TEST_P(CmaProgressTest, AcksAreProcessedByTheHolder) {
  auto owned = std::make_shared<std::vector<uint8_t>>(1 << 20, 0x5A);
  std::weak_ptr<std::vector<uint8_t>> watch = owned;
  const uint8_t* data = owned->data();
  const size_t size = owned->size();
  ASSERT_TRUE(a_->BeginProgress());
  ASSERT_TRUE(a_->Send(Request(kIdA, kIdB, 1, data, size, std::move(owned))).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  EXPECT_TRUE(ProgressUntil(a_.get(), [&] { return watch.expired(); }));
  a_->EndProgress();
  EXPECT_TRUE(watch.expired());
}

// A connection made while a caller holds progress completes its handshake through the
// holder (the hello frames arrive in the data set).
TEST_P(CmaProgressTest, HandshakeOfANewConnectionRunsOnTheHolder) {
  ThreadRecordingReceiver rc;
  auto c = CreateCmaVan(TestOptions(GetParam()));
  ASSERT_TRUE(c->Bind("", 0).ok());
  ASSERT_TRUE(c->Start(&rc).ok());
  std::atomic<bool> connected{false};
  std::atomic<bool> holding{false};
  std::thread holder([&] {
    ASSERT_TRUE(b_->BeginProgress());
    holding = true;
    EXPECT_TRUE(ProgressUntil(b_.get(), [&] { return connected.load() && !rb_.tids().empty(); }));
    b_->EndProgress();
  });
  while (!holding.load()) std::this_thread::yield();
  Status s = c->Connect({kIdB, "", 0, b_->endpoint(), getpid()});
  EXPECT_TRUE(s.ok()) << s.ToString();
  connected = true;
  if (s.ok()) {
    ASSERT_TRUE(c->Send(Request(kIdC, kIdB, 7)).ok());
  }
  holder.join();
  c->Stop();
}

// WakeProgress from another thread ends a Progress that would block for a minute; Stop
// makes Progress return false and waits for the holder's EndProgress.
TEST_P(CmaProgressTest, WakeAndStopEndABlockingProgress) {
  std::atomic<int> stage{0};
  std::thread holder([&] {
    ASSERT_TRUE(b_->BeginProgress());
    stage = 1;
    const uint64_t start = GetNanosecond();
    EXPECT_TRUE(b_->Progress(start + 60'000'000'000ull));
    EXPECT_LT(GetNanosecond() - start, 30'000'000'000ull);  // woken, not timed out
    stage = 2;
    bool running = true;
    while (running) running = b_->Progress(GetNanosecond() + 60'000'000'000ull);
    b_->EndProgress();
  });
  while (stage.load() != 1) std::this_thread::yield();
  // The wake may come before the holder is inside epoll_wait: the kick stays readable.
  b_->WakeProgress();
  while (stage.load() != 2) std::this_thread::yield();
  b_->Stop();  // returns only after the holder ended
  holder.join();
  EXPECT_FALSE(b_->BeginProgress());
}

INSTANTIATE_TEST_SUITE_P(Paths, CmaProgressTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "cma" : "shm"; });

}  // namespace
}  // namespace meshpost
