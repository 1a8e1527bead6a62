#include "ps/server_request.h"

#include <string>

namespace meshpost {

BatchRequest BatchRequestOf(const ServerRequest& r) {
  BatchRequest b;
  b.handle = r.handle;
  b.worker_rank = r.worker_rank;
  b.push.reserve(r.push.size());
  for (size_t i = 0; i < r.push.size(); ++i) {
    KeyTensor kt;
    kt.key = r.push[i].key;
    kt.tensor.data = r.segments[i].data;
    kt.tensor.dtype = r.push[i].dtype;
    kt.tensor.shape = r.push[i].shape;
    // Van-owned bytes outlive the request for as long as a caller holds the view.
    kt.tensor.owner = r.segments[i].owner;
    if (!r.devices.empty()) kt.tensor.device = r.devices[i];
    b.push.push_back(std::move(kt));
  }
  b.pull_slots = SlotsOf(r);
  b.outputs = OutputsOf(r);
  return b;
}

std::vector<TensorView> OutputsOf(const ServerRequest& r) {
  std::vector<TensorView> out(r.slots.size());
  for (size_t j = 0; j < r.slots.size() && j < r.peer_slots.size(); ++j) {
    if (r.peer_slots[j].data == nullptr) continue;
    out[j].data = r.peer_slots[j].data;
    out[j].dtype = r.slots[j].dtype;
    out[j].shape = r.slots[j].shape;
    out[j].owner = r.peer_slots[j].owner;
    out[j].device = r.peer_slots[j].device;
  }
  return out;
}

bool AllSlotsShared(const ServerRequest& r) {
  if (r.peer_slots.size() != r.slots.size()) return false;
  for (const RecvSegment& s : r.peer_slots) {
    if (s.data == nullptr) return false;
  }
  return true;
}

std::vector<PullSlot> SlotsOf(const ServerRequest& r) {
  std::vector<PullSlot> slots;
  slots.reserve(r.slots.size());
  for (const TensorDesc& d : r.slots) slots.push_back({d.key, d.dtype, d.shape, d.nbytes});
  return slots;
}

Result<int> RequestingWorker(const Meta& meta, int num_servers, int num_workers) {
  if (meta.cmd != Command::kRequest) {
    return DataLossError(std::string("server got unexpected ") + CommandName(meta.cmd));
  }
  const int rank = meta.sender - 1 - num_servers;
  if (rank < 0 || rank >= num_workers) {
    return DataLossError("request from node " + std::to_string(meta.sender) +
                         ", which is not a worker");
  }
  return rank;
}

Status UnknownServerHandle(const char* fn, uint64_t handle, uint64_t handle_base,
                           uint64_t next_handle) {
  const uint64_t owner = handle >> kHandleRankShift;
  if (owner != handle_base >> kHandleRankShift) {
    return NotFoundError(std::string(fn) + ": handle " + std::to_string(handle) +
                         " belongs to server " + std::to_string(owner) + ", not to this server " +
                         std::to_string(handle_base >> kHandleRankShift));
  }
  return NotFoundError(std::string(fn) + ": handle " + std::to_string(handle) +
                       (handle > handle_base && handle < next_handle
                            ? " was already answered (or is not yet returned by GetBatch)"
                            : " was never returned by GetBatch"));
}

Status CheckResponse(const char* fn, const ServerRequest& r, const std::vector<TensorView>& tensors,
                     DeviceBackend* backend) {
  if (tensors.size() != r.slots.size()) {
    return InvalidArgumentError(std::string(fn) + ": " + std::to_string(tensors.size()) +
                                " tensors for handle " + std::to_string(r.handle) + "; worker " +
                                std::to_string(r.worker_rank) + " expects " +
                                std::to_string(r.slots.size()) + " (its pull slots)" +
                                (tensors.empty() ? "; no tensors answers with the request's "
                                                   "outputs only when every pull slot is in "
                                                   "the worker's shared memory"
                                                 : ""));
  }
  for (size_t j = 0; j < tensors.size(); ++j) {
    const std::string where = std::string(fn) + ": tensors[" + std::to_string(j) + "]";
    MESHPOST_RETURN_IF_ERROR(ValidateTensor(tensors[j], where, backend));
    const TensorDesc& slot = r.slots[j];
    if (tensors[j].dtype != slot.dtype || tensors[j].nbytes() != slot.nbytes) {
      TensorView want;
      want.dtype = slot.dtype;
      want.shape = slot.shape;
      return InvalidArgumentError(
          where + " is " + tensors[j].Describe() + " (" + std::to_string(tensors[j].nbytes()) +
          " bytes); worker " + std::to_string(r.worker_rank) + "'s pull slot " + std::to_string(j) +
          " (key " + std::to_string(slot.key) + ") expects " + want.Describe() + " (" +
          std::to_string(slot.nbytes) + " bytes)");
    }
  }
  return OkStatus();
}

TraceRecord ServerTraceRecord(const ServerRequest& req, const std::vector<TensorView>& tensors,
                              const std::array<uint64_t, kServerStamps>& stamps,
                              uint32_t posted_tid) {
  TraceRecord r;
  r.kind = TraceRecordKind::kServerRequest;
  r.peer = req.worker_rank;
  r.request_id = req.request_id;
  r.handle = req.handle;
  r.num_keys = static_cast<uint16_t>(req.push.size());
  for (size_t i = 0; i < req.push.size(); ++i) {
    r.push_bytes += req.push[i].nbytes;
    if (i < static_cast<size_t>(kTraceRecordKeys)) r.keys[i] = req.push[i].key;
  }
  for (const TensorView& t : tensors) r.pull_bytes += t.nbytes();
  // Same positions as in ps/trace.h, so both ends' records index alike.
  for (int k = 0; k < kServerStamps; ++k) r.stamps[2 + k] = stamps[k];
  r.tids[2] = req.received_tid;
  r.tids[3] = req.processed_tid;
  r.tids[4] = req.respond_tid;
  r.tids[5] = posted_tid;
  return r;
}

}  // namespace meshpost
