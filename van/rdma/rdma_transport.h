// The RDMA protocol engine behind RdmaVan (van/rdma internal), written against VerbsApi
// so tests drive it with a fake: per-peer connection state machine fed by rendezvous
// blobs, sends as RDMA WRITE(payload) + WRITE_WITH_IMM(header) with credit flow control,
// completion-to-handle mapping, and delivery to a VanReceiver. Progress() polls the CQ
// once; nothing here starts a thread. Thread-safe; callbacks run without the lock held.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "common/log_rate.h"
#include "common/waiter.h"
#include "van/device_copy.h"
#include "van/rdma/mr_cache.h"
#include "van/rdma/rdma_van.h"
#include "van/rdma/rdma_wire.h"
#include "van/rdma/verbs_api.h"

namespace meshpost {
namespace rdma {

// What was picked at open time.
struct LocalPort {
  std::string device;
  uint8_t port = 1;
  int gid_index = 0;
  Gid gid{};
  uint16_t lid = 0;
  LinkLayer link_layer = LinkLayer::kUnknown;
  uint32_t mtu_bytes = 1024;
};

enum class PeerState { kNone, kConnecting, kReady, kDead };
const char* PeerStateName(PeerState s);

// Chooses device, port and GID index per options (DMLC_INTERFACE, MESHPOST_RDMA_DEVICE,
// MESHPOST_RDMA_GID_INDEX); Unavailable "no RDMA device: ..." when there is none.
Result<std::string> SelectDevice(VerbsApi* api, const RdmaOptions& options);
Result<LocalPort> SelectPort(VerbsDevice* device, const RdmaOptions& options);

class RdmaTransport {
 public:
  static Result<std::unique_ptr<RdmaTransport>> Create(std::unique_ptr<VerbsApi> api,
                                                       const RdmaOptions& options,
                                                       RdmaControlSend control_send);
  ~RdmaTransport();

  void SetReceiver(VanReceiver* receiver);
  void SetPeerFailureCallback(RdmaPeerFailure cb);
  const LocalPort& local() const { return local_; }

  // Creates the QP for peer (if none or dead) and sends our Hello. Idempotent.
  Status Connect(int peer);
  Status OnControlBlob(int peer, const void* data, size_t size);
  // Fails everything pending for peer (Cancelled) and destroys its QP.
  void Disconnect(int peer);
  // Validates msg on the caller's thread, then posts or queues it. The handle completes
  // exactly once; detached handles are forgotten at completion (failures still reach the
  // peer-failure callback).
  Result<uint64_t> Send(OutMessage&& msg, bool detached);
  // Final status of a handle (forgets it), DeadlineExceeded on timeout, NotFound if unknown.
  Status Wait(uint64_t handle, int64_t timeout_ms);
  // Status of a completed handle without waiting: nullopt-like NotFound if pending.
  bool IsDone(uint64_t handle);

  // cuda_device: the memory is CUDA device memory of `device`, registered for GPUDirect
  // (mr_cache.h). It is recorded as a device destination first, whether or not the
  // registration works, so a push that lands in a van buffer (before the worker learned
  // of the buffer, or without GPUDirect) is copied into it by the device, never the CPU.
  Status RegisterRecvBuffer(int peer, int64_t key, void* addr, size_t size,
                            bool cuda_device = false, int device = 0);
  Status RegisterMemory(const void* addr, size_t size, const std::weak_ptr<const void>& owner,
                        bool cuda_device = false);
  // The device of a CUDA receive buffer holding [p, p + n); -1 when none does.
  int DeviceDestination(const void* p, size_t n) const;
  void InvalidateMemory(const void* addr, size_t size);

  // Polls the CQ once and handles what it returned; returns the number of completions.
  int Progress();
  // Poller helper: arm the CQ, re-poll, and block up to timeout_ms if still idle.
  Status BlockForCompletions(int timeout_ms);

  PeerState state(int peer) const;
  Status dead_reason(int peer) const;
  uint32_t max_inline(int peer) const;
  MrCacheStats mr_stats() const;
  size_t pending_sends(int peer) const;
  Waiter& waiter() { return waiter_; }

  // Waits up to timeout_ms until nothing is queued or in flight on a live connection
  // (someone must keep calling Progress). Stop drains before Shutdown: destroying a QP
  // discards posted WRITEs, so a last response or PEER_LEAVE would never arrive.
  Status Drain(int64_t timeout_ms);
  void Shutdown();  // fails everything, destroys all QPs; idempotent

