#include "ps/request_queues.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

TEST(RequestQueuesTest, BatchNeedsEveryWorker) {
  RequestQueues<int> q(3);
  EXPECT_FALSE(q.BatchReady());
  q.Push(2, 20);
  q.Push(0, 0);
  EXPECT_EQ(q.ready_workers(), 2);
  EXPECT_TRUE(q.HasPending(0));
  EXPECT_FALSE(q.HasPending(1));
  EXPECT_FALSE(q.BatchReady());
  q.Push(1, 10);
  EXPECT_TRUE(q.BatchReady());
  EXPECT_EQ(q.PopBatch(), (std::vector<int>{0, 10, 20}));  // worker-rank order
  EXPECT_FALSE(q.BatchReady());
  EXPECT_EQ(q.ready_workers(), 0);
}

TEST(RequestQueuesTest, FifoPerWorkerAndMaskTracksDepth) {
  RequestQueues<int> q(2);
  q.Push(0, 1);
  q.Push(0, 2);
  q.Push(0, 3);
  q.Push(1, 100);
  EXPECT_EQ(q.Depth(0), 3u);
  EXPECT_EQ(q.PopBatch(), (std::vector<int>{1, 100}));
  EXPECT_TRUE(q.HasPending(0));
  EXPECT_FALSE(q.HasPending(1));
  EXPECT_FALSE(q.BatchReady());
  q.Push(1, 101);
  EXPECT_EQ(q.PopBatch(), (std::vector<int>{2, 101}));
  q.Push(1, 102);
  EXPECT_EQ(q.PopBatch(), (std::vector<int>{3, 102}));
  EXPECT_EQ(q.ready_workers(), 0);
}

TEST(RunningOffsetSlicesTest, OffsetsAccumulate) {
  auto s = RunningOffsetSlices({3, 5, 0, 2}, 12);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->size(), 4u);
  EXPECT_EQ((*s)[0].begin, 0);
  EXPECT_EQ((*s)[1].begin, 3);
  EXPECT_EQ((*s)[1].rows, 5);
  EXPECT_EQ((*s)[2].begin, 8);
  EXPECT_EQ((*s)[3].begin, 8);
  EXPECT_EQ((*s)[3].rows, 2);
}

TEST(RunningOffsetSlicesTest, OverflowingTheBufferIsAnError) {
  auto s = RunningOffsetSlices({3, 5}, 7);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("need 8 rows but ret_buffer has 7"), std::string::npos)
      << s.status();
  EXPECT_FALSE(RunningOffsetSlices({-1}, 7).ok());
}

}  // namespace
}  // namespace meshpost
