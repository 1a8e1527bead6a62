// TensorView: a non-owning description of contiguous tensor memory (pointer, dtype,
// shape, device) plus an optional owner the library holds until a transfer that reads or
// writes the memory completes. KeyTensor pairs a view with its key.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "tensor/dtype.h"

namespace meshpost {

constexpr size_t kMaxTensorDims = 16;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  Device device;
  // Optional keep-alive: held by meshpost until the transfer touching `data` is done.
  std::shared_ptr<const void> owner;

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
  std::string Describe() const;  // "bfloat16[128, 7168] on cpu"
};

struct KeyTensor {
  int64_t key = 0;
  TensorView tensor;
};
using KeyTensorBatch = std::vector<KeyTensor>;

// True when some tensor lives in device (GPU) memory rather than host memory.
bool AnyOnDevice(const std::vector<TensorView>& tensors);
bool AnyOnDevice(const KeyTensorBatch& batch);

class DeviceBackend;

// Checks a caller's tensor: non-null data (unless empty), sane shape, and a device it can
// move: cpu always; cuda only where `backend` is given and usable (otherwise the error
// says why GPU tensors are refused). `where` names the function and argument, e.g.
// "ZBatchPushPull: push[2]".
Status ValidateTensor(const TensorView& t, const std::string& where,
                      DeviceBackend* backend = nullptr);
Status ValidateKey(int64_t key, const std::string& where);

// Product of dims with overflow and negativity checks.
Result<int64_t> CheckedNumel(const std::vector<int64_t>& shape);

}  // namespace meshpost
