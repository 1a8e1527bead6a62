// Protocol tests of the RDMA engine over the scripted fake: rendezvous, data path, inline
// limits, flow control, re-rendezvous, completion-to-handle mapping and every error path.
#include "van/rdma/rdma_transport.h"

#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"

namespace meshpost {
namespace rdma {
namespace testing {
namespace {

constexpr int kWorker = 9;
constexpr int kServer = 8;

bool Contains(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

class RdmaTransportTest : public ::testing::Test {
 protected:
  void Pair(FakeDeviceSpec ws = RoceSpec("mlx5_0", 1), FakeDeviceSpec ss = RoceSpec("mlx5_0", 2),
            RdmaOptions wo = {}, RdmaOptions so = {}) {
    w_ = cluster_.Add(kWorker, ws, wo);
    s_ = cluster_.Add(kServer, ss, so);
    ASSERT_NE(w_, nullptr) << cluster_.create_status;
    ASSERT_NE(s_, nullptr) << cluster_.create_status;
  }
  void Connect() {
    ASSERT_TRUE(w_->t->Connect(kServer).ok());
    cluster_.Settle();
    ASSERT_EQ(w_->t->state(kServer), PeerState::kReady);
    ASSERT_EQ(s_->t->state(kWorker), PeerState::kReady);
  }
  uint64_t Push(int64_t key, const std::shared_ptr<std::vector<uint8_t>>& bytes, uint64_t id = 1) {
    auto h = w_->t->Send(MakePush(kWorker, kServer, key, bytes, id), false);
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : 0;
  }
  static std::vector<uint8_t> Data(const RecvSegment& s) {
    const auto* p = static_cast<const uint8_t*>(s.data);
    return std::vector<uint8_t>(p, p + s.size);
  }

  FakeCluster cluster_;
  TestNode* w_ = nullptr;
  TestNode* s_ = nullptr;
};

// --- rendezvous -------------------------------------------------------------------------

TEST_F(RdmaTransportTest, RendezvousBringsBothSidesUpWithOneHelloEach) {
  Pair();
  Connect();
  EXPECT_EQ(cluster_.CountSent(BlobType::kHello), 2);
  EXPECT_TRUE(w_->t->Connect(kServer).ok());  // idempotent
  cluster_.Settle();
  EXPECT_EQ(cluster_.CountSent(BlobType::kHello), 2);
}

TEST_F(RdmaTransportTest, SimultaneousConnectConverges) {
  Pair();
  ASSERT_TRUE(w_->t->Connect(kServer).ok());
  ASSERT_TRUE(s_->t->Connect(kWorker).ok());
  cluster_.Settle();
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kReady);
  EXPECT_EQ(cluster_.CountSent(BlobType::kHello), 2);
  auto h = Push(1, Bytes(100, 1));
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  EXPECT_EQ(s_->recv.messages.size(), 1u);
}

TEST_F(RdmaTransportTest, DuplicateHelloIsIgnored) {
  Pair();
  Connect();
  const Blobbed hello = cluster_.sent[0];  // worker's hello
  ASSERT_TRUE(s_->t->OnControlBlob(hello.from, hello.blob.data(), hello.blob.size()).ok());
  cluster_.Settle();
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kReady);
  EXPECT_TRUE(s_->failures.empty());
}

TEST_F(RdmaTransportTest, PeerRestartWithNewQueuePairReconnects) {
  Pair();
  Connect();
  // The worker process "restarts": a new transport on a new host sends a fresh hello.
  cluster_.fabric.set_hold(true);
  auto pending = Push(1, Bytes(64, 1));  // in flight on the old QP (completion held)
  cluster_.fabric.Release();
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(pending, 0).ok());
  cluster_.nodes.erase(kWorker);
  w_ = cluster_.Add(kWorker, RoceSpec("mlx5_0", 3));
  ASSERT_NE(w_, nullptr);
  ASSERT_TRUE(w_->t->Connect(kServer).ok());
  cluster_.Settle();
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kReady);
  ASSERT_EQ(s_->failures.size(), 1u);  // the old connection was declared dead once
  EXPECT_TRUE(Contains(s_->failures[0].second.message(), "re-connected"));
  auto h = Push(2, Bytes(64, 2));
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(h, 0).ok());
}

