// DeviceStager's chunked pipeline, LazyStager and LandingBuffers, through the fake device
// backend and its race checker (tensor/backend/fake_backend.h).
#include "tensor/device_staging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <future>
#include <mutex>
#include <vector>

#include "tensor/backend/fake_backend.h"

namespace meshpost {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr int64_t kWaitMs = 30000;
constexpr size_t kChunk = 64 << 10;

std::unique_ptr<DeviceStager> MakeStager(FakeBackend* be, size_t chunk) {
  StagerOptions o;
  o.chunk_bytes = chunk;
  auto st = DeviceStager::Create(be, o);
  EXPECT_TRUE(st.ok()) << st.status();
  return st.ok() ? std::move(st).value() : nullptr;
}

struct ChunkSeen {
  size_t index;
  size_t bytes_done;
  bool bytes_ok;
};

class DeviceStagingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = static_cast<char*>(*be_.AllocDevice(0, kA));
    b_ = static_cast<char*>(*be_.AllocDevice(0, kB));
    for (size_t i = 0; i < kA; ++i) a_[i] = static_cast<char>(i * 7 + 1);
    for (size_t i = 0; i < kB; ++i) b_[i] = static_cast<char>(i * 13 + 5);
    expect_.assign(a_, a_ + kA);
    expect_.insert(expect_.end(), b_, b_ + kB);
  }
  void TearDown() override {
    be_.FreeDevice(a_);
    be_.FreeDevice(b_);
  }

  // 300 KiB + 200 KiB, device -> one pinned buffer: 8 chunks of 64 KiB (the last short).
  static constexpr size_t kA = 300 << 10, kB = 200 << 10;
  FakeBackend be_;
  char* a_ = nullptr;
  char* b_ = nullptr;
  std::vector<char> expect_;
};

TEST_F(DeviceStagingTest, ChunksCompleteInOrderEachWithItsBytesInPlace) {
  auto stager = MakeStager(&be_, kChunk);
  ASSERT_NE(stager, nullptr);
  EXPECT_EQ(stager->chunk_bytes(), kChunk);
  be_.SetDelayUs(stager->stream(), 300);  // widen the window between chunks
  auto buf = stager->Acquire(kA + kB);
  ASSERT_TRUE(buf.ok()) << buf.status();
  char* dst = static_cast<char*>(buf->data);
  std::mutex mu;
  std::vector<ChunkSeen> seen;
  std::promise<Status> done;
  Status queued = stager->Submit(
      {{dst, a_, kA}, {dst + kA, b_, kB}}, nullptr,
      [&done, owner = buf->owner](const Status& s) { done.set_value(s); },
      [&](size_t k, size_t bytes_done) {
        // The consumer (a transport) uses exactly the bytes this chunk completed.
        be_.HostAccess(dst, bytes_done, /*write=*/false);
        const bool ok = std::memcmp(dst, expect_.data(), bytes_done) == 0;
        std::lock_guard<std::mutex> lock(mu);
        seen.push_back({k, bytes_done, ok});
      });
  ASSERT_TRUE(queued.ok()) << queued;
  auto f = done.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::milliseconds(kWaitMs)), std::future_status::ready);
  ASSERT_TRUE(f.get().ok());
  const size_t total = kA + kB, chunks = (total + kChunk - 1) / kChunk;
  ASSERT_EQ(seen.size(), chunks);
  for (size_t k = 0; k < chunks; ++k) {
    EXPECT_EQ(seen[k].index, k);
    EXPECT_EQ(seen[k].bytes_done, std::min(total, (k + 1) * kChunk));
    EXPECT_TRUE(seen[k].bytes_ok) << "chunk " << k;
  }
  EXPECT_EQ(std::memcmp(dst, expect_.data(), total), 0);
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(DeviceStagingTest, ReadingPastTheCompletedChunkIsReportedByTheChecker) {
  auto stager = MakeStager(&be_, kChunk);
  ASSERT_NE(stager, nullptr);
  be_.SetDelayUs(stager->stream(), 300);
  auto buf = stager->Acquire(kA);
  ASSERT_TRUE(buf.ok());
  char* dst = static_cast<char*>(buf->data);
  std::promise<Status> done;
  ASSERT_TRUE(stager
                  ->Submit(
                      {{dst, a_, kA}}, nullptr,
                      [&done, owner = buf->owner](const Status& s) { done.set_value(s); },
                      [&](size_t k, size_t bytes_done) {
                        // A broken consumer: at chunk 0 it reads chunk 1 too.
                        if (k == 0) be_.HostAccess(dst, bytes_done + kChunk, false);
                      })
                  .ok());
  auto f = done.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::milliseconds(kWaitMs)), std::future_status::ready);
  ASSERT_TRUE(f.get().ok());
  EXPECT_THAT(be_.Hazards(), Not(IsEmpty()));
}

