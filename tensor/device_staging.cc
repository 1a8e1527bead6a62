#include "tensor/device_staging.h"

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

namespace meshpost {
namespace {

constexpr size_t kMinBlock = 4096;

size_t SizeClass(size_t n) {
  size_t c = kMinBlock;
  while (c < n) c <<= 1;
  return c;
}

// Free pinned blocks by size class. Shared with the deleters of handed-out buffers, so a
// buffer dropped after the stager is gone is still freed (the backend outlives both).
struct Pool {
  DeviceBackend* backend = nullptr;
  size_t limit = 0;
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;
  size_t pooled = 0;

  ~Pool() {
    for (auto& [size, p] : free_blocks) backend->FreePinned(p);
  }
  void Return(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (pooled + size <= limit) {
        free_blocks.emplace(size, p);
        pooled += size;
        return;
      }
    }
    backend->FreePinned(p);
  }
};

}  // namespace

class DeviceStager::Impl {
 public:
  struct Batch {
    std::vector<DeviceEvent> chunk_events;  // one per chunk; the last marks the batch done
    std::vector<size_t> chunk_end;          // bytes of the batch done after each chunk
    DeviceEvent after = nullptr;
    Done done;
    OnChunk on_chunk;
  };

  Impl(DeviceBackend* backend, const StagerOptions& options, DeviceStream stream)
      : backend_(backend), options_(options), stream_(stream), pool_(std::make_shared<Pool>()) {
    pool_->backend = backend;
    pool_->limit = options.pool_limit_bytes;
    completer_ = std::thread([this] { Complete(); });
  }

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    completer_.join();
    for (auto& z : zombies_) {
      if (!z.chunk_events.empty()) {
        (void)backend_->SyncEvent(z.chunk_events.back(), options_.copy_timeout_ms);
      }
    }
    zombies_.clear();
    for (DeviceEvent e : free_events_) backend_->DestroyEvent(e);
    backend_->DestroyStream(stream_);
  }

  Result<PinnedBuffer> Acquire(size_t n) {
    const size_t size = SizeClass(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(pool_->mu);
      auto it = pool_->free_blocks.find(size);
      if (it != pool_->free_blocks.end()) {
        p = it->second;
        pool_->free_blocks.erase(it);
        pool_->pooled -= size;
      }
    }
    if (p == nullptr) {
      auto fresh = backend_->AllocPinned(size);
      if (!fresh.ok()) return fresh.status().Annotate("DeviceStager: pinned staging buffer");
      p = *fresh;
    }
    // The caller fills or reads it from the host next: a reuse while a copy still uses
    // the block is exactly what the fake backend's checker reports.
    backend_->HostAccess(p, size, /*write=*/true);
    std::shared_ptr<Pool> pool = pool_;
    std::shared_ptr<void> owner(p, [pool, size](void* q) { pool->Return(q, size); });
    return PinnedBuffer{p, size, std::move(owner)};
  }

  Result<DeviceEvent> TakeEvent() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_events_.empty()) {
        DeviceEvent e = free_events_.back();
        free_events_.pop_back();
        return e;
      }
    }
    return backend_->CreateEvent(options_.device);
  }

  void RecycleEvent(DeviceEvent e) {
    if (e == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    free_events_.push_back(e);
  }

  Result<DeviceEvent> RecordOn(DeviceStream stream) {
    MESHPOST_ASSIGN_OR_RETURN(DeviceEvent e, TakeEvent());
    Status s = backend_->RecordEvent(e, stream);
    if (!s.ok()) {
      RecycleEvent(e);
      return s.Annotate("recording an event on the caller's stream");
    }
    return e;
  }

  Status Submit(const std::vector<Copy>& copies, DeviceEvent after, Done done, OnChunk on_chunk) {
    // Cut the batch's byte stream into chunks: pieces of copies, each chunk ending with an
    // event. An empty batch still gets one event (its Done runs in queue order).
    const size_t chunk = options_.chunk_bytes == 0 ? SIZE_MAX : options_.chunk_bytes;
    std::vector<std::vector<Copy>> chunks(1);
    std::vector<size_t> chunk_end(1, 0);
    size_t total = 0, in_chunk = 0;
    for (const Copy& c : copies) {
      size_t off = 0;
      while (off < c.n) {
        if (in_chunk == chunk) {
          chunks.emplace_back();
          chunk_end.push_back(total);
          in_chunk = 0;
        }
        const size_t n = std::min(c.n - off, chunk - in_chunk);
        chunks.back().push_back(
            {static_cast<char*>(c.dst) + off, static_cast<const char*>(c.src) + off, n});
        off += n;
        in_chunk += n;
        total += n;
        chunk_end.back() = total;
      }
    }
    Batch b;
    b.after = after;
    b.done = std::move(done);
    b.on_chunk = std::move(on_chunk);
    b.chunk_end = std::move(chunk_end);
    for (size_t k = 0; k < chunks.size(); ++k) {
      auto ev = TakeEvent();
      if (!ev.ok()) {
        for (DeviceEvent e : b.chunk_events) RecycleEvent(e);
        RecycleEvent(after);
        return ev.status().Annotate("DeviceStager: staging events");
      }
      b.chunk_events.push_back(*ev);
    }
    // One submitter at a time: the stream order must match the completion queue order.
    std::lock_guard<std::mutex> submit(submit_mu_);
    Status s;
    if (after != nullptr) s = backend_->StreamWaitEvent(stream_, after);
    for (size_t k = 0; k < chunks.size() && s.ok(); ++k) {
      for (size_t i = 0; i < chunks[k].size() && s.ok(); ++i) {
        s = backend_->CopyAsync(chunks[k][i].dst, chunks[k][i].src, chunks[k][i].n, stream_);
      }
      if (s.ok()) s = backend_->RecordEvent(b.chunk_events[k], stream_);
    }
    if (!s.ok()) {
      // Copies already queued may still run: wait for the stream before giving buffers
      // back (the last event recorded, if any, follows every queued copy).
      (void)backend_->RecordEvent(b.chunk_events.back(), stream_);
      (void)backend_->SyncEvent(b.chunk_events.back(), options_.copy_timeout_ms);
      for (DeviceEvent e : b.chunk_events) RecycleEvent(e);
      RecycleEvent(after);
      return s.Annotate("DeviceStager: queueing staging copies");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(b));
    }
    cv_.notify_all();
    return OkStatus();
  }

  void Complete() {
    for (;;) {
      Batch b;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, drained
        b = std::move(queue_.front());
        queue_.pop_front();
      }
      Status s;
      for (size_t k = 0; k < b.chunk_events.size() && s.ok(); ++k) {
        s = backend_->SyncEvent(b.chunk_events[k], options_.copy_timeout_ms);
        if (s.ok() && b.on_chunk) b.on_chunk(k, b.chunk_end[k]);
      }
      if (!s.ok())
        s = s.Annotate("staging copy on the " + std::string(backend_->name()) +
                       " device (did the caller's stream stall?)");
      b.done(s);
      if (s.ok()) {
        for (DeviceEvent e : b.chunk_events) RecycleEvent(e);
        RecycleEvent(b.after);
      } else {
        // The copies may still run: keep what they touch alive until the stager goes.
        zombies_.push_back(std::move(b));
      }
    }
  }

  DeviceBackend* backend_;
  const StagerOptions options_;
  const DeviceStream stream_;
  std::shared_ptr<Pool> pool_;
  std::mutex submit_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;
  std::vector<DeviceEvent> free_events_;
  std::vector<Batch> zombies_;  // touched only by the completion thread, then the destructor
  bool stop_ = false;
  std::thread completer_;
};

Result<std::unique_ptr<DeviceStager>> DeviceStager::Create(DeviceBackend* backend,
                                                           const StagerOptions& options) {
  if (backend == nullptr) return InvalidArgumentError("DeviceStager::Create: null backend");
  MESHPOST_RETURN_IF_ERROR(backend->Available());
  MESHPOST_ASSIGN_OR_RETURN(DeviceStream stream, backend->CreateStream(options.device));
  return std::unique_ptr<DeviceStager>(
      new DeviceStager(std::make_unique<Impl>(backend, options, stream)));
}

DeviceStager::DeviceStager(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceStager::~DeviceStager() = default;

Result<PinnedBuffer> DeviceStager::Acquire(size_t n) { return impl_->Acquire(n); }
Status DeviceStager::Submit(const std::vector<Copy>& copies, DeviceEvent after, Done done,
                            OnChunk on_chunk) {
  return impl_->Submit(copies, after, std::move(done), std::move(on_chunk));
}
size_t DeviceStager::chunk_bytes() const { return impl_->options_.chunk_bytes; }
Result<DeviceEvent> DeviceStager::RecordOn(DeviceStream stream) { return impl_->RecordOn(stream); }
void DeviceStager::Recycle(DeviceEvent event) { impl_->RecycleEvent(event); }
DeviceBackend* DeviceStager::backend() const { return impl_->backend_; }
DeviceStream DeviceStager::stream() const { return impl_->stream_; }

Result<DeviceStager*> LazyStager::Get() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!stager_) {
    if (backend_ == nullptr) return FailedPreconditionError("no device backend configured");
    MESHPOST_RETURN_IF_ERROR(backend_->Available());
    MESHPOST_ASSIGN_OR_RETURN(stager_, DeviceStager::Create(backend_, options_));
  }
  return stager_.get();
}

DeviceStager* LazyStager::IfCreated() {
  std::lock_guard<std::mutex> lock(mu_);
  return stager_.get();
}

Result<void*> LandingBuffers::Acquire(DeviceStager* stager, int node, uint64_t id, size_t index,
                                      size_t n, void* device_dst, Device device) {
  // Allocation (possibly a driver call) happens outside the table's lock.
  MESHPOST_ASSIGN_OR_RETURN(PinnedBuffer buf, stager->Acquire(n == 0 ? 1 : n));
  void* data = buf.data;
  std::lock_guard<std::mutex> lock(mu_);
  pending_[{node, id}][index] = Landing{std::move(buf), device_dst, device, n};
  return data;
}

std::map<size_t, LandingBuffers::Landing> LandingBuffers::Take(int node, uint64_t id) {
  std::map<size_t, Landing> out;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_.find({node, id});
  if (it == pending_.end()) return out;
  out.swap(it->second);
  pending_.erase(it);
  return out;
}

size_t LandingBuffers::pending_messages() {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

}  // namespace meshpost
