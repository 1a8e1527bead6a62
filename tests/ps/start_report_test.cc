#include "ps/start_report.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

TEST(StartReportTest, TransportSummaryCountsPeersPerTransport) {
  EXPECT_EQ(TransportSummary({{"server 0", "cma"}, {"server 1", "cma"}}), "2 servers via cma");
  EXPECT_EQ(TransportSummary({{"server 0", "cma"}, {"server 1", "tcp"}, {"server 2", "tcp"}}),
            "1 server via cma, 2 servers via tcp");
  EXPECT_EQ(TransportSummary({{"worker 0", "rdma"}}), "1 worker via rdma");
  EXPECT_EQ(TransportSummary({}), "no data peers");
}

TEST(StartReportTest, WaitingForNamesTheMissingAndCounts) {
  EXPECT_EQ(WaitingFor({"worker 1", "server 3"}, 2, 4),
            "waiting for worker 1, server 3 (2 of 4 registered)");
  EXPECT_EQ(WaitingFor({"worker 0", "worker 1", "worker 2"}, 0, 3, 2),
            "waiting for worker 0, worker 1 and 1 more (0 of 3 registered)");
}

}  // namespace
}  // namespace meshpost
