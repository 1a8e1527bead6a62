// Van conformance suite: every transport (tcp, cma, cma with its shared-memory fallback,
// rdma over the in-process fake fabric; see tests/CMakeLists.txt) must pass the same
// behavioural tests. Two vans live in this process and talk to each
// other; every wait has a timeout and no test sleeps for synchronisation.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "tests/support/cma_pair.h"
#include "tests/support/recording_receiver.h"
#ifdef MESHPOST_CONFORMANCE_RDMA
#include "van/rdma/fake_verbs.h"
#include "van/rdma/rdma_van.h"
#include "van/rdma/test_util.h"
#endif
#include "van/cma/cma_van.h"
#include "van/van.h"
#include "van/zmq/zmq_van.h"
#ifdef MESHPOST_HAVE_RDMA
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <deque>
#include <map>
#include <thread>

#include "van/rdma/rdma_van.h"
#endif

namespace meshpost {
namespace {

constexpr auto kTimeout = std::chrono::seconds(60);

using support::OwnerCallScope;
using support::RecordingReceiver;

// Counts owner releases so tests can check the van lets go of every sent buffer.
class ReleaseCounter {
 public:
  std::shared_ptr<const void> Track(std::shared_ptr<std::vector<uint8_t>> buf) {
    return std::shared_ptr<const void>(buf->data(), [this, buf](const void*) {
      std::lock_guard<std::mutex> lock(mu_);
      ++released_;
      cv_.notify_all();
    });
  }
  bool WaitFor(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kTimeout, [&] { return released_ >= n; });
  }
  int released() {
    std::lock_guard<std::mutex> lock(mu_);
    return released_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int released_ = 0;
};

// Carries rendezvous blobs between the two vans of a test, as an owner's control plane
// would: queued by VanReceiver::SendRendezvous on any thread, delivered by a thread of its
// own (a van must never be called back inline from its own SendRendezvous).
class RendezvousRelay {
 public:
  ~RendezvousRelay() { Stop(); }
  void Attach(int id, Van* van) {
    std::lock_guard<std::mutex> lock(vans_mu_);
    vans_[id] = van;
  }
  // Blocks until no delivery to `id` is in progress; none starts afterwards.
  void Detach(int id) {
    std::lock_guard<std::mutex> lock(vans_mu_);
    vans_.erase(id);
  }
  Status Post(int from, int to, std::string blob) {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stopped_) return UnavailableError("relay stopped");
    queue_.push_back({from, to, std::move(blob)});
    if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
    cv_.notify_all();
    return OkStatus();
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      stopped_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Blob {
    int from, to;
    std::string bytes;
  };
  void Loop() {
    std::unique_lock<std::mutex> lock(queue_mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stopped_ || !queue_.empty(); });
      if (stopped_) return;
      Blob b = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      {
        std::lock_guard<std::mutex> vans(vans_mu_);
        auto it = vans_.find(b.to);
        if (it != vans_.end()) {
          // A van that stopped refuses late blobs; the rdma engine tests cover blob errors.
          (void)it->second->OnRendezvousBlob(b.from, b.bytes);
        }
      }
      lock.lock();
    }
  }
  std::mutex vans_mu_;
  std::map<int, Van*> vans_;
  std::mutex queue_mu_;
  std::condition_variable cv_;
  std::deque<Blob> queue_;
  bool stopped_ = false;
  std::thread thread_;
};

// What the two vans of one test share: for rdma, the in-process fake fabric their verbs
// run on (one fake host per van).
struct VanWorld {
#ifdef MESHPOST_CONFORMANCE_RDMA
  rdma::testing::FakeFabric fabric;
  int next_ip = 1;
  ~VanWorld() { fabric.Release(); }
#endif
};

struct VanFactory {
  std::string name;
  std::function<std::unique_ptr<Van>(VanWorld*)> create;
  // Empty, or why this van cannot run on this host (the test then skips with the reason).
  std::function<Status()> unavailable = {};
};

std::ostream& operator<<(std::ostream& os, const VanFactory& f) { return os << f.name; }

VanOptions TestOptions() {
  VanOptions o;
  o.wait.spin_ns = 20'000;
  o.connect_timeout_ms = 30'000;
  return o;
}

constexpr int kIdA = 8;
constexpr int kIdB = 9;

