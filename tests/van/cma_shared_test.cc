// The cma van's shared-block path (tensor/shared_memory.h): segments in shared blocks
// travel as (block, offset) and arrive as views or with one memcpy, a request's pull slots
// arrive as writable views, a response written into one is sent as a name and lands with
// no copy; and a hostile peer's blocks and ranges are refused without harm.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "common/wire.h"
#include "support/cma_pair.h"
#include "support/recording_receiver.h"
#include "tensor/shared_memory.h"
#include "van/cma/cma_van.h"
#include "van/cma/frame_ring.h"
#include "van/codec.h"

namespace meshpost {
namespace {

using support::RecordingReceiver;

constexpr int kIdA = 8;
constexpr int kIdB = 9;

VanOptions TestOptions(bool cma = true) {
  VanOptions o;
  o.wait.spin_ns = 20'000;
  o.connect_timeout_ms = 30'000;
  o.cma_disable = !cma;
  return o;
}

class CmaSharedTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    support::StartConnectedCmaPair(TestOptions(GetParam()), TestOptions(GetParam()), kIdA, kIdB,
                                   &ra_, &rb_, &a_, &b_);
  }
  void TearDown() override {
    if (a_) a_->Stop();
    if (b_) b_->Stop();
  }

  static TensorDesc Desc(int64_t key, size_t nbytes, const void* addr = nullptr) {
    TensorDesc d;
    d.key = key;
    d.shape = {static_cast<int64_t>(nbytes)};
    d.nbytes = nbytes;
    d.addr = reinterpret_cast<uint64_t>(addr);
    return d;
  }

  std::unique_ptr<Van> a_, b_;
  RecordingReceiver ra_, rb_;
};