TEST_F(RdmaTransportTest, DrainWaitsForInFlightAndQueuedSends) {
  Pair();
  Connect();
  EXPECT_TRUE(w_->t->Drain(0).ok());
  cluster_.fabric.set_hold(true);
  auto h = Push(1, Bytes(64, 1));  // posted; its completion is held
  Status busy = w_->t->Drain(0);
  EXPECT_EQ(busy.code(), StatusCode::kDeadlineExceeded) << busy;
  EXPECT_TRUE(Contains(busy.message(), "1 message(s)")) << busy;
  cluster_.fabric.Release();
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Drain(0).ok());
  EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  EXPECT_EQ(s_->recv.messages.size(), 1u);
}

TEST_F(RdmaTransportTest, MalformedBlobChangesNothing) {
  Pair();
  const std::string junk = "MPRD garbage";
  Status s = s_->t->OnControlBlob(kWorker, junk.data(), junk.size());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(s.message(), "node 9"));
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kNone);
  std::string hello = EncodeHello(ConnInfo{});  // qpn 0
  EXPECT_EQ(s_->t->OnControlBlob(kWorker, hello.data(), hello.size()).code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kNone);
  // Advertisements before any connection are refused, not applied.
  std::string adv = EncodeAdvertise({{1, 0x1000, 1, 8}});
  EXPECT_EQ(s_->t->OnControlBlob(kWorker, adv.data(), adv.size()).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_TRUE(cluster_.wire.empty());
}

// --- data path --------------------------------------------------------------------------

TEST_F(RdmaTransportTest, PushLandsInRegisteredRecvBufferWithoutCopies) {
  Pair();
  std::vector<uint8_t> buffer(4096, 0);
  ASSERT_TRUE(s_->t->RegisterRecvBuffer(kWorker, 7, buffer.data(), buffer.size()).ok());
  Connect();
  EXPECT_EQ(cluster_.CountSent(BlobType::kAdvertise), 1);
  auto payload = Bytes(3000, 5);
  auto h = Push(7, payload);
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 1u);
  const InMessage& in = s_->recv.messages[0];
  ASSERT_EQ(in.segments.size(), 1u);
  EXPECT_EQ(in.segments[0].data, buffer.data());
  EXPECT_EQ(in.segments[0].owner, nullptr);
  EXPECT_EQ(Data(in.segments[0]), *payload);
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), 0);
}

TEST_F(RdmaTransportTest, UnregisteredKeyGetsPooledBufferOnceAndAddressIsCached) {
  Pair();
  Connect();
  auto h1 = Push(3, Bytes(1000, 1), 1);
  cluster_.Settle();
  auto h2 = Push(3, Bytes(900, 2), 2);
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(h1, 0).ok());
  EXPECT_TRUE(w_->t->Wait(h2, 0).ok());
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), 1);
  ASSERT_EQ(s_->recv.messages.size(), 2u);
  EXPECT_NE(s_->recv.messages[1].segments[0].owner, nullptr);  // van-owned
  EXPECT_EQ(Data(s_->recv.messages[1].segments[0]), *Bytes(900, 2));
  // The pool buffer is reused, the delivered messages keep their own bytes.
  EXPECT_EQ(Data(s_->recv.messages[0].segments[0]), *Bytes(1000, 1));
}

// Regression (issue 13, gap a): a second push to a key used to overwrite the van buffer
// while the receiver still held the first message.
TEST_F(RdmaTransportTest, BackToBackPushesToOneKeyNeverOverwriteAHeldMessage) {
  Pair();
  Connect();
  auto h0 = Push(3, Bytes(4096, 1), 0);  // settle the van buffer for key 3
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h0, 0).ok());
  cluster_.fabric.clear_writes();
  std::vector<uint64_t> handles;
  for (uint64_t i = 1; i <= 6; ++i) handles.push_back(Push(3, Bytes(4096, uint8_t(10 + i)), i));
  // One message at a time may use the buffer: the rest wait for its credit.
  EXPECT_EQ(w_->t->pending_sends(kServer), 5u);
  cluster_.Settle();
  for (auto h : handles) EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 7u);
  for (uint64_t i = 0; i <= 6; ++i) {
    EXPECT_EQ(s_->recv.messages[i].meta.id, i);
    EXPECT_EQ(Data(s_->recv.messages[i].segments[0]), *Bytes(4096, i == 0 ? 1 : uint8_t(10 + i)))
        << "message " << i;
  }
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), 1);  // no re-rendezvous per message
}

