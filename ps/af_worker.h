// AFTensorWorker: the attention-side API. ZBatchPushPull sends the push tensors to every
// server and registers the pull tensors as destinations (server-major: with S servers and
// S * P pull tensors, entry s * P + j is slot j of server s); it returns a 64-bit handle
// that completes once every server has answered. Handles are never reused.
//
// StepMesh's id contract: a batch owns len(push) + P consecutive ids, the handle first
// (one per push tensor and one per pull slot position). Wait, Done, FetchTrace and
// GetAllHandlers accept every one of them; meshpost sends one message per server that
// carries all of them, so each id's trace is that message's.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/result.h"
#include "ps/trace.h"
#include "tensor/device_backend.h"
#include "tensor/tensor_view.h"

namespace meshpost {

class NodeContext;

class AFTensorWorker {
 public:
  explicit AFTensorWorker(NodeContext* ctx);
  ~AFTensorWorker();
  AFTensorWorker(const AFTensorWorker&) = delete;
  AFTensorWorker& operator=(const AFTensorWorker&) = delete;

  // Push tensors and pull tensors must stay valid until the handle completes, unless
  // their `owner` is set (then meshpost holds it as long as it needs the memory).
  // CUDA tensors move through pinned staging buffers (see docs/gpu.md); with
  // sync.need_event the push tensors are read only after sync.stream's work so far.
  Result<uint64_t> ZBatchPushPull(const KeyTensorBatch& push, const KeyTensorBatch& pull,
                                  const StreamSync& sync = {});
  // Later work on `stream` waits until `handle` completed (its pull tensors are written, or
  // it failed: Wait reports which) without blocking the CPU.
  Status WaitOnStream(uint64_t handle, DeviceStream stream);
  // OK once every server answered; DeadlineExceeded after timeout_ms (the request stays
  // pending and may be waited on again); Unavailable when a server died or left; any error
  // the server reported. timeout_ms < 0 waits without limit.
  Status Wait(uint64_t handle, int64_t timeout_ms);
  // True once the handle completed (successfully or not); NotFound for unknown handles.
  // Wait and Done accept any id of the batch and refer to the whole batch.
  Result<bool> Done(uint64_t handle);
  // The batch's ids, the handle first (StepMesh's GetAllHandlers). For an id that is not
  // a batch's first, just that id (as StepMesh answers for a non-batch timestamp).
  Result<std::vector<uint64_t>> GetAllHandlers(uint64_t id);
  // One Trace per server, in server-rank order (any id of the batch).
  Result<std::vector<Trace>> FetchTrace(uint64_t id);
  // StepMesh's per-id trace: the 8 stamps of the message that carried id's tensors, i.e.
  // the request to the server whose answer completed the batch last (the critical path;
  // server 0 until one answered). Any id of a batch is accepted.
  Result<Trace> FetchRequestTrace(uint64_t id);
  int num_servers() const;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshpost
