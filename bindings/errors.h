// Status -> Python exception mapping for the extension. Each StatusCode raises its own
// class from meshpost.errors (all subclass meshpost.Error plus the builtin that fits:
// ValueError, TimeoutError, ConnectionError, ...). Only bindings/ throws exceptions.
#pragma once

#include <string>

#include "common/status.h"

namespace meshpost::py_bindings {

// Raises the Python exception for a non-OK status (throws pybind11::error_already_set).
[[noreturn]] void RaiseStatus(const Status& status);
inline void ThrowIfError(const Status& status) {
  if (!status.ok()) RaiseStatus(status);
}
// Bad argument types (not a tensor, not an int): meshpost.InvalidTypeError (a TypeError).
[[noreturn]] void RaiseTypeError(const std::string& message);
// Bad argument values: meshpost.InvalidArgumentError (a ValueError).
[[noreturn]] void RaiseValueError(const std::string& message);

}  // namespace meshpost::py_bindings
