// The port-pipe protocol reader (the scheduler side is Postoffice::Start with port_fd).
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "launch/local_cluster.h"

namespace meshpost {
namespace {

class PortPipeTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(pipe(fds_), 0); }
  void TearDown() override {
    close(fds_[0]);
    if (fds_[1] >= 0) close(fds_[1]);
  }
  void Write(const std::string& s) {
    ASSERT_EQ(write(fds_[1], s.data(), s.size()), static_cast<ssize_t>(s.size()));
  }
  void CloseWriter() {
    close(fds_[1]);
    fds_[1] = -1;
  }
  int fds_[2] = {-1, -1};
};

TEST_F(PortPipeTest, ReadsOneLine) {
  Write("40123\n");
  auto port = ReadReportedPort(fds_[0], 10000);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(*port, 40123);
}

TEST_F(PortPipeTest, WriterGoneWithoutAPortIsUnavailable) {
  Write("401");
  CloseWriter();
  auto port = ReadReportedPort(fds_[0], 10000);
  ASSERT_FALSE(port.ok());
  EXPECT_EQ(port.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(port.status().message().find("'401'"), std::string::npos) << port.status();
}

TEST_F(PortPipeTest, JunkAndOutOfRangeAreRefused) {
  Write("http\n");
  EXPECT_EQ(ReadReportedPort(fds_[0], 10000).status().code(), StatusCode::kUnavailable);
  Write("70000\n");
  EXPECT_EQ(ReadReportedPort(fds_[0], 10000).status().code(), StatusCode::kUnavailable);
  Write(std::string(40, '7'));
  EXPECT_EQ(ReadReportedPort(fds_[0], 10000).status().code(), StatusCode::kUnavailable);
}

TEST_F(PortPipeTest, SilentWriterTimesOut) {
  auto port = ReadReportedPort(fds_[0], 50);
  ASSERT_FALSE(port.ok());
  EXPECT_EQ(port.status().code(), StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace meshpost
