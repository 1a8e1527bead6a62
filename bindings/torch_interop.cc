// The one translation unit of meshpost that includes libtorch (it is expensive to compile).
#include "bindings/torch_interop.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

#include <sstream>

#include "bindings/errors.h"

namespace py = pybind11;

namespace meshpost::py_bindings {
namespace {

struct DTypePair {
  at::ScalarType torch;
  DType mp;
};

// float8 has no torch 1.13 dtype; such payloads come back as uint8 (same element size).
constexpr DTypePair kDTypes[] = {
    {at::kFloat, DType::kFloat32},  {at::kHalf, DType::kFloat16}, {at::kBFloat16, DType::kBFloat16},
    {at::kDouble, DType::kFloat64}, {at::kChar, DType::kInt8},    {at::kByte, DType::kUInt8},
    {at::kShort, DType::kInt16},    {at::kInt, DType::kInt32},    {at::kLong, DType::kInt64},
    {at::kBool, DType::kBool},
};

bool ToDType(at::ScalarType t, DType* out) {
  for (const DTypePair& p : kDTypes) {
    if (p.torch == t) {
      *out = p.mp;
      return true;
    }
  }
  return false;
}

at::ScalarType ToScalarType(DType d) {
  for (const DTypePair& p : kDTypes) {
    if (p.mp == d) return p.torch;
  }
  return at::kByte;
}

std::string Dims(at::IntArrayRef dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

}  // namespace

std::string SupportedDTypeNames() {
  std::string names;
  for (const DTypePair& p : kDTypes) {
    names += (names.empty() ? "" : ", ") + std::string("torch.") +
             (p.mp == DType::kFloat32 ? "float32" : DTypeName(p.mp));
  }
  return names;
}

bool IsTensor(py::handle obj) { return THPVariable_Check(obj.ptr()); }

TensorView ViewFromTensor(py::handle obj, const std::string& where) {
  if (!THPVariable_Check(obj.ptr())) {
    RaiseTypeError(where + " is a " + std::string(Py_TYPE(obj.ptr())->tp_name) +
                   "; expected a torch.Tensor");
  }
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.defined()) RaiseValueError(where + " is an undefined tensor");
  DType dtype;
  if (!ToDType(t.scalar_type(), &dtype)) {
    RaiseTypeError(where + " has dtype " + py::str(obj.attr("dtype")).cast<std::string>() +
                   ", which meshpost does not move; expected one of " + SupportedDTypeNames());
  }
  if (t.layout() != at::kStrided) {
    RaiseValueError(where + " has a non-strided layout; expected a dense tensor");
  }
  // CUDA tensors are described here and judged by the ps layer, which knows whether the
  // device backend is usable (and says why not).
  if (!t.device().is_cpu() && !t.device().is_cuda()) {
    RaiseValueError(where + " is on device " + t.device().str() +
                    "; meshpost moves cpu and cuda tensors only");
  }
  if (!t.is_contiguous()) {
    RaiseValueError(where + " is not contiguous (shape " + Dims(t.sizes()) + ", strides " +
                    Dims(t.strides()) + "); expected a contiguous tensor, e.g. t.contiguous()");
  }
  if (t.is_conj() || t.is_neg()) {
    RaiseValueError(where + " has a lazy conj/neg bit set; call .resolve_conj()/.resolve_neg()");
  }
  TensorView v;
  v.data = t.numel() == 0 ? nullptr : const_cast<void*>(t.data_ptr());
  v.dtype = dtype;
  v.shape.assign(t.sizes().begin(), t.sizes().end());
  if (t.device().is_cuda()) v.device = Device{DeviceType::kCUDA, t.device().index()};
  // Holding an at::Tensor keeps its storage (and the Python object's data) alive.
  v.owner = std::make_shared<const at::Tensor>(t);
  return v;
}

py::object TensorFromView(const TensorView& view, std::shared_ptr<const void> keep_alive) {
  const at::ScalarType st = ToScalarType(view.dtype);
  std::vector<int64_t> shape = view.shape;
  // A push that landed in a CUDA receive buffer is a view of device memory.
  at::TensorOptions options = at::TensorOptions().dtype(st);
  if (view.device.type == DeviceType::kCUDA) options = options.device(at::kCUDA, view.device.index);
  at::Tensor t;
  if (view.numel() == 0 || view.data == nullptr) {
    t = at::empty(shape, options);
  } else {
    t = at::from_blob(
        view.data, shape, [keep = std::move(keep_alive)](void*) mutable { keep.reset(); }, options);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}

py::object MapPinnedTensor(py::handle obj, int64_t device_index, void* device_ptr) {
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  at::Tensor keep = t;
  at::Tensor mapped = at::from_blob(
      device_ptr, t.sizes(), t.strides(), [keep](void*) mutable { keep.reset(); },
      at::TensorOptions().dtype(t.scalar_type()).device(at::kCUDA, device_index));
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(mapped)));
}

}  // namespace meshpost::py_bindings
