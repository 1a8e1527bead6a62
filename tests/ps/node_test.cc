#include "ps/node.h"

#include <gtest/gtest.h>

#include "ps/node_context.h"

namespace meshpost {
namespace {

TEST(NodeTest, TableRoundTrip) {
  std::vector<NodeInfo> nodes = {{0, Role::kScheduler, 0, "10.0.0.1", 9000, 11, "h/b"},
                                 {1, Role::kServer, 0, "10.0.0.2", 9001, 12, "h2/b"},
                                 {3, Role::kWorker, 1, "10.0.0.3", 9002, 13, "h3/b"}};
  auto d = DecodeNodes(EncodeNodes(nodes));
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->size(), 3u);
  EXPECT_EQ((*d)[2].role, Role::kWorker);
  EXPECT_EQ((*d)[2].rank, 1);
  EXPECT_EQ((*d)[1].host, "10.0.0.2");
  EXPECT_EQ((*d)[1].port, 9001);
  EXPECT_EQ((*d)[0].host_identity, "h/b");
  EXPECT_EQ((*d)[1].Describe(), "server 0 (node 1 at 10.0.0.2:9001, pid 12)");
}

TEST(NodeTest, AdvertisedTransportsRoundTrip) {
  NodeInfo n{1, Role::kServer, 0, "h", 9001, 1, "host/boot"};
  n.vans = {{"cma", "@meshpost-1"}, {"rdma", "blob"}};
  auto d = DecodeNodes(EncodeNodes({n}));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)[0].vans, n.vans);
}

TEST(NodeTest, MalformedTablesRejected) {
  std::string b = EncodeNodes({{1, Role::kServer, 0, "h", 9001, 1, ""}});
  for (size_t n = 0; n < b.size(); ++n) {
    EXPECT_FALSE(DecodeNodes(b.substr(0, n)).ok()) << n;
  }
  EXPECT_FALSE(DecodeNodes(b + "x").ok());
  EXPECT_FALSE(DecodeNodes(EncodeNodes({{1, Role::kServer, 0, "h", 0, 1, ""}})).ok());
}

TEST(NodeTest, IdsAndRequestIds) {
  EXPECT_EQ(ServerNodeId(0), 1);
  EXPECT_EQ(WorkerNodeId(2, 0), 3);
  const uint64_t id = RequestId(123456, 7);
  EXPECT_EQ(HandleOf(id), 123456u);
  EXPECT_EQ(ServerOf(id), 7);
}

}  // namespace
}  // namespace meshpost