 private:
  struct LocalBuffer {
    uint64_t addr = 0;
    uint64_t len = 0;
    std::shared_ptr<VerbsMr> mr;
    std::shared_ptr<void> pool;  // van-owned memory, else null (user / pull slot)
    bool pull_slot = false;
  };
  struct Pending {
    uint64_t handle = 0;
    OutMessage msg;
    size_t frame_bytes = 0;  // encoded header frame; out of line when over the peer's slot
  };
  struct Conn;
  enum class WrKind { kData, kHeader, kCredit, kRecv };
  struct WrInfo {
    int peer = -1;
    uint64_t conn_gen = 0;
    WrKind kind = WrKind::kData;
    uint64_t handle = 0;
    uint32_t covers = 1;  // send-queue entries a signaled completion retires
  };
  struct Inflight {
    int peer = -1;
    std::vector<std::shared_ptr<VerbsMr>> mrs;
    std::vector<SendSegment> segments;  // owners kept alive until completion
    std::vector<uint64_t> wr_ids;       // every work request posted for the message
  };
  struct HandleRec {
    bool done = false;
    bool detached = false;
    Status status;
  };
  // Work to do once the lock is released.
  struct Actions {
    std::vector<std::pair<int, std::string>> blobs;
    std::vector<InMessage> messages;
    std::vector<std::pair<Meta, Status>> dropped;
    std::vector<std::pair<int, Status>> failures;
    // (peer, connection generation) of each delivered message whose payload sits in van
    // buffers: once Run has copied it out, the header credit may go back.
    std::vector<std::pair<int, uint64_t>> releases;
    bool notify = false;
  };

  RdmaTransport(std::unique_ptr<VerbsApi> api, std::unique_ptr<VerbsDevice> device,
                const RdmaOptions& options, LocalPort local, RdmaControlSend control_send);

  Result<Conn*> CreateConnLocked(int peer, Actions* acts);
  Status BringUpLocked(Conn* c, const ConnInfo& remote, Actions* acts);
  void KillLocked(Conn* c, const Status& why, Actions* acts);
  void CompleteLocked(uint64_t handle, const Status& s, Actions* acts);
  // Posts as many pending messages as credits, queue room and buffers allow.
  void PumpLocked(Conn* c, Actions* acts);
  enum class PostResult { kPosted, kBlocked, kFailed };
  PostResult TryPostLocked(Conn* c, Pending* p, Actions* acts);
  void HandleCompletionLocked(const Completion& wc, Actions* acts);
  void HandleHeaderLocked(Conn* c, uint32_t slot, Actions* acts);
  void ReturnCreditsLocked(Conn* c, bool force, Actions* acts);
  void AdvertiseLocked(Conn* c, const std::vector<int64_t>& keys, Actions* acts);
  Status PostRecvLocked(Conn* c);
  uint64_t NewWrId(const WrInfo& info);
  Conn* FindConn(int peer) const;
  void Run(Actions* acts);

  std::unique_ptr<VerbsApi> api_;
  std::unique_ptr<VerbsDevice> device_;
  RdmaOptions options_;
  LocalPort local_;
  RdmaControlSend control_send_;
  std::unique_ptr<VerbsCq> cq_;

  mutable std::mutex mu_;
  VanReceiver* receiver_ = nullptr;
  RdmaPeerFailure on_failure_;
  MrCache mr_cache_;
  std::map<int, std::unique_ptr<Conn>> conns_;
  std::unordered_map<uint64_t, WrInfo> wrs_;
  std::unordered_map<uint64_t, HandleRec> handles_;
  std::unordered_map<uint64_t, Inflight> inflight_;
  uint64_t next_wr_id_ = 1;
  uint64_t next_handle_ = 1;
  uint64_t next_gen_ = 1;
  bool shut_down_ = false;
  // register_recv_buffer memory per (peer, key); survives reconnects.
  std::map<int, std::map<int64_t, LocalBuffer>> registered_;
  // CUDA receive buffers by address: (size, device). Guarded by mu_.
  std::map<uintptr_t, std::pair<size_t, int>> device_dests_;
  // Copies of pushes from van buffers into CUDA receive buffers (Run; copy_mu_).
  std::mutex copy_mu_;
  DeviceCopier copier_;
  Waiter waiter_;
  // Refused messages are logged through this: a peer can provoke them (thread-safe).
  LogRateLimiter refused_log_;
};

}  // namespace rdma
}  // namespace meshpost