class VanConformanceTest : public ::testing::TestWithParam<VanFactory> {
 protected:
  void SetUp() override {
    if (GetParam().unavailable) {
      if (Status why = GetParam().unavailable(); !why.ok()) GTEST_SKIP() << why.message();
    }
    a_ = GetParam().create(&world_);
    b_ = GetParam().create(&world_);
    auto pa = a_->Bind("127.0.0.1", 0);
    auto pb = b_->Bind("127.0.0.1", 0);
    ASSERT_TRUE(pa.ok()) << pa.status();
    ASSERT_TRUE(pb.ok()) << pb.status();
    addr_a_ = {kIdA, "127.0.0.1", *pa, a_->endpoint(), static_cast<int>(getpid())};
    addr_b_ = {kIdB, "127.0.0.1", *pb, b_->endpoint(), static_cast<int>(getpid())};
    relay_.Attach(kIdA, a_.get());
    relay_.Attach(kIdB, b_.get());
    ra_.set_rendezvous([this](const char*, int peer, std::string blob) {
      return relay_.Post(kIdA, peer, std::move(blob));
    });
    rb_.set_rendezvous([this](const char*, int peer, std::string blob) {
      return relay_.Post(kIdB, peer, std::move(blob));
    });
    ASSERT_TRUE(a_->Start(&ra_).ok());
    ASSERT_TRUE(b_->Start(&rb_).ok());
    ASSERT_TRUE(a_->Connect(addr_b_).ok());
    ASSERT_TRUE(b_->Connect(addr_a_).ok());
  }
  void TearDown() override {
    relay_.Stop();
    if (a_) a_->Stop();
    if (b_) b_->Stop();
    // The Van contract (docs/threads.md): no receiver callback ever ran inline inside a
    // van call the test made under an OwnerCallScope.
    EXPECT_EQ(ra_.inline_callbacks(), 0);
    EXPECT_EQ(rb_.inline_callbacks(), 0);
  }

  static OutMessage Request(uint64_t id, int from = kIdA, int to = kIdB) {
    OutMessage m;
    m.meta.cmd = Command::kRequest;
    m.meta.sender = from;
    m.meta.recipient = to;
    m.meta.id = id;
    return m;
  }
  // Adds a segment of `n` bytes filled with a pattern derived from `seed`.
  static std::shared_ptr<std::vector<uint8_t>> AddSegment(OutMessage* m, size_t n, uint8_t seed,
                                                          ReleaseCounter* counter = nullptr) {
    auto buf = std::make_shared<std::vector<uint8_t>>(n);
    for (size_t i = 0; i < n; ++i) (*buf)[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 12));
    TensorDesc d;
    d.key = static_cast<int64_t>(m->meta.data.size());
    d.dtype = DType::kUInt8;
    d.shape = {static_cast<int64_t>(n)};
    d.nbytes = n;
    m->meta.data.push_back(d);
    std::shared_ptr<const void> owner = counter ? counter->Track(buf) : buf;
    m->segments.push_back({buf->data(), n, owner});
    return buf;
  }
  static bool Matches(const RecvSegment& seg, size_t n, uint8_t seed) {
    if (seg.size != n) return false;
    const auto* p = static_cast<const uint8_t*>(seg.data);
    for (size_t i = 0; i < n; ++i) {
      if (p[i] != static_cast<uint8_t>(seed + i * 7 + (i >> 12))) return false;
    }
    return true;
  }

  // Stops a van and destroys it, after which no rendezvous blob reaches it.
  // As ps/ does (data vans stop before the control plane): the van still gets rendezvous
  // blobs while Stop drains, and none once it is gone.
  void Destroy(std::unique_ptr<Van>* van, int id) {
    (*van)->Stop();
    relay_.Detach(id);
    van->reset();
  }

  // Declared first: the vans run on the world (rdma: its fake fabric), destroyed last.
  VanWorld world_;
  RecordingReceiver ra_, rb_;
  RendezvousRelay relay_;
  std::unique_ptr<Van> a_, b_;
  PeerAddress addr_a_, addr_b_;
};

TEST_P(VanConformanceTest, DeliversInOrder) {
  constexpr int kCount = 500;
  for (int i = 0; i < kCount; ++i) {
    OutMessage m = Request(i);
    AddSegment(&m, 64 + (i % 5) * 3000, static_cast<uint8_t>(i));
    Status sent = a_->Send(std::move(m));
    ASSERT_TRUE(sent.ok()) << sent;
  }
  ASSERT_TRUE(rb_.WaitFor(kCount));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), static_cast<size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(got[i].meta.id, static_cast<uint64_t>(i));
    EXPECT_EQ(got[i].meta.sender, kIdA);
    ASSERT_EQ(got[i].segments.size(), 1u);
    EXPECT_TRUE(Matches(got[i].segments[0], 64 + (i % 5) * 3000, static_cast<uint8_t>(i)));
  }
}