TEST_F(DeviceStagingTest, BatchesCompleteInSubmissionOrderIncludingEmptyOnes) {
  auto stager = MakeStager(&be_, kChunk);
  ASSERT_NE(stager, nullptr);
  be_.SetDelayUs(stager->stream(), 200);
  auto buf = stager->Acquire(kA);
  ASSERT_TRUE(buf.ok());
  std::mutex mu;
  std::vector<int> order;
  std::promise<void> last;
  auto record = [&](int id) {
    std::lock_guard<std::mutex> lock(mu);
    order.push_back(id);
  };
  ASSERT_TRUE(stager
                  ->Submit({{buf->data, a_, kA}}, nullptr,
                           [&, owner = buf->owner](const Status&) { record(1); })
                  .ok());
  ASSERT_TRUE(stager->Submit({}, nullptr, [&](const Status&) { record(2); }).ok());
  ASSERT_TRUE(stager
                  ->Submit({}, nullptr,
                           [&](const Status&) {
                             record(3);
                             last.set_value();
                           })
                  .ok());
  ASSERT_EQ(last.get_future().wait_for(std::chrono::milliseconds(kWaitMs)),
            std::future_status::ready);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_THAT(be_.Hazards(), IsEmpty());
}

TEST_F(DeviceStagingTest, LazyStagerCreatesOnceAndReportsAnUnusableBackend) {
  be_.SetUnavailable(UnavailableError("CUDA driver not found (test)"));
  LazyStager lazy(&be_, StagerOptions::Chunked(kChunk));
  EXPECT_EQ(lazy.IfCreated(), nullptr);
  auto refused = lazy.Get();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("CUDA driver not found (test)"));
  EXPECT_EQ(lazy.IfCreated(), nullptr);
  be_.SetUnavailable(OkStatus());
  auto first = lazy.Get();
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = lazy.Get();
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(*first, *second);
  EXPECT_EQ(lazy.IfCreated(), *first);
  EXPECT_EQ((*first)->chunk_bytes(), kChunk);

  LazyStager none(nullptr, StagerOptions{});
  EXPECT_FALSE(none.Get().ok());
}

TEST_F(DeviceStagingTest, LandingBuffersArePerMessageAndTakenOnce) {
  auto stager = MakeStager(&be_, kChunk);
  ASSERT_NE(stager, nullptr);
  LandingBuffers landing;
  const Device cuda0{DeviceType::kCUDA, 0};
  auto p0 = landing.Acquire(stager.get(), 3, 42, 0, 1000, a_, cuda0);
  auto p1 = landing.Acquire(stager.get(), 3, 42, 2, 2000, b_, cuda0);
  auto other = landing.Acquire(stager.get(), 4, 42, 0, 10, a_, cuda0);
  ASSERT_TRUE(p0.ok() && p1.ok() && other.ok());
  EXPECT_EQ(landing.pending_messages(), 2u);
  auto taken = landing.Take(3, 42);
  ASSERT_EQ(taken.size(), 2u);
  EXPECT_EQ(taken[0].pinned.data, *p0);
  EXPECT_EQ(taken[0].device_dst, a_);
  EXPECT_EQ(taken[0].n, 1000u);
  EXPECT_EQ(taken[2].pinned.data, *p1);
  EXPECT_EQ(taken[2].device_dst, b_);
  EXPECT_TRUE(landing.Take(3, 42).empty());
  landing.Drop(4, 42);
  EXPECT_EQ(landing.pending_messages(), 0u);
}

}  // namespace
}  // namespace meshpost
