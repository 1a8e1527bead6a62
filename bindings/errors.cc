#include "bindings/errors.h"

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace meshpost::py_bindings {
namespace {

const char* ClassFor(StatusCode code) {
  switch (code) {
    case StatusCode::kInvalidArgument: return "InvalidArgumentError";
    case StatusCode::kDeadlineExceeded: return "DeadlineExceededError";
    case StatusCode::kUnavailable: return "UnavailableError";
    case StatusCode::kNotFound: return "NotFoundError";
    case StatusCode::kFailedPrecondition: return "FailedPreconditionError";
    case StatusCode::kResourceExhausted: return "ResourceExhaustedError";
    case StatusCode::kDataLoss: return "DataLossError";
    case StatusCode::kCancelled: return "CancelledError";
    case StatusCode::kUnimplemented: return "UnimplementedError";
    case StatusCode::kInternal:
    case StatusCode::kOk: break;
  }
  return "InternalError";
}

[[noreturn]] void Raise(const char* cls_name, const std::string& message) {
  // Looked up per raise (a dict hit once imported): no static py::object outlives Python.
  py::object cls = py::module_::import("meshpost.errors").attr(cls_name);
  PyErr_SetString(cls.ptr(), message.c_str());
  throw py::error_already_set();
}

}  // namespace

void RaiseStatus(const Status& status) {
  if (status.ok()) Raise("InternalError", "RaiseStatus called with an OK status");
  Raise(ClassFor(status.code()), status.message());
}

void RaiseTypeError(const std::string& message) { Raise("InvalidTypeError", message); }
void RaiseValueError(const std::string& message) { Raise("InvalidArgumentError", message); }

}  // namespace meshpost::py_bindings