TEST_P(VanConformanceTest, BothDirections) {
  OutMessage m = Request(1);
  AddSegment(&m, 100000, 1);
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  OutMessage r = Request(2, kIdB, kIdA);
  r.meta.cmd = Command::kResponse;
  AddSegment(&r, 200000, 2);
  ASSERT_TRUE(b_->Send(std::move(r)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  ASSERT_TRUE(ra_.WaitFor(1));
  auto at_b = rb_.TakeMessages();
  auto at_a = ra_.TakeMessages();
  EXPECT_TRUE(Matches(at_b[0].segments[0], 100000, 1));
  EXPECT_EQ(at_a[0].meta.cmd, Command::kResponse);
  EXPECT_TRUE(Matches(at_a[0].segments[0], 200000, 2));
}

TEST_P(VanConformanceTest, EmptyMessagesAndEmptySegments) {
  OutMessage empty = Request(1);
  empty.meta.body = "no data";
  ASSERT_TRUE(a_->Send(std::move(empty)).ok());
  OutMessage zero = Request(2);
  AddSegment(&zero, 0, 0);
  AddSegment(&zero, 10, 3);
  AddSegment(&zero, 0, 0);
  ASSERT_TRUE(a_->Send(std::move(zero)).ok());
  ASSERT_TRUE(rb_.WaitFor(2));
  auto got = rb_.TakeMessages();
  EXPECT_EQ(got[0].meta.body, "no data");
  EXPECT_TRUE(got[0].segments.empty());
  ASSERT_EQ(got[1].segments.size(), 3u);
  EXPECT_EQ(got[1].segments[0].size, 0u);
  EXPECT_TRUE(Matches(got[1].segments[1], 10, 3));
  EXPECT_EQ(got[1].segments[2].size, 0u);
}

TEST_P(VanConformanceTest, LargeHeaderBody) {
  OutMessage m = Request(1);
  m.meta.body.assign(300000, 'x');  // larger than one doorbell frame
  AddSegment(&m, 5000, 9);
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  EXPECT_EQ(got[0].meta.body, std::string(300000, 'x'));
  EXPECT_TRUE(Matches(got[0].segments[0], 5000, 9));
}

TEST_P(VanConformanceTest, Large64MiBToVanBufferAndToRegisteredMemory) {
  constexpr size_t kBig = 64u << 20;
  OutMessage m = Request(1);
  AddSegment(&m, kBig, 5);
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got[0].segments.size(), 1u);
  EXPECT_NE(got[0].segments[0].owner, nullptr);  // van-owned buffer kept alive by owner
  EXPECT_TRUE(Matches(got[0].segments[0], kBig, 5));

  std::vector<uint8_t> registered(kBig, 0);
  rb_.set_destination([&](const Meta& meta, size_t i) -> Result<void*> {
    return static_cast<void*>(registered.data());
  });
  OutMessage m2 = Request(2);
  AddSegment(&m2, kBig, 6);
  ASSERT_TRUE(a_->Send(std::move(m2)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  got = rb_.TakeMessages();
  EXPECT_EQ(got[0].segments[0].data, registered.data());
  EXPECT_TRUE(Matches(got[0].segments[0], kBig, 6));
}

TEST_P(VanConformanceTest, ManyInFlightAllOwnersReleased) {
  constexpr int kCount = 200;
  ReleaseCounter released;
  for (int i = 0; i < kCount; ++i) {
    OutMessage m = Request(i);
    AddSegment(&m, 256 << 10, static_cast<uint8_t>(i), &released);
    AddSegment(&m, 100, static_cast<uint8_t>(i + 1), &released);
    Status sent = a_->Send(std::move(m));
    ASSERT_TRUE(sent.ok()) << sent;
  }
  ASSERT_TRUE(rb_.WaitFor(kCount));
  auto got = rb_.TakeMessages();
  for (int i = 0; i < kCount; ++i) {
    ASSERT_EQ(got[i].meta.id, static_cast<uint64_t>(i));
    EXPECT_TRUE(Matches(got[i].segments[0], 256 << 10, static_cast<uint8_t>(i)));
    EXPECT_TRUE(Matches(got[i].segments[1], 100, static_cast<uint8_t>(i + 1)));
  }
  EXPECT_TRUE(released.WaitFor(2 * kCount));
}

TEST_P(VanConformanceTest, ManySegmentsLandInRegisteredDestinations) {
  // Mixed small (inline-sized) and large segments, each into its own registered slot.
  constexpr int kSegs = 40;
  std::vector<std::vector<uint8_t>> slots(kSegs);
  std::vector<size_t> sizes(kSegs);
  OutMessage m = Request(7);
  for (int i = 0; i < kSegs; ++i) {
    sizes[i] = (i % 3 == 0) ? 700000 + i : 17 * i + 1;
    slots[i].assign(sizes[i], 0);
    AddSegment(&m, sizes[i], static_cast<uint8_t>(i * 3));
  }
  rb_.set_destination([&](const Meta& meta, size_t i) -> Result<void*> {
    if (i >= slots.size() || meta.data[i].nbytes != slots[i].size()) {
      return InvalidArgumentError("unexpected segment");
    }
    return static_cast<void*>(slots[i].data());
  });
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got[0].segments.size(), static_cast<size_t>(kSegs));
  for (int i = 0; i < kSegs; ++i) {
    EXPECT_EQ(got[0].segments[i].data, slots[i].data());
    EXPECT_EQ(got[0].segments[i].owner, nullptr);
    EXPECT_TRUE(Matches(got[0].segments[i], sizes[i], static_cast<uint8_t>(i * 3)));
  }
}

TEST_P(VanConformanceTest, DestinationErrorDropsTheMessageAndTheVanCarriesOn) {
  rb_.set_destination([&](const Meta& meta, size_t i) -> Result<void*> {
    if (meta.id == 666) return InvalidArgumentError("outside registered memory");
    return static_cast<void*>(nullptr);
  });
  ReleaseCounter released;
  OutMessage bad = Request(666);
  AddSegment(&bad, 1 << 20, 1, &released);
  ASSERT_TRUE(a_->Send(std::move(bad)).ok());
  OutMessage good = Request(667);
  AddSegment(&good, 1 << 20, 2);
  ASSERT_TRUE(a_->Send(std::move(good)).ok());
  ASSERT_TRUE(rb_.WaitFor(1, 1));
  auto dropped = rb_.TakeDropped();
  ASSERT_EQ(dropped.size(), 1u);
  EXPECT_EQ(dropped[0].first.id, 666u);
  EXPECT_EQ(dropped[0].second.code(), StatusCode::kInvalidArgument);
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].meta.id, 667u);
  EXPECT_TRUE(Matches(got[0].segments[0], 1 << 20, 2));
  EXPECT_TRUE(released.WaitFor(1));  // the refused message's buffer is released too
}

