// DeviceStager: moves device memory through pinned host buffers for transports that can
// only read or write host memory (TCP, and RDMA/same-host when the user chooses staging).
// Copies run on the stager's own stream, after an optional event of the caller's stream
// (need_event), and a completion thread runs each batch's callback once its copies are
// done. Pinned buffers come from a pool and return to it only when the last reference is
// dropped, so a buffer is never reused while a copy or a send still uses it.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "common/result.h"
#include "tensor/device_backend.h"

namespace meshpost {

// A pinned host buffer from the pool; returns to the pool when the last copy is dropped.
struct PinnedBuffer {
  void* data = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> owner;  // hand this to whoever reads data asynchronously
};

struct StagerOptions {
  int device = 0;
  size_t pool_limit_bytes = size_t{1} << 30;  // pinned memory kept for reuse
  int64_t copy_timeout_ms = 60'000;           // a copy (or the awaited event) taking longer fails
  // Copies are split into chunks of this many bytes, each followed by its own event, so a
  // batch's chunks complete (and OnChunk runs) one by one while later chunks still copy.
  size_t chunk_bytes = size_t{4} << 20;  // MESHPOST_GPU_STAGING_CHUNK

  static StagerOptions Chunked(size_t chunk_bytes) {
    StagerOptions o;
    o.chunk_bytes = chunk_bytes;
    return o;
  }
};

class DeviceStager {
 public:
  using Done = std::function<void(const Status&)>;
  // Chunk `index` of a batch finished copying; `bytes_done` bytes of the batch (in the
  // order of its copies) are now in place. Runs on the completion thread, in order,
  // before the batch's Done.
  using OnChunk = std::function<void(size_t index, size_t bytes_done)>;
  struct Copy {
    void* dst = nullptr;
    const void* src = nullptr;
    size_t n = 0;
  };

  static Result<std::unique_ptr<DeviceStager>> Create(DeviceBackend* backend,
                                                      const StagerOptions& options);
  ~DeviceStager();  // waits for queued copies (bounded by copy_timeout_ms), then stops
  DeviceStager(const DeviceStager&) = delete;
  DeviceStager& operator=(const DeviceStager&) = delete;

  // A pinned buffer of at least n bytes that the caller may fill or read.
  Result<PinnedBuffer> Acquire(size_t n);
  // Enqueues `copies` on the stager's stream after `after` (null: no wait) and calls
  // done(status) on the completion thread once they finished. Buffers the copies use must
  // stay referenced until done runs (capture their owners in `done`).
  // The copies are queued in chunks of options.chunk_bytes; on_chunk (optional) runs as
  // each chunk completes, so a consumer can use chunk k while chunk k+1 still copies.
  Status Submit(const std::vector<Copy>& copies, DeviceEvent after, Done done,
                OnChunk on_chunk = nullptr);
  size_t chunk_bytes() const;
  // Records an event on `stream` (the caller's current stream) for Submit's `after`;
  // the returned event is owned by the stager and recycled after the batch that used it.
  Result<DeviceEvent> RecordOn(DeviceStream stream);
  // Gives back an event from RecordOn that will not be passed to Submit.
  void Recycle(DeviceEvent event);

  DeviceBackend* backend() const;
  DeviceStream stream() const;

  class Impl;

 private:
  explicit DeviceStager(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A DeviceStager created at first use (the first GPU tensor a worker or server sees), so
// nodes that never touch GPU memory start no stream and no completion thread. Get() is
// thread-safe; a failed creation (no usable device) is returned and retried next time.
// Owners declare it after the state its callbacks touch, so it is destroyed first and its
// completion thread has stopped before that state goes away.
class LazyStager {
 public:
  LazyStager(DeviceBackend* backend, StagerOptions options)
      : backend_(backend), options_(std::move(options)) {}
  Result<DeviceStager*> Get();
  // The stager when it was already created, else null (never creates one).
  DeviceStager* IfCreated();

 private:
  DeviceBackend* const backend_;
  const StagerOptions options_;
  std::mutex mu_;
  std::unique_ptr<DeviceStager> stager_;
};

// Bytes bound for device memory that a transport can only write to host memory (a
// server's CUDA receive buffers): the transport lands segment `index` of message
// (node, id) in a pinned buffer from Acquire; Take hands the message's landings, with
// their device destinations, to the caller, which copies them to the device on the
// stager. Landings of a message that never arrives whole are dropped with Drop.
class LandingBuffers {
 public:
  struct Landing {
    PinnedBuffer pinned;
    void* device_dst = nullptr;  // where the bytes belong
    Device device;
    size_t n = 0;
  };
  // A pinned buffer of n bytes for segment `index` of message (node, id), bound for
  // device_dst on `device`. A second Acquire for the same segment replaces the first.
  Result<void*> Acquire(DeviceStager* stager, int node, uint64_t id, size_t index, size_t n,
                        void* device_dst, Device device);
  // The landings of message (node, id) by segment index, removed from the table.
  std::map<size_t, Landing> Take(int node, uint64_t id);
  void Drop(int node, uint64_t id) { (void)Take(node, id); }
  size_t pending_messages();

 private:
  std::mutex mu_;
  std::map<std::pair<int, uint64_t>, std::map<size_t, Landing>> pending_;
};

}  // namespace meshpost
