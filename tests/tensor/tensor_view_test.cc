#include "tensor/tensor_view.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kFloat64), 8u);
  EXPECT_EQ(DTypeSize(DType::kFloat8E4M3), 1u);
  EXPECT_STREQ(DTypeName(DType::kInt32), "int32");
  EXPECT_TRUE(IsValidDType(11));
  EXPECT_FALSE(IsValidDType(12));
  EXPECT_FALSE(IsValidDType(-1));
}

TEST(TensorViewTest, BytesAndDescribe) {
  float data[6];
  TensorView t{data, DType::kFloat32, {2, 3}, {}, nullptr};
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.nbytes(), 24u);
  EXPECT_EQ(t.Describe(), "float32[2, 3] on cpu");
  EXPECT_TRUE(ValidateTensor(t, "f: x").ok());
}

TEST(TensorViewTest, ValidationErrorsNameTheArgument) {
  TensorView null_data{nullptr, DType::kFloat32, {2}, {}, nullptr};
  Status s = ValidateTensor(null_data, "ZBatchPushPull: push[1]");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("push[1]"), std::string::npos);
  EXPECT_NE(s.message().find("null"), std::string::npos);

  TensorView empty{nullptr, DType::kFloat32, {0, 4}, {}, nullptr};
  EXPECT_TRUE(ValidateTensor(empty, "x").ok()) << "empty tensors may have no memory";

  float d;
  TensorView negative{&d, DType::kFloat32, {-1}, {}, nullptr};
  EXPECT_EQ(ValidateTensor(negative, "x").code(), StatusCode::kInvalidArgument);

  TensorView cuda{&d, DType::kFloat32, {1}, {DeviceType::kCUDA, 0}, nullptr};
  s = ValidateTensor(cuda, "x");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("cuda:0"), std::string::npos);

  EXPECT_EQ(ValidateKey(-1, "k").code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateKey(0, "k").ok());
}

TEST(TensorViewTest, CheckedNumelOverflow) {
  EXPECT_FALSE(CheckedNumel({INT64_MAX / 2, 3}).ok());
  EXPECT_FALSE(CheckedNumel(std::vector<int64_t>(17, 1)).ok());
  EXPECT_EQ(*CheckedNumel({}), 1);
  EXPECT_EQ(*CheckedNumel({0, INT64_MAX}), 0);
}

}  // namespace
}  // namespace meshpost
