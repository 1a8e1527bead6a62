#include "van/rdma/rdma_wire.h"

#include <gtest/gtest.h>

#include <random>

#include "van/codec.h"

namespace meshpost {
namespace rdma {
namespace {

ConnInfo SampleInfo() {
  ConnInfo c;
  c.qpn = 0x1234;
  c.psn = 0xABCDE;
  c.lid = 7;
  for (int i = 0; i < 16; ++i) c.gid[i] = static_cast<uint8_t>(i + 1);
  c.mtu_bytes = 4096;
  c.link_layer = LinkLayer::kEthernet;
  c.ring_addr = 0x7f0000001000;
  c.ring_rkey = 0x55;
  c.slot_bytes = 4096;
  c.slots = 64;
  return c;
}

TEST(RdmaWireTest, HelloRoundTrip) {
  const ConnInfo c = SampleInfo();
  const std::string blob = EncodeHello(c);
  auto d = DecodeBlob(blob.data(), blob.size());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->type, BlobType::kHello);
  EXPECT_EQ(d->hello.qpn, c.qpn);
  EXPECT_EQ(d->hello.psn, c.psn);
  EXPECT_EQ(d->hello.lid, c.lid);
  EXPECT_EQ(d->hello.gid, c.gid);
  EXPECT_EQ(d->hello.mtu_bytes, 4096u);
  EXPECT_EQ(d->hello.link_layer, LinkLayer::kEthernet);
  EXPECT_EQ(d->hello.ring_addr, c.ring_addr);
  EXPECT_EQ(d->hello.ring_rkey, c.ring_rkey);
  EXPECT_EQ(d->hello.slots, 64u);
}

TEST(RdmaWireTest, AdvertiseNeedBufferRefuseRoundTrip) {
  std::vector<RemoteBuffer> bufs = {{5, 0x1000, 9, 64}, {-3, 0x2000, 10, 1 << 20}};
  std::string blob = EncodeAdvertise(bufs);
  auto a = DecodeBlob(blob.data(), blob.size());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->buffers.size(), 2u);
  EXPECT_EQ(a->buffers[1].key, -3);
  EXPECT_EQ(a->buffers[1].capacity, 1u << 20);
  blob = EncodeNeedBuffer(42, 1000);
  auto n = DecodeBlob(blob.data(), blob.size());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->key, 42);
  EXPECT_EQ(n->nbytes, 1000u);
  blob = EncodeRefuse(42, "too small");
  auto r = DecodeBlob(blob.data(), blob.size());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->reason, "too small");
}

void ExpectDataLoss(const std::string& blob, const std::string& needle) {
  auto d = DecodeBlob(blob.data(), blob.size());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(d.status().message().find(needle), std::string::npos) << d.status();
}

TEST(RdmaWireTest, MalformedHelloIsRejectedWithReason) {
  ConnInfo c = SampleInfo();
  std::string good = EncodeHello(c);
  for (size_t n = 0; n < good.size(); ++n) {
    auto d = DecodeBlob(good.data(), n);
    EXPECT_FALSE(d.ok()) << "truncated to " << n;
  }
  ExpectDataLoss(good + "x", "trailing");
  std::string bad_magic = good;
  bad_magic[0] ^= 1;
  ExpectDataLoss(bad_magic, "magic");
  std::string bad_version = good;
  bad_version[4] = 9;
  ExpectDataLoss(bad_version, "version");
  std::string bad_type = good;
  bad_type[6] = 77;
  ExpectDataLoss(bad_type, "unknown type");
  auto with = [&](auto mutate) {
    ConnInfo m = SampleInfo();
    mutate(m);
    return EncodeHello(m);
  };
  ExpectDataLoss(with([](ConnInfo& m) { m.qpn = 0; }), "QP number");
  ExpectDataLoss(with([](ConnInfo& m) { m.qpn = 1u << 24; }), "QP number");
  ExpectDataLoss(with([](ConnInfo& m) { m.psn = 1u << 24; }), "PSN");
  ExpectDataLoss(with([](ConnInfo& m) { m.mtu_bytes = 1500; }), "MTU");
  ExpectDataLoss(with([](ConnInfo& m) { m.link_layer = static_cast<LinkLayer>(9); }), "link");
  ExpectDataLoss(with([](ConnInfo& m) {
                   m.lid = 0;
                   m.gid = {};
                 }),
                 "neither a LID nor a GID");
  ExpectDataLoss(with([](ConnInfo& m) { m.ring_addr = 0; }), "ring address");
  ExpectDataLoss(with([](ConnInfo& m) { m.slot_bytes = 8; }), "slot size");
  ExpectDataLoss(with([](ConnInfo& m) { m.slots = 0; }), "slot count");
  ExpectDataLoss(with([](ConnInfo& m) { m.slots = kMaxHeaderSlots + 1; }), "slot count");
  ExpectDataLoss(with([](ConnInfo& m) { m.ring_addr = ~0ull - 100; }), "wraps");
}

