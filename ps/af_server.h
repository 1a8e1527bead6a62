// AFTensorServer: the FFN-side API. Requests are queued per worker; GetBatch returns one
// request from every worker, in worker-rank order, once each worker has one pending.
// Respond / RespondVec answer a request into the worker's pull tensors after checking
// count, bytes and dtype against the worker's pull slots; nothing is sent on a mismatch.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/result.h"
#include "tensor/device_backend.h"
#include "tensor/tensor_view.h"

namespace meshpost {

class NodeContext;

// A worker's pull slot as described in its request.
struct PullSlot {
  int64_t key = 0;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  size_t nbytes = 0;
};

struct BatchRequest {
  uint64_t handle = 0;  // server-side handle for Respond; never reused
  int worker_rank = 0;
  // Views of the received bytes. Each view's `owner` (set when the bytes sit in a van
  // buffer, null for a registered receive buffer) keeps them valid for as long as the caller
  // holds it; without holding it they are valid until this request is answered.
  KeyTensorBatch push;
  std::vector<PullSlot> pull_slots;
  // Per pull slot: a writable view of the worker's slot itself when the worker allocated it
  // in shared memory (tensor/shared_memory.h) and the transport mapped it (same host);
  // data == nullptr otherwise. Compute into these and Respond with them (or with nothing):
  // only the completion travels. Views end at Respond: the worker may reuse the memory
  // as soon as its handle completes.
  std::vector<TensorView> outputs;
};

class AFTensorServer {
 public:
  explicit AFTensorServer(NodeContext* ctx);
  ~AFTensorServer();
  AFTensorServer(const AFTensorServer&) = delete;
  AFTensorServer& operator=(const AFTensorServer&) = delete;

  // One request per worker in worker-rank order. DeadlineExceeded after timeout_ms
  // (< 0: no limit); Unavailable if a worker died or left while requests are incomplete.
  Result<std::vector<BatchRequest>> GetBatch(int64_t timeout_ms);
  // Sends tensors[j] into pull slot j of the request's worker (a slot with an `outputs`
  // view gets one memcpy into it, none when tensors[j] is that view; an empty `tensors`
  // answers with the outputs when every slot has one). Tensors must stay valid
  // until the transport is done with them unless their `owner` is set. CUDA tensors are
  // staged through pinned memory; with sync.need_event they are read only after
  // sync.stream's work so far (otherwise the caller guarantees they are ready).
  Status Respond(uint64_t handle, const std::vector<TensorView>& tensors,
                 const StreamSync& sync = {});
  // Handle i gets rows [off_i, off_i + tensors_vec[i].shape[0]) of ret_buffer, where
  // off_i is the running sum of the previous row counts.
  Status RespondVec(const TensorView& ret_buffer, const std::vector<TensorView>& tensors_vec,
                    const std::vector<uint64_t>& handles, const StreamSync& sync = {});
  // Splits `tensor` evenly along dim 0 into worker_ranks.size() chunks; pushes of keys[i]
  // from worker worker_ranks[i] then land in chunk i (a push larger than its chunk fails
  // that worker's request). Re-registering a (worker, key) pair replaces its chunk.
  Status RegisterRecvBuffer(const TensorView& tensor, const std::vector<int>& worker_ranks,
                            const std::vector<int64_t>& keys);
  // Pull slots of a pending request (NotFound when unknown or already answered).
  Result<std::vector<PullSlot>> PullSlots(uint64_t handle);
  // The request's BatchRequest::outputs (NotFound when unknown or already answered).
  Result<std::vector<TensorView>> Outputs(uint64_t handle);
  int num_workers() const;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshpost
