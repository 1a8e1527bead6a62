#include "ps/af_server.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/clock.h"
#include "common/logging.h"
#include "ps/node_context.h"
#include "ps/request_queues.h"
#include "ps/server_request.h"
#include "ps/trace_recorder.h"
#include "tensor/device_staging.h"
#include "van/streamed_bytes.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";

struct RecvChunk {
  char* data = nullptr;
  size_t capacity = 0;
  std::shared_ptr<const void> owner;
  // cuda: bytes land in pinned staging, then an async copy (docs/gpu.md), or, over a van
  // that writes device memory, straight in
  Device device;
};

}  // namespace

class AFTensorServer::Impl : public DataHandler {
 public:
  explicit Impl(NodeContext* ctx)
      : ctx_(ctx),
        num_workers_(ctx->options().num_workers),
        num_servers_(ctx->options().num_servers),
        backend_(ctx->options().device_backend ? ctx->options().device_backend : CudaBackend()),
        waiter_(ctx->wait_policy(), ctx->progress_engine()),
        queues_(num_workers_),
        worker_down_(num_workers_),
        handle_base_(static_cast<uint64_t>(ctx->options().Rank()) << kHandleRankShift),
        next_handle_(handle_base_ + 1),
        recorder_(StartNodeTraceRecorder(ctx->options(), 2, ctx->clock_sync(),
                                         [ctx, n = num_servers_](int w) {
                                           return TraceTransportFromName(
                                               ctx->PeerTransport(WorkerNodeId(n, w)));
                                         })),
        stager_(backend_, StagerOptions::Chunked(ctx->options().gpu_staging_chunk)) {}

  Result<std::vector<BatchRequest>> GetBatch(int64_t timeout_ms) {
    const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
    uint64_t seen_epoch = 0;  // 0 first: check down workers once before waiting
    for (;;) {
      const bool woke = waiter_.WaitUntil(
          [this, seen_epoch] {
            return ready_.load(std::memory_order_acquire) ||
                   down_epoch_.load(std::memory_order_acquire) != seen_epoch;
          },
          deadline);
      seen_epoch = down_epoch_.load(std::memory_order_acquire);
      std::lock_guard<std::mutex> lock(mu_);
      if (queues_.BatchReady()) {
        std::vector<std::shared_ptr<ServerRequest>> batch = queues_.PopBatch();
        ready_.store(queues_.BatchReady(), std::memory_order_release);
        const uint64_t now = GetNanosecond();
        const uint32_t tid = recorder_ ? TraceThreadId() : 0;
        std::vector<BatchRequest> out;
        out.reserve(batch.size());
        for (auto& r : batch) {
          r->processed = now;
          r->processed_tid = tid;
          BatchRequest b = BatchRequestOf(*r);
          outstanding_.emplace(r->handle, std::move(r));
          out.push_back(std::move(b));
        }
        return out;
      }
      for (int w = 0; w < num_workers_; ++w) {
        if (!worker_down_[w].ok() && !queues_.HasPending(w)) {
          return UnavailableError("GetBatch: worker " + std::to_string(w) +
                                  " is down and has no pending request, so no batch can "
                                  "complete: " +
                                  worker_down_[w].message());
        }
      }
      if (!woke && GetNanosecond() >= deadline) {
        std::string missing;
        for (int w = 0; w < num_workers_; ++w) {
          if (!queues_.HasPending(w)) missing += (missing.empty() ? "" : ", ") + std::to_string(w);
        }
        return DeadlineExceededError("GetBatch: no complete batch after " +
                                     std::to_string(timeout_ms) + " ms; waiting for worker(s) " +
                                     missing);
      }
      // Woken by a down worker whose queue still holds requests: wait on.
    }
  }