TEST_F(RdmaTransportTest, OversizedPushReRendezvousesInsteadOfOverrunning) {
  Pair();
  Connect();
  auto h1 = Push(3, Bytes(1000, 1), 1);
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h1, 0).ok());
  cluster_.fabric.clear_writes();
  auto big = Bytes(5000, 9);
  auto h2 = Push(3, big, 2);
  EXPECT_EQ(w_->t->pending_sends(kServer), 1u);   // waits for the new buffer
  EXPECT_TRUE(cluster_.fabric.writes().empty());  // nothing was written into the old one
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h2, 0).ok());
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), 2);
  ASSERT_EQ(s_->recv.messages.size(), 2u);
  EXPECT_EQ(Data(s_->recv.messages[1].segments[0]), *big);
  // Both messages' buffers are valid: the first (retired) buffer is still owned.
  EXPECT_NE(s_->recv.messages[0].segments[0].data, s_->recv.messages[1].segments[0].data);
}

TEST_F(RdmaTransportTest, OversizedPushIntoCallerBufferIsRefusedNotOverrun) {
  Pair();
  std::vector<uint8_t> buffer(512, 0xEE);
  ASSERT_TRUE(s_->t->RegisterRecvBuffer(kWorker, 7, buffer.data(), buffer.size()).ok());
  Connect();
  auto h = Push(7, Bytes(600, 1));
  cluster_.Settle();
  Status st = w_->t->Wait(h, 0);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(st.message(), "key 7")) << st;
  EXPECT_TRUE(Contains(st.message(), "512")) << st;
  EXPECT_EQ(buffer, std::vector<uint8_t>(512, 0xEE));
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);  // only that send failed
  auto ok = Push(7, Bytes(512, 2), 2);
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(ok, 0).ok());
}

TEST_F(RdmaTransportTest, PullResponseIsWrittenStraightIntoTheWorkersSlot) {
  Pair();
  Connect();
  std::vector<uint8_t> pull(256, 0);
  w_->recv.destinations[11] = pull.data();
  OutMessage req = MakePush(kWorker, kServer, 3, Bytes(100, 1));
  TensorDesc slot;
  slot.key = 11;
  slot.shape = {static_cast<int64_t>(pull.size())};
  slot.nbytes = pull.size();
  slot.addr = reinterpret_cast<uint64_t>(pull.data());
  req.meta.slots.push_back(slot);
  auto h = w_->t->Send(std::move(req), false);
  ASSERT_TRUE(h.ok());
  cluster_.Settle();
  ASSERT_EQ(s_->recv.messages.size(), 1u);
  const int needs_before = cluster_.CountSent(BlobType::kNeedBuffer);
  auto result = Bytes(256, 42);
  auto resp = MakePush(kServer, kWorker, 11, result);
  resp.meta.cmd = Command::kResponse;
  auto rh = s_->t->Send(std::move(resp), false);
  ASSERT_TRUE(rh.ok()) << rh.status();
  cluster_.Settle();
  ASSERT_TRUE(s_->t->Wait(*rh, 0).ok());
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), needs_before);  // rkey came in-band
  ASSERT_EQ(w_->recv.messages.size(), 1u);
  EXPECT_EQ(w_->recv.messages[0].segments[0].data, pull.data());
  EXPECT_EQ(pull, *result);
}

// Found on soft-RoCE across two VMs: with several requests of one worker in flight using
// the same pull key, each response must land in the slot of the request it answers.
TEST_F(RdmaTransportTest, ResponsesToRequestsInFlightWithOnePullKeyLandInTheirOwnSlots) {
  Pair();
  Connect();
  std::vector<std::vector<uint8_t>> pulls(3, std::vector<uint8_t>(128, 0));
  for (uint64_t id = 1; id <= 3; ++id) {
    OutMessage req = MakePush(kWorker, kServer, 3, Bytes(100, 1), id);
    TensorDesc slot;
    slot.key = 11;
    slot.shape = {128};
    slot.nbytes = 128;
    slot.addr = reinterpret_cast<uint64_t>(pulls[id - 1].data());
    req.meta.slots.push_back(slot);
    ASSERT_TRUE(w_->t->Send(std::move(req), true).ok());
  }
  cluster_.Settle();
  ASSERT_EQ(s_->recv.messages.size(), 3u);
  for (uint64_t id = 1; id <= 3; ++id) {  // answered oldest first, after all three arrived
    auto resp = MakePush(kServer, kWorker, 11, Bytes(128, static_cast<uint8_t>(10 * id)), id);
    resp.meta.cmd = Command::kResponse;
    auto rh = s_->t->Send(std::move(resp), false);
    ASSERT_TRUE(rh.ok()) << rh.status();
    cluster_.Settle();
    ASSERT_TRUE(s_->t->Wait(*rh, 0).ok());
  }
  ASSERT_EQ(w_->recv.messages.size(), 3u);  // none dropped as outside the advertised slots
  for (uint64_t id = 1; id <= 3; ++id) {
    EXPECT_EQ(w_->recv.messages[id - 1].meta.id, id);
    EXPECT_EQ(pulls[id - 1], *Bytes(128, static_cast<uint8_t>(10 * id))) << "request " << id;
  }
}

