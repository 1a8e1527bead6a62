#include "common/status.h"

#include <gtest/gtest.h>

#include "common/result.h"

namespace meshpost {
namespace {

TEST(StatusTest, OkAndErrors) {
  EXPECT_TRUE(OkStatus().ok());
  Status s = InvalidArgumentError("bad key");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.ToString(), "INVALID_ARGUMENT: bad key");
  EXPECT_EQ(s.Annotate("Wait").message(), "Wait: bad key");
  EXPECT_EQ(s.Annotate("Wait").code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(OkStatus().Annotate("x").ok());
}

Result<int> Half(int v) {
  if (v % 2) return InvalidArgumentError("odd");
  return v / 2;
}

Status UseHalf(int v, int* out) {
  MESHPOST_ASSIGN_OR_RETURN(*out, Half(v));
  return OkStatus();
}

TEST(ResultTest, ValueOrStatus) {
  EXPECT_EQ(*Half(4), 2);
  EXPECT_EQ(Half(3).status().code(), StatusCode::kInvalidArgument);
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  EXPECT_EQ(UseHalf(7, &out).code(), StatusCode::kInvalidArgument);
}

TEST(ResultTest, OkStatusWithoutValueBecomesInternal) {
  Result<int> r{OkStatus()};
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

}  // namespace
}  // namespace meshpost
