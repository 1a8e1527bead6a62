#include "tensor/tensor_view.h"

#include <sstream>

namespace meshpost {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::Describe() const {
  std::ostringstream os;
  os << DTypeName(dtype) << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "] on " << device.ToString();
  return os.str();
}

Result<int64_t> CheckedNumel(const std::vector<int64_t>& shape) {
  if (shape.size() > kMaxTensorDims) {
    return InvalidArgumentError("tensor has " + std::to_string(shape.size()) +
                                " dims; at most " + std::to_string(kMaxTensorDims) +
                                " are supported");
  }
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    int64_t d = shape[i];
    if (d < 0) {
      return InvalidArgumentError("dimension " + std::to_string(i) + " is " + std::to_string(d) +
                                  "; expected >= 0");
    }
    if (d != 0 && n > INT64_MAX / d) {
      return InvalidArgumentError("shape overflows int64 element count");
    }
    n *= d;
  }
  return n;
}

Status ValidateTensor(const TensorView& t, const std::string& where) {
  auto numel = CheckedNumel(t.shape);
  if (!numel.ok()) return numel.status().Annotate(where);
  if (t.device.type != DeviceType::kCPU) {
    return UnimplementedError(where + ": tensor is on " + t.device.ToString() +
                              "; this build of meshpost supports cpu tensors only");
  }
  if (t.data == nullptr && *numel != 0) {
    return InvalidArgumentError(where + ": tensor " + t.Describe() +
                                " has a null data pointer; expected allocated memory");
  }
  return OkStatus();
}

Status ValidateKey(int64_t key, const std::string& where) {
  if (key < 0) {
    return InvalidArgumentError(where + ": key is " + std::to_string(key) +
                                "; expected a non-negative integer");
  }
  return OkStatus();
}

}  // namespace meshpost