TEST_F(RdmaTransportTest, ResponseLargerThanPullSlotIsRefused) {
  Pair();
  Connect();
  std::vector<uint8_t> pull(64, 0);
  OutMessage req = MakePush(kWorker, kServer, 3, Bytes(10, 1));
  TensorDesc slot;
  slot.key = 11;
  slot.shape = {static_cast<int64_t>(pull.size())};
  slot.nbytes = pull.size();
  slot.addr = reinterpret_cast<uint64_t>(pull.data());
  req.meta.slots.push_back(slot);
  ASSERT_TRUE(w_->t->Send(std::move(req), true).ok());
  cluster_.Settle();
  auto resp = MakePush(kServer, kWorker, 11, Bytes(65, 1));
  auto rh = s_->t->Send(std::move(resp), false);
  ASSERT_TRUE(rh.ok());
  cluster_.Settle();
  Status st = s_->t->Wait(*rh, 0);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(pull, std::vector<uint8_t>(64, 0));
}

TEST_F(RdmaTransportTest, ReceiverDestinationElsewhereGetsOneCopyAndRefusalDrops) {
  Pair();
  Connect();
  std::vector<uint8_t> dest(100, 0);
  s_->recv.destinations[4] = dest.data();
  auto h = Push(4, Bytes(100, 3));
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 1u);
  EXPECT_EQ(s_->recv.messages[0].segments[0].data, dest.data());
  EXPECT_EQ(dest, *Bytes(100, 3));
  s_->recv.refuse = true;
  Push(4, Bytes(100, 4), 2);
  cluster_.Settle();
  ASSERT_EQ(s_->recv.dropped.size(), 1u);
  EXPECT_EQ(s_->recv.dropped[0].first.id, 2u);
}

TEST_F(RdmaTransportTest, EmptyPayloadAndControlOnlyMessages) {
  Pair();
  Connect();
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = kWorker;
  m.meta.recipient = kServer;
  m.meta.body = "hello";
  TensorDesc d;
  d.key = 1;
  d.shape = {0};
  m.meta.data.push_back(d);
  m.segments.push_back({nullptr, 0, nullptr});
  auto h = w_->t->Send(std::move(m), false);
  ASSERT_TRUE(h.ok());
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(*h, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 1u);
  EXPECT_EQ(s_->recv.messages[0].meta.body, "hello");
  EXPECT_EQ(cluster_.CountSent(BlobType::kNeedBuffer), 0);
}

// --- inline limits ----------------------------------------------------------------------

void ExpectInlineWithin(const FakeFabric& f, uint32_t limit) {
  EXPECT_EQ(f.inline_violations(), 0);
  for (const auto& w : f.writes()) {
    if (w.wr.inline_data) {
      EXPECT_LE(w.wr.length, limit);
    }
  }
}

TEST_F(RdmaTransportTest, SmallHeaderGoesInlineWithinTheGrantedLimit) {
  Pair();
  Connect();
  EXPECT_EQ(w_->t->max_inline(kServer), 220u);  // requested 256, NIC granted 220
  cluster_.fabric.clear_writes();
  auto h = Push(1, Bytes(4096, 1));
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(h, 0).ok());
  int headers = 0;
  for (const auto& w : cluster_.fabric.writes()) {
    if (w.wr.with_imm && ImmKindOf(w.wr.imm) == ImmKind::kHeader) {
      ++headers;
      EXPECT_TRUE(w.wr.inline_data);
      EXPECT_TRUE(w.wr.signaled);
    } else if (!w.wr.with_imm) {
      EXPECT_FALSE(w.wr.inline_data);  // 4 KiB payload is never inlined
      EXPECT_FALSE(w.wr.signaled);
      EXPECT_NE(w.wr.lkey, 0u);
    }
  }
  EXPECT_EQ(headers, 1);
  ExpectInlineWithin(cluster_.fabric, 220);
}

