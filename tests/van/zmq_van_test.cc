// ZeroMQ van in one process: two vans on loopback exchanging messages, with the
// receiver choosing destinations and refusing payloads.
#include "van/zmq/zmq_van.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>

#include "tests/support/raw_zmq_peer.h"
#include "tests/support/recording_receiver.h"
#include "van/codec.h"
#include "van/delivery.h"
#include "van/van.h"

namespace meshpost {
namespace {

using Recorder = support::RecordingReceiver;

struct Pair {
  std::unique_ptr<Van> a = CreateZmqVan({});
  std::unique_ptr<Van> b = CreateZmqVan({});
  Recorder ra, rb;
  Pair() {
    int pa = *a->Bind("127.0.0.1", 0);
    int pb = *b->Bind("127.0.0.1", 0);
    EXPECT_GT(pa, 0);
    EXPECT_TRUE(a->Start(&ra).ok());
    EXPECT_TRUE(b->Start(&rb).ok());
    EXPECT_TRUE(a->Connect({2, "127.0.0.1", pb}).ok());
    EXPECT_TRUE(b->Connect({1, "127.0.0.1", pa}).ok());
    EXPECT_NE(a->endpoint().find(std::to_string(pa)), std::string::npos);
  }
};

OutMessage DataMessage(int to, const std::vector<char>& bytes) {
  OutMessage m;
  m.meta.cmd = Command::kRequest;
  m.meta.sender = 1;
  m.meta.recipient = to;
  m.meta.data.push_back({1, DType::kUInt8, {static_cast<int64_t>(bytes.size())}, bytes.size(), 0});
  m.segments.push_back({bytes.data(), bytes.size(), nullptr});
  return m;
}

TEST(ZmqVanTest, BytesLandInTheChosenDestination) {
  // Declared before the vans, so they outlive them: the payload has no owner, and the
  // destination is written by the receive thread.
  std::vector<char> payload(100000);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 13);
  std::vector<char> dest(payload.size());
  Pair p;
  p.rb.land(1, dest.data());
  ASSERT_TRUE(p.a->Send(DataMessage(2, payload)).ok());
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
  EXPECT_EQ(p.rb.TakeMessages()[0].segments[0].data, dest.data());
  EXPECT_EQ(dest, payload);
}

TEST(ZmqVanTest, VanBufferWhenNoDestinationAndOrderKept) {
  Pair p;
  for (int i = 0; i < 50; ++i) {
    std::vector<char> payload(5000 + i, static_cast<char>(i));
    auto owner = std::make_shared<std::vector<char>>(payload);
    OutMessage m = DataMessage(2, *owner);
    m.segments[0].data = owner->data();
    m.segments[0].owner = owner;
    m.meta.id = i;
    ASSERT_TRUE(p.a->Send(std::move(m)).ok());
  }
  ASSERT_TRUE(p.rb.WaitFor(50, 0));
  const auto got = p.rb.TakeMessages();
  for (int i = 0; i < 50; ++i) {
    const InMessage& in = got[i];
    EXPECT_EQ(in.meta.id, static_cast<uint64_t>(i));
    ASSERT_EQ(in.segments.size(), 1u);
    EXPECT_EQ(in.segments[0].size, 5000u + i);
    EXPECT_TRUE(in.segments[0].owner != nullptr);
    EXPECT_EQ(static_cast<char*>(in.segments[0].data)[17], static_cast<char>(i));
  }
}

TEST(ZmqVanTest, RefusedDestinationReportsDrop) {
  Pair p;
  p.rb.refuse = true;
  std::vector<char> payload(64, 1);
  ASSERT_TRUE(p.a->Send(DataMessage(2, payload)).ok());
  ASSERT_TRUE(p.rb.WaitFor(0, 1));
  EXPECT_NE(p.rb.TakeDropped()[0].second.message().find("refuses"), std::string::npos);
  // The van keeps working afterwards.
  p.rb.refuse = false;
  ASSERT_TRUE(p.a->Send(DataMessage(2, payload)).ok());
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
}

// A sender whose frames disagree with its own header (hostile or buggy) is refused.
TEST(ZmqVanTest, FrameSizeMismatchIsDropped) {
  std::vector<char> dest(64);  // outlives the vans
  Pair p;
  p.rb.land(1, dest.data());
  const std::string endpoint =
      "tcp://127.0.0.1:" + p.b->endpoint().substr(p.b->endpoint().rfind(':') + 1);
  support::RawZmqPeer raw(endpoint);  // frames ZmqVan::Send would refuse
  ASSERT_TRUE(raw.connected());
  std::vector<char> payload(32, 5);
  OutMessage m = DataMessage(2, payload);
  m.meta.data[0].shape = {64};
  m.meta.data[0].nbytes = 64;  // claims 64 bytes, sends 32
  ASSERT_TRUE(raw.Send(m.meta, {payload}));
  ASSERT_TRUE(p.rb.WaitFor(0, 1));
  EXPECT_EQ(p.rb.TakeDropped()[0].second.code(), StatusCode::kDataLoss);
  EXPECT_EQ(dest, std::vector<char>(64, 0)) << "nothing written for a refused frame";
  // One frame more than described.
  ASSERT_TRUE(raw.Send(DataMessage(2, payload).meta, {payload, payload}));
  ASSERT_TRUE(p.rb.WaitFor(0, 1));
  EXPECT_EQ(p.rb.TakeDropped()[0].second.code(), StatusCode::kDataLoss);
  ASSERT_TRUE(p.a->Send(DataMessage(2, payload)).ok());
  ASSERT_TRUE(p.rb.WaitFor(1, 0));
}

TEST(ZmqVanTest, MessagesThatDisagreeWithTheirHeaderAreRefusedAtSend) {
  Pair p;
  std::vector<char> payload(32, 5);
  OutMessage m = DataMessage(2, payload);
  m.meta.data[0].nbytes = 64;
  EXPECT_EQ(p.a->Send(std::move(m)).code(), StatusCode::kInvalidArgument);
  OutMessage extra = DataMessage(2, payload);
  extra.segments.push_back(extra.segments[0]);
  EXPECT_EQ(p.a->Send(std::move(extra)).code(), StatusCode::kInvalidArgument);
}

TEST(ZmqVanTest, NullSegmentWithBytesIsRefusedAtSend) {
  Pair p;
  std::vector<char> payload(8);
  OutMessage m = DataMessage(2, payload);
  m.segments[0].data = nullptr;
  Status s = p.a->Send(std::move(m));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("null"), std::string::npos) << s;
}