TEST_P(CmaSharedTest, SharedPushArrivesAsAViewOfTheSendersBlock) {
  auto t = AllocateSharedTensor(DType::kUInt8, {128, 7168});
  ASSERT_TRUE(t.ok());
  for (size_t i = 0; i < t->nbytes(); ++i) static_cast<uint8_t*>(t->data)[i] = i % 251;
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = kIdA;
  m.meta.recipient = kIdB;
  m.meta.id = 1;
  m.meta.data.push_back(Desc(5, t->nbytes()));
  m.segments.push_back({t->data, t->nbytes(), t->owner});
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  const RecvSegment& seg = got[0].segments[0];
  ASSERT_EQ(seg.size, t->nbytes());
  ASSERT_NE(seg.owner, nullptr);  // the mapping stays while the view is held
  EXPECT_NE(seg.data, t->data);   // b's own mapping of the block
  EXPECT_EQ(std::memcmp(seg.data, t->data, t->nbytes()), 0);
  // It is a view, not a copy: a later write by the owner shows through.
  static_cast<uint8_t*>(t->data)[77] = 0xAB;
  EXPECT_EQ(static_cast<uint8_t*>(seg.data)[77], 0xAB);
  // The owner frees the block: b's view stays readable (no crash), the next send tells b.
  const uint8_t before = static_cast<uint8_t*>(seg.data)[1000];
  t->owner.reset();
  t->data = nullptr;
  EXPECT_EQ(static_cast<uint8_t*>(seg.data)[1000], before);
  OutMessage again;
  again.meta.cmd = Command::kRequest;
  again.meta.sender = kIdA;
  again.meta.recipient = kIdB;
  again.meta.id = 2;
  ASSERT_TRUE(a_->Send(std::move(again)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  EXPECT_EQ(static_cast<uint8_t*>(seg.data)[1000], before);
}

// A receiver reports the views it holds of the sender's blocks with its next frame to
// the sender, and their end the same way: how the worker knows when a shared copy of a
// push may take the next one (ps/push_staging.h).
TEST_P(CmaSharedTest, ViewsOfTheSendersBlockAreReportedBackWithTheNextFrame) {
  auto t = AllocateSharedTensor(DType::kUInt8, {1 << 20});
  ASSERT_TRUE(t.ok());
  SharedRef ref;
  ASSERT_TRUE(SharedMemoryRegistry::Get().Find(t->data, t->nbytes(), &ref));
  // a sends the block to b; b holds a view of it for as long as it keeps the message.
  auto a_pushes = [&](uint64_t id) {
    OutMessage m;
    m.meta.cmd = Command::kRequest;
    m.meta.sender = kIdA;
    m.meta.recipient = kIdB;
    m.meta.id = id;
    m.meta.data.push_back(Desc(5, t->nbytes()));
    m.segments.push_back({t->data, t->nbytes(), t->owner});
    EXPECT_TRUE(a_->Send(std::move(m)).ok());
    EXPECT_TRUE(rb_.WaitFor(1));
    auto got = rb_.TakeMessages();
    EXPECT_EQ(got.size(), 1u);
    return got;
  };
  // b's next data frame to a, which carries b's view reports; a applies them on receipt.
  auto b_answers = [&](uint64_t id) {
    OutMessage m;
    m.meta.cmd = Command::kResponse;
    m.meta.sender = kIdB;
    m.meta.recipient = kIdA;
    m.meta.id = id;
    EXPECT_TRUE(b_->Send(std::move(m)).ok());
    EXPECT_TRUE(ra_.WaitFor(1));
    ra_.TakeMessages();
  };
  auto first = a_pushes(1);
  EXPECT_EQ(ref.block->peer_views(), 0) << "not reported before b sends anything";
  b_answers(1);
  EXPECT_EQ(ref.block->peer_views(), 1) << "b's view rode on its next frame";
  // A second view of the same block (the owner rewrote it and sent it again).
  auto second = a_pushes(2);
  first.clear();  // the first view ends; the second is held
  b_answers(2);
  EXPECT_EQ(ref.block->peer_views(), 1);
  second.clear();
  b_answers(3);
  EXPECT_EQ(ref.block->peer_views(), 0) << "every view dropped";
  // b's views end with its connection too: a view held while b goes away is forgotten.
  auto held = a_pushes(3);
  b_answers(4);
  EXPECT_EQ(ref.block->peer_views(), 1);
  b_->Stop();
  for (int i = 0; i < 200 && ref.block->peer_views() != 0; ++i) usleep(10'000);
  EXPECT_EQ(ref.block->peer_views(), 0) << "the closed connection's views no longer count";
}

TEST_P(CmaSharedTest, AnswersSharedHostMemoryCapability) {
  EXPECT_TRUE(a_->SupportsMemory(MemoryKind::kSharedHost));
  EXPECT_TRUE(a_->SupportsMemory(MemoryKind::kHost));
  EXPECT_FALSE(a_->SupportsMemory(MemoryKind::kCudaDevice));
}

TEST_P(CmaSharedTest, SharedPushIntoARegisteredBufferIsOneCopy) {
  auto t = AllocateSharedTensor(DType::kInt32, {1024});
  ASSERT_TRUE(t.ok());
  for (int i = 0; i < 1024; ++i) static_cast<int32_t*>(t->data)[i] = i * 3;
  std::vector<int32_t> dest(1024, -1);
  rb_.land(5, dest.data());
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = kIdA;
  m.meta.recipient = kIdB;
  m.meta.id = 1;
  m.meta.data.push_back(Desc(5, t->nbytes()));
  m.segments.push_back({t->data, t->nbytes(), t->owner});
  ASSERT_TRUE(a_->Send(std::move(m)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].segments[0].data, dest.data());
  for (int i = 0; i < 1024; ++i) ASSERT_EQ(dest[i], i * 3);
}

TEST_P(CmaSharedTest, PullSlotsArriveWritableAndAResponseInPlaceMovesNoBytes) {
  auto slot = AllocateSharedTensor(DType::kBFloat16, {128, 7168});
  ASSERT_TRUE(slot.ok());
  std::vector<uint8_t> plain_slot(64, 0);
  OutMessage req;
  req.meta.cmd = Command::kRequest;
  req.meta.sender = kIdA;
  req.meta.recipient = kIdB;
  req.meta.id = 7;
  req.meta.slots.push_back(Desc(1, slot->nbytes(), slot->data));
  req.meta.slots.push_back(Desc(2, plain_slot.size(), plain_slot.data()));
  ASSERT_TRUE(a_->Send(std::move(req)).ok());
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].peer_slots.size(), 2u);
  const RecvSegment view = got[0].peer_slots[0];
  ASSERT_NE(view.data, nullptr);
  EXPECT_EQ(view.size, slot->nbytes());
  EXPECT_EQ(got[0].peer_slots[1].data, nullptr);  // ordinary memory: no view
  // b computes into the view; a sees it in its own tensor.
  std::memset(view.data, 0x5A, view.size);
  EXPECT_EQ(static_cast<uint8_t*>(slot->data)[12345], 0x5A);
  // b answers with the view itself: a receives the segment in place.
  ra_.land(1, slot->data);
  OutMessage resp;
  resp.meta.cmd = Command::kResponse;
  resp.meta.sender = kIdB;
  resp.meta.recipient = kIdA;
  resp.meta.id = 7;
  resp.meta.data.push_back(Desc(1, view.size));
  resp.segments.push_back({view.data, view.size, view.owner});
  ASSERT_TRUE(b_->Send(std::move(resp)).ok());
  ASSERT_TRUE(ra_.WaitFor(1));
  auto back = ra_.TakeMessages();
  ASSERT_EQ(back.size(), 1u);
  EXPECT_EQ(back[0].segments[0].data, slot->data);
  EXPECT_EQ(static_cast<uint8_t*>(slot->data)[slot->nbytes() - 1], 0x5A);
  // A response of b's own memory to a shared slot is still one copy into the slot.
  std::vector<uint8_t> answer(slot->nbytes(), 0x11);
  OutMessage resp2;
  resp2.meta.cmd = Command::kResponse;
  resp2.meta.sender = kIdB;
  resp2.meta.recipient = kIdA;
  resp2.meta.id = 8;
  resp2.meta.data.push_back(Desc(1, answer.size()));
  resp2.segments.push_back({answer.data(), answer.size(), nullptr});
  ASSERT_TRUE(b_->Send(std::move(resp2)).ok());
  ASSERT_TRUE(ra_.WaitFor(1));
  EXPECT_EQ(static_cast<uint8_t*>(slot->data)[4096], 0x11);
}

INSTANTIATE_TEST_SUITE_P(CmaAndShm, CmaSharedTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "cma" : "cma_shm"; });

// --- a hostile peer speaking the doorbell protocol by hand ----------------------------

constexpr uint32_t kMagic = 0x4D43504D;
constexpr uint16_t kVersion = 2;
constexpr uint8_t kHello = 1, kBlock = 7, kData = 4, kRing = 11, kWake = 12;
constexpr uint8_t kInline = 0, kShared = 3, kPeerShared = 4;
constexpr uint8_t kFlagSlots = 4;

struct Src {
  uint8_t kind;
  uint32_t id;
  uint64_t offset;
  uint64_t len;
};

class HostilePeerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    b_ = CreateCmaVan(TestOptions(false));
    ASSERT_TRUE(b_->Bind("", 0).ok());
    ASSERT_TRUE(b_->Start(&rb_).ok());
    const std::string name = b_->endpoint().substr(1);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name.data(), name.size());
    const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    fd_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd_, 0);
    ASSERT_EQ(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), len), 0);
    WireWriter w;
    Preamble(&w, kHello, 0);
    w.Put<uint32_t>(static_cast<uint32_t>(getpid()));
    w.Put<uint64_t>(0);
    w.Put<uint32_t>(16);
    uint8_t cookie[16] = {0};
    w.PutBytes(cookie, 16);
    w.Put<uint8_t>(0);  // no CMA
    SendRaw(w);
    char ack[64];
    ASSERT_GT(::recv(fd_, ack, sizeof(ack), 0), 0);
  }
  void TearDown() override {
    if (fd_ >= 0) ::close(fd_);
    if (ring_fd_ >= 0) ::close(ring_fd_);
    b_->Stop();
  }
  static void Preamble(WireWriter* w, uint8_t type, uint8_t flags) {
    w->Put<uint32_t>(kMagic);
    w->Put<uint16_t>(kVersion);
    w->Put<uint8_t>(type);
    w->Put<uint8_t>(flags);
  }
  // From now on frames go through a frame ring passed to b, as the van's own connector
  // sends them: the ring for frames without a descriptor, else the socket plus a marker.
  void UseRing() {
    int ring_fd = -1;
    auto ring = cma::FrameRing::Create(4096, &ring_fd);
    ASSERT_TRUE(ring.ok());
    WireWriter w;
    Preamble(&w, kRing, 0);
    SendRaw(w, ring_fd);
    ring_fd_ = ring_fd;
    ring_ = std::move(ring).value();
  }
  void SendRaw(WireWriter& w, int pass_fd = -1) {
    if (ring_ && pass_fd < 0) {
      auto wrote = ring_->TryWrite(cma::FrameRing::kFrame, w.buffer().data(), w.size());
      ASSERT_TRUE(wrote.ok() && *wrote);
      RingIfAsleep();
      return;
    }
    SendSocket(w, pass_fd);
    if (ring_) {
      auto wrote = ring_->TryWrite(cma::FrameRing::kMarker, nullptr, 0);
      ASSERT_TRUE(wrote.ok() && *wrote);
      RingIfAsleep();
    }
  }
  void RingIfAsleep() {
    if (!ring_->TakeSleeper()) return;
    WireWriter w;
    Preamble(&w, kWake, 0);
    SendSocket(w, -1);
  }
  void SendSocket(WireWriter& w, int pass_fd) {
    iovec iov{const_cast<char*>(reinterpret_cast<const char*>(w.buffer().data())), w.size()};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (pass_fd >= 0) {
      std::memset(control, 0, sizeof(control));
      mh.msg_control = control;
      mh.msg_controllen = sizeof(control);
      cmsghdr* c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    ASSERT_EQ(::sendmsg(fd_, &mh, MSG_NOSIGNAL), static_cast<ssize_t>(w.size()));
  }
  // A block of `size` bytes (sealed or not) passed to b as `id`.
  int PassBlock(uint32_t id, size_t size, bool sealed, uint64_t announced) {
    int fd = ::memfd_create("hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
    if (sealed) {
      EXPECT_EQ(::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    }
    WireWriter w;
    Preamble(&w, kBlock, 0);
    w.Put<uint32_t>(id);
    w.Put<uint64_t>(announced);
    SendRaw(w, fd);
    return fd;
  }
  // A request with one data segment from `seg` and optionally a one-entry slot table.
  void SendData(uint64_t id, Src seg, const Src* slot = nullptr) {
    Meta meta;
    meta.cmd = Command::kRequest;
    meta.sender = kIdA;
    meta.recipient = kIdB;
    meta.id = id;
    TensorDesc d;
    d.key = 1;
    d.shape = {static_cast<int64_t>(seg.len)};
    d.nbytes = seg.len;
    meta.data.push_back(d);
    if (slot) {
      TensorDesc s = d;
      s.nbytes = 4096;
      s.shape = {4096};
      meta.slots.push_back(s);
    }
    const std::string header = EncodeMeta(meta);
    WireWriter w;
    Preamble(&w, kData, slot ? kFlagSlots : 0);
    w.Put<uint64_t>(id);
    w.Put<uint32_t>(1);
    auto put = [&](const Src& s) {
      w.Put<uint8_t>(s.kind);
      w.Put<uint32_t>(s.id);
      w.Put<uint64_t>(s.offset);
      w.Put<uint64_t>(s.len);
    };
    put({kInline, 0, 0, header.size()});
    put(seg);
    if (slot) {
      w.Put<uint32_t>(1);
      put(*slot);
    }
    w.PutBytes(header.data(), header.size());
    SendRaw(w);
  }

  void OutOfRangeUnknownAndForeignBlocks();

  std::unique_ptr<Van> b_;
  RecordingReceiver rb_;
  int fd_ = -1;
  std::unique_ptr<cma::FrameRing> ring_;
  int ring_fd_ = -1;
};

TEST_F(HostilePeerTest, OutOfRangeUnknownAndForeignBlocksAreRefused) {
  OutOfRangeUnknownAndForeignBlocks();
}

// The same through a frame ring: blocks (with descriptors) on the socket, marked in the
// ring; requests in the ring, in order with them.
TEST_F(HostilePeerTest, OutOfRangeUnknownAndForeignBlocksAreRefusedThroughTheFrameRing) {
  UseRing();
  OutOfRangeUnknownAndForeignBlocks();
}

// Whether b closed the connection within 5 s: EOF, or ECONNRESET when b closed it with
// frames of ours still unread (it may notice a corrupt ring before it reads our kWake).
bool ClosedByPeer(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 5000) != 1) return false;
  char buf[256];
  const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

TEST_F(HostilePeerTest, ACorruptFrameRingClosesThatConnection) {
  UseRing();
  SendData(30, {kInline, 0, 0, 0});
  ASSERT_TRUE(rb_.WaitFor(1));  // b attached the ring and reads it
  rb_.TakeMessages();
  // The connector publishes more than the ring holds, and rings the doorbell.
  void* map = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ring_fd_, 0);
  ASSERT_NE(map, MAP_FAILED);
  *reinterpret_cast<volatile uint64_t*>(static_cast<char*>(map) + 64) += uint64_t{1} << 20;
  WireWriter w;
  Preamble(&w, kWake, 0);
  SendSocket(w, -1);
  EXPECT_TRUE(ClosedByPeer(fd_));
  ::munmap(map, 4096);
}

