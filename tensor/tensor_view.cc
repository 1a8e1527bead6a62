#include "tensor/tensor_view.h"

#include <sstream>

#include "tensor/device_backend.h"

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
    return InvalidArgumentError("tensor has " + std::to_string(shape.size()) + " dims; at most " +
                                std::to_string(kMaxTensorDims) + " are supported");
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

Status ValidateTensor(const TensorView& t, const std::string& where, DeviceBackend* backend) {
  auto numel = CheckedNumel(t.shape);
  if (!numel.ok()) return numel.status().Annotate(where);
  if (t.device.type != DeviceType::kCPU) {
    if (backend == nullptr) {
      return UnimplementedError(where + ": tensor is on " + t.device.ToString() +
                                "; only cpu tensors are accepted here");
    }
    Status usable = backend->Available();
    if (!usable.ok()) {
      return Status(usable.code(),
                    where + ": tensor is on " + t.device.ToString() +
                        " but GPU tensors cannot be moved in this process: " + usable.message());
    }
    if (t.device.index < 0 || t.device.index >= backend->device_count()) {
      return InvalidArgumentError(where + ": tensor is on " + t.device.ToString() + "; only " +
                                  std::to_string(backend->device_count()) +
                                  " device(s) are visible");
    }
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

bool AnyOnDevice(const std::vector<TensorView>& tensors) {
  for (const TensorView& t : tensors) {
    if (t.device.type != DeviceType::kCPU) return true;
  }
  return false;
}

bool AnyOnDevice(const KeyTensorBatch& batch) {
  for (const KeyTensor& kt : batch) {
    if (kt.tensor.device.type != DeviceType::kCPU) return true;
  }
  return false;
}

}  // namespace meshpost