  Status Respond(uint64_t handle, const std::vector<TensorView>& tensors, const StreamSync& sync) {
    const uint64_t start = GetNanosecond();
    std::shared_ptr<ServerRequest> r;
    std::vector<TensorView> in_place;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = outstanding_.find(handle);
      if (it == outstanding_.end()) return UnknownHandle("Respond", handle);
      r = it->second;
      // No tensors: the answer is already in the worker's slots (BatchRequest::outputs).
      if (tensors.empty() && !r->slots.empty() && AllSlotsShared(*r)) {
        in_place = OutputsOf(*r);
      } else {
        MESHPOST_RETURN_IF_ERROR(CheckResponse("Respond", *r, tensors, backend_));
      }
      outstanding_.erase(it);
    }
    if (!in_place.empty()) return SendResponseNow(std::move(r), in_place, start);
    DeviceEvent after = nullptr;
    Status prepared = PrepareDevice("Respond", tensors, sync, &after);
    // The request is no longer outstanding: tell the worker instead of leaving it waiting.
    if (!prepared.ok()) {
      (void)SendError(r, prepared);
      return prepared;
    }
    return SendResponse(std::move(r), tensors, start, after);
  }

  Status RespondVec(const TensorView& ret_buffer, const std::vector<TensorView>& tensors_vec,
                    const std::vector<uint64_t>& handles, const StreamSync& sync) {
    const uint64_t start = GetNanosecond();
    const char* fn = "RespondVec";
    if (tensors_vec.size() != handles.size()) {
      return InvalidArgumentError(std::string(fn) + ": tensors_vec has " +
                                  std::to_string(tensors_vec.size()) + " tensors but handles has " +
                                  std::to_string(handles.size()) + "; expected equal lengths");
    }
    MESHPOST_RETURN_IF_ERROR(
        ValidateTensor(ret_buffer, std::string(fn) + ": ret_buffer", backend_));
    if (ret_buffer.shape.empty()) {
      return InvalidArgumentError(std::string(fn) + ": ret_buffer is a scalar (" +
                                  ret_buffer.Describe() + "); expected at least one dimension");
    }
    std::vector<int64_t> rows;
    for (size_t i = 0; i < tensors_vec.size(); ++i) {
      if (tensors_vec[i].shape.empty()) {
        return InvalidArgumentError(std::string(fn) + ": tensors_vec[" + std::to_string(i) +
                                    "] is a scalar; expected a tensor with rows (dim 0)");
      }
      rows.push_back(tensors_vec[i].shape[0]);
    }
    MESHPOST_ASSIGN_OR_RETURN(std::vector<RowSlice> slices,
                              RunningOffsetSlices(rows, ret_buffer.shape[0]));
    const size_t row_bytes = ret_buffer.shape[0] == 0
                                 ? 0
                                 : ret_buffer.nbytes() / static_cast<size_t>(ret_buffer.shape[0]);
    std::vector<TensorView> views(handles.size());
    for (size_t i = 0; i < handles.size(); ++i) {
      TensorView& v = views[i];
      v = ret_buffer;
      v.data = static_cast<char*>(ret_buffer.data) + slices[i].begin * row_bytes;
      v.shape[0] = slices[i].rows;
    }
    // Check every handle before sending anything, so a bad entry sends nothing.
    std::vector<std::shared_ptr<ServerRequest>> requests;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < handles.size(); ++i) {
        for (size_t j = 0; j < i; ++j) {
          if (handles[j] == handles[i]) {
            return InvalidArgumentError(std::string(fn) + ": handle " + std::to_string(handles[i]) +
                                        " appears twice (handles[" + std::to_string(j) + "] and [" +
                                        std::to_string(i) + "])");
          }
        }
        auto it = outstanding_.find(handles[i]);
        if (it == outstanding_.end()) return UnknownHandle(fn, handles[i]);
        MESHPOST_RETURN_IF_ERROR(
            CheckResponse((std::string(fn) + " handles[" + std::to_string(i) + "]").c_str(),
                          *it->second, {views[i]}, backend_));
        requests.push_back(it->second);
      }
      for (uint64_t h : handles) outstanding_.erase(h);
    }
    // GPUDirect: one registration of the whole buffer serves every view of it.
    // (Asked only for a CUDA buffer: the question may load the CUDA driver.)
    const bool direct = ret_buffer.device.type != DeviceType::kCPU &&
                        std::any_of(requests.begin(), requests.end(), [this](const auto& r) {
                          return ctx_->PeerTakesMemory(r->worker_node, MemoryKind::kCudaDevice);
                        });
    Status prepared = direct
                          ? RegisterForGpuDirect(ctx_, ret_buffer, std::string(fn) + ": ret_buffer")
                          : OkStatus();
    DeviceEvent after = nullptr;
    if (prepared.ok()) prepared = PrepareDevice(fn, {ret_buffer}, sync, &after);
    if (!prepared.ok()) {
      for (auto& r : requests) (void)SendError(r, prepared);
      return prepared;
    }
    Status first_error;
    for (size_t i = 0; i < requests.size(); ++i) {
      // One event for the whole call: the first staging batch waits for it, and the later
      // ones follow it on the stager's stream.
      Status s = SendResponse(std::move(requests[i]), {views[i]}, start, i == 0 ? after : nullptr,
                              after != nullptr);
      if (!s.ok() && first_error.ok()) first_error = s;
    }
    return first_error;
  }

  Status RegisterRecvBuffer(const TensorView& tensor, const std::vector<int>& worker_ranks,
                            const std::vector<int64_t>& keys) {
    const std::string fn = "RegisterRecvBuffer";
    // CUDA tensors are accepted: pushes land in pinned staging and are copied to them
    // before GetBatch returns the request.
    MESHPOST_RETURN_IF_ERROR(ValidateTensor(tensor, fn + ": tensor", backend_));
    if (tensor.device.type != DeviceType::kCPU) {
      auto st = Stager();
      if (!st.ok()) return st.status().Annotate(fn);
    }
    if (worker_ranks.empty() || worker_ranks.size() != keys.size()) {
      return InvalidArgumentError(fn + ": worker_ranks has " + std::to_string(worker_ranks.size()) +
                                  " entries and keys " + std::to_string(keys.size()) +
                                  "; expected equal, non-zero lengths (one chunk per pair)");
    }
    const size_t n = worker_ranks.size();
    if (tensor.shape.empty() || tensor.shape[0] == 0 ||
        tensor.shape[0] % static_cast<int64_t>(n) != 0) {
      return InvalidArgumentError(fn + ": tensor " + tensor.Describe() +
                                  " does not split evenly along dim 0 into " + std::to_string(n) +
                                  " chunks (one per (worker, key) pair)");
    }
    for (size_t i = 0; i < n; ++i) {
      if (worker_ranks[i] < 0 || worker_ranks[i] >= num_workers_) {
        return InvalidArgumentError(fn + ": worker_ranks[" + std::to_string(i) +
                                    "]=" + std::to_string(worker_ranks[i]) +
                                    "; expected 0 <= rank < " + std::to_string(num_workers_));
      }
      MESHPOST_RETURN_IF_ERROR(ValidateKey(keys[i], fn + ": keys[" + std::to_string(i) + "]"));
      for (size_t j = 0; j < i; ++j) {
        if (worker_ranks[j] == worker_ranks[i] && keys[j] == keys[i]) {
          return InvalidArgumentError(fn + ": (worker " + std::to_string(worker_ranks[i]) +
                                      ", key " + std::to_string(keys[i]) + ") appears twice");
        }
      }
    }
    const size_t chunk = tensor.nbytes() / n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < n; ++i) {
        RecvChunk c;
        c.data = static_cast<char*>(tensor.data) + i * chunk;
        c.capacity = chunk;
        c.owner = tensor.owner;
        c.device = tensor.device;
        recv_buffers_[{worker_ranks[i], keys[i]}] = std::move(c);
      }
    }
    // CUDA chunks go only to the transports that write device memory themselves (cma with
    // CUDA IPC, rdma with GPUDirect); over the others pushes land in pinned memory.
    const bool cuda = tensor.device.type != DeviceType::kCPU;
    if (cuda) gpu_recv_.store(true, std::memory_order_release);
    for (size_t i = 0; i < n; ++i) {
      ctx_->OnRecvBufferRegistered(worker_ranks[i], keys[i],
                                   static_cast<char*>(tensor.data) + i * chunk, chunk,
                                   cuda ? tensor.device.index : -1);
    }
    if (cuda) {
      MP_LOG_INFO(kLog, "registered {} receive chunks of {} bytes on {}", n, chunk,
                  tensor.device.ToString());
      return OkStatus();
    }
    MP_LOG_INFO(kLog, "registered {} receive chunks of {} bytes", n, chunk);
    return OkStatus();
  }

  Result<std::vector<PullSlot>> PullSlots(uint64_t handle) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = outstanding_.find(handle);
    if (it == outstanding_.end()) return UnknownHandle("PullSlots", handle);
    return SlotsOf(*it->second);
  }

  Result<std::vector<TensorView>> Outputs(uint64_t handle) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = outstanding_.find(handle);
    if (it == outstanding_.end()) return UnknownHandle("Outputs", handle);
    return OutputsOf(*it->second);
  }

  int num_workers() const { return num_workers_; }

  // --- DataHandler, called on the van's receive thread ---

  Result<void*> Destination(const Meta& meta, size_t index) override {
    MESHPOST_ASSIGN_OR_RETURN(int rank, WorkerRankOf(meta));
    const TensorDesc& d = meta.data[index];
    RecvChunk chunk;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = recv_buffers_.find({rank, d.key});
      if (it == recv_buffers_.end()) return nullptr;
      if (d.nbytes > it->second.capacity) {
        return InvalidArgumentError("push of key " + std::to_string(d.key) + " from worker " +
                                    std::to_string(rank) + " is " + std::to_string(d.nbytes) +
                                    " bytes but its registered receive buffer chunk holds " +
                                    std::to_string(it->second.capacity));
      }
      if (it->second.device.type == DeviceType::kCPU) return static_cast<void*>(it->second.data);
      chunk = it->second;
    }
    // A CUDA chunk: cma with CUDA IPC and rdma with GPUDirect write it themselves (device
    // to device, a one-sided write, or a copy out of a van buffer); elsewhere the bytes
    // land in pinned memory and OnData copies them.
    if (ctx_->PeerWritesDevice(meta.sender)) return static_cast<void*>(chunk.data);
    MESHPOST_ASSIGN_OR_RETURN(DeviceStager * stager, Stager());
    return landing_.Acquire(stager, meta.sender, meta.id, index, d.nbytes, chunk.data,
                            chunk.device);
  }

  void OnData(InMessage&& msg) override {
    if (msg.meta.cmd == Command::kCancel) {
      OnCancel(msg.meta);
      return;
    }
    auto rank = WorkerRankOf(msg.meta);
    if (!rank.ok()) {
      MP_LOG_ERROR(kLog, "server dropped message: {}", rank.status().ToString());
      return;
    }
    auto r = std::make_shared<ServerRequest>();
    r->received = GetNanosecond();
    if (recorder_) r->received_tid = TraceThreadId();
    r->worker_rank = *rank;
    r->worker_node = msg.meta.sender;
    r->request_id = msg.meta.id;
    r->push = std::move(msg.meta.data);
    r->slots = std::move(msg.meta.slots);
    r->segments = std::move(msg.segments);
    r->peer_slots = std::move(msg.peer_slots);
    if (!gpu_recv_.load(std::memory_order_acquire)) return Enqueue(std::move(r));
    // With CUDA receive buffers registered, every request passes through the stager (an
    // empty batch for CPU-only ones) so requests of a worker stay in arrival order.
    std::map<size_t, LandingBuffers::Landing> landed = landing_.Take(msg.meta.sender, msg.meta.id);
    std::vector<DeviceStager::Copy> copies;
    std::vector<PinnedBuffer> pinned;
    for (auto& [i, l] : landed) {
      if (i >= r->segments.size() || r->segments[i].data != l.pinned.data) continue;
      if (r->devices.empty()) r->devices.resize(r->segments.size());
      copies.push_back({l.device_dst, l.pinned.data, l.n});
      r->segments[i].data = l.device_dst;  // the registered chunk's owner is the user's
      r->segments[i].owner = nullptr;
      r->devices[i] = l.device;
      pinned.push_back(std::move(l.pinned));
    }
    MarkWrittenCudaChunks(r.get());
    auto stager = Stager();
    Status queued = stager.ok() ? OkStatus() : stager.status();
    if (queued.ok()) {
      queued = (*stager)->Submit(copies, nullptr, [this, r, pinned](const Status& copied) {
        if (copied.ok()) return Enqueue(r);
        MP_LOG_ERROR(kLog, "push from worker {} not delivered: {}", r->worker_rank,
                     copied.ToString());
        (void)SendError(r, copied, "copying the push to the GPU receive buffer failed: ");
      });
    }
    if (!queued.ok()) {
      MP_LOG_ERROR(kLog, "push from worker {} not delivered: {}", r->worker_rank,
                   queued.ToString());
      (void)SendError(r, queued, "copying the push to the GPU receive buffer failed: ");
    }
  }

  // Pushes a van wrote straight into CUDA receive chunks (Destination returned the chunk)
  // are device tensors of the request.
  void MarkWrittenCudaChunks(ServerRequest* r) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < r->segments.size() && i < r->push.size(); ++i) {
      if (!r->devices.empty() && r->devices[i].type != DeviceType::kCPU) continue;  // landed
      auto it = recv_buffers_.find({r->worker_rank, r->push[i].key});
      if (it == recv_buffers_.end() || it->second.device.type == DeviceType::kCPU ||
          r->segments[i].data != it->second.data) {
        continue;
      }
      if (r->devices.empty()) r->devices.resize(r->segments.size());
      r->devices[i] = it->second.device;
      r->segments[i].owner = nullptr;
    }
  }

  // Queues a request for GetBatch.
  void Enqueue(std::shared_ptr<ServerRequest> r) {
    const int rank = r->worker_rank;
    {
      std::lock_guard<std::mutex> lock(mu_);
      r->handle = next_handle_++;
      queues_.Push(rank, std::move(r));
      ready_.store(queues_.BatchReady(), std::memory_order_release);
    }
    waiter_.Notify();
  }

  void OnDropped(const Meta& meta, const Status& why) override {
    landing_.Drop(meta.sender, meta.id);  // pinned landings of a refused message, if any
    if (meta.cmd != Command::kRequest || !WorkerRankOf(meta).ok()) return;
    // Tell the worker, so its handle fails now instead of timing out.
    OutMessage out;
    out.meta.cmd = Command::kResponse;
    out.meta.sender = ctx_->node_id();
    out.meta.recipient = meta.sender;
    out.meta.id = meta.id;
    out.meta.status_code = static_cast<int32_t>(why.code());
    out.meta.body = why.message();
    Status s = ctx_->Send(std::move(out));
    if (!s.ok()) MP_LOG_ERROR(kLog, "could not report a refused request: {}", s.ToString());
  }

  // The worker's handle failed (another server died or refused it): a request of it still
  // queued here would pair with other workers' requests of later rounds, and lockstep
  // workers would then wait on each other for good. Already batched: answered as usual
  // (the worker drops the answer).
  void OnCancel(const Meta& meta) {
    const int w = meta.sender - 1 - num_servers_;
    if (w < 0 || w >= num_workers_) return;
    std::lock_guard<std::mutex> lock(mu_);
    queues_.RemoveIf(
        w, [&](const std::shared_ptr<ServerRequest>& r) { return r->request_id == meta.id; });
    ready_.store(queues_.BatchReady(), std::memory_order_release);
  }

  void SetWaitPolicy(const WaitPolicy& policy) override { waiter_.set_policy(policy); }
  void OnNodeUp(int node_id) override {
    const int w = node_id - 1 - num_servers_;
    if (w < 0 || w >= num_workers_) return;
    std::lock_guard<std::mutex> lock(mu_);
    // Requests the old holder left queued would be answered to the new one (which knows
    // none of their handles) and pair with other workers' requests of a later round.
    queues_.Clear(w);
    ready_.store(queues_.BatchReady(), std::memory_order_release);
    worker_down_[w] = OkStatus();
  }

  void OnNodeDown(int node_id, const Status& why) override {
    const int w = node_id - 1 - num_servers_;
    if (w < 0 || w >= num_workers_) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      worker_down_[w] = why;
    }
    down_epoch_.fetch_add(1, std::memory_order_acq_rel);
    waiter_.Notify();
  }

 private:
  Result<int> WorkerRankOf(const Meta& meta) const {
    return RequestingWorker(meta, num_servers_, num_workers_);
  }

  Status UnknownHandle(const char* fn, uint64_t handle) const {
    return UnknownServerHandle(fn, handle, handle_base_, next_handle_);
  }

  Result<DeviceStager*> Stager() { return stager_.Get(); }

  // With GPU tensors and need_event: an event on the caller's stream for the staging copies.
  Status PrepareDevice(const char* fn, const std::vector<TensorView>& tensors,
                       const StreamSync& sync, DeviceEvent* after) {
    if (!AnyOnDevice(tensors)) return OkStatus();
    auto st = Stager();
    if (!st.ok()) return st.status().Annotate(fn);
    if (!sync.need_event) return OkStatus();
    auto ev = (*st)->RecordOn(sync.stream);
    if (!ev.ok()) return ev.status().Annotate(std::string(fn) + ": need_event");
    *after = *ev;
    return OkStatus();
  }

  // GPU tensors are copied to pinned buffers first; the response leaves from the stager's
  // completion thread. A failed copy answers the worker with the error instead, so its
  // handle fails rather than waiting for a response that never comes.
  // follows_event: an earlier response of the same call waits for the caller's event on the
  // stager's stream, so this one must follow it there too.
  Status SendResponse(std::shared_ptr<ServerRequest> r, const std::vector<TensorView>& tensors,
                      uint64_t start, DeviceEvent after = nullptr, bool follows_event = false) {
    if (recorder_) r->respond_tid = TraceThreadId();
    if (!AnyOnDevice(tensors)) return SendResponseNow(std::move(r), tensors, start);
    MESHPOST_ASSIGN_OR_RETURN(DeviceStager * stager, Stager());
    // GPUDirect: the worker's transport reads the device tensors in place (registered here);
    // with need_event an empty batch on the stager's stream waits for the caller's event.
    const bool direct = ctx_->PeerTakesMemory(r->worker_node, MemoryKind::kCudaDevice);
    if (direct) {
      for (size_t j = 0; j < tensors.size(); ++j) {
        Status reg = RegisterForGpuDirect(ctx_, tensors[j], "tensors[" + std::to_string(j) + "]");
        if (!reg.ok()) {
          if (after != nullptr) stager->Recycle(after);
          (void)SendError(r, reg);
          return reg;
        }
      }
      if (after == nullptr && !follows_event) return SendResponseNow(std::move(r), tensors, start);
    }
    std::vector<TensorView> staged = tensors;
    std::vector<DeviceStager::Copy> copies;
    std::vector<bool> pinned(staged.size(), false);
    size_t staged_bytes = 0;
    for (size_t j = 0; j < staged.size(); ++j) {
      TensorView& t = staged[j];
      if (direct || t.device.type == DeviceType::kCPU || t.nbytes() == 0) continue;
      auto buf = stager->Acquire(t.nbytes());
      if (!buf.ok())
        return buf.status().Annotate("response for handle " + std::to_string(r->handle));
      copies.push_back({buf->data, t.data, t.nbytes()});
      t.data = buf->data;
      t.device = Device{};
      // The pinned copy stays referenced until the transport is done; the GPU tensor's
      // owner until the copy finished (held by the callback below).
      t.owner = buf->owner;
      pinned[j] = true;
      staged_bytes += t.nbytes();
    }
    // Over a transport that streams (tcp), a response of more than one staging chunk
    // leaves at once and each chunk goes on the wire as soon as it is copied.
    std::shared_ptr<StreamedBytes> stream;
    if (staged_bytes > stager->chunk_bytes() && ctx_->PeerStreams(r->worker_node)) {
      stream = std::make_shared<StreamedBytes>();
    }
    Status queued = stager->Submit(
        copies, after,
        [this, r, staged, tensors, start, stream, staged_bytes](const Status& copied) {
          if (stream) {
            // A failure reaches the worker as the dropped response (STREAM_ABORT).
            copied.ok() ? stream->Advance(staged_bytes) : stream->Fail(copied);
            return;
          }
          Status s = copied.ok() ? SendResponseNow(r, staged, start) : SendError(r, copied);
          if (!s.ok()) MP_LOG_ERROR(kLog, "{}", s.ToString());
        },
        stream ? [stream](size_t, size_t done) { stream->Advance(done); }
               : DeviceStager::OnChunk());
    if (!queued.ok() || !stream) return queued;
    return SendResponseNow(std::move(r), staged, start, stream, &pinned);
  }

  Status SendError(const std::shared_ptr<ServerRequest>& r, const Status& why,
                   const char* what = "the GPU response could not be sent: ") {
    OutMessage out;
    out.meta.cmd = Command::kResponse;
    out.meta.sender = ctx_->node_id();
    out.meta.recipient = r->worker_node;
    out.meta.id = r->request_id;
    out.meta.status_code = static_cast<int32_t>(why.code());
    out.meta.body = what + why.message();
    return ctx_->Send(std::move(out));
  }

  // stream: the tensors marked in `streamed` are still being copied (StreamedBytes).
  Status SendResponseNow(std::shared_ptr<ServerRequest> r, const std::vector<TensorView>& tensors,
                         uint64_t start, const std::shared_ptr<StreamedBytes>& stream = nullptr,
                         const std::vector<bool>* streamed = nullptr) {
    OutMessage out;
    out.meta.cmd = Command::kResponse;
    out.meta.sender = ctx_->node_id();
    out.meta.recipient = r->worker_node;
    out.meta.id = r->request_id;
    out.meta.data.reserve(tensors.size());
    for (size_t j = 0; j < tensors.size(); ++j) {
      TensorDesc d = r->slots[j];
      out.meta.data.push_back(std::move(d));
      const RecvSegment* peer = j < r->peer_slots.size() && r->peer_slots[j].data != nullptr
                                    ? &r->peer_slots[j]
                                    : nullptr;
      // A mapped CUDA slot is written by the worker's van (device to device) unless the
      // caller computed into it; the CPU never writes device memory.
      if (peer != nullptr && peer->device.type != DeviceType::kCPU &&
          tensors[j].data != peer->data) {
        peer = nullptr;
      }
      if (peer != nullptr) {
        // The worker's slot is mapped here: write it directly (unless the caller computed
        // into it) and send its name; the worker's van copies nothing.
        if (tensors[j].data != peer->data && peer->size != 0) {
          std::memcpy(peer->data, tensors[j].data, peer->size);
        }
        out.segments.push_back({peer->data, peer->size, peer->owner});
      } else {
        out.segments.push_back({tensors[j].data, tensors[j].nbytes(), tensors[j].owner,
                                streamed != nullptr && (*streamed)[j]});
      }
    }
    out.stream = stream;
    out.meta.stamps = {r->received, r->processed, start, GetNanosecond()};
    const std::array<uint64_t, kServerStamps> stamps = out.meta.stamps;
    Status s = ctx_->Send(std::move(out));
    if (!s.ok()) {
      return s.Annotate("response for handle " + std::to_string(r->handle) + " to worker " +
                        std::to_string(r->worker_rank));
    }
    if (recorder_ && recorder_->Sampled(HandleOf(r->request_id))) {
      recorder_->Record(ServerTraceRecord(*r, tensors, stamps, TraceThreadId()));
    }
    return OkStatus();
  }

  NodeContext* ctx_;
  const int num_workers_;
  const int num_servers_;
  DeviceBackend* const backend_;
  Waiter waiter_;
  std::mutex mu_;
  RequestQueues<std::shared_ptr<ServerRequest>> queues_;
  std::atomic<bool> ready_{false};
  std::atomic<uint64_t> down_epoch_{0};
  std::vector<Status> worker_down_;
  const uint64_t handle_base_;
  uint64_t next_handle_;
  std::unordered_map<uint64_t, std::shared_ptr<ServerRequest>> outstanding_;
  std::map<std::pair<int, int64_t>, RecvChunk> recv_buffers_;
  std::atomic<bool> gpu_recv_{false};        // a CUDA receive buffer was registered
  LandingBuffers landing_;                   // pinned landings of pushes bound for CUDA chunks
  std::unique_ptr<TraceRecorder> recorder_;  // null unless MESHPOST_TRACE is on
  // Declared last: destroyed first, so its completion thread stops before the state its
  // callbacks touch goes away.
  LazyStager stager_;
};

AFTensorServer::AFTensorServer(NodeContext* ctx) : impl_(std::make_unique<Impl>(ctx)) {
  ctx->SetDataHandler(impl_.get());
}
AFTensorServer::~AFTensorServer() = default;

Result<std::vector<BatchRequest>> AFTensorServer::GetBatch(int64_t timeout_ms) {
  return impl_->GetBatch(timeout_ms);
}
Status AFTensorServer::Respond(uint64_t handle, const std::vector<TensorView>& tensors,
                               const StreamSync& sync) {
  return impl_->Respond(handle, tensors, sync);
}
Status AFTensorServer::RespondVec(const TensorView& ret_buffer,
                                  const std::vector<TensorView>& tensors_vec,
                                  const std::vector<uint64_t>& handles, const StreamSync& sync) {
  return impl_->RespondVec(ret_buffer, tensors_vec, handles, sync);
}
Status AFTensorServer::RegisterRecvBuffer(const TensorView& tensor,
                                          const std::vector<int>& worker_ranks,
                                          const std::vector<int64_t>& keys) {
  return impl_->RegisterRecvBuffer(tensor, worker_ranks, keys);
}
Result<std::vector<PullSlot>> AFTensorServer::PullSlots(uint64_t handle) {
  return impl_->PullSlots(handle);
}
Result<std::vector<TensorView>> AFTensorServer::Outputs(uint64_t handle) {
  return impl_->Outputs(handle);
}
int AFTensorServer::num_workers() const { return impl_->num_workers(); }

}  // namespace meshpost
