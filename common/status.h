// Status and error codes used by every fallible function in meshpost.
// A Status is either OK or a code plus a human-readable message that names the
// function, the argument, the value and what was expected. Statuses never abort.
#pragma once

#include <ostream>
#include <string>
#include <utility>

namespace meshpost {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,     // caller passed a bad value (maps to ValueError)
  kDeadlineExceeded = 2,    // a wait timed out (TimeoutError)
  kUnavailable = 3,         // a peer died, left or cannot be reached (ConnectionError)
  kNotFound = 4,            // unknown handle, key or node (KeyError / ValueError)
  kFailedPrecondition = 5,  // call made in the wrong state (RuntimeError)
  kResourceExhausted = 6,   // a bounded table is full (RuntimeError)
  kDataLoss = 7,            // malformed or hostile bytes on the wire
  kCancelled = 8,           // stopped / interrupted
  kInternal = 9,            // our own invariant broke
  kUnimplemented = 10,      // feature or hardware not available in this build
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Prefixes the message with context ("while X: ...") keeping the code.
  Status Annotate(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

inline Status OkStatus() { return Status(); }
inline Status InvalidArgumentError(std::string m) {
  return Status(StatusCode::kInvalidArgument, std::move(m));
}
inline Status DeadlineExceededError(std::string m) {
  return Status(StatusCode::kDeadlineExceeded, std::move(m));
}
inline Status UnavailableError(std::string m) {
  return Status(StatusCode::kUnavailable, std::move(m));
}
inline Status NotFoundError(std::string m) { return Status(StatusCode::kNotFound, std::move(m)); }
inline Status FailedPreconditionError(std::string m) {
  return Status(StatusCode::kFailedPrecondition, std::move(m));
}
inline Status ResourceExhaustedError(std::string m) {
  return Status(StatusCode::kResourceExhausted, std::move(m));
}
inline Status DataLossError(std::string m) { return Status(StatusCode::kDataLoss, std::move(m)); }
inline Status CancelledError(std::string m) { return Status(StatusCode::kCancelled, std::move(m)); }
inline Status InternalError(std::string m) { return Status(StatusCode::kInternal, std::move(m)); }
inline Status UnimplementedError(std::string m) {
  return Status(StatusCode::kUnimplemented, std::move(m));
}

}  // namespace meshpost

#define MESHPOST_RETURN_IF_ERROR(expr)       \
  do {                                       \
    ::meshpost::Status _mp_status = (expr);  \
    if (!_mp_status.ok()) return _mp_status; \
  } while (0)
