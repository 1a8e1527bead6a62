// Internal seam between the Postoffice and the AF worker/server: what they need from the
// node (options, sending, peer liveness) and what the node delivers to them (data
// messages, destinations for incoming payloads, peer failures). Not a public header.
#pragma once

#include "common/result.h"
#include "common/waiter.h"
#include "ps/clock_sync.h"
#include "ps/options.h"
#include "tensor/tensor_view.h"
#include "van/message.h"
#include "van/van.h"

namespace meshpost {

// Node ids are derived from ranks so that every process can compute them: the scheduler
// is 0, server rank r is 1 + r, worker rank r is 1 + num_servers + r.
constexpr int kSchedulerId = 0;
inline int ServerNodeId(int rank) { return 1 + rank; }
inline int WorkerNodeId(int num_servers, int rank) { return 1 + num_servers + rank; }

// Request ids carry the server index in their low bits so a response maps back to
// (handle, server) without a lookup table.
constexpr int kServerIndexBits = 12;
constexpr int kMaxServers = 1 << kServerIndexBits;
inline uint64_t RequestId(uint64_t handle, int server) {
  return (handle << kServerIndexBits) | static_cast<uint64_t>(server);
}
inline uint64_t HandleOf(uint64_t request_id) { return request_id >> kServerIndexBits; }
inline int ServerOf(uint64_t request_id) {
  return static_cast<int>(request_id & (kMaxServers - 1));
}

class DataHandler {
 public:
  virtual ~DataHandler() = default;
  virtual Result<void*> Destination(const Meta& meta, size_t index) = 0;
  virtual void OnData(InMessage&& msg) = 0;
  // VanReceiver::OnStreamProgress: the first `bytes` of segment `index` landed.
  virtual void OnStreamProgress(const Meta& meta, size_t index, size_t bytes) {}
  virtual void OnDropped(const Meta& meta, const Status& why) = 0;
  virtual void OnNodeDown(int node_id, const Status& why) = 0;
  // A peer that was down is reachable again: a new process took its rank (issue 10).
  virtual void OnNodeUp(int node_id) {}
  // How Wait / GetBatch wait, once Start knows the cluster (MESHPOST_SPIN_US auto).
  virtual void SetWaitPolicy(const WaitPolicy& policy) {}
};

class NodeContext {
 public:
  virtual ~NodeContext() = default;
  virtual const Options& options() const = 0;
  virtual int node_id() const = 0;
  virtual Status Send(OutMessage&& msg) = 0;
  // OK while the peer is alive; otherwise why it is not (died, left).
  virtual Status PeerStatus(int node_id) const = 0;
  virtual void SetDataHandler(DataHandler* handler) = 0;
  // Memory a peer will write into one-sidedly: a server's receive buffer for pushes of
  // `key` from worker `worker_rank` (CUDA memory of `device` when >= 0: told only to the
  // transports that write device destinations), and a worker's pull tensors (tracked by
  // `owner`). Transports that need registration register it; the default ignores it.
  virtual void OnRecvBufferRegistered(int worker_rank, int64_t key, void* addr, size_t size,
                                      int device = -1) {}
  virtual void OnPullMemory(const void* addr, size_t size,
                            const std::shared_ptr<const void>& owner) {}
  // GPUDirect: true when the transport carrying data to and from `node_id` reads and writes
  // memory of `kind` itself (the rdma van with CUDA memory, unless MESHPOST_RDMA_GPU=staging),
  // so tensors of that kind travel without pinned host staging.
  virtual bool PeerTakesMemory(int node_id, MemoryKind kind) const {
    return kind == MemoryKind::kHost;
  }
  // Registers CUDA memory of `device` with every transport that takes it in place; the error
  // says why it cannot be (no dma-buf export, no peer memory: docs/gpu.md).
  virtual Status RegisterDeviceMemory(const void* addr, size_t size, int device,
                                      const std::shared_ptr<const void>& owner) {
    return UnimplementedError("no transport registers device memory");
  }

  // Whether the transport from `node_id` writes received bytes into CUDA receive buffers
  // itself (Van::WritesDeviceDestinations: cma with CUDA IPC, rdma with GPUDirect).
  virtual bool PeerWritesDevice(int node_id) const { return false; }
  // Whether the transport to `node_id` sends a message while its bytes are still being
  // written (Van::SupportsStreaming: tcp), so staging copies and the network overlap.
  virtual bool PeerStreams(int node_id) const { return false; }

  // Trace capture: the transport carrying data to/from a peer (by node id; "" when not
  // known), and this node's clock-offset estimate to the scheduler (null: none kept).
  virtual std::string PeerTransport(int node_id) const { return std::string(); }
  virtual const ClockSync* clock_sync() const { return nullptr; }

  // What a worker's or server's Waiter lends its thread to (common/progress.h); null: none.
  virtual ProgressEngine* progress_engine() { return nullptr; }

  WaitPolicy wait_policy() const {
    WaitPolicy p;
    p.spin_ns = options().EffectiveSpinUs() * 1000;
    p.busy_poll = options().busy_poll;
    return p;
  }
};

// Registers a CUDA tensor for GPUDirect (a no-op for host or empty tensors); the error
// names `where` and the tensor, and the fallback the user can choose.
inline Status RegisterForGpuDirect(NodeContext* ctx, const TensorView& t,
                                   const std::string& where) {
  if (t.device.type == DeviceType::kCPU || t.nbytes() == 0) return OkStatus();
  return ctx->RegisterDeviceMemory(t.data, t.nbytes(), t.device.index, t.owner)
      .Annotate(where + " " + t.Describe() +
                " for GPUDirect (MESHPOST_RDMA_GPU=staging stages it through pinned host memory "
                "instead)");
}

}  // namespace meshpost