TEST_P(VanConformanceTest, SizeMismatchIsRefused) {
  // A descriptor claiming more bytes than the segment has is a protocol error.
  OutMessage m = Request(5);
  AddSegment(&m, 1000, 1);
  m.meta.data[0].nbytes = 2000;
  m.meta.data[0].shape = {2000};
  Status s = a_->Send(std::move(m));
  if (s.ok()) {
    ASSERT_TRUE(rb_.WaitFor(0, 1));
    EXPECT_EQ(rb_.TakeDropped()[0].second.code(), StatusCode::kDataLoss);
  }
  OutMessage ok = Request(6);
  AddSegment(&ok, 10, 1);
  ASSERT_TRUE(a_->Send(std::move(ok)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  EXPECT_EQ(rb_.TakeMessages()[0].meta.id, 6u);
}

TEST_P(VanConformanceTest, PeerExitIsSurvived) {
  OutMessage m = Request(1);
  AddSegment(&m, 1 << 20, 1);
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  Destroy(&b_, kIdB);
  // Sends to the departed peer fail or are dropped; they never crash or hang, and every
  // buffer handed to the van is eventually released.
  ReleaseCounter released;
  for (int i = 0; i < 20; ++i) {
    OutMessage x = Request(100 + i);
    AddSegment(&x, 1 << 20, 2, &released);
    (void)a_->Send(std::move(x));
  }
  a_->Disconnect(kIdB);
  Destroy(&a_, kIdA);
  EXPECT_EQ(released.released(), 20);
}

TEST_P(VanConformanceTest, CleanStopWithMessagesInFlight) {
  constexpr int kCount = 64;
  ReleaseCounter released;
  for (int i = 0; i < kCount; ++i) {
    OutMessage m = Request(i);
    AddSegment(&m, 1 << 20, static_cast<uint8_t>(i), &released);
    Status sent = a_->Send(std::move(m));
    ASSERT_TRUE(sent.ok()) << sent;
  }
  Destroy(&a_, kIdA);
  EXPECT_EQ(released.released(), kCount);
  // Stop drained the sends: the receiver gets every message, intact and in order.
  ASSERT_TRUE(rb_.WaitFor(kCount));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), static_cast<size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(got[i].meta.id, static_cast<uint64_t>(i));
    EXPECT_TRUE(Matches(got[i].segments[0], 1 << 20, static_cast<uint8_t>(i)));
  }
}

