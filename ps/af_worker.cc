#include "ps/af_worker.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <string>

#include "common/clock.h"
#include "common/log_rate.h"
#include "common/logging.h"
#include "ps/node_context.h"
#include "ps/trace_recorder.h"
#include "ps/worker_request.h"
#include "tensor/device_staging.h"
#include "van/codec.h"
#include "van/streamed_bytes.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";

}  // namespace

class AFTensorWorker::Impl : public DataHandler {
 public:
  explicit Impl(NodeContext* ctx)
      : ctx_(ctx),
        num_servers_(ctx->options().num_servers),
        backend_(ctx->options().device_backend ? ctx->options().device_backend : CudaBackend()),
        waiter_(ctx->wait_policy(), ctx->progress_engine()),
        recorder_(StartNodeTraceRecorder(
            ctx->options(), 1, ctx->clock_sync(),
            [ctx](int s) { return TraceTransportFromName(ctx->PeerTransport(ServerNodeId(s))); })),
        stager_(backend_, StagerOptions::Chunked(ctx->options().gpu_staging_chunk)) {}

  Result<uint64_t> ZBatchPushPull(const KeyTensorBatch& push, const KeyTensorBatch& pull,
                                  const StreamSync& sync) {
    const uint64_t start = GetNanosecond();
    const char* fn = "ZBatchPushPull";
    MESHPOST_RETURN_IF_ERROR(ValidatePushPull(fn, push, pull, num_servers_, backend_));
    for (int s = 0; s < num_servers_; ++s) {
      Status peer = ctx_->PeerStatus(ServerNodeId(s));
      if (!peer.ok()) return peer.Annotate(std::string(fn) + ": server " + std::to_string(s));
    }

    const bool device_push = AnyOnDevice(push), device_pull = AnyOnDevice(pull);
    DeviceStager* stager = nullptr;
    if (device_push || device_pull || sync.need_event) {
      auto st = stager_.Get();
      if (!st.ok()) return st.status().Annotate(fn);
      stager = *st;
    }
    // GPUDirect: when every server's transport moves CUDA memory itself, the push is read
    // and the pull slots are written in place (registered here), with no pinned staging.
    bool direct = false;
    if (device_push || device_pull) {
      direct = AllServersTake(*ctx_, num_servers_, MemoryKind::kCudaDevice);
      if (direct) {
        MESHPOST_RETURN_IF_ERROR(RegisterDeviceTensors(ctx_, push, fn, "push"));
        MESHPOST_RETURN_IF_ERROR(RegisterDeviceTensors(ctx_, pull, fn, "pull"));
      }
    }
    std::vector<SendSegment> segments;
    segments.reserve(push.size());
    for (const KeyTensor& kt : push) {
      segments.push_back({kt.tensor.data, kt.tensor.nbytes(), kt.tensor.owner});
    }
    auto p = std::make_shared<PendingBatch>();
    // Large ordinary host pushes to same-host servers go from a shared copy (set before the
    // batch is visible: a node-down may complete it from another thread).
    const int64_t share_min = ctx_->options().shared_push_min;
    if (!device_push && share_min > 0 &&
        AnyServerTakes(*ctx_, num_servers_, MemoryKind::kSharedHost) && push_staging_->Wanted()) {
      auto lease = push_staging_->Stage(push, static_cast<size_t>(share_min), &segments);
      if (lease.ok()) {
        p->push_staging = std::move(lease).value();
      } else {
        MP_LOG_ERROR_LIMITED(staging_log_, kLog,
                             "push_pull: {}; sending the push from its own memory",
                             lease.status().ToString());
      }
    }
    p->num_servers = num_servers_;
    p->slots_per_server = static_cast<int>(pull.size()) / num_servers_;
    p->pull = pull;
    if (device_pull && !direct) {
      p->staging.resize(pull.size());
      for (size_t i = 0; i < pull.size(); ++i) {
        if (pull[i].tensor.device.type == DeviceType::kCPU) continue;
        auto buf = stager->Acquire(pull[i].tensor.nbytes());
        if (!buf.ok())
          return buf.status().Annotate(std::string(fn) + ": pull[" + std::to_string(i) + "]");
        p->staging[i] = std::move(buf).value();
      }
    }
    p->traces.resize(num_servers_);
    p->answered.assign(num_servers_, 0);
    p->sent.assign(num_servers_, 0);
    p->remaining = num_servers_;
    // One id per push tensor and per pull slot position, as StepMesh allocates them.
    p->num_ids = std::max<uint64_t>(1, push.size() + static_cast<uint64_t>(p->slots_per_server));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (inflight_ >= ctx_->options().max_inflight) {
        return ResourceExhaustedError(
            std::string(fn) + ": " + std::to_string(inflight_) +
            " requests already in flight (max_inflight / MESHPOST_MAX_INFLIGHT=" +
            std::to_string(ctx_->options().max_inflight) + "); Wait on earlier handles first");
      }
      p->handle = next_handle_;
      next_handle_ += p->num_ids;
      ++inflight_;
      pending_.emplace(p->handle, p);
    }

