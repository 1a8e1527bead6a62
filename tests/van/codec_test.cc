#include "van/codec.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

namespace meshpost {
namespace {

Meta SampleMeta() {
  Meta m;
  m.cmd = Command::kRequest;
  m.sender = 3;
  m.recipient = 1;
  m.id = 0x123456789abcull;
  m.arg = 6;
  m.status_code = 0;
  m.body = "body";
  m.data.push_back({7, DType::kBFloat16, {128, 7168}, 128 * 7168 * 2, 0x1000});
  m.data.push_back({8, DType::kInt32, {4}, 16, 0});
  m.slots.push_back({100, DType::kFloat32, {2, 2}, 16, 0x2000});
  m.stamps = {1, 2, 3, 4};
  return m;
}

TEST(CodecTest, RoundTrip) {
  const Meta m = SampleMeta();
  const std::string b = EncodeMeta(m);
  auto d = DecodeMeta(b.data(), b.size());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->cmd, m.cmd);
  EXPECT_EQ(d->sender, 3);
  EXPECT_EQ(d->recipient, 1);
  EXPECT_EQ(d->id, m.id);
  EXPECT_EQ(d->arg, 6);
  EXPECT_EQ(d->body, "body");
  ASSERT_EQ(d->data.size(), 2u);
  EXPECT_EQ(d->data[0].shape, (std::vector<int64_t>{128, 7168}));
  EXPECT_EQ(d->data[0].dtype, DType::kBFloat16);
  EXPECT_EQ(d->data[0].addr, 0x1000u);
  EXPECT_EQ(d->data[1].key, 8);
  ASSERT_EQ(d->slots.size(), 1u);
  EXPECT_EQ(d->slots[0].nbytes, 16u);
  EXPECT_EQ(d->stamps[3], 4u);
}

TEST(CodecTest, StartsWithMagicVersionAndLength) {
  const std::string b = EncodeMeta(SampleMeta());
  uint32_t magic, len;
  uint16_t version;
  std::memcpy(&magic, b.data(), 4);
  std::memcpy(&version, b.data() + 4, 2);
  std::memcpy(&len, b.data() + 8, 4);
  EXPECT_EQ(magic, kWireMagic);
  EXPECT_EQ(version, kWireVersion);
  EXPECT_EQ(len, b.size() - kWirePreambleBytes);
}

TEST(CodecTest, EveryTruncationIsRejected) {
  const std::string b = EncodeMeta(SampleMeta());
  for (size_t n = 0; n < b.size(); ++n) {
    auto d = DecodeMeta(b.data(), n);
    ASSERT_FALSE(d.ok()) << "accepted a frame truncated to " << n << " bytes";
    EXPECT_EQ(d.status().code(), StatusCode::kDataLoss);
  }
}

TEST(CodecTest, TrailingBytesRejected) {
  std::string b = EncodeMeta(SampleMeta());
  b += "xx";
  EXPECT_FALSE(DecodeMeta(b.data(), b.size()).ok());
}

TEST(CodecTest, BadMagicAndVersion) {
  std::string b = EncodeMeta(SampleMeta());
  std::string bad = b;
  bad[0] = 'X';
  auto d = DecodeMeta(bad.data(), bad.size());
  EXPECT_NE(d.status().message().find("magic"), std::string::npos);
  bad = b;
  bad[4] = 99;
  d = DecodeMeta(bad.data(), bad.size());
  EXPECT_NE(d.status().message().find("version 99"), std::string::npos);
}

TEST(CodecTest, InconsistentDescriptorRejected) {
  Meta m = SampleMeta();
  m.data[1].nbytes = 17;  // int32[4] is 16 bytes
  std::string b = EncodeMeta(m);
  auto d = DecodeMeta(b.data(), b.size());
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("17"), std::string::npos);

  m = SampleMeta();
  m.data[0].dtype = static_cast<DType>(77);
  b = EncodeMeta(m);
  EXPECT_NE(DecodeMeta(b.data(), b.size()).status().message().find("dtype"), std::string::npos);

  m = SampleMeta();
  m.data[0].shape = {-1, 4};
  m.data[0].nbytes = 0;
  b = EncodeMeta(m);
  EXPECT_FALSE(DecodeMeta(b.data(), b.size()).ok());

  m = SampleMeta();
  m.data[0].shape.assign(17, 1);
  m.data[0].nbytes = 2;
  b = EncodeMeta(m);
  EXPECT_FALSE(DecodeMeta(b.data(), b.size()).ok());
}

TEST(CodecTest, OversizedCountsRejectedWithoutAllocation) {
  Meta m;
  m.cmd = Command::kHeartbeat;
  std::string b = EncodeMeta(m);
  // Offset of the data-descriptor count: preamble + cmd(1) + sender/recipient(8) + id(8) +
  // arg/status(8) + body length(4) + body(0).
  const size_t count_at = kWirePreambleBytes + 1 + 8 + 8 + 8 + 4;
  uint32_t huge = 0xffffffffu;
  std::memcpy(&b[count_at], &huge, 4);
  auto d = DecodeMeta(b.data(), b.size());
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("exceeds limit"), std::string::npos);
  uint32_t many = 4000;  // under the limit, but the frame cannot hold them
  std::memcpy(&b[count_at], &many, 4);
  d = DecodeMeta(b.data(), b.size());
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("does not fit"), std::string::npos);
}

TEST(CodecTest, UnknownCommandRejected) {
  Meta m = SampleMeta();
  std::string b = EncodeMeta(m);
  b[kWirePreambleBytes] = 99;
  EXPECT_NE(DecodeMeta(b.data(), b.size()).status().message().find("unknown command"),
            std::string::npos);
}

// Random corruption must give an error or a valid Meta — never a crash or a hang.
TEST(CodecTest, RandomCorruptionNeverCrashes) {
  const std::string b = EncodeMeta(SampleMeta());
  std::mt19937 rng(1234);
  int rejected = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string c = b;
    const int flips = 1 + rng() % 4;
    for (int f = 0; f < flips; ++f) c[rng() % c.size()] = static_cast<char>(rng());
    if (rng() % 3 == 0) c.resize(rng() % c.size());
    auto d = DecodeMeta(c.data(), c.size());
    if (!d.ok()) {
      ++rejected;
      EXPECT_EQ(d.status().code(), StatusCode::kDataLoss);
    }
  }
  EXPECT_GT(rejected, 0);
}

}  // namespace
}  // namespace meshpost