TEST(ZmqVanTest, SendToUnknownPeerIsAnError) {
  Pair p;
  std::vector<char> payload(8);
  Status s = p.a->Send(DataMessage(9, payload));
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace meshpost

namespace meshpost {
namespace {

// A kept van buffer becomes a tensor: one at an odd offset (ZeroMQ slices small frames out
// of one receive batch) is copied to aligned memory; an aligned one is kept as it is.
TEST(LandSegmentTest, KeptBuffersAreAlignedForEveryElementType) {
  auto batch = std::make_shared<std::vector<char>>(4096);
  for (size_t i = 0; i < batch->size(); ++i) (*batch)[i] = static_cast<char>(i * 7);
  char* base = batch->data();
  while (reinterpret_cast<uintptr_t>(base) % kVanBufferAlign != 0) ++base;
  for (size_t offset : {0, 1, 3, 4, 7, 9}) {
    RecvSegment seg = LandSegment(nullptr, base + offset, 64, batch);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(seg.data) % kVanBufferAlign, 0u) << offset;
    EXPECT_EQ(std::memcmp(seg.data, base + offset, 64), 0) << offset;
    ASSERT_NE(seg.owner, nullptr);
    if (offset % kVanBufferAlign == 0) {
      EXPECT_EQ(seg.data, base + offset);
    }
  }
}

}  // namespace
}  // namespace meshpost