TEST_P(VanConformanceTest, CallbacksNeverRunOnTheSendingThread) {
  // Both directions, data that lands in registered memory and data the van keeps, a
  // refused payload and a bad descriptor: every receiver callback must run on the van's
  // own thread, never inside the Send/Disconnect/Stop that the owner's thread is in.
  std::vector<uint8_t> landing(1 << 16);
  rb_.set_destination([&](const Meta& meta, size_t index) -> Result<void*> {
    if (meta.id == 3) return InvalidArgumentError("refused by test");
    return meta.id == 1 ? static_cast<void*>(landing.data()) : nullptr;
  });
  constexpr int kRounds = 20;
  for (int round = 0; round < kRounds; ++round) {
    OwnerCallScope scope;
    for (uint64_t id = 1; id <= 3; ++id) {
      OutMessage m = Request(id);
      AddSegment(&m, id == 1 ? landing.size() : 100'000, static_cast<uint8_t>(id));
      ASSERT_TRUE(a_->Send(std::move(m)).ok());
    }
    OutMessage back = Request(4, kIdB, kIdA);
    AddSegment(&back, 10, 4);
    ASSERT_TRUE(b_->Send(std::move(back)).ok());
  }
  ASSERT_TRUE(rb_.WaitFor(2 * kRounds, kRounds));
  ASSERT_TRUE(ra_.WaitFor(kRounds));
  {
    OwnerCallScope scope;
    a_->Disconnect(kIdB);
    b_->Disconnect(kIdA);
    a_->Stop();
    b_->Stop();
  }
  EXPECT_EQ(ra_.inline_callbacks(), 0);
  EXPECT_EQ(rb_.inline_callbacks(), 0);
}

TEST_P(VanConformanceTest, SendToUnknownPeerFails) {
  OutMessage m = Request(1, kIdA, 12345);
  EXPECT_EQ(a_->Send(std::move(m)).code(), StatusCode::kUnavailable);
}

VanOptions CmaShmOptions() {
  VanOptions o = TestOptions();
  o.cma_disable = true;
  return o;
}

#ifdef MESHPOST_CONFORMANCE_RDMA
// The RDMA van over the fake fabric: real engine, real poller thread, fake verbs. Default
// 4 KiB header slots (LargeHeaderBody goes out of line), few of them (flow control).
std::unique_ptr<Van> CreateFakeFabricRdmaVan(VanWorld* world) {
  const int host = world->fabric.AddHost(
      {rdma::testing::RoceSpec("mlx5_0", static_cast<uint8_t>(world->next_ip++))});
  RdmaOptions ro;
  ro.wait = TestOptions().wait;
  ro.header_slots = 16;
  ro.stop_drain_ms = TestOptions().stop_drain_ms;
  rdma::testing::FakeFabric* fabric = &world->fabric;
  ro.verbs = [fabric, host] { return fabric->Api(host); };
  auto van = CreateRdmaVan(ro);
  EXPECT_TRUE(van.ok()) << van.status();
  return van.ok() ? std::unique_ptr<Van>(std::move(van).value()) : nullptr;
}
#endif

INSTANTIATE_TEST_SUITE_P(
    AllVans, VanConformanceTest,
    ::testing::Values(VanFactory{"tcp", [](VanWorld*) { return CreateZmqVan(TestOptions()); }},
                      VanFactory{"cma", [](VanWorld*) { return CreateCmaVan(TestOptions()); }},
                      VanFactory{"cma_shm", [](VanWorld*) { return CreateCmaVan(CmaShmOptions()); }}
#ifdef MESHPOST_CONFORMANCE_RDMA
                      ,
                      VanFactory{"rdma_fake_fabric", &CreateFakeFabricRdmaVan}
#endif
                      ),
    [](const ::testing::TestParamInfo<VanFactory>& info) { return info.param.name; });

#ifdef MESHPOST_HAVE_RDMA
// --- the rdma van on a real device (soft-RoCE in the VM stage, scripts/rdma_vm/) -----
// The rdma van exchanges rendezvous blobs through its receiver's SendRendezvous. Here the
// control plane behind it is a mailbox thread: a blob is never delivered on the sending
// van's own thread (SendRendezvous must not call back into the van). The first van a test
// creates is kIdA, the second kIdB.
class LoopbackControlPlane {
 public:
  static LoopbackControlPlane& Get() {
    static LoopbackControlPlane* plane = new LoopbackControlPlane();  // outlives every van
    return *plane;
  }
  int NextId() {
    std::lock_guard<std::mutex> lock(queue_mu_);
    return created_++ % 2 == 0 ? kIdA : kIdB;
  }
  void Attach(int id, Van* van) {
    std::lock_guard<std::mutex> lock(deliver_mu_);
    vans_[id] = van;
  }
  // Waits for a delivery in progress, so the van can be destroyed afterwards.
  void Detach(int id, Van* van) {
    std::lock_guard<std::mutex> lock(deliver_mu_);
    if (vans_[id] == van) vans_.erase(id);
  }
  Status Post(int from, int to, std::string blob) {
    std::lock_guard<std::mutex> lock(queue_mu_);
    queue_.push_back({from, to, std::move(blob)});
    queue_cv_.notify_one();
    return OkStatus();
  }

 private:
  struct Blob {
    int from, to;
    std::string bytes;
  };
  LoopbackControlPlane() {
    std::thread([this] { Run(); }).detach();
  }
  void Run() {
    for (;;) {
      Blob b;
      {
        std::unique_lock<std::mutex> lock(queue_mu_);
        queue_cv_.wait(lock, [&] { return !queue_.empty(); });
        b = std::move(queue_.front());
        queue_.pop_front();
      }
      std::lock_guard<std::mutex> lock(deliver_mu_);
      auto it = vans_.find(b.to);
      if (it == vans_.end()) continue;  // the peer is gone: a lost control message
      Status s = it->second->OnRendezvousBlob(b.from, b.bytes);
      // A blob that reaches a van already stopping (a test tearing down) is CANCELLED.
      EXPECT_TRUE(s.ok() || s.code() == StatusCode::kCancelled)
          << "OnRendezvousBlob from " << b.from << ": " << s;
    }
  }
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Blob> queue_;
  int created_ = 0;
  std::mutex deliver_mu_;  // held while a blob is delivered; Detach takes it
  std::map<int, Van*> vans_;
};

// The test's receiver, plus SendRendezvous into the loopback control plane.
class PlaneReceiver : public VanReceiver {
 public:
  explicit PlaneReceiver(int id) : id_(id) {}
  void set_inner(VanReceiver* inner) { inner_ = inner; }
  Result<void*> Destination(const Meta& meta, size_t index) override {
    return inner_->Destination(meta, index);
  }
  void OnMessage(InMessage&& msg) override { inner_->OnMessage(std::move(msg)); }
  void OnDropped(const Meta& meta, const Status& why) override { inner_->OnDropped(meta, why); }
  void OnPeerFailure(int peer_id, const Status& why) override {
    inner_->OnPeerFailure(peer_id, why);
  }
  Status SendRendezvous(const char*, int peer_id, std::string blob) override {
    return LoopbackControlPlane::Get().Post(id_, peer_id, std::move(blob));
  }

 private:
  int id_;
  VanReceiver* inner_ = nullptr;
};

// Forwards to a real RdmaVan and detaches it from the control plane before it dies.
class PlaneAttachedRdmaVan : public Van {
 public:
  PlaneAttachedRdmaVan(int id, std::unique_ptr<RdmaVan> van)
      : id_(id), receiver_(id), van_(std::move(van)) {
    LoopbackControlPlane::Get().Attach(id_, van_.get());
  }
  ~PlaneAttachedRdmaVan() override {
    van_->Stop();
    LoopbackControlPlane::Get().Detach(id_, van_.get());
  }
  const char* name() const override { return van_->name(); }
  Result<int> Bind(const std::string& host, int port) override { return van_->Bind(host, port); }
  std::string endpoint() const override { return van_->endpoint(); }
  Status Start(VanReceiver* receiver) override {
    receiver_.set_inner(receiver);
    return van_->Start(&receiver_);
  }
  Status Connect(const PeerAddress& peer) override { return van_->Connect(peer); }
  void Disconnect(int peer_id) override { van_->Disconnect(peer_id); }
  Status Send(OutMessage&& msg) override { return van_->Send(std::move(msg)); }
  void Stop() override { van_->Stop(); }
  std::string PeerTransport(int peer_id) const override { return van_->PeerTransport(peer_id); }
  Status OnRendezvousBlob(int peer_id, const std::string& blob) override {
    return van_->OnRendezvousBlob(peer_id, blob);
  }
  bool RegistersMemory() const override { return van_->RegistersMemory(); }
  Status RegisterRecvBuffer(int peer_id, int64_t key, const MemoryRegion& region) override {
    return van_->RegisterRecvBuffer(peer_id, key, region);
  }
  Status RegisterMemory(const MemoryRegion& region) override {
    return van_->RegisterMemory(region);
  }
  void InvalidateMemory(const void* addr, size_t size) override {
    van_->InvalidateMemory(addr, size);
  }
  RdmaVan* rdma() { return van_.get(); }

 private:
  int id_;
  PlaneReceiver receiver_;  // outlives van_ (declared first)
  std::unique_ptr<RdmaVan> van_;
};

Status RdmaDeviceUnavailable() {
  auto options = RdmaOptionsFromEnv(ProcessEnv());
  if (!options.ok()) return options.status();
  return CheckRdmaAvailable(*options);
}

std::unique_ptr<PlaneAttachedRdmaVan> CreateDeviceRdmaVanWithId(int id) {
  auto options = RdmaOptionsFromEnv(ProcessEnv());  // MESHPOST_RDMA_DEVICE etc. apply
  EXPECT_TRUE(options.ok()) << options.status();
  if (!options.ok()) return nullptr;
  options->wait = TestOptions().wait;
  auto van = CreateRdmaVan(*options);
  EXPECT_TRUE(van.ok()) << van.status();
  if (!van.ok()) return nullptr;
  return std::make_unique<PlaneAttachedRdmaVan>(id, std::move(van).value());
}

std::unique_ptr<Van> CreateDeviceRdmaVan(VanWorld*) {
  return CreateDeviceRdmaVanWithId(LoopbackControlPlane::Get().NextId());
}

INSTANTIATE_TEST_SUITE_P(
    RdmaDevice, VanConformanceTest,
    ::testing::Values(VanFactory{"rdma_device", CreateDeviceRdmaVan, RdmaDeviceUnavailable}),
    [](const ::testing::TestParamInfo<VanFactory>& info) { return info.param.name; });

// Failure handling that only real verbs can show: pinned pages, QP state, memlock.
class RdmaDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Status why = RdmaDeviceUnavailable(); !why.ok()) GTEST_SKIP() << why.message();
    a_ = Open(kIdA, &ra_);
    b_ = Open(kIdB, &rb_);
    ASSERT_TRUE(a_ && b_);
    ASSERT_TRUE(a_->Connect({kIdB, "", 0, b_->endpoint(), getpid()}).ok());
  }
  std::unique_ptr<PlaneAttachedRdmaVan> Open(int id, RecordingReceiver* receiver) {
    auto van = CreateDeviceRdmaVanWithId(id);
    if (!van) return nullptr;
    auto bound = van->Bind("", 0);
    EXPECT_TRUE(bound.ok()) << bound.status();
    Status started = van->Start(receiver);
    EXPECT_TRUE(started.ok()) << started;
    if (!bound.ok() || !started.ok()) return nullptr;
    return van;
  }
  // One segment of `n` bytes at `data`, owned (or not) by `owner`.
  static OutMessage Push(uint64_t id, const void* data, size_t n,
                         std::shared_ptr<const void> owner) {
    OutMessage m;
    m.meta.cmd = Command::kRequest;
    m.meta.sender = kIdA;
    m.meta.recipient = kIdB;
    m.meta.id = id;
    TensorDesc d;
    d.dtype = DType::kUInt8;
    d.shape = {static_cast<int64_t>(n)};
    d.nbytes = n;
    m.meta.data.push_back(d);
    m.segments.push_back({data, n, std::move(owner)});
    return m;
  }
  // Sends `n` bytes from `data` and checks that b received exactly `fill` bytes.
  void SendAndExpect(uint64_t id, const void* data, size_t n, std::shared_ptr<const void> owner,
                     uint8_t fill) {
    ASSERT_TRUE(a_->Send(Push(id, data, n, std::move(owner))).ok());
    ASSERT_TRUE(rb_.WaitFor(1));
    auto got = rb_.TakeMessages();
    ASSERT_EQ(got.size(), 1u);
    ASSERT_EQ(got[0].segments.size(), 1u);
    const auto* p = static_cast<const uint8_t*>(got[0].segments[0].data);
    size_t wrong = 0;
    for (size_t i = 0; i < n; ++i) wrong += p[i] != fill;
    EXPECT_EQ(wrong, 0u) << "message " << id << ": " << wrong << " of " << n << " bytes are not 0x"
                         << std::hex << int{fill};
  }
  // Maps `n` bytes filled with `fill`, at `at` when given (MAP_FIXED: same address).
  static void* Map(size_t n, uint8_t fill, void* at = nullptr) {
    void* p = mmap(at, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0), -1, 0);
    if (p == MAP_FAILED) return nullptr;
    std::memset(p, fill, n);
    return p;
  }

  RecordingReceiver ra_, rb_;
  std::unique_ptr<PlaneAttachedRdmaVan> a_, b_;
};