TEST(RdmaWireTest, MalformedAdvertiseAndRequestsAreRejected) {
  std::string blob = EncodeAdvertise({{1, 0x1000, 1, 10}});
  blob[7] = static_cast<char>(0xff);  // count low byte -> 255 entries, only one present
  ExpectDataLoss(blob, "truncated");
  std::string huge = EncodeAdvertise({});
  huge[7] = 0;
  huge[8] = 0;
  huge[9] = 0;
  huge[10] = 0x10;  // 2^28 entries
  ExpectDataLoss(huge, "buffers");
  ExpectDataLoss(EncodeAdvertise({{1, 0, 1, 10}}), "key 1");
  ExpectDataLoss(EncodeAdvertise({{1, ~0ull - 4, 1, 10}}), "key 1");
  ExpectDataLoss(EncodeAdvertise({{1, 0x1000, 1, 0}}), "key 1");
  ExpectDataLoss(EncodeNeedBuffer(1, 0), "need-buffer");
  ExpectDataLoss(EncodeNeedBuffer(1, kMaxTensorBytes + 1), "need-buffer");
}

TEST(RdmaWireTest, RandomBytesAndMutationsNeverCrash) {
  std::mt19937 rng(1234);
  const std::vector<std::string> seeds = {EncodeHello(SampleInfo()),
                                          EncodeAdvertise({{1, 0x1000, 1, 10}}),
                                          EncodeNeedBuffer(3, 9), EncodeRefuse(3, "no")};
  int accepted = 0;
  for (int i = 0; i < 5000; ++i) {
    std::string b = seeds[i % seeds.size()];
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] = static_cast<char>(rng());
    if (rng() % 3 == 0) b.resize(rng() % (b.size() + 1));
    auto d = DecodeBlob(b.data(), b.size());
    if (d.ok()) {
      ++accepted;
    } else {
      EXPECT_EQ(d.status().code(), StatusCode::kDataLoss);
    }
  }
  EXPECT_LT(accepted, 5000);
}

TEST(RdmaWireTest, HeaderFrameRoundTripAndValidation) {
  Meta m;
  m.cmd = Command::kRequest;
  m.sender = 3;
  m.recipient = 8;
  TensorDesc slot;
  slot.key = 9;
  slot.shape = {128};
  slot.nbytes = 128;
  slot.addr = 0x5000;
  m.slots = {slot};
  const std::string meta = EncodeMeta(m);
  std::string frame = EncodeHeaderFrame(meta, {77});
  std::string slot_bytes = frame + std::string(512, '\0');  // the rest of a ring slot
  auto f = DecodeHeaderFrame(slot_bytes.data(), slot_bytes.size());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->meta.sender, 3);
  ASSERT_EQ(f->slot_rkeys.size(), 1u);
  EXPECT_EQ(f->slot_rkeys[0], 77u);

  // Frame length larger than the slot.
  auto t = DecodeHeaderFrame(frame.data(), frame.size() - 1);
  EXPECT_EQ(t.status().code(), StatusCode::kDataLoss);
  // rkey count disagrees with the pull slots.
  std::string wrong = EncodeHeaderFrame(meta, {});
  EXPECT_EQ(DecodeHeaderFrame(wrong.data(), wrong.size()).status().code(), StatusCode::kDataLoss);
  // An empty (never written) slot.
  std::string zeros(256, '\0');
  EXPECT_EQ(DecodeHeaderFrame(zeros.data(), zeros.size()).status().code(), StatusCode::kDataLoss);
  // Corrupted meta inside a well-formed frame.
  std::string bad_meta = frame;
  bad_meta[12] ^= 0x5a;
  EXPECT_FALSE(DecodeHeaderFrame(bad_meta.data(), bad_meta.size()).ok());
}

TEST(RdmaWireTest, ImmediateAndInlineHelpers) {
  const uint32_t imm = MakeImm(ImmKind::kCredit, 17);
  EXPECT_EQ(ImmKindOf(imm), ImmKind::kCredit);
  EXPECT_EQ(ImmValue(imm), 17u);
  EXPECT_EQ(ImmKindOf(MakeImm(ImmKind::kHeader, kImmValueMask)), ImmKind::kHeader);
  EXPECT_TRUE(ShouldInline(64, 64));
  EXPECT_FALSE(ShouldInline(65, 64));
  EXPECT_FALSE(ShouldInline(1, 0));
}

}  // namespace
}  // namespace rdma
}  // namespace meshpost
