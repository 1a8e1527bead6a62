#include "common/env.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

TEST(EnvTest, ParseIntAcceptsRange) {
  EXPECT_EQ(*ParseInt("X", "42", 0, 100), 42);
  EXPECT_EQ(*ParseInt("X", "-3", -5, 0), -3);
}

TEST(EnvTest, ParseIntNamesVariableValueAndRange) {
  auto r = ParseInt("DMLC_PS_ROOT_PORT", "80x", 0, 65535);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("DMLC_PS_ROOT_PORT"), std::string::npos);
  EXPECT_NE(r.status().message().find("80x"), std::string::npos);
  EXPECT_NE(r.status().message().find("[0, 65535]"), std::string::npos);
  EXPECT_FALSE(ParseInt("X", "", 0, 1).ok());
  EXPECT_FALSE(ParseInt("X", "99999999999999999999", 0, 1).ok());
  auto out = ParseInt("X", "70000", 0, 65535);
  EXPECT_NE(out.status().message().find("out of range"), std::string::npos);
}

TEST(EnvTest, ParseBool) {
  EXPECT_TRUE(*ParseBool("B", "1"));
  EXPECT_TRUE(*ParseBool("B", "true"));
  EXPECT_FALSE(*ParseBool("B", "0"));
  EXPECT_FALSE(*ParseBool("B", "off"));
  EXPECT_FALSE(ParseBool("B", "maybe").ok());
}

}  // namespace
}  // namespace meshpost
