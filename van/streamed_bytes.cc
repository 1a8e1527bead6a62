#include "van/streamed_bytes.h"

#include <utility>

namespace meshpost {

void StreamedBytes::Listen(Listener fn) {
  std::lock_guard<std::mutex> order(notify_mu_);
  size_t ready;
  Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listeners_.push_back(fn);
    ready = ready_;
    status = status_;
  }
  fn(ready, status);
}

void StreamedBytes::Advance(size_t ready) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status_.ok() || ready <= ready_) return;
    ready_ = ready;
  }
  Notify();
}

void StreamedBytes::Fail(const Status& why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status_.ok()) return;
    status_ = why.ok() ? InternalError("StreamedBytes::Fail with an OK status") : why;
  }
  Notify();
}

void StreamedBytes::Notify() {
  std::lock_guard<std::mutex> order(notify_mu_);
  size_t ready;
  Status status;
  std::vector<Listener> listeners;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready = ready_;
    status = status_;
    listeners = listeners_;
  }
  for (auto& fn : listeners) fn(ready, status);
}

size_t StreamedBytes::ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_;
}

Status StreamedBytes::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

}  // namespace meshpost
