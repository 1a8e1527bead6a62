#include "ps/af_worker.h"

#include <atomic>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/clock.h"
#include "common/logging.h"
#include "ps/node_context.h"
#include "ps/trace_recorder.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";
// Completed handles stay queryable (Wait / FetchTrace / GetAllHandlers) until this many
// newer handles completed; bounds memory in long runs.
constexpr size_t kFinishedKeep = 4096;

struct Pending {
  uint64_t handle = 0;
  int num_servers = 0;
  int slots_per_server = 0;
  KeyTensorBatch pull;  // holds owners: pull tensors stay alive until completion
  std::vector<Trace> traces;
  std::vector<uint8_t> answered;
  int remaining = 0;
  Status status;                   // written before `done` is released
  std::atomic<bool> done{false};
  // Trace capture (MESHPOST_TRACE): set before the first send when this handle is sampled.
  bool traced = false;
  std::atomic<bool> wake_recorded{false};
  uint64_t push_bytes = 0;
  uint16_t num_keys = 0;
  int64_t keys[kTraceRecordKeys] = {0, 0, 0};
};

}  // namespace

class AFTensorWorker::Impl : public DataHandler {
 public:
  explicit Impl(NodeContext* ctx)
      : ctx_(ctx),
        num_servers_(ctx->options().num_servers),
        waiter_(ctx->wait_policy()),
        recorder_(StartNodeTraceRecorder(ctx->options(), 1, ctx->clock_sync(), [ctx](int s) {
          return TraceTransportFromName(ctx->PeerTransport(ServerNodeId(s)));
        })) {}

  Result<uint64_t> ZBatchPushPull(const KeyTensorBatch& push, const KeyTensorBatch& pull) {
    const uint64_t start = GetNanosecond();
    const char* fn = "ZBatchPushPull";
    if (push.empty() && pull.empty()) {
      return InvalidArgumentError(std::string(fn) + ": push and pull are both empty; expected "
                                  "at least one tensor");
    }
    if (pull.size() % num_servers_ != 0) {
      return InvalidArgumentError(
          std::string(fn) + ": pull has " + std::to_string(pull.size()) +
          " tensors, not divisible by the " + std::to_string(num_servers_) +
          " servers; expected num_servers * slots_per_server tensors, server-major");
    }
    if (push.size() > 4096 || pull.size() / num_servers_ > 4096) {
      return InvalidArgumentError(std::string(fn) + ": at most 4096 tensors per server each way");
    }
    for (size_t i = 0; i < push.size(); ++i) {
      const std::string where = std::string(fn) + ": push[" + std::to_string(i) + "]";
      MESHPOST_RETURN_IF_ERROR(ValidateKey(push[i].key, where));
      MESHPOST_RETURN_IF_ERROR(ValidateTensor(push[i].tensor, where));
    }
    for (size_t i = 0; i < pull.size(); ++i) {
      const std::string where = std::string(fn) + ": pull[" + std::to_string(i) + "]";
      MESHPOST_RETURN_IF_ERROR(ValidateKey(pull[i].key, where));
      MESHPOST_RETURN_IF_ERROR(ValidateTensor(pull[i].tensor, where));
    }
    for (int s = 0; s < num_servers_; ++s) {
      Status peer = ctx_->PeerStatus(ServerNodeId(s));
      if (!peer.ok()) return peer.Annotate(std::string(fn) + ": server " + std::to_string(s));
    }

    auto p = std::make_shared<Pending>();
    p->num_servers = num_servers_;
    p->slots_per_server = static_cast<int>(pull.size()) / num_servers_;
    p->pull = pull;
    p->traces.resize(num_servers_);
    p->answered.assign(num_servers_, 0);
    p->remaining = num_servers_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (inflight_ >= ctx_->options().max_inflight) {
        return ResourceExhaustedError(
            std::string(fn) + ": " + std::to_string(inflight_) +
            " requests already in flight (max_inflight / MESHPOST_MAX_INFLIGHT=" +
            std::to_string(ctx_->options().max_inflight) + "); Wait on earlier handles first");
      }
      p->handle = next_handle_++;
      ++inflight_;
      pending_.emplace(p->handle, p);
    }

