// One request as the server holds it between its arrival and the response (ps/af_server.cc),
// and what is derived from it without the server's state: what GetBatch hands the caller,
// the check of a response against the worker's pull slots, and the request's trace record.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "ps/af_server.h"
#include "ps/trace_recorder.h"
#include "tensor/tensor_view.h"
#include "van/message.h"

namespace meshpost {

// Handles carry the server rank in their top bits (rank << 40 | counter), so a handle from
// another server is never mistaken for one of ours. 40 bits of counter last for 10^12
// requests; rank < 4096 keeps handles below 2^52 (exact in a Python float too).
constexpr int kHandleRankShift = 40;

struct ServerRequest {
  uint64_t handle = 0;
  int worker_rank = 0;
  int worker_node = 0;
  uint64_t request_id = 0;
  std::vector<TensorDesc> push;
  std::vector<RecvSegment> segments;  // owners keep van buffers alive until answered
  std::vector<Device> devices;        // per push segment when some landed in GPU memory
  std::vector<TensorDesc> slots;
  std::vector<RecvSegment> peer_slots;  // writable views of the worker's slots (or empty)
  uint64_t received = 0;
  uint64_t processed = 0;
  // Trace capture only: OS threads (TraceThreadId) that received, returned and answered it.
  uint32_t received_tid = 0;
  uint32_t processed_tid = 0;
  uint32_t respond_tid = 0;
};

// What GetBatch returns for `r`: its push tensors as views of the received bytes (their
// owners keep them alive), its pull slots and its outputs.
BatchRequest BatchRequestOf(const ServerRequest& r);

// Writable views of the worker's pull slots that are mapped here (Request.outputs); a slot
// in ordinary memory is an empty view.
std::vector<TensorView> OutputsOf(const ServerRequest& r);
// True when every pull slot is mapped here, so a response may carry no tensors.
bool AllSlotsShared(const ServerRequest& r);
// The worker's pull slots as GetBatch reports them.
std::vector<PullSlot> SlotsOf(const ServerRequest& r);

// The rank of the worker that sent the request `meta` (node ids: ps/node_context.h); a
// DataLoss error for any other command or sender.
Result<int> RequestingWorker(const Meta& meta, int num_servers, int num_workers);

// Why `handle` is not outstanding on the server whose handles run from handle_base + 1 to
// next_handle - 1: another server's, already answered, or never returned by GetBatch.
Status UnknownServerHandle(const char* fn, uint64_t handle, uint64_t handle_base,
                           uint64_t next_handle);

// Checks a response to `r`: one tensor per pull slot, each valid (devices through `backend`)
// and of the slot's dtype and size. Errors name `fn` and the tensor's position.
Status CheckResponse(const char* fn, const ServerRequest& r, const std::vector<TensorView>& tensors,
                     DeviceBackend* backend);

// The trace record of an answered request; `stamps` are the ones sent to the worker and
// `posted_tid` the thread that handed the response to the transport.
TraceRecord ServerTraceRecord(const ServerRequest& req, const std::vector<TensorView>& tensors,
                              const std::array<uint64_t, kServerStamps>& stamps,
                              uint32_t posted_tid);

}  // namespace meshpost
