// Per-request trace: eight nanosecond stamps taken on the GetNanosecond() clock. Worker
// stamps (request start/posted, response received/processed) are from the worker's host,
// server stamps from the server's host; subtract only stamps from the same host.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cstdint>

namespace meshpost {

// The calling thread's OS thread id (gettid), cached per thread: after the first call it
// is one thread-local load, cheap enough for the data path. Trace capture records it so a
// timeline can show which thread took each stamp.
inline uint32_t TraceThreadId() {
  static thread_local uint32_t tid = static_cast<uint32_t>(syscall(SYS_gettid));
  return tid;
}

struct Trace {
  uint64_t request_start = 0;       // worker: ZBatchPushPull entered
  uint64_t request_posted = 0;      // worker: request being handed to the transport
  uint64_t request_received = 0;    // server: request fully received
  uint64_t request_processed = 0;   // server: request returned by GetBatch
  uint64_t response_start = 0;      // server: Respond entered
  uint64_t response_posted = 0;     // server: response being handed to the transport
  uint64_t response_received = 0;   // worker: response header received
  uint64_t response_processed = 0;  // worker: payload in the pull tensors, handle complete
  // OS thread (TraceThreadId) that took each stamp, in the order above; 0 = not known.
  // Only the worker's own stamps (0, 1, 6, 7) are filled on the worker: the server's
  // threads are in the server's trace file.
  std::array<uint32_t, 8> tids = {0, 0, 0, 0, 0, 0, 0, 0};

  std::array<uint64_t, 8> ToArray() const {
    return {request_start,  request_posted,  request_received,  request_processed,
            response_start, response_posted, response_received, response_processed};
  }
};

}  // namespace meshpost