// The classic RDMA bug: a registration cached by address outlives the memory; new pages
// mapped at the same address must not be sent through the old (still pinned) MR.
TEST_F(RdmaDeviceTest, MemoryFreedAndRemappedAtTheSameAddressIsNotSentThroughAStaleMr) {
  constexpr size_t kBytes = 4u << 20;
  void* addr = Map(kBytes, 0x11);
  ASSERT_NE(addr, nullptr);
  ReleaseCounter released;
  auto keep = std::make_shared<std::vector<uint8_t>>();  // stands in for the tensor's owner
  {
    std::shared_ptr<const void> owner = released.Track(keep);
    SendAndExpect(1, addr, kBytes, owner, 0x11);
  }
  ASSERT_TRUE(released.WaitFor(1));          // the van let go: the owner (and its MR) are dead
  ASSERT_EQ(Map(kBytes, 0x22, addr), addr);  // new pages, same address
  SendAndExpect(2, addr, kBytes, released.Track(keep), 0x22);

  // Caller-managed memory (no owner) is cached until InvalidateMemory, which the caller
  // must call before freeing it.
  SendAndExpect(3, addr, kBytes, nullptr, 0x22);
  a_->rdma()->InvalidateMemory(addr, kBytes);
  ASSERT_EQ(Map(kBytes, 0x33, addr), addr);
  SendAndExpect(4, addr, kBytes, nullptr, 0x33);
  a_->Stop();
  munmap(addr, kBytes);
}

