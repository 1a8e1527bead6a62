#include "common/wire.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

TEST(WireTest, RoundTrip) {
  WireWriter w;
  w.Put<uint8_t>(7);
  w.Put<int64_t>(-5);
  w.PutString("hello");
  w.Put<uint32_t>(0xdeadbeef);
  std::string b = w.Release();
  WireReader r(b.data(), b.size());
  uint8_t a;
  int64_t c;
  std::string s;
  uint32_t d;
  ASSERT_TRUE(r.Get(&a) && r.Get(&c) && r.GetString(&s, 100) && r.Get(&d));
  EXPECT_EQ(a, 7);
  EXPECT_EQ(c, -5);
  EXPECT_EQ(s, "hello");
  EXPECT_EQ(d, 0xdeadbeefu);
  EXPECT_EQ(r.remaining(), 0u);
}

TEST(WireTest, TruncationIsDataLoss) {
  WireWriter w;
  w.Put<uint64_t>(1);
  std::string b = w.Release();
  WireReader r(b.data(), 5);
  uint64_t v;
  EXPECT_FALSE(r.Get(&v));
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("truncated"), std::string::npos);
  // Sticky: later reads fail too.
  uint8_t x;
  EXPECT_FALSE(r.Get(&x));
}

TEST(WireTest, OversizedStringRejectedBeforeAllocation) {
  WireWriter w;
  w.Put<uint32_t>(1u << 31);  // claims 2 GiB
  std::string b = w.Release();
  WireReader r(b.data(), b.size());
  std::string s;
  EXPECT_FALSE(r.GetString(&s, 1024));
  EXPECT_NE(r.status().message().find("exceeds limit"), std::string::npos);
}

}  // namespace
}  // namespace meshpost