TEST_F(RdmaTransportTest, NicWithSmallInlineLimitNeverGetsMoreInlined) {
  FakeDeviceSpec small = RoceSpec("bnxt_re0", 1);
  small.max_inline = 64;  // e.g. a non-mlx5 NIC
  FakeDeviceSpec none = RoceSpec("rxe0", 2);
  none.max_inline = 0;
  Pair(small, none);
  Connect();
  EXPECT_EQ(w_->t->max_inline(kServer), 64u);
  EXPECT_EQ(s_->t->max_inline(kWorker), 0u);
  cluster_.fabric.clear_writes();
  const int regs_before = cluster_.fabric.registrations();
  auto tiny = Push(1, Bytes(32, 1), 1);  // payload fits inline: no registration needed
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(tiny, 0).ok());
  OutMessage big_header = MakePush(kWorker, kServer, 2, Bytes(16, 2), 2);
  big_header.meta.body = std::string(300, 'b');  // header well over 64 bytes
  auto h = w_->t->Send(std::move(big_header), false);
  ASSERT_TRUE(h.ok());
  cluster_.Settle();
  ASSERT_TRUE(w_->t->Wait(*h, 0).ok());
  ExpectInlineWithin(cluster_.fabric, 64);
  bool saw_staged_header = false;
  for (const auto& w : cluster_.fabric.writes()) {
    if (w.qpn != 0 && w.wr.with_imm && ImmKindOf(w.wr.imm) == ImmKind::kHeader &&
        !w.wr.inline_data) {
      saw_staged_header = true;
      EXPECT_NE(w.wr.lkey, 0u);
    }
  }
  EXPECT_TRUE(saw_staged_header);
  // The worker registered nothing for its 32- and 16-byte payloads.
  const int server_pool_regs = 2;  // one pooled buffer per key on the server
  EXPECT_EQ(cluster_.fabric.registrations() - regs_before, server_pool_regs);
  ASSERT_EQ(s_->recv.messages.size(), 2u);
  EXPECT_EQ(s_->recv.messages[1].meta.body, std::string(300, 'b'));
  // Responses from the server (max inline 0) are never inlined at all.
  cluster_.fabric.clear_writes();
  auto resp = MakePush(kServer, kWorker, 5, Bytes(8, 1));
  auto rh = s_->t->Send(std::move(resp), false);
  ASSERT_TRUE(rh.ok());
  cluster_.Settle();
  ASSERT_TRUE(s_->t->Wait(*rh, 0).ok());
  ExpectInlineWithin(cluster_.fabric, 64);
  for (const auto& w : cluster_.fabric.writes()) {
    if (w.wr.length > 0 && w.wr.with_imm && ImmKindOf(w.wr.imm) == ImmKind::kHeader) {
      EXPECT_FALSE(w.wr.inline_data);
    }
  }
}

// Regression (issue 13, gap b): a header over the peer's slot used to be refused.
TEST_F(RdmaTransportTest, HeaderLargerThanSlotGoesOutOfLine) {
  RdmaOptions small;
  small.header_slot_bytes = 256;
  Pair(RoceSpec("mlx5_0", 1), RoceSpec("mlx5_0", 2), small, small);
  Connect();
  std::vector<uint64_t> handles;
  for (uint64_t i = 0; i < 3; ++i) {
    OutMessage m = MakePush(kWorker, kServer, 1, Bytes(8, uint8_t(i)), i);
    m.meta.body = std::string(300000 + i, char('a' + i));
    auto h = w_->t->Send(std::move(m), false);
    ASSERT_TRUE(h.ok()) << h.status();
    handles.push_back(*h);
  }
  OutMessage small_body = MakePush(kWorker, kServer, 1, Bytes(8, 9), 3);
  small_body.meta.body = "inline";
  auto hs = w_->t->Send(std::move(small_body), false);
  ASSERT_TRUE(hs.ok());
  cluster_.Settle();
  for (auto h : handles) EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  EXPECT_TRUE(w_->t->Wait(*hs, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 4u);
  for (uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(s_->recv.messages[i].meta.body, std::string(300000 + i, char('a' + i)));
    EXPECT_EQ(Data(s_->recv.messages[i].segments[0]), *Bytes(8, uint8_t(i)));
  }
  EXPECT_EQ(s_->recv.messages[3].meta.body, "inline");
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);
}

TEST_F(RdmaTransportTest, HeaderOverTheLimitAndTheReservedKeyFailAtTheCall) {
  Pair();
  Connect();
  OutMessage m = MakePush(kWorker, kServer, 1, Bytes(8, 1));
  m.meta.body = std::string((17u << 20) + 1, 'x');
  auto h = w_->t->Send(std::move(m), false);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
  OutMessage r = MakePush(kWorker, kServer, kHeaderBodyKey, Bytes(8, 1));
  auto hr = w_->t->Send(std::move(r), false);
  ASSERT_FALSE(hr.ok());
  EXPECT_EQ(hr.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(hr.status().message(), "reserved")) << hr.status();
  auto ok = Push(1, Bytes(8, 2));
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(ok, 0).ok());
}