// A peer that restarts (new process, new QP numbers, same node id) is connected afresh:
// the old connection fails and traffic reaches the new incarnation.
TEST_F(RdmaDeviceTest, PeerRestartGetsAFreshConnection) {
  std::vector<uint8_t> data(1 << 20, 0x5a);
  SendAndExpect(1, data.data(), data.size(), nullptr, 0x5a);
  b_->Stop();
  b_.reset();
  RecordingReceiver rb2;
  b_ = Open(kIdB, &rb2);
  ASSERT_TRUE(b_);
  ASSERT_TRUE(b_->Connect({kIdA, "", 0, a_->endpoint(), getpid()}).ok());
  // Until a has seen the new hello, a's sends still go to the old connection and fail with
  // it (as a restart must): b's side is ready only once a answered that hello.
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (!b_->rdma()->IsReady(kIdA) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(b_->rdma()->IsReady(kIdA)) << "the restarted peer never became ready";
  std::fill(data.begin(), data.end(), 0x6b);
  ASSERT_TRUE(a_->Send(Push(2, data.data(), data.size(), nullptr)).ok());
  ASSERT_TRUE(rb2.WaitFor(1));
  auto got = rb2.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].meta.id, 2u);
  EXPECT_EQ(static_cast<const uint8_t*>(got[0].segments[0].data)[12345], 0x6b);
  EXPECT_TRUE(rb_.TakeMessages().empty());
  a_->Stop();
}

