// PushStagingPool (ps/push_staging.h): which push segments are copied into shared memory,
// and when a block may take a later push.
#include "ps/push_staging.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace meshpost {
namespace {

struct Host {
  std::shared_ptr<std::vector<char>> bytes;
  KeyTensor kt;
  Host(int64_t key, size_t n, char fill) : bytes(std::make_shared<std::vector<char>>(n, fill)) {
    kt = {key, TensorView{bytes->data(), DType::kUInt8, {static_cast<int64_t>(n)}, {}, bytes}};
  }
};

std::vector<SendSegment> SegmentsOf(const KeyTensorBatch& push) {
  std::vector<SendSegment> out;
  for (const KeyTensor& kt : push)
    out.push_back({kt.tensor.data, kt.tensor.nbytes(), kt.tensor.owner});
  return out;
}

// Stages every tensor of `push` from the caller's memory: `segments` is rebuilt first, so it
// never still points at an earlier copy (which is shared already, so nothing would be
// staged). Fails the test when nothing was staged.
std::shared_ptr<PushStagingLease> StageAll(PushStagingPool* pool, const KeyTensorBatch& push,
                                           std::vector<SendSegment>* segments) {
  *segments = SegmentsOf(push);
  auto lease = pool->Stage(push, 1, segments);
  if (!lease.ok() || *lease == nullptr) {
    throw std::runtime_error("nothing staged: " + lease.status().ToString());
  }
  return *lease;
}

bool InSharedBlock(const SendSegment& s) {
  SharedRef ref;
  return SharedMemoryRegistry::Get().Find(s.data, s.size, &ref);
}

TEST(PushStagingTest, CopiesLargeOrdinaryHostTensorsIntoOneBlock) {
  auto pool = std::make_shared<PushStagingPool>();
  Host a(0, 1 << 16, 'a'), small(1, (1 << 16) - 1, 'b'), c(2, 3 << 16, 'c');
  auto shared = AllocateSharedTensor(DType::kUInt8, {1 << 17});
  ASSERT_TRUE(shared.ok());
  KeyTensorBatch push = {a.kt, small.kt, c.kt, {3, *shared}};
  auto segments = SegmentsOf(push);
  auto lease = pool->Stage(push, 1 << 16, &segments);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  ASSERT_NE(*lease, nullptr);
  // The two large ordinary tensors moved into the lease's block, aligned, bytes intact.
  for (size_t i : {0u, 2u}) {
    EXPECT_TRUE(InSharedBlock(segments[i])) << i;
    EXPECT_NE(segments[i].data, push[i].tensor.data) << i;
    EXPECT_EQ(segments[i].size, push[i].tensor.nbytes()) << i;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(segments[i].data) % 64, 0u) << i;
    EXPECT_EQ(std::memcmp(segments[i].data, push[i].tensor.data, segments[i].size), 0) << i;
    SharedRef ref;
    ASSERT_TRUE(SharedMemoryRegistry::Get().Find(segments[i].data, segments[i].size, &ref));
    EXPECT_EQ(ref.block.get(), (*lease)->block()) << i;
  }
  // Below the threshold, or already shared: sent as they are.
  EXPECT_EQ(segments[1].data, push[1].tensor.data);
  EXPECT_EQ(segments[3].data, push[3].tensor.data);
  // The copy is a snapshot: changing the caller's tensor leaves it alone.
  std::memset(a.bytes->data(), 'z', a.bytes->size());
  EXPECT_EQ(static_cast<const char*>(segments[0].data)[7], 'a');
}

TEST(PushStagingTest, NothingQualifiesOrDisabledStagesNothing) {
  auto pool = std::make_shared<PushStagingPool>();
  Host small(0, 100, 'x');
  KeyTensorBatch push = {small.kt};
  auto segments = SegmentsOf(push);
  auto none = pool->Stage(push, 1 << 16, &segments);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  Host big(0, 1 << 20, 'y');
  push = {big.kt};
  segments = SegmentsOf(push);
  auto off = pool->Stage(push, 0, &segments);  // MESHPOST_SHARED_PUSH_MIN=0
  ASSERT_TRUE(off.ok());
  EXPECT_EQ(*off, nullptr);
  EXPECT_EQ(segments[0].data, push[0].tensor.data);
}