// --- flow control and completion-to-handle mapping --------------------------------------

TEST_F(RdmaTransportTest, CreditsBoundInFlightHeadersAndOrderIsKept) {
  RdmaOptions two;
  two.header_slots = 2;
  Pair(RoceSpec("mlx5_0", 1), RoceSpec("mlx5_0", 2), two, two);
  std::vector<uint8_t> buffer(64);
  ASSERT_TRUE(s_->t->RegisterRecvBuffer(kWorker, 1, buffer.data(), buffer.size()).ok());
  Connect();
  cluster_.fabric.set_hold(true);
  std::vector<uint64_t> handles;
  for (uint64_t i = 0; i < 5; ++i) handles.push_back(Push(1, Bytes(16, 1), i));
  EXPECT_EQ(w_->t->pending_sends(kServer), 3u);  // two slots on the server
  for (auto h : handles) EXPECT_FALSE(w_->t->IsDone(h));
  cluster_.fabric.Release();
  cluster_.Settle();
  for (auto h : handles) EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  ASSERT_EQ(s_->recv.messages.size(), 5u);
  for (uint64_t i = 0; i < 5; ++i) EXPECT_EQ(s_->recv.messages[i].meta.id, i);
}

TEST_F(RdmaTransportTest, HandleCompletesOnlyAtItsHeaderCompletionAndReleasesOwners) {
  Pair();
  Connect();
  Push(1, Bytes(1000, 1));  // settle the pooled buffer for key 1
  cluster_.Settle();
  cluster_.fabric.set_hold(true);
  auto payload = Bytes(1000, 2);
  std::weak_ptr<std::vector<uint8_t>> watch = payload;
  auto h = Push(1, payload, 2);
  payload.reset();
  EXPECT_FALSE(watch.expired());  // the van keeps the tensor alive while in flight
  EXPECT_EQ(w_->t->Progress(), 0);
  EXPECT_FALSE(w_->t->IsDone(h));
  EXPECT_EQ(w_->t->Wait(h, 0).code(), StatusCode::kDeadlineExceeded);
  cluster_.fabric.Release();
  cluster_.Settle();
  EXPECT_TRUE(w_->t->IsDone(h));
  EXPECT_TRUE(watch.expired());
  EXPECT_TRUE(w_->t->Wait(h, 0).ok());
  EXPECT_EQ(w_->t->Wait(h, 0).code(), StatusCode::kNotFound);  // completes exactly once
}

TEST_F(RdmaTransportTest, PayloadRegistrationIsCachedAcrossSends) {
  Pair();
  Connect();
  auto payload = Bytes(8192, 1);
  for (uint64_t i = 0; i < 3; ++i) {
    auto h = Push(1, payload, i);
    cluster_.Settle();
    ASSERT_TRUE(w_->t->Wait(h, 0).ok());
  }
  EXPECT_EQ(w_->t->mr_stats().misses, 1u);
  EXPECT_EQ(w_->t->mr_stats().hits, 2u);
}

// --- error paths ------------------------------------------------------------------------

class CompletionErrorTest : public RdmaTransportTest, public ::testing::WithParamInterface<int> {};

TEST_P(CompletionErrorTest, FailsHandlesNamesPeerAndMarksConnectionDead) {
  const int status = GetParam();
  Pair();
  Connect();
  Push(1, Bytes(1000, 1));  // establish the buffer
  cluster_.Settle();
  cluster_.fabric.FailNextWrites(status);
  auto h1 = Push(1, Bytes(1000, 2), 2);
  auto h2 = Push(1, Bytes(1000, 3), 3);  // posted behind it: flushed
  cluster_.Settle();
  for (auto h : {h1, h2}) {
    Status st = w_->t->Wait(h, 0);
    EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
    EXPECT_TRUE(Contains(st.message(), "node 8")) << st;
    EXPECT_TRUE(Contains(st.message(), WcStatusString(status))) << st;
  }
  EXPECT_EQ(w_->t->state(kServer), PeerState::kDead);
  ASSERT_EQ(w_->failures.size(), 1u);
  EXPECT_EQ(w_->failures[0].first, kServer);
  // Later sends fail fast with the original reason.
  auto later = w_->t->Send(MakePush(kWorker, kServer, 1, Bytes(10, 1), 4), false);
  ASSERT_FALSE(later.ok());
  EXPECT_EQ(later.status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(Contains(later.status().message(), "dead"));
  EXPECT_TRUE(Contains(later.status().message(), WcStatusString(status)));
  // Reconnecting gives a working connection again.
  ASSERT_TRUE(w_->t->Connect(kServer).ok());
  cluster_.Settle();
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);
  auto again = Push(1, Bytes(100, 1), 5);
  cluster_.Settle();
  EXPECT_TRUE(w_->t->Wait(again, 0).ok());
}

