#include "van/rdma/mr_cache.h"

#include <gtest/gtest.h>

#include <vector>

#include "fake_verbs.h"
#include "test_util.h"

namespace meshpost {
namespace rdma {
namespace testing {
namespace {

class MrCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    host_ = fabric_.AddHost({RoceSpec()});
    api_ = fabric_.Api(host_);
    auto d = api_->OpenDevice("mlx5_0");
    ASSERT_TRUE(d.ok());
    device_ = std::move(d).value();
  }
  FakeFabric fabric_;
  int host_ = 0;
  std::unique_ptr<VerbsApi> api_;
  std::unique_ptr<VerbsDevice> device_;
  std::vector<char> mem_ = std::vector<char>(1 << 16);
};

TEST_F(MrCacheTest, HitInsideRegisteredRangeMissOutside) {
  MrCache cache(device_.get(), 16);
  auto a = cache.Get(mem_.data(), 4096, kAccessRemoteWrite | kAccessLocalWrite);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = cache.Get(mem_.data() + 100, 1000, kAccessRemoteWrite);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->get(), b->get());
  EXPECT_EQ(cache.stats().hits, 1u);
  auto c = cache.Get(mem_.data() + 4000, 200, 0);  // crosses the end
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->get(), c->get());
  EXPECT_EQ(cache.stats().misses, 2u);
  EXPECT_EQ(fabric_.registrations(), 2);
}

TEST_F(MrCacheTest, WeakerRegistrationDoesNotServeRemoteWrite) {
  MrCache cache(device_.get(), 16);
  ASSERT_TRUE(cache.Get(mem_.data(), 4096, 0).ok());
  auto w = cache.Get(mem_.data(), 4096, kAccessLocalWrite | kAccessRemoteWrite);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->info().access & kAccessRemoteWrite, kAccessRemoteWrite);
  EXPECT_EQ(cache.stats().misses, 2u);
}

TEST_F(MrCacheTest, FreedAndReusedAddressDoesNotHitStaleRegistration) {
  MrCache cache(device_.get(), 16);
  auto first_owner = std::make_shared<int>(1);
  auto first = cache.Get(mem_.data(), 4096, 0, first_owner);
  ASSERT_TRUE(first.ok());
  const uint32_t stale_key = (*first)->info().lkey;
  first = Status(StatusCode::kCancelled, "drop");  // release our reference
  // The allocation is freed; the same address now belongs to a new allocation.
  first_owner.reset();
  auto second_owner = std::make_shared<int>(2);
  auto second = cache.Get(mem_.data(), 4096, 0, second_owner);
  ASSERT_TRUE(second.ok());
  EXPECT_NE((*second)->info().lkey, stale_key);
  EXPECT_EQ(cache.stats().stale, 1u);
  EXPECT_EQ(cache.stats().hits, 0u);
  EXPECT_EQ(fabric_.deregistrations(), 1);
  // While the owner lives, the same range hits.
  ASSERT_TRUE(cache.Get(mem_.data() + 8, 8, 0).ok());
  EXPECT_EQ(cache.stats().hits, 1u);
}

TEST_F(MrCacheTest, SweepDropsRegistrationsOfFreedOwners) {
  MrCache cache(device_.get(), 16);
  {
    auto owner = std::make_shared<int>(0);
    ASSERT_TRUE(cache.Get(mem_.data() + 8192, 128, 0, owner).ok());
  }
  ASSERT_TRUE(cache.Get(mem_.data(), 128, 0).ok());  // caller-managed, stays
  EXPECT_EQ(cache.Sweep(), 1u);
  EXPECT_EQ(cache.size(), 1u);
}

TEST_F(MrCacheTest, InvalidateDropsEveryOverlappingEntry) {
  MrCache cache(device_.get(), 16);
  ASSERT_TRUE(cache.Get(mem_.data(), 1024, 0).ok());
  ASSERT_TRUE(cache.Get(mem_.data() + 512, 1024, 0).ok());
  ASSERT_TRUE(cache.Get(mem_.data() + 8192, 1024, 0).ok());
  EXPECT_EQ(cache.Invalidate(mem_.data() + 1000, 10), 2u);
  EXPECT_EQ(cache.size(), 1u);
  ASSERT_TRUE(cache.Get(mem_.data(), 16, 0).ok());
  EXPECT_EQ(cache.stats().misses, 4u);  // re-registered, no stale hit
}

TEST_F(MrCacheTest, DeregisterByStartAddress) {
  MrCache cache(device_.get(), 16);
  ASSERT_TRUE(cache.Get(mem_.data(), 1024, 0).ok());
  EXPECT_EQ(cache.Deregister(mem_.data() + 1).code(), StatusCode::kNotFound);
  EXPECT_TRUE(cache.Deregister(mem_.data()).ok());
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(fabric_.deregistrations(), 1);
}

TEST_F(MrCacheTest, EvictionKeepsInUseRegistrationUntilReleased) {
  MrCache cache(device_.get(), 2);
  auto in_use = cache.Get(mem_.data(), 64, 0);
  ASSERT_TRUE(in_use.ok());
  ASSERT_TRUE(cache.Get(mem_.data() + 4096, 64, 0).ok());
  ASSERT_TRUE(cache.Get(mem_.data() + 4096, 64, 0).ok());  // make entry 2 most recent
  ASSERT_TRUE(cache.Get(mem_.data() + 8192, 64, 0).ok());  // evicts entry 1 (LRU)
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(fabric_.deregistrations(), 0);  // still referenced by an in-flight user
  const uint32_t key = (*in_use)->info().lkey;
  EXPECT_TRUE(fabric_.mrs[key].alive);
  in_use = Status(StatusCode::kCancelled, "released");
  EXPECT_EQ(fabric_.deregistrations(), 1);
  EXPECT_FALSE(fabric_.mrs[key].alive);
}

TEST_F(MrCacheTest, RegistrationFailureIsAStatus) {
  MrCache cache(device_.get(), 4);
  fabric_.set_fail_registrations(1);
  auto r = cache.Get(mem_.data(), 64, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(cache.Get(nullptr, 64, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.Get(mem_.data(), 0, 0).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace testing
}  // namespace rdma
}  // namespace meshpost