    if (recorder_ && recorder_->Sampled(p->handle)) PrepareTrace(p.get(), push);
    for (const KeyTensor& kt : pull) {
      // GPU slots are written by the staging copy; the transport sees the pinned buffer.
      if (kt.tensor.owner && kt.tensor.device.type == DeviceType::kCPU) {
        ctx_->OnPullMemory(kt.tensor.data, kt.tensor.nbytes(), kt.tensor.owner);
      }
    }
    if (!device_push || (direct && !sync.need_event)) {
      SendRequests(p, push, segments, start);
    } else {
      // Staged: the push tensors are copied to pinned buffers on the stager's stream (after
      // the caller's stream, with need_event) and sent from the completion thread. Direct:
      // an empty batch on that stream waits for the caller's event before the transport
      // reads the device memory.
      std::vector<DeviceStager::Copy> copies;
      size_t staged = 0;
      for (size_t i = 0; i < push.size() && !direct; ++i) {
        if (push[i].tensor.device.type == DeviceType::kCPU || segments[i].size == 0) continue;
        auto buf = stager->Acquire(segments[i].size);
        if (!buf.ok()) {
          Fail(p, buf.status().Annotate(std::string(fn) + ": push[" + std::to_string(i) + "]"));
          return p->handle;
        }
        copies.push_back({buf->data, push[i].tensor.data, segments[i].size});
        segments[i] = {buf->data, segments[i].size, buf->owner, /*streamed=*/true};
        staged += segments[i].size;
      }
      // Over transports that stream (tcp), a push of more than one staging chunk leaves at
      // once and each chunk goes on the wire as soon as it is copied (docs/gpu.md).
      std::shared_ptr<StreamedBytes> stream;
      if (staged > stager->chunk_bytes() && AllServersStream(*ctx_, num_servers_)) {
        stream = std::make_shared<StreamedBytes>();
      } else {
        for (SendSegment& s : segments) s.streamed = false;
      }
      DeviceEvent after = nullptr;
      if (sync.need_event) {
        auto ev = stager->RecordOn(sync.stream);
        if (!ev.ok()) {
          Fail(p, ev.status().Annotate(std::string(fn) + ": need_event"));
          return p->handle;
        }
        after = *ev;
      }
      // `push` (with its owners) rides along: the caller's tensors stay alive until read.
      Status queued = stager->Submit(
          copies, after,
          [this, p, push, segments, start, stream, staged](const Status& copied) {
            if (!copied.ok()) {
              if (stream) stream->Fail(copied);
              Fail(p, copied.Annotate("ZBatchPushPull: staging the push tensors"));
              return;
            }
            if (stream) {
              stream->Advance(staged);
            } else {
              SendRequests(p, push, segments, start);
            }
          },
          stream ? [stream](size_t, size_t done) { stream->Advance(done); }
                 : DeviceStager::OnChunk());
      if (!queued.ok()) {
        Fail(p, queued.Annotate(fn));
      } else if (stream) {
        SendRequests(p, push, segments, start, stream);
      }
    }
    return p->handle;
  }

  // Sends the request to every server; segments[i] carries push[i]'s bytes (the tensor
  // itself, or its pinned staging copy).
  void SendRequests(const std::shared_ptr<PendingBatch>& p, const KeyTensorBatch& push,
                    const std::vector<SendSegment>& segments, uint64_t start,
                    const std::shared_ptr<StreamedBytes>& stream = nullptr) {
    const char* fn = "ZBatchPushPull";
    std::vector<TensorDesc> push_descs;
    push_descs.reserve(push.size());
    for (size_t i = 0; i < push.size(); ++i) {
      push_descs.push_back(DescribeTensor(push[i]));
      // A staged GPU tensor travels from its pinned copy.
      push_descs.back().addr = reinterpret_cast<uint64_t>(segments[i].data);
    }
    const int P = p->slots_per_server;
    for (int s = 0; s < num_servers_; ++s) {
      OutMessage msg;
      msg.meta.cmd = Command::kRequest;
      msg.meta.sender = ctx_->node_id();
      msg.meta.recipient = ServerNodeId(s);
      msg.meta.id = RequestId(p->handle, s);
      msg.meta.data = push_descs;
      for (int j = 0; j < P; ++j) {
        msg.meta.slots.push_back(DescribeTensor(p->pull[s * P + j]));
        // A GPU slot is answered into its pinned staging buffer.
        if (!p->staging.empty() && p->staging[s * P + j].data) {
          msg.meta.slots.back().addr = reinterpret_cast<uint64_t>(p->staging[s * P + j].data);
        }
      }
      msg.segments = segments;
      msg.stream = stream;
      p->traces[s].request_start = start;
      // Stamped as the request is handed to the transport: the response may be received
      // on another thread before Send() returns, and the stamps must stay ordered.
      p->traces[s].request_posted = GetNanosecond();
      if (p->traced) {
        p->traces[s].tids[0] = p->caller_tid;
        p->traces[s].tids[1] = TraceThreadId();
      }
      Status sent = ctx_->Send(std::move(msg));
      if (!sent.ok()) {
        Fail(p, sent.Annotate(std::string(fn) + ": sending to server " + std::to_string(s)));
        break;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        p->sent[s] = 1;
        if (p->done.load(std::memory_order_relaxed) && !p->answered[s]) {
          cancels_.emplace_back(s, RequestId(p->handle, s));  // failed meanwhile
          has_cancels_.store(true, std::memory_order_relaxed);
        }
      }
    }
    SendCancels();  // for a handle that failed while its requests went out
    MP_LOG_TRACE(kLog, "push_pull handle {} sent to {} servers", p->handle, num_servers_);
  }

  Status WaitOnStream(uint64_t handle, DeviceStream stream) {
    auto found = Find(handle, "WaitOnStream");
    if (!found.ok()) return found.status();
    std::shared_ptr<PendingBatch> p = *found;
    auto st = stager_.Get();
    if (!st.ok()) return st.status().Annotate("WaitOnStream");
    int64_t* device_flag = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (p->done.load(std::memory_order_relaxed)) return OkStatus();  // nothing to wait for
      if (p->stream_flag.data == nullptr) {
        auto flag = (*st)->Acquire(sizeof(int64_t));
        if (!flag.ok()) return flag.status().Annotate("WaitOnStream");
        auto dev = backend_->HostDevicePointer(flag->data);
        if (!dev.ok()) return dev.status().Annotate("WaitOnStream");
        __atomic_store_n(static_cast<int64_t*>(flag->data), 0, __ATOMIC_RELEASE);
        p->stream_flag = std::move(flag).value();
        p->stream_flag_device = static_cast<int64_t*>(*dev);
      }
      device_flag = p->stream_flag_device;
    }
    // The flag stays allocated while the handle is remembered (kFinishedKeep handles).
    return backend_->WaitFlagAsync(device_flag, 1, nullptr, stream)
        .Annotate("WaitOnStream(handle=" + std::to_string(handle) + ")");
  }

  Status Wait(uint64_t handle, int64_t timeout_ms) {
    auto p = Find(handle, "Wait");
    if (!p.ok()) return p.status();
    PendingBatch* pending = p->get();
    const bool done =
        waiter_.WaitUntil([pending] { return pending->done.load(std::memory_order_acquire); },
                          DeadlineFromTimeoutMs(timeout_ms));
    if (done && pending->traced && !pending->wake_recorded.exchange(true)) {
      TraceRecord r;
      r.kind = TraceRecordKind::kWake;
      r.handle = handle;
      r.stamps[0] = GetNanosecond();
      r.tids[0] = TraceThreadId();
      recorder_->Record(r);
    }
    if (!done) {
      std::string missing;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (int s = 0; s < pending->num_servers; ++s) {
          if (!pending->answered[s]) missing += (missing.empty() ? "" : ", ") + std::to_string(s);
        }
      }
      return DeadlineExceededError("Wait(handle=" + std::to_string(handle) +
                                   "): not complete after " + std::to_string(timeout_ms) +
                                   " ms; waiting for server(s) " + missing);
    }
    return pending->status;
  }

  Result<bool> Done(uint64_t handle) {
    auto p = Find(handle, "Done");
    if (!p.ok()) return p.status();
    return (*p)->done.load(std::memory_order_acquire);
  }

  Result<std::vector<uint64_t>> GetAllHandlers(uint64_t id) {
    auto p = Find(id, "GetAllHandlers");
    if (!p.ok()) return p.status();
    if ((*p)->handle != id) return std::vector<uint64_t>{id};
    std::vector<uint64_t> ids;
    ids.reserve((*p)->num_ids);
    for (uint64_t i = 0; i < (*p)->num_ids; ++i) ids.push_back(id + i);
    return ids;
  }

  Result<Trace> FetchRequestTrace(uint64_t id) {
    auto p = Find(id, "FetchTrace");
    if (!p.ok()) return p.status();
    std::lock_guard<std::mutex> lock(mu_);
    return (*p)->traces[(*p)->last_server];
  }

  Result<std::vector<Trace>> FetchTrace(uint64_t id) {
    auto p = Find(id, "FetchTrace");
    if (!p.ok()) return p.status();
    std::lock_guard<std::mutex> lock(mu_);
    return (*p)->traces;
  }

  int num_servers() const { return num_servers_; }

  // --- DataHandler, called on the van's receive thread ---

  Result<void*> Destination(const Meta& meta, size_t index) override {
    if (meta.cmd != Command::kResponse) {
      return DataLossError(std::string("worker got unexpected ") + CommandName(meta.cmd));
    }
    std::lock_guard<std::mutex> lock(mu_);
    MESHPOST_ASSIGN_OR_RETURN(PendingBatch * p, LookupForResponse(meta));
    const int s = ServerOf(meta.id);
    if (index == 0 && p->traces[s].response_received == 0) {
      p->traces[s].response_received = GetNanosecond();
      if (p->traced) p->traces[s].tids[6] = TraceThreadId();
    }
    if (index >= static_cast<size_t>(p->slots_per_server)) {
      return DataLossError("response to handle " + std::to_string(p->handle) + " from server " +
                           std::to_string(s) + " has more tensors than the " +
                           std::to_string(p->slots_per_server) + " pull slots");
    }
    const size_t i = s * p->slots_per_server + index;
    const TensorView& slot = p->pull[i].tensor;
    const TensorDesc& d = meta.data[index];
    if (d.nbytes != slot.nbytes() || d.dtype != slot.dtype) {
      return DataLossError("response slot " + std::to_string(index) + " from server " +
                           std::to_string(s) + " is " + std::to_string(d.nbytes) + " bytes of " +
                           DTypeName(d.dtype) + "; the pull tensor is " + slot.Describe());
    }
    if (!p->staging.empty() && p->staging[i].data != nullptr) return p->staging[i].data;
    if (slot.device.type != DeviceType::kCPU &&
        !ctx_->PeerTakesMemory(meta.sender, MemoryKind::kCudaDevice)) {
      // An unstaged (GPUDirect) slot answered over a transport that cannot write device
      // memory: the route changed since the request went out (a replaced server).
      return FailedPreconditionError("response from server " + std::to_string(s) +
                                     " for the CUDA pull tensor " + slot.Describe() +
                                     " arrived over " + ctx_->PeerTransport(meta.sender) +
                                     ", which cannot write device memory");
    }
    return slot.data;
  }

  void OnData(InMessage&& msg) override {
    const Meta& meta = msg.meta;
    if (meta.cmd != Command::kResponse) {
      MP_LOG_ERROR(kLog, "worker dropped unexpected {} from node {}", CommandName(meta.cmd),
                   meta.sender);
      return;
    }
    const uint64_t now = GetNanosecond();
    std::shared_ptr<PendingBatch> done;
    std::vector<DeviceStager::Copy> copies;  // staged GPU slots of this server's response
    std::shared_ptr<PendingBatch> staged;
    // Pull tensors of a completed handle: their owners are released here, outside mu_
    // (an owner may run user code, e.g. free a torch tensor), instead of when the handle
    // is forgotten kFinishedKeep handles later, which would pin thousands of tensors.
    KeyTensorBatch released;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto found = LookupForResponse(meta);
      if (!found.ok()) {
        MP_LOG_ERROR(kLog, "dropped response: {}", found.status().ToString());
        return;
      }
      PendingBatch* p = *found;
      const int s = ServerOf(meta.id);
      Trace& t = p->traces[s];
      if (t.response_received == 0) {
        t.response_received = now;
        if (p->traced) t.tids[6] = TraceThreadId();
      }
      t.request_received = meta.stamps[0];
      t.request_processed = meta.stamps[1];
      t.response_start = meta.stamps[2];
      t.response_posted = meta.stamps[3];
      if (meta.status_code != 0) {
        Status err(static_cast<StatusCode>(meta.status_code),
                   "server " + std::to_string(s) + " refused the request: " + meta.body);
        done = FailLocked(p->handle, err);
      } else if (msg.segments.size() != static_cast<size_t>(p->slots_per_server)) {
        done = FailLocked(p->handle,
                          DataLossError("server " + std::to_string(s) + " answered " +
                                        std::to_string(msg.segments.size()) + " tensors for " +
                                        std::to_string(p->slots_per_server) + " pull slots"));
      } else {
        p->answered[s] = 1;
        p->last_server = s;
        const int P = p->slots_per_server;
        bool streamed_in = false;
        for (int j = 0; j < P && !p->staging.empty(); ++j) {
          const size_t i = s * P + j;
          if (p->staging[i].data == nullptr) continue;
          // What streamed in early is already queued (OnStreamProgress): the rest only.
          const size_t from = p->to_device.empty() ? 0 : p->to_device[i];
          streamed_in = streamed_in || from > 0;
          const size_t n = p->pull[i].tensor.nbytes();
          if (from < n) {
            copies.push_back({static_cast<char*>(p->pull[i].tensor.data) + from,
                              static_cast<char*>(p->staging[i].data) + from, n - from});
          }
        }
        if (copies.empty() && !streamed_in) {
          t.response_processed = GetNanosecond();
          if (p->traced) t.tids[7] = TraceThreadId();
          if (--p->remaining == 0) done = CompleteLocked(p->handle, OkStatus());
          if (done && p->traced) RecordWorkerRequests(*p, recorder_.get());
          // Every response is written; nothing reads p->pull once the handle is done.
          if (done) ReleaseLocked(done.get(), &released);
        } else {
          staged = pending_.at(p->handle);
        }
      }
    }
    if (staged) {
      // The staged slots complete once the copy to the GPU tensors finished.
      const int s = ServerOf(meta.id);
      // The stager exists: the staging buffers came from it.
      Status queued = stager_.IfCreated()->Submit(
          copies, nullptr,
          [this, staged, s](const Status& copied) { FinishStaged(staged, s, copied); });
      if (!queued.ok()) FinishStaged(staged, s, queued);
    }
    if (done) waiter_.Notify();
    if (done && !done->status.ok()) SendCancels();
  }

  // A staged GPU slot's response is streaming in (tcp): copy what landed to the device now,
  // so the last copy after the whole response arrived is short. The stager's batches
  // complete in order: FinishStaged (the final batch) runs after these.
  void OnStreamProgress(const Meta& meta, size_t index, size_t bytes) override {
    if (meta.cmd != Command::kResponse) return;
    std::shared_ptr<PendingBatch> p;
    DeviceStager::Copy copy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto found = LookupForResponse(meta);
      if (!found.ok() || index >= static_cast<size_t>((*found)->slots_per_server)) return;
      const size_t i = ServerOf(meta.id) * (*found)->slots_per_server + index;
      PendingBatch* pb = *found;
      if (pb->staging.empty() || pb->staging[i].data == nullptr) return;
      if (pb->to_device.empty()) pb->to_device.assign(pb->staging.size(), 0);
      const size_t from = pb->to_device[i];
      if (bytes <= from || bytes > pb->pull[i].tensor.nbytes()) return;
      pb->to_device[i] = bytes;
      copy = {static_cast<char*>(pb->pull[i].tensor.data) + from,
              static_cast<char*>(pb->staging[i].data) + from, bytes - from};
      p = pending_.at(pb->handle);
    }
    auto record = [this, p](const Status& copied) {
      if (copied.ok()) return;
      std::lock_guard<std::mutex> lock(mu_);
      if (p->early_copy.ok()) p->early_copy = copied;
    };
    Status queued = stager_.IfCreated()->Submit({copy}, nullptr, record);
    if (!queued.ok()) record(queued);
  }

  void FinishStaged(const std::shared_ptr<PendingBatch>& p, int s, const Status& staged_copy) {
    std::shared_ptr<PendingBatch> done;
    KeyTensorBatch released;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const Status copied = staged_copy.ok() ? p->early_copy : staged_copy;
      if (!copied.ok()) {
        done = FailLocked(p->handle, copied.Annotate("copying server " + std::to_string(s) +
                                                     "'s response to the GPU pull tensors"));
      } else {
        p->traces[s].response_processed = GetNanosecond();
        if (p->traced) p->traces[s].tids[7] = TraceThreadId();
        if (--p->remaining == 0) done = CompleteLocked(p->handle, OkStatus());
        if (done && p->traced) RecordWorkerRequests(*p, recorder_.get());
        if (done) ReleaseLocked(done.get(), &released);
      }
    }
    if (done) waiter_.Notify();
    if (done && !done->status.ok()) SendCancels();
  }

  // Requires mu_, on successful completion: hands the pull tensors' owners to the caller
  // to drop outside the lock; staging buffers are free again once no copy uses them.
  static void ReleaseLocked(PendingBatch* p, KeyTensorBatch* released) {
    released->swap(p->pull);
    p->staging.clear();
  }

  void OnDropped(const Meta& meta, const Status& why) override {
    if (meta.cmd != Command::kResponse) return;
    std::shared_ptr<PendingBatch> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto found = LookupForResponse(meta);
      if (!found.ok()) return;
      done = FailLocked((*found)->handle,
                        why.Annotate("response from server " + std::to_string(ServerOf(meta.id))));
    }
    if (done) waiter_.Notify();
    SendCancels();
  }

  void SetWaitPolicy(const WaitPolicy& policy) override { waiter_.set_policy(policy); }
  void OnNodeDown(int node_id, const Status& why) override {
    const int s = node_id - 1;
    if (s < 0 || s >= num_servers_) return;
    int failed = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<uint64_t> victims;
      for (auto& [handle, p] : pending_) {
        if (!p->done.load(std::memory_order_relaxed) && !p->answered[s]) victims.push_back(handle);
      }
      for (uint64_t h : victims) {
        FailLocked(h, UnavailableError("server " + std::to_string(s) + " (node " +
                                       std::to_string(node_id) + ") is down: " + why.message()));
        ++failed;
      }
    }
    if (failed) {
      MP_LOG_ERROR(kLog, "failed {} pending handle(s): server {} is down: {}", failed, s,
                   why.message());
      waiter_.Notify();
    }
    SendCancels();
  }

 private:
  // The batch that owns `id`: its handle or any id GetAllHandlers listed for it.
  Result<std::shared_ptr<PendingBatch>> Find(uint64_t id, const char* fn) {
    std::lock_guard<std::mutex> lock(mu_);
    return FindBatch(pending_, id, next_handle_, fn);
  }

  // Requires mu_. The pending request a response answers, if it still expects one.
  Result<PendingBatch*> LookupForResponse(const Meta& meta) {
    auto it = pending_.find(HandleOf(meta.id));
    if (it == pending_.end()) {
      return NotFoundError("response for unknown handle " + std::to_string(HandleOf(meta.id)));
    }
    MESHPOST_RETURN_IF_ERROR(ExpectsResponse(*it->second, meta));
    return it->second.get();
  }

  void Fail(const std::shared_ptr<PendingBatch>& p, const Status& why) {
    bool notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      notify = FailLocked(p->handle, why) != nullptr;
    }
    if (notify) waiter_.Notify();
    SendCancels();
  }

  // A failed handle's requests that servers hold unanswered are withdrawn (CANCEL after
  // the request on the same connection), so they do not pair with later rounds of other
  // workers (ps/af_server.cc OnCancel). Sent without mu_ held.
  void SendCancels() {
    if (!has_cancels_.load(std::memory_order_relaxed)) return;  // the common case: no lock
    std::vector<std::pair<int, uint64_t>> todo;
    {
      std::lock_guard<std::mutex> lock(mu_);
      todo.swap(cancels_);
      has_cancels_.store(false, std::memory_order_relaxed);
    }
    for (const auto& [s, id] : todo) {
      if (!ctx_->PeerStatus(ServerNodeId(s)).ok()) continue;
      OutMessage msg;
      msg.meta.cmd = Command::kCancel;
      msg.meta.sender = ctx_->node_id();
      msg.meta.recipient = ServerNodeId(s);
      msg.meta.id = id;
      Status st = ctx_->Send(std::move(msg));
      if (!st.ok()) MP_LOG_DEBUG(kLog, "cancel to server {} not sent: {}", s, st.ToString());
    }
  }

  std::shared_ptr<PendingBatch> FailLocked(uint64_t handle, const Status& why) {
    return CompleteLocked(handle, why);
  }

  // Requires mu_. Completes a handle exactly once; returns it when this call completed it.
  std::shared_ptr<PendingBatch> CompleteLocked(uint64_t handle, const Status& status) {
    auto it = pending_.find(handle);
    if (it == pending_.end() || it->second->done.load(std::memory_order_relaxed)) return nullptr;
    std::shared_ptr<PendingBatch> p = it->second;
    p->status = status;
    p->done.store(true, std::memory_order_release);
    if (p->push_staging) {
      // Reused once every server answered and none views it; a failed batch's copy is
      // freed, never reused (a server may still read it). Leaf locks only.
      p->push_staging->Completed(status.ok());
      p->push_staging.reset();
    }
    if (!status.ok()) {
      for (int s = 0; s < p->num_servers && s < static_cast<int>(p->sent.size()); ++s) {
        if (p->sent[s] && !p->answered[s]) {
          cancels_.emplace_back(s, RequestId(handle, s));
          has_cancels_.store(true, std::memory_order_relaxed);
        }
      }
    }
    // A stream waiting on the handle is released on failure too (Wait reports the error);
    // a stuck GPU stream would be worse than a stream that runs on after a failed pull.
    if (p->stream_flag.data) backend_->HostWriteFlag(static_cast<int64_t*>(p->stream_flag.data), 1);
    --inflight_;
    finished_.push_back(handle);
    while (finished_.size() > kFinishedKeep) {
      pending_.erase(finished_.front());
      finished_.pop_front();
    }
    if (!status.ok()) MP_LOG_DEBUG(kLog, "handle {} failed: {}", handle, status.ToString());
    return p;
  }

  NodeContext* ctx_;
  const int num_servers_;
  DeviceBackend* const backend_;
  Waiter waiter_;
  std::mutex mu_;
  uint64_t next_handle_ = 1;
  int inflight_ = 0;
  // Ordered by handle so that any id of a batch finds its batch (upper_bound - 1).
  std::map<uint64_t, std::shared_ptr<PendingBatch>> pending_;
  std::deque<uint64_t> finished_;
  std::vector<std::pair<int, uint64_t>> cancels_;  // (server, request id) to withdraw
  std::atomic<bool> has_cancels_{false};           // cancels_ is not empty
  std::unique_ptr<TraceRecorder> recorder_;        // null unless MESHPOST_TRACE is on
  const std::shared_ptr<PushStagingPool> push_staging_ = std::make_shared<PushStagingPool>();
  LogRateLimiter staging_log_{3, 60'000};
  // Declared last: destroyed first, so its completion thread stops before the state its
  // callbacks touch goes away.
  LazyStager stager_;
};