TEST(PushStagingTest, ABlockIsReusedOnlyAfterItsBatchCompletedAndEveryReaderLetGo) {
  auto pool = std::make_shared<PushStagingPool>();
  Host big(0, 1 << 20, 'q');
  KeyTensorBatch push = {big.kt};
  std::vector<SendSegment> segments;
  auto lease = StageAll(pool.get(), push, &segments);
  const void* first = segments[0].data;
  SendSegment in_van = segments[0];  // a van still sending holds the segment's owner
  segments.clear();
  lease->MarkReusable();
  lease.reset();
  EXPECT_EQ(pool->free_blocks(), 0u) << "the van's reference keeps the block busy";
  in_van = SendSegment{};
  EXPECT_EQ(pool->free_blocks(), 1u);
  lease = StageAll(pool.get(), push, &segments);
  EXPECT_EQ(segments[0].data, first) << "a completed batch's block takes the next push";
  EXPECT_EQ(pool->free_blocks(), 0u);
  // A batch that failed (a server may still read its views) frees its block instead.
  lease.reset();
  segments.clear();
  EXPECT_EQ(pool->free_blocks(), 0u);
  SharedRef ref;
  EXPECT_FALSE(SharedMemoryRegistry::Get().Find(first, 1, &ref))
      << "the failed batch's block is freed";
}

TEST(PushStagingTest, ABlockAServerStillViewsTakesNoNewPush) {
  auto pool = std::make_shared<PushStagingPool>();
  Host big(0, 1 << 20, 'v');
  KeyTensorBatch push = {big.kt};
  std::vector<SendSegment> segments;
  auto lease = StageAll(pool.get(), push, &segments);
  SharedBlock* block = lease->block();
  const void* first = segments[0].data;
  block->AddPeerViews(1);  // the server kept its get_batch tensor
  lease->MarkReusable();
  lease.reset();
  auto second = StageAll(pool.get(), push, &segments);
  EXPECT_NE(segments[0].data, first) << "a viewed block must not be rewritten";
  EXPECT_EQ(static_cast<const char*>(first)[0], 'v');
  block->AddPeerViews(-1);  // the server dropped it
  auto third = StageAll(pool.get(), push, &segments);
  EXPECT_EQ(segments[0].data, first) << "no longer viewed: reused";
}

TEST(PushStagingTest, StagingPausesWhileServersCopyTheCopyAgain) {
  auto pool = std::make_shared<PushStagingPool>();
  Host big(0, 1 << 20, 's');
  KeyTensorBatch push = {big.kt};
  std::vector<SendSegment> segments;
  ASSERT_TRUE(pool->Wanted());
  auto copied = StageAll(pool.get(), push, &segments);
  copied->Completed(true);  // no server views it: it went into a receive buffer
  copied.reset();
  segments.clear();
  for (int i = 0; i < PushStagingPool::kProbeEvery; ++i) EXPECT_FALSE(pool->Wanted()) << i;
  EXPECT_TRUE(pool->Wanted()) << "then one push probes again";
  auto viewed = StageAll(pool.get(), push, &segments);
  viewed->block()->AddPeerViews(1);
  viewed->Completed(true);
  EXPECT_TRUE(pool->Wanted()) << "a server reads it in place: keep staging";
  viewed->block()->AddPeerViews(-1);
  // A failed batch says nothing about the servers.
  auto failed = StageAll(pool.get(), push, &segments);
  failed->Completed(false);
  EXPECT_TRUE(pool->Wanted());
}

TEST(PushStagingTest, KeepsABoundedNumberOfFreeBlocks) {
  auto pool = std::make_shared<PushStagingPool>();
  Host big(0, 1 << 20, 'k');
  KeyTensorBatch push = {big.kt};
  std::vector<std::shared_ptr<PushStagingLease>> leases;
  for (size_t i = 0; i < PushStagingPool::kKeepPerSize + 3; ++i) {
    std::vector<SendSegment> segments;
    leases.push_back(StageAll(pool.get(), push, &segments));
    leases.back()->MarkReusable();
  }
  leases.clear();
  EXPECT_EQ(pool->free_blocks(), PushStagingPool::kKeepPerSize);
}

}  // namespace
}  // namespace meshpost