// Registration under a small locked-memory limit fails with a status that says what to
// change. Root's CAP_IPC_LOCK ignores the limit, so a child process drops it first.
TEST(RdmaDeviceMemlockTest, SmallMemlockLimitIsAClearRegistrationError) {
  if (Status why = RdmaDeviceUnavailable(); !why.ok()) GTEST_SKIP() << why.message();
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(pipefd[0]);
    auto report = [&](int code, const std::string& what) {
      (void)!write(pipefd[1], what.data(), what.size());
      _exit(code);
    };
    rlimit small{64 << 10, 64 << 10};
    if (setrlimit(RLIMIT_MEMLOCK, &small) != 0) report(3, "setrlimit failed");
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct caps[2] = {};
    if (syscall(SYS_capget, &header, caps) != 0) report(3, "capget failed");
    for (auto& c : caps) {
      c.effective &= ~(1u << CAP_IPC_LOCK);
      c.permitted &= ~(1u << CAP_IPC_LOCK);
    }
    if (syscall(SYS_capset, &header, caps) != 0) report(3, "capset failed");
    auto options = RdmaOptionsFromEnv(ProcessEnv());
    if (!options.ok()) report(3, options.status().ToString());
    auto van = CreateRdmaVan(*options);
    if (!van.ok()) report(3, van.status().ToString());
    auto bound = (*van)->Bind("", 0);
    if (!bound.ok()) report(1, "Bind: " + bound.status().ToString());
    std::vector<uint8_t> big(16u << 20, 1);
    auto owner = std::make_shared<int>(0);
    MemoryRegion region;
    region.addr = big.data();
    region.size = big.size();
    region.owner = owner;
    Status s = (*van)->RegisterMemory(region);
    report(s.ok() ? 2 : 0, s.ToString());
  }
  close(pipefd[1]);
  std::string said;
  char buf[512];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof(buf))) > 0;) said.append(buf, n);
  close(pipefd[0]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "child died: " << status;
  ASSERT_EQ(WEXITSTATUS(status), 0) << said;
  EXPECT_NE(said.find("RESOURCE_EXHAUSTED"), std::string::npos) << said;
  EXPECT_NE(said.find("ulimit -l"), std::string::npos) << said;
  EXPECT_NE(said.find("16777216 bytes"), std::string::npos) << said;
}
#endif  // MESHPOST_HAVE_RDMA

// --- same-host van specifics ---------------------------------------------------------

class CmaVanTest : public ::testing::Test {
 protected:
  void Init(VanOptions oa, VanOptions ob) {
    support::StartConnectedCmaPair(oa, ob, kIdA, kIdB, &ra_, &rb_, &a_, &b_);
  }
  void TearDown() override {
    if (a_) a_->Stop();
    if (b_) b_->Stop();
  }
  std::unique_ptr<Van> a_, b_;
  RecordingReceiver ra_, rb_;
};

TEST_F(CmaVanTest, ReportsMechanismPerPeer) {
  VanOptions shm = TestOptions();
  shm.cma_disable = true;
  Init(TestOptions(), shm);
  EXPECT_STREQ(a_->name(), "cma");
  // Either side refusing CMA puts the pair on the shared-memory path.
  EXPECT_EQ(a_->PeerTransport(kIdB), "cma-shm");
  EXPECT_EQ(b_->PeerTransport(kIdA), "cma-shm");
}

TEST_F(CmaVanTest, UsesCmaWhenAllowed) {
  Init(TestOptions(), TestOptions());
  EXPECT_EQ(a_->PeerTransport(kIdB), "cma");
}

TEST_F(CmaVanTest, ConnectToBadEndpointFails) {
  Init(TestOptions(), TestOptions());
  EXPECT_EQ(a_->Connect({20, "", 0, "tcp://1.2.3.4:5", 0}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a_->Connect({20, "", 0, "@meshpost-cma-no-such-endpoint", 0}).code(),
            StatusCode::kUnavailable);
}

TEST_F(CmaVanTest, MalformedDoorbellFramesAreDroppedNotFatal) {
  Init(TestOptions(), TestOptions());
  const std::string name = b_->endpoint().substr(1);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  // Garbage, a truncated data frame, and a data frame claiming a remote read before any
  // handshake: each one is refused and b keeps serving a.
  const std::vector<std::string> frames = {
      std::string("hello there, not a frame"),
      std::string("\x4d\x50\x43\x4d\x01\x00\x04\x01\x01", 9),
      std::string(200, '\xff'),
  };
  for (const std::string& f : frames) {
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
    ASSERT_EQ(::send(fd, f.data(), f.size(), MSG_NOSIGNAL), static_cast<ssize_t>(f.size()));
    ::close(fd);
  }
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = kIdA;
  m.meta.recipient = kIdB;
  m.meta.id = 42;
  std::vector<uint8_t> payload(1 << 20, 7);
  TensorDesc d;
  d.nbytes = payload.size();
  d.shape = {static_cast<int64_t>(payload.size())};
  m.meta.data.push_back(d);
  m.segments.push_back({payload.data(), payload.size(), nullptr});
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].meta.id, 42u);
  EXPECT_EQ(static_cast<const uint8_t*>(got[0].segments[0].data)[12345], 7);
}

}  // namespace
}  // namespace meshpost
