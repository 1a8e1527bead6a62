// Bytes a producer is still writing when their message is sent (GPU staging: the device
// copies a push or response into pinned memory chunk by chunk). The segments of an
// OutMessage marked `streamed` are written in order, as one concatenation; the producer
// calls Advance(n) as the first n bytes of it become final, or Fail(why). A van that
// streams (Van::SupportsStreaming, the tcp van) sends each range as soon as it is ready,
// so copy and network overlap; the receiver still gets the message whole.
#pragma once

#include <cstddef>
#include <functional>
#include <mutex>
#include <vector>

#include "common/result.h"

namespace meshpost {

class StreamedBytes {
 public:
  // fn(ready, status): status OK with the bytes ready so far, or the failure (then ready
  // is what was ready before it). Called once at Listen with the current state, then on
  // every Advance / Fail, on the calling thread, in order, never concurrently for one
  // listener. fn must not call back into this object.
  using Listener = std::function<void(size_t ready, const Status& status)>;

  void Listen(Listener fn);
  // Monotonic: a smaller n than already reported changes nothing.
  void Advance(size_t ready);
  void Fail(const Status& why);

  size_t ready() const;
  Status status() const;

 private:
  void Notify();

  mutable std::mutex mu_;
  std::mutex notify_mu_;  // one notification at a time, so listeners see them in order
  size_t ready_ = 0;
  Status status_;
  std::vector<Listener> listeners_;
};

}  // namespace meshpost
