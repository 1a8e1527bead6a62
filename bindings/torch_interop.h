// torch.Tensor <-> TensorView without copies. The only header of bindings/ whose
// implementation includes libtorch; callers see pybind11 handles and TensorViews.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "tensor/tensor_view.h"

namespace meshpost::py_bindings {

// Views a torch tensor in place. `owner` holds a reference to the tensor so meshpost can
// keep it alive until the transfer that touches it completes. Raises InvalidTypeError for a
// non-tensor or an unsupported dtype, InvalidArgumentError for a non-contiguous tensor or a
// device this build cannot move; `where` names the function and argument.
TensorView ViewFromTensor(pybind11::handle obj, const std::string& where);

// A torch tensor over `view`'s bytes (no copy) that holds `keep_alive` until it is freed.
pybind11::object TensorFromView(const TensorView& view, std::shared_ptr<const void> keep_alive);

// A CUDA tensor on `device_index` over device_ptr (the device address of `obj`'s pinned
// host memory) with obj's shape, strides and dtype; holds obj alive. obj must be a tensor.
pybind11::object MapPinnedTensor(pybind11::handle obj, int64_t device_index, void* device_ptr);

// True for a torch.Tensor (or subclass).
bool IsTensor(pybind11::handle obj);

// Names of the torch dtypes this build moves (for error messages and docs).
std::string SupportedDTypeNames();

}  // namespace meshpost::py_bindings