INSTANTIATE_TEST_SUITE_P(WcStatus, CompletionErrorTest,
                         ::testing::Values(kWcRemAccessErr, kWcRetryExcErr, kWcWrFlushErr,
                                           kWcRnrRetryExcErr, kWcLocProtErr, kWcRemOpErr,
                                           kWcRemInvReqErr, kWcLocLenErr, kWcLocQpOpErr,
                                           kWcBadRespErr, kWcLocAccessErr, kWcGeneralErr),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "status" + std::to_string(info.param);
                         });

TEST_F(RdmaTransportTest, PeerQueuePairGoneGivesRetryExceeded) {
  Pair();
  Connect();
  Push(1, Bytes(100, 1));
  cluster_.Settle();
  // Kill the server's QP as a crashed process would leave it.
  uint32_t server_qpn = 0;
  for (const auto& b : cluster_.sent) {
    auto d = DecodeBlob(b.blob.data(), b.blob.size());
    if (d.ok() && d->type == BlobType::kHello && b.from == kServer) server_qpn = d->hello.qpn;
  }
  ASSERT_NE(server_qpn, 0u);
  cluster_.fabric.KillQp(server_qpn);
  auto h = Push(1, Bytes(100, 2), 2);
  cluster_.Settle();
  Status st = w_->t->Wait(h, 0);
  EXPECT_TRUE(Contains(st.message(), WcStatusString(kWcRetryExcErr))) << st;
  EXPECT_EQ(w_->t->state(kServer), PeerState::kDead);
  // The server saw its receives flushed and declared the worker dead too.
  EXPECT_EQ(s_->t->state(kWorker), PeerState::kDead);
  EXPECT_TRUE(Contains(s_->t->dead_reason(kWorker).message(), "node 9"));
}

TEST_F(RdmaTransportTest, QueuedSendsFailWhenTheConnectionDies) {
  Pair();
  cluster_.hold_blobs = true;  // the server never answers
  ASSERT_TRUE(w_->t->Connect(kServer).ok());
  cluster_.Settle();
  EXPECT_EQ(w_->t->state(kServer), PeerState::kConnecting);
  auto h = Push(1, Bytes(10, 1));
  EXPECT_EQ(w_->t->pending_sends(kServer), 1u);
  w_->t->Disconnect(kServer);
  EXPECT_EQ(w_->t->Wait(h, 0).code(), StatusCode::kCancelled);
  EXPECT_TRUE(w_->failures.empty());  // a voluntary disconnect is not a failure
}

TEST_F(RdmaTransportTest, SendValidationHappensOnTheCallersThread) {
  Pair();
  auto none = w_->t->Send(MakePush(kWorker, kServer, 1, Bytes(10, 1)), false);
  EXPECT_EQ(none.status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(Contains(none.status().message(), "node 8"));
  Connect();
  OutMessage bad = MakePush(kWorker, kServer, 1, Bytes(10, 1));
  bad.meta.data[0].nbytes = 11;
  auto r = w_->t->Send(std::move(bad), false);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status().message(), "nbytes"));
  OutMessage missing = MakePush(kWorker, kServer, 1, Bytes(10, 1));
  missing.segments.clear();
  EXPECT_EQ(w_->t->Send(std::move(missing), false).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(w_->t->Wait(12345, 0).code(), StatusCode::kNotFound);
}

TEST_F(RdmaTransportTest, RegistrationFailureFailsOnlyThatSend) {
  Pair();
  Connect();
  Push(1, Bytes(4096, 1));
  cluster_.Settle();
  cluster_.fabric.set_fail_registrations(1);
  auto h = Push(1, Bytes(4096, 2), 2);  // a new payload buffer must be registered
  cluster_.Settle();
  Status st = w_->t->Wait(h, 0);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(w_->t->state(kServer), PeerState::kReady);
}

// --- device / port / GID selection -----------------------------------------------------

