// Result<T>: either a value or a non-OK Status (the StatusOr idea).
// Accessing the value of an error Result is a programming error and aborts.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <utility>

#include "common/status.h"

namespace meshpost {

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    if (status_.ok()) {
      status_ = InternalError("Result constructed from an OK status without a value");
    }
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }

  T& value() & {
    CheckOk();
    return *value_;
  }
  const T& value() const& {
    CheckOk();
    return *value_;
  }
  T&& value() && {
    CheckOk();
    return std::move(*value_);
  }
  T* operator->() {
    CheckOk();
    return &*value_;
  }
  const T* operator->() const {
    CheckOk();
    return &*value_;
  }
  T& operator*() & {
    CheckOk();
    return *value_;
  }
  const T& operator*() const& {
    CheckOk();
    return *value_;
  }
  T&& operator*() && {
    CheckOk();
    return std::move(*value_);
  }

 private:
  void CheckOk() const {
    if (!value_) {
      // Our own broken invariant: the caller did not check ok().
      std::fprintf(stderr, "meshpost: value() on error Result: %s\n", status_.ToString().c_str());
      std::abort();
    }
  }
  Status status_;
  std::optional<T> value_;
};

}  // namespace meshpost

#define MESHPOST_CONCAT_INNER(a, b) a##b
#define MESHPOST_CONCAT(a, b) MESHPOST_CONCAT_INNER(a, b)
#define MESHPOST_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  lhs = std::move(tmp).value()
#define MESHPOST_ASSIGN_OR_RETURN(lhs, expr) \
  MESHPOST_ASSIGN_OR_RETURN_IMPL(MESHPOST_CONCAT(_mp_result_, __LINE__), lhs, expr)
