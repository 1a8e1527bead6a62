// One push_pull batch as the worker tracks it (ps/af_worker.cc), and what is derived from it
// without the worker's state: the caller's input checks, tensor descriptors for the wire,
// GPUDirect registration and the batch's trace records.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "ps/node_context.h"
#include "ps/push_staging.h"
#include "ps/trace.h"
#include "ps/trace_recorder.h"
#include "tensor/device_staging.h"
#include "tensor/tensor_view.h"
#include "van/message.h"

namespace meshpost {

// Completed handles stay queryable (Wait / FetchTrace / GetAllHandlers) until this many
// newer handles completed; bounds memory in long runs.
constexpr size_t kFinishedKeep = 4096;

struct PendingBatch {
  uint64_t handle = 0;
  uint64_t num_ids = 1;  // StepMesh ids [handle, handle + num_ids) name this batch
  int num_servers = 0;
  int slots_per_server = 0;
  KeyTensorBatch pull;  // holds owners: pull tensors stay alive until completion
  std::vector<Trace> traces;
  std::vector<uint8_t> answered;  // response arrived (its staging copy may still run)
  std::vector<uint8_t> sent;      // request handed to the transport
  int remaining = 0;
  // GPU pull slots: the response lands in staging[i] and is copied to pull[i] after.
  std::vector<PinnedBuffer> staging;
  // Per staged slot: bytes already queued for the device while the response streamed in
  // (OnStreamProgress), and the first failure of such a copy.
  std::vector<size_t> to_device;
  Status early_copy;
  PinnedBuffer stream_flag;  // set to 1 on completion for WaitOnStream
  int64_t* stream_flag_device = nullptr;
  int last_server = 0;  // whose answer arrived last: the batch's critical path
  // Shared-memory copy of the push (ps/push_staging.h): reusable once every server answered.
  std::shared_ptr<PushStagingLease> push_staging;
  Status status;  // written before `done` is released
  std::atomic<bool> done{false};
  // Trace capture (MESHPOST_TRACE): set before the first send when this handle is sampled.
  bool traced = false;
  uint32_t caller_tid = 0;  // thread that called ZBatchPushPull (traced handles only)
  std::atomic<bool> wake_recorded{false};
  uint64_t push_bytes = 0;
  uint16_t num_keys = 0;
  int64_t keys[kTraceRecordKeys] = {0, 0, 0};
};

// Checks a push_pull's arguments before anything is allocated or sent: not both empty, pull
// divisible into `num_servers` equal shares, message tensor limits, every key and tensor
// (devices through `backend`). Errors name `fn` and the argument, e.g. "push[2]".
Status ValidatePushPull(const char* fn, const KeyTensorBatch& push, const KeyTensorBatch& pull,
                        int num_servers, DeviceBackend* backend);

// The batch that owns `id` among `pending` (by first handle): its handle or any id
// GetAllHandlers listed for it; otherwise why not (forgotten, never returned).
Result<std::shared_ptr<PendingBatch>> FindBatch(
    const std::map<uint64_t, std::shared_ptr<PendingBatch>>& pending, uint64_t id,
    uint64_t next_handle, const char* fn);

// OK when `meta` is a response `p` still expects: from the server its request id names, for
// a batch not yet complete, the first from that server. The caller holds the lock of `p`.
Status ExpectsResponse(const PendingBatch& p, const Meta& meta);

// GPUDirect: whether the transport to every one of `num_servers` servers moves `kind` itself.
bool AllServersTake(const NodeContext& ctx, int num_servers, MemoryKind kind);
// Whether some server's transport takes `kind` (NodeContext::PeerTakesMemory).
bool AnyServerTakes(const NodeContext& ctx, int num_servers, MemoryKind kind);
// Whether every server's transport streams (NodeContext::PeerStreams).
bool AllServersStream(const NodeContext& ctx, int num_servers);
// Registers the CUDA tensors of `batch` for GPUDirect; errors name `fn` and `name`[i].
Status RegisterDeviceTensors(NodeContext* ctx, const KeyTensorBatch& batch, const char* fn,
                             const char* name);

// The wire descriptor of a caller's tensor (its address is where the bytes are read from).
TensorDesc DescribeTensor(const KeyTensor& kt);

// Marks `p` as traced and notes what its records report of the push (bytes, first keys).
void PrepareTrace(PendingBatch* p, const KeyTensorBatch& push);

// One record per server of a completed traced batch, once all eight stamps are known. The
// caller holds the lock that guards `p`.
void RecordWorkerRequests(const PendingBatch& p, TraceRecorder* recorder);

}  // namespace meshpost
