#include "ps/transport_policy.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

const std::vector<std::string> kAll = {"cma", "rdma", "tcp"};

TEST(TransportPolicyTest, RdmaIsACandidateOnlyWhenEnabled) {
  Options o;
  EXPECT_EQ(CandidateTransports(o, kAll), (std::vector<std::string>{"cma", "tcp"}));
  o.enable_rdma = true;
  EXPECT_EQ(CandidateTransports(o, kAll), (std::vector<std::string>{"cma", "rdma", "tcp"}));
  EXPECT_EQ(CandidateTransports(o, {"tcp"}), (std::vector<std::string>{"tcp"}));
}

TEST(TransportPolicyTest, MeshpostTransportForcesOneForEveryPair) {
  Options o;
  o.enable_rdma = true;
  o.transport = "tcp";
  EXPECT_EQ(CandidateTransports(o, kAll), (std::vector<std::string>{"tcp"}));
  EXPECT_TRUE(CheckPairTransport(o, "server 1", false, "tcp", UnavailableError("x")).ok());
}

TEST(TransportPolicyTest, CrossHostPairNeedsRdmaWhenEnabled) {
  Options o;
  o.enable_rdma = true;
  o.enable_rdma_setting = "DMLC_ENABLE_RDMA=ibverbs";
  // Co-located pairs keep the same-host transport.
  EXPECT_TRUE(CheckPairTransport(o, "server 0", true, "cma", OkStatus()).ok());
  EXPECT_TRUE(CheckPairTransport(o, "server 1", false, "rdma", OkStatus()).ok());
  Status s = CheckPairTransport(o, "server 1", false, "tcp",
                                UnavailableError("no RDMA device (ibv_get_device_list: none)"));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("DMLC_ENABLE_RDMA=ibverbs"), std::string::npos) << s;
  EXPECT_NE(s.message().find("server 1 is on another host"), std::string::npos) << s;
  EXPECT_NE(s.message().find("no RDMA device (ibv_get_device_list: none)"), std::string::npos) << s;
  // RDMA off: tcp between hosts is the plan.
  o.enable_rdma = false;
  EXPECT_TRUE(CheckPairTransport(o, "server 1", false, "tcp", OkStatus()).ok());
}

TEST(TransportPolicyTest, RdmaNotNeededNoteNamesTheSetting) {
  Options o;
  o.enable_rdma = true;
  o.enable_rdma_setting = "DMLC_ENABLE_RDMA=ibverbs";
  EXPECT_EQ(RdmaNotNeededNote(o, "cma"),
            "DMLC_ENABLE_RDMA=ibverbs: every peer is on this host; the same-host transport "
            "(cma) serves them and RDMA was not needed");
}

}  // namespace
}  // namespace meshpost