AFTensorWorker::AFTensorWorker(NodeContext* ctx) : impl_(std::make_unique<Impl>(ctx)) {
  ctx->SetDataHandler(impl_.get());
}
AFTensorWorker::~AFTensorWorker() = default;

Result<uint64_t> AFTensorWorker::ZBatchPushPull(const KeyTensorBatch& push,
                                                const KeyTensorBatch& pull,
                                                const StreamSync& sync) {
  return impl_->ZBatchPushPull(push, pull, sync);
}
Status AFTensorWorker::WaitOnStream(uint64_t handle, DeviceStream stream) {
  return impl_->WaitOnStream(handle, stream);
}
Status AFTensorWorker::Wait(uint64_t handle, int64_t timeout_ms) {
  return impl_->Wait(handle, timeout_ms);
}
Result<bool> AFTensorWorker::Done(uint64_t handle) { return impl_->Done(handle); }
Result<std::vector<uint64_t>> AFTensorWorker::GetAllHandlers(uint64_t handle) {
  return impl_->GetAllHandlers(handle);
}
Result<std::vector<Trace>> AFTensorWorker::FetchTrace(uint64_t id) { return impl_->FetchTrace(id); }
Result<Trace> AFTensorWorker::FetchRequestTrace(uint64_t id) {
  return impl_->FetchRequestTrace(id);
}
int AFTensorWorker::num_servers() const { return impl_->num_servers(); }

}  // namespace meshpost