    if (recorder_ && recorder_->Sampled(p->handle)) PrepareTrace(p.get(), push);
    for (const KeyTensor& kt : pull) {
      if (kt.tensor.owner) ctx_->OnPullMemory(kt.tensor.data, kt.tensor.nbytes(), kt.tensor.owner);
    }
    std::vector<TensorDesc> push_descs;
    push_descs.reserve(push.size());
    for (const KeyTensor& kt : push) push_descs.push_back(Describe(kt));
    const int P = p->slots_per_server;
    for (int s = 0; s < num_servers_; ++s) {
      OutMessage msg;
      msg.meta.cmd = Command::kRequest;
      msg.meta.sender = ctx_->node_id();
      msg.meta.recipient = ServerNodeId(s);
      msg.meta.id = RequestId(p->handle, s);
      msg.meta.data = push_descs;
      for (int j = 0; j < P; ++j) msg.meta.slots.push_back(Describe(pull[s * P + j]));
      msg.segments.reserve(push.size());
      for (const KeyTensor& kt : push) {
        msg.segments.push_back({kt.tensor.data, kt.tensor.nbytes(), kt.tensor.owner});
      }
      p->traces[s].request_start = start;
      // Stamped as the request is handed to the transport: the response may be received
      // on another thread before Send() returns, and the stamps must stay ordered.
      p->traces[s].request_posted = GetNanosecond();
      Status sent = ctx_->Send(std::move(msg));
      if (!sent.ok()) {
        Fail(p, sent.Annotate(std::string(fn) + ": sending to server " + std::to_string(s)));
        break;
      }
    }
    MP_LOG_TRACE(kLog, "push_pull handle {} sent to {} servers", p->handle, num_servers_);
    return p->handle;
  }

  Status Wait(uint64_t handle, int64_t timeout_ms) {
    auto p = Find(handle, "Wait");
    if (!p.ok()) return p.status();
    Pending* pending = p->get();
    const bool done = waiter_.WaitUntil(
        [pending] { return pending->done.load(std::memory_order_acquire); },
        DeadlineFromTimeoutMs(timeout_ms));
    if (done && pending->traced && !pending->wake_recorded.exchange(true)) {
      TraceRecord r;
      r.kind = TraceRecordKind::kWake;
      r.handle = handle;
      r.stamps[0] = GetNanosecond();
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

  Result<std::vector<uint64_t>> GetAllHandlers(uint64_t handle) {
    auto p = Find(handle, "GetAllHandlers");
    if (!p.ok()) return p.status();
    std::vector<uint64_t> ids;
    for (int s = 0; s < num_servers_; ++s) ids.push_back(RequestId(handle, s));
    return ids;
  }

  Result<std::vector<Trace>> FetchTrace(uint64_t handle) {
    auto p = Find(handle, "FetchTrace");
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
    MESHPOST_ASSIGN_OR_RETURN(Pending* p, LookupForResponse(meta));
    const int s = ServerOf(meta.id);
    if (index == 0 && p->traces[s].response_received == 0) {
      p->traces[s].response_received = GetNanosecond();
    }
    if (index >= static_cast<size_t>(p->slots_per_server)) {
      return DataLossError("response to handle " + std::to_string(p->handle) + " from server " +
                           std::to_string(s) + " has more tensors than the " +
                           std::to_string(p->slots_per_server) + " pull slots");
    }
    const TensorView& slot = p->pull[s * p->slots_per_server + index].tensor;
    const TensorDesc& d = meta.data[index];
    if (d.nbytes != slot.nbytes() || d.dtype != slot.dtype) {
      return DataLossError("response slot " + std::to_string(index) + " from server " +
                           std::to_string(s) + " is " + std::to_string(d.nbytes) + " bytes of " +
                           DTypeName(d.dtype) + "; the pull tensor is " + slot.Describe());
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
    std::shared_ptr<Pending> done;
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
      Pending* p = *found;
      const int s = ServerOf(meta.id);
      Trace& t = p->traces[s];
      if (t.response_received == 0) t.response_received = now;
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
        t.response_processed = GetNanosecond();
        if (--p->remaining == 0) {
          done = CompleteLocked(p->handle, OkStatus());
          if (done && p->traced) RecordCompletedLocked(*p);
          // Every response is written; nothing reads p->pull once the handle is done.
          if (done) released.swap(p->pull);
        }
      }
    }
    if (done) waiter_.Notify();
  }

  void OnDropped(const Meta& meta, const Status& why) override {
    if (meta.cmd != Command::kResponse) return;
    std::shared_ptr<Pending> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto found = LookupForResponse(meta);
      if (!found.ok()) return;
      done = FailLocked((*found)->handle, why.Annotate("response from server " +
                                                       std::to_string(ServerOf(meta.id))));
    }
    if (done) waiter_.Notify();
  }

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
  }

 private:
  static void PrepareTrace(Pending* p, const KeyTensorBatch& push) {
    p->traced = true;
    p->num_keys = static_cast<uint16_t>(push.size());
    for (size_t i = 0; i < push.size(); ++i) {
      p->push_bytes += push[i].tensor.nbytes();
      if (i < static_cast<size_t>(kTraceRecordKeys)) p->keys[i] = push[i].key;
    }
  }

  // Requires mu_. One record per server, once all eight stamps of every server are known.
  void RecordCompletedLocked(const Pending& p) {
    const int P = p.slots_per_server;
    for (int s = 0; s < p.num_servers; ++s) {
      TraceRecord r;
      r.kind = TraceRecordKind::kWorkerRequest;
      r.peer = s;
      r.request_id = RequestId(p.handle, s);
      r.handle = p.handle;
      r.push_bytes = p.push_bytes;
      for (int j = 0; j < P; ++j) r.pull_bytes += p.pull[s * P + j].tensor.nbytes();
      r.num_keys = p.num_keys;
      for (int k = 0; k < kTraceRecordKeys; ++k) r.keys[k] = p.keys[k];
      const std::array<uint64_t, 8> st = p.traces[s].ToArray();
      for (int k = 0; k < 8; ++k) r.stamps[k] = st[k];
      recorder_->Record(r);
    }
  }

  static TensorDesc Describe(const KeyTensor& kt) {
    TensorDesc d;
    d.key = kt.key;
    d.dtype = kt.tensor.dtype;
    d.shape = kt.tensor.shape;
    d.nbytes = kt.tensor.nbytes();
    d.addr = reinterpret_cast<uint64_t>(kt.tensor.data);
    return d;
  }

  Result<std::shared_ptr<Pending>> Find(uint64_t handle, const char* fn) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(handle);
    if (it == pending_.end()) {
      return NotFoundError(std::string(fn) + ": handle " + std::to_string(handle) +
                           (handle < next_handle_ && handle > 0
                                ? " completed long ago and was forgotten (only the last " +
                                      std::to_string(kFinishedKeep) + " are kept)"
                                : " was never returned by ZBatchPushPull"));
    }
    return it->second;
  }

  // Requires mu_. The pending request a response answers, if it still expects one.
  Result<Pending*> LookupForResponse(const Meta& meta) {
    const uint64_t handle = HandleOf(meta.id);
    const int s = ServerOf(meta.id);
    auto it = pending_.find(handle);
    if (it == pending_.end()) {
      return NotFoundError("response for unknown handle " + std::to_string(handle));
    }
    Pending* p = it->second.get();
    if (s >= num_servers_ || meta.sender != ServerNodeId(s)) {
      return DataLossError("response for handle " + std::to_string(handle) + " server " +
                           std::to_string(s) + " came from node " + std::to_string(meta.sender));
    }
    if (p->done.load(std::memory_order_relaxed)) {
      return FailedPreconditionError("response for handle " + std::to_string(handle) +
                                     " which already completed: " + p->status.ToString());
    }
    if (p->answered[s]) {
      return DataLossError("duplicate response for handle " + std::to_string(handle) +
                           " from server " + std::to_string(s));
    }
    return p;
  }

  void Fail(const std::shared_ptr<Pending>& p, const Status& why) {
    bool notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      notify = FailLocked(p->handle, why) != nullptr;
    }
    if (notify) waiter_.Notify();
  }

  std::shared_ptr<Pending> FailLocked(uint64_t handle, const Status& why) {
    return CompleteLocked(handle, why);
  }

  // Requires mu_. Completes a handle exactly once; returns it when this call completed it.
  std::shared_ptr<Pending> CompleteLocked(uint64_t handle, const Status& status) {
    auto it = pending_.find(handle);
    if (it == pending_.end() || it->second->done.load(std::memory_order_relaxed)) return nullptr;
    std::shared_ptr<Pending> p = it->second;
    p->status = status;
    p->done.store(true, std::memory_order_release);
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
  Waiter waiter_;
  std::mutex mu_;
  uint64_t next_handle_ = 1;
  int inflight_ = 0;
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> pending_;
  std::deque<uint64_t> finished_;
  std::unique_ptr<TraceRecorder> recorder_;  // null unless MESHPOST_TRACE is on
};

AFTensorWorker::AFTensorWorker(NodeContext* ctx) : impl_(std::make_unique<Impl>(ctx)) {
  ctx->SetDataHandler(impl_.get());
}
AFTensorWorker::~AFTensorWorker() = default;

Result<uint64_t> AFTensorWorker::ZBatchPushPull(const KeyTensorBatch& push,
                                                const KeyTensorBatch& pull) {
  return impl_->ZBatchPushPull(push, pull);
}
Status AFTensorWorker::Wait(uint64_t handle, int64_t timeout_ms) {
  return impl_->Wait(handle, timeout_ms);
}
Result<bool> AFTensorWorker::Done(uint64_t handle) { return impl_->Done(handle); }
Result<std::vector<uint64_t>> AFTensorWorker::GetAllHandlers(uint64_t handle) {
  return impl_->GetAllHandlers(handle);
}
Result<std::vector<Trace>> AFTensorWorker::FetchTrace(uint64_t handle) {
  return impl_->FetchTrace(handle);
}
int AFTensorWorker::num_servers() const { return impl_->num_servers(); }

}  // namespace meshpost