TEST(RdmaSelectTest, NoDeviceIsUnavailableWithTheStatedReason) {
  FakeFabric fabric;
  const int host = fabric.AddHost({});
  auto t = RdmaTransport::Create(fabric.Api(host), RdmaOptions{}, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(t.status().message().rfind("no RDMA device: ibv_get_device_list found 0 devices", 0),
            0u)
      << t.status();
}

TEST(RdmaSelectTest, NamedDeviceMustExistAndErrorListsWhatWasFound) {
  FakeFabric fabric;
  const int host = fabric.AddHost({RoceSpec("mlx5_0"), RoceSpec("mlx5_1")});
  auto api = fabric.Api(host);
  RdmaOptions o;
  o.device = "mlx5_9";
  auto d = SelectDevice(api.get(), o);
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(Contains(d.status().message(), "mlx5_0, mlx5_1")) << d.status();
  o.device = "mlx5_1";
  EXPECT_EQ(*SelectDevice(api.get(), o), "mlx5_1");
}

TEST(RdmaSelectTest, InterfaceSelectsItsDeviceAndRoceV2Ipv4Gid) {
  FakeFabric fabric;
  FakeDeviceSpec a = RoceSpec("mlx5_0", 1);
  FakeDeviceSpec b = RoceSpec("mlx5_1", 2);
  b.netdev = "ens2";
  for (auto& g : b.gids) g.netdev = "ens2";
  const int host = fabric.AddHost({a, b});
  auto api = fabric.Api(host);
  RdmaOptions o;
  o.interface = "ens2";
  auto name = SelectDevice(api.get(), o);
  ASSERT_TRUE(name.ok());
  EXPECT_EQ(*name, "mlx5_1");
  auto dev = api->OpenDevice(*name);
  ASSERT_TRUE(dev.ok());
  auto port = SelectPort(dev->get(), o);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(port->gid_index, 3);  // RoCE v2 + IPv4-mapped
  o.gid_index = 1;
  EXPECT_EQ(SelectPort(dev->get(), o)->gid_index, 1);
  o.gid_index = 7;
  EXPECT_EQ(SelectPort(dev->get(), o).status().code(), StatusCode::kInvalidArgument);
  o.interface = "eth9";  // no RDMA device behind it: falls back, with a warning
  o.gid_index = -1;
  EXPECT_EQ(*SelectDevice(api.get(), o), "mlx5_0");
}

TEST(RdmaSelectTest, InfiniBandUsesGidZeroAndDownPortIsUnavailable) {
  FakeFabric fabric;
  FakeDeviceSpec ib = RoceSpec("mlx5_0");
  ib.link_layer = LinkLayer::kInfiniBand;
  ib.lid = 12;
  FakeDeviceSpec down = RoceSpec("mlx5_1");
  down.port_active = false;
  const int host = fabric.AddHost({ib, down});
  auto api = fabric.Api(host);
  auto d0 = api->OpenDevice("mlx5_0");
  auto p = SelectPort(d0->get(), RdmaOptions{});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->gid_index, 0);
  EXPECT_EQ(p->lid, 12);
  auto d1 = api->OpenDevice("mlx5_1");
  auto q = SelectPort(d1->get(), RdmaOptions{});
  EXPECT_EQ(q.status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(Contains(q.status().message(), "PORT_DOWN")) << q.status();
  RdmaOptions bad_port;
  bad_port.port = 2;
  EXPECT_EQ(SelectPort(d0->get(), bad_port).status().code(), StatusCode::kInvalidArgument);
}

TEST(RdmaOptionsTest, FromEnvParsesAndNamesBadVariables) {
  std::map<std::string, std::string> env = {{"MESHPOST_RDMA_DEVICE", "mlx5_2:2"},
                                            {"MESHPOST_RDMA_GID_INDEX", "3"},
                                            {"DMLC_INTERFACE", "ens1"},
                                            {"MESHPOST_RDMA_INLINE", "64"}};
  auto lookup = [&](const char* n) -> const char* {
    auto it = env.find(n);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  auto o = RdmaOptionsFromEnv(lookup);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->device, "mlx5_2");
  EXPECT_EQ(o->port, 2);
  EXPECT_EQ(o->gid_index, 3);
  EXPECT_EQ(o->interface, "ens1");
  EXPECT_EQ(o->max_inline, 64u);
  env["MESHPOST_RDMA_GID_INDEX"] = "three";
  auto bad = RdmaOptionsFromEnv(lookup);
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(Contains(bad.status().message(), "MESHPOST_RDMA_GID_INDEX"));
  env["MESHPOST_RDMA_GID_INDEX"] = "1";
  env["MESHPOST_RDMA_HEADER_BYTES"] = "10";
  EXPECT_EQ(RdmaOptionsFromEnv(lookup).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
