#include "ps/worker_request.h"

#include <array>
#include <string>

#include "ps/node_context.h"
#include "van/codec.h"

namespace meshpost {

Status ValidatePushPull(const char* fn, const KeyTensorBatch& push, const KeyTensorBatch& pull,
                        int num_servers, DeviceBackend* backend) {
  if (push.empty() && pull.empty()) {
    return InvalidArgumentError(std::string(fn) +
                                ": push and pull are both empty; expected "
                                "at least one tensor");
  }
  if (pull.size() % num_servers != 0) {
    return InvalidArgumentError(
        std::string(fn) + ": pull has " + std::to_string(pull.size()) +
        " tensors, not divisible by the " + std::to_string(num_servers) +
        " servers; expected num_servers * slots_per_server tensors, server-major");
  }
  if (push.size() > kMaxTensorsPerMessage || pull.size() / num_servers > kMaxTensorsPerMessage) {
    return InvalidArgumentError(std::string(fn) + ": push has " + std::to_string(push.size()) +
                                " tensors and pull " + std::to_string(pull.size() / num_servers) +
                                " per server; expected at most " +
                                std::to_string(kMaxTensorsPerMessage) + " each way");
  }
  for (const auto& [batch, name] : {std::pair{&push, "push"}, std::pair{&pull, "pull"}}) {
    for (size_t i = 0; i < batch->size(); ++i) {
      const std::string where = std::string(fn) + ": " + name + "[" + std::to_string(i) + "]";
      MESHPOST_RETURN_IF_ERROR(ValidateKey((*batch)[i].key, where));
      MESHPOST_RETURN_IF_ERROR(ValidateTensor((*batch)[i].tensor, where, backend));
    }
  }
  return OkStatus();
}

Result<std::shared_ptr<PendingBatch>> FindBatch(
    const std::map<uint64_t, std::shared_ptr<PendingBatch>>& pending, uint64_t id,
    uint64_t next_handle, const char* fn) {
  auto it = pending.upper_bound(id);
  if (it != pending.begin()) {
    --it;
    if (id - it->first < it->second->num_ids) return it->second;
  }
  return NotFoundError(std::string(fn) + ": handle " + std::to_string(id) +
                       (id < next_handle && id > 0
                            ? " completed long ago and was forgotten (only the last " +
                                  std::to_string(kFinishedKeep) + " are kept)"
                            : " was never returned by ZBatchPushPull"));
}

Status ExpectsResponse(const PendingBatch& p, const Meta& meta) {
  const int s = ServerOf(meta.id);
  if (s >= p.num_servers || meta.sender != ServerNodeId(s)) {
    return DataLossError("response for handle " + std::to_string(p.handle) + " server " +
                         std::to_string(s) + " came from node " + std::to_string(meta.sender));
  }
  if (p.done.load(std::memory_order_relaxed)) {
    return FailedPreconditionError("response for handle " + std::to_string(p.handle) +
                                   " which already completed: " + p.status.ToString());
  }
  if (p.answered[s]) {
    return DataLossError("duplicate response for handle " + std::to_string(p.handle) +
                         " from server " + std::to_string(s));
  }
  return OkStatus();
}

bool AllServersTake(const NodeContext& ctx, int num_servers, MemoryKind kind) {
  for (int s = 0; s < num_servers; ++s) {
    if (!ctx.PeerTakesMemory(ServerNodeId(s), kind)) return false;
  }
  return true;
}

bool AnyServerTakes(const NodeContext& ctx, int num_servers, MemoryKind kind) {
  for (int s = 0; s < num_servers; ++s) {
    if (ctx.PeerTakesMemory(ServerNodeId(s), kind)) return true;
  }
  return false;
}

bool AllServersStream(const NodeContext& ctx, int num_servers) {
  for (int s = 0; s < num_servers; ++s) {
    if (!ctx.PeerStreams(ServerNodeId(s))) return false;
  }
  return true;
}

Status RegisterDeviceTensors(NodeContext* ctx, const KeyTensorBatch& batch, const char* fn,
                             const char* name) {
  for (size_t i = 0; i < batch.size(); ++i) {
    MESHPOST_RETURN_IF_ERROR(RegisterForGpuDirect(
        ctx, batch[i].tensor, std::string(fn) + ": " + name + "[" + std::to_string(i) + "]"));
  }
  return OkStatus();
}

TensorDesc DescribeTensor(const KeyTensor& kt) {
  TensorDesc d;
  d.key = kt.key;
  d.dtype = kt.tensor.dtype;
  d.shape = kt.tensor.shape;
  d.nbytes = kt.tensor.nbytes();
  d.addr = reinterpret_cast<uint64_t>(kt.tensor.data);
  return d;
}

void PrepareTrace(PendingBatch* p, const KeyTensorBatch& push) {
  p->traced = true;
  p->caller_tid = TraceThreadId();
  p->num_keys = static_cast<uint16_t>(push.size());
  for (size_t i = 0; i < push.size(); ++i) {
    p->push_bytes += push[i].tensor.nbytes();
    if (i < static_cast<size_t>(kTraceRecordKeys)) p->keys[i] = push[i].key;
  }
}

void RecordWorkerRequests(const PendingBatch& p, TraceRecorder* recorder) {
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
    for (int k = 0; k < 8; ++k) {
      r.stamps[k] = st[k];
      r.tids[k] = p.traces[s].tids[k];
    }
    recorder->Record(r);
  }
}

}  // namespace meshpost
