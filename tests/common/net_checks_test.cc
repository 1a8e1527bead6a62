// Launch checks that fail at once (issue 10): host resolution, bindable addresses, and the
// scheduler's port descriptor. Each error names the variable and the value.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "common/net.h"

namespace meshpost {
namespace {

TEST(NetChecksTest, ResolvesNamesAndNumbers) {
  auto numeric = ResolveIPv4("127.0.0.1", "DMLC_PS_ROOT_URI");
  ASSERT_TRUE(numeric.ok());
  EXPECT_EQ(*numeric, "127.0.0.1");
  auto local = ResolveIPv4("localhost", "DMLC_PS_ROOT_URI");
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  EXPECT_EQ(local->rfind("127.", 0), 0u);
  // .invalid never resolves (RFC 2606), with or without a network.
  auto bad = ResolveIPv4("no-such-host.invalid", "DMLC_PS_ROOT_URI");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("DMLC_PS_ROOT_URI='no-such-host.invalid'"),
            std::string::npos)
      << bad.status().message();
}

TEST(NetChecksTest, OnlyOwnAddressesAreBindable) {
  EXPECT_TRUE(CheckBindable("127.0.0.1", "DMLC_NODE_HOST").ok());
  // TEST-NET-3 (RFC 5737) is never assigned to a host.
  Status s = CheckBindable("203.0.113.7", "DMLC_NODE_HOST");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("DMLC_NODE_HOST='203.0.113.7'"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("this host has"), std::string::npos) << s.message();
}

TEST(NetChecksTest, PortFdMustBeOpenForWriting) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  EXPECT_TRUE(CheckWritableFd(fds[1], "MESHPOST_PORT_FD").ok());
  Status read_end = CheckWritableFd(fds[0], "MESHPOST_PORT_FD");
  EXPECT_FALSE(read_end.ok());
  close(fds[0]);
  close(fds[1]);
  Status closed = CheckWritableFd(fds[1], "MESHPOST_PORT_FD");
  ASSERT_FALSE(closed.ok());
  EXPECT_NE(closed.message().find("MESHPOST_PORT_FD=" + std::to_string(fds[1]) +
                                  " is not an open file descriptor"),
            std::string::npos)
      << closed.message();
}

TEST(NetChecksTest, LoopbackHosts) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.8.0.1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
}

}  // namespace
}  // namespace meshpost