TEST_F(HostilePeerTest, AnUnsealedFrameRingIsRefused) {
  int raw = ::memfd_create("ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(::ftruncate(raw, 8192), 0);
  WireWriter w;
  Preamble(&w, kRing, 0);
  SendRaw(w, raw);
  ::close(raw);
  EXPECT_TRUE(ClosedByPeer(fd_));
}

void HostilePeerTest::OutOfRangeUnknownAndForeignBlocks() {
  const size_t kSize = 1 << 20;
  int good = PassBlock(1, kSize, true, kSize);
  char* mine =
      static_cast<char*>(::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, good, 0));
  ASSERT_NE(mine, MAP_FAILED);
  std::memset(mine, 0x42, kSize);
  int unsealed = PassBlock(2, kSize, false, kSize);  // refused: could shrink under b
  int liar = PassBlock(3, 4096, true, kSize);        // refused: smaller than announced
  auto own = AllocateShared(4096);                   // b's block, never passed to us
  ASSERT_TRUE(own.ok());

  SendData(10, {kShared, 1, kSize - 100, 200});       // crosses the end
  SendData(11, {kShared, 1, ~uint64_t{0} - 10, 20});  // offset overflow
  SendData(12, {kShared, 2, 0, 100});                 // unsealed, never mapped
  SendData(13, {kShared, 3, 0, 100});                 // lied about its size
  SendData(14, {kShared, 99, 0, 100});                // never passed
  SendData(15, {kPeerShared, (*own)->id(), 0, 100});  // b's block, not ours to name
  const Src bad_slot{kShared, 1, kSize - 10, 4096};
  SendData(16, {kInline, 0, 0, 0}, &bad_slot);  // slot outside the block
  const Src short_slot{kShared, 1, 0, 100};
  SendData(17, {kInline, 0, 0, 0}, &short_slot);  // slot size != descriptor
  ASSERT_TRUE(rb_.WaitFor(0, 8));
  auto dropped = rb_.TakeDropped();
  ASSERT_EQ(dropped.size(), 8u);
  for (const auto& [meta, why] : dropped) {
    EXPECT_EQ(why.code(), StatusCode::kDataLoss) << meta.id << ": " << why.ToString();
  }
  // The connection still works: an in-range read of the good block is delivered.
  const Src slot{kShared, 1, 8192, 4096};
  SendData(20, {kShared, 1, 4096, 100}, &slot);
  ASSERT_TRUE(rb_.WaitFor(1));
  auto got = rb_.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(static_cast<uint8_t*>(got[0].segments[0].data)[99], 0x42);
  ASSERT_EQ(got[0].peer_slots.size(), 1u);
  static_cast<char*>(got[0].peer_slots[0].data)[0] = 0x17;
  EXPECT_EQ(mine[8192], 0x17);
  ::munmap(mine, kSize);
  ::close(good);
  ::close(unsealed);
  ::close(liar);
}

}  // namespace
}  // namespace meshpost
