// The transport interface. A Van moves OutMessages to peer nodes and hands InMessages to
// a VanReceiver on its own thread. Before copying a data segment, the van asks the
// receiver where it should land (registered memory), so one-sided transports (same-host
// CMA, RDMA) and copy-at-receiver transports (ZeroMQ TCP) share one contract. Everything
// the owner (ps/) needs is a question to this interface with a default: whether a peer is
// reachable, an out-of-band rendezvous channel, memory registration, peer failures.
// Threads and locks: docs/threads.md.
#pragma once

#include <memory>
#include <string>

#include "common/affinity.h"
#include "common/env.h"
#include "common/result.h"
#include "common/waiter.h"
#include "van/message.h"

namespace meshpost {

class DeviceBackend;  // tensor/device_backend.h: the GPU memory a van may register

// What the owner knows about a peer (from the node table) when it asks a van to reach it.
struct PeerAddress {
  int id = -1;
  std::string host;           // TCP host (zmq van)
  int port = 0;               // TCP port (zmq van)
  std::string endpoint;       // the peer van's endpoint() string (non-TCP vans)
  int pid = 0;                // peer process id (same-host vans)
  std::string host_identity;  // the peer's HostIdentity() (same-host detection); "" unknown
};

// Callbacks from a van to its owner. Threading contract, which every van keeps and the
// conformance suite checks: Destination, OnMessage, OnDropped and OnPeerFailure run on a
// thread the van started (its receive/poller thread), or on a caller's thread the owner
// lent the van inside Van::Progress, never inline inside a Send, Connect, Disconnect or
// Stop call the owner made. SendRendezvous is a request *to* the
// owner and may run on any thread, including inside Connect or OnRendezvousBlob.
class VanReceiver {
 public:
  virtual ~VanReceiver() = default;
  // Destination for data segment `index` of an incoming message whose meta decoded fine.
  // Returns a pointer to at least meta.data[index].nbytes writable bytes, or nullptr to
  // let the van keep the bytes in its own buffer. An error drops the message and is
  // reported through OnDropped.
  virtual Result<void*> Destination(const Meta& meta, size_t index) = 0;
  // A complete message.
  virtual void OnMessage(InMessage&& msg) = 0;
  // A streamed message (van/streamed_bytes.h) whose segment `index` now holds its first
  // `bytes` bytes in the destination Destination chose: the receiver may start using them
  // before OnMessage (the worker starts copying a staged GPU slot to the device). Same
  // thread rules as OnMessage; the message may still be dropped later.
  virtual void OnStreamProgress(const Meta& meta, size_t index, size_t bytes) {}
  // A message whose header decoded but whose payload was refused (why says how).
  virtual void OnDropped(const Meta& meta, const Status& why) = 0;
  // The connection to peer_id failed (completion error, failed post, reset): whatever
  // depends on that peer should fail. At most once per connection. Vans that cannot tell
  // (tcp, cma) never call it; the owner's heartbeats cover them.
  virtual void OnPeerFailure(int peer_id, const Status& why) {}
  // Out-of-band rendezvous: a van that must exchange set-up bytes with a peer before data
  // flows (RDMA queue pairs and keys) hands them here; the owner carries them over its
  // control plane and feeds them to the peer's van of the same name() through
  // Van::OnRendezvousBlob. Must not block long and must not call back into the van.
  virtual Status SendRendezvous(const char* van_name, int peer_id, std::string blob) {
    return UnimplementedError(std::string("van '") + van_name +
                              "' needs a rendezvous channel its owner does not provide");
  }
};

// Kinds of memory a van can be asked to register for one-sided access by peers. Host
// memory is what vans take today; shared host memory (memfd, mappable by same-host peers)
// and CUDA IPC device memory are further kinds of the same capability: a van answers
// SupportsMemory(kind) and registers what it supports.
enum class MemoryKind : uint8_t { kHost = 0, kSharedHost = 1, kCudaDevice = 2 };
const char* MemoryKindName(MemoryKind kind);

struct MemoryRegion {
  void* addr = nullptr;
  size_t size = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;  // CUDA device ordinal for kCudaDevice
  // When set, the registration is dropped once the owner is freed; when empty, the
  // memory must stay valid until Van::InvalidateMemory, Disconnect or Stop.
  std::weak_ptr<const void> owner;
};

struct VanOptions {
  WaitPolicy wait;              // receive-thread spin/block policy
  int io_threads = 1;           // ZeroMQ I/O threads
  size_t zero_copy_min = 4096;  // smaller segments are copied into the frame
  // Same-host (cma) van: never use cross-memory attach, always the shared-memory copy
  // path (the automatic fallback where CMA is refused; set to test it).
  bool cma_disable = false;
  // Same-host van: bytes of the shared-memory frame ring per connection (a power of two,
  // >= 4096), through which frames travel without a system call; 0 = socket frames only.
  size_t cma_ring_bytes = size_t{256} << 10;
  // Same-host van: CUDA memory the owner registers moves by CUDA IPC (the receiver copies
  // device to device, or computes into a mapped pull slot); false (MESHPOST_CMA_GPU=
  // staging) leaves GPU tensors to the owner's pinned host staging.
  bool cma_gpu_ipc = true;
  int64_t connect_timeout_ms = 10'000;  // cma van: Connect handshake deadline
  // How long Stop() waits for sends already handed to the van (zero-copy frames not yet
  // released, unacknowledged reads, posted RDMA writes) before closing connections. A
  // dead peer cannot hold Stop longer than this.
  int64_t stop_drain_ms = 5'000;
  std::string interface;  // DMLC_INTERFACE: vans that pick a device (rdma) use it
  // Where van-specific variables (MESHPOST_RDMA_*) are read; empty = process environment.
  EnvLookup env;
  // Cluster authentication (common/auth.h, docs/security.md). With a token every
  // connection proves knowledge of it, and a message's meta.sender is the authenticated
  // peer of the connection it arrived on (a message claiming another sender is dropped).
  std::string cluster_token;  // "" = unauthenticated
  // With a token: the tcp van also MACs every message's data frames (MESHPOST_AUTH_PAYLOAD)
  // and refuses a message whose frames do not match, or that arrives without a payload MAC.
  bool auth_payload = false;
  int self_id = -1;  // this node's id, bound into every handshake
  // Largest frame a peer may send; a larger one closes that connection before anything is
  // allocated for it (MESHPOST_MAX_MESSAGE_BYTES).
  uint64_t max_message_bytes = 1ull << 30;
  // STEPMESH_BIND_CPU_CORE: each thread a van starts pins itself through this (null: no
  // pinning). Shared by every van and ps/ thread of the process.
  std::shared_ptr<CorePinner> pinner;
  // The device backend of the GPU memory a van registers in place (GPUDirect); null means
  // the CUDA backend. Tests pass the fake backend here.
  DeviceBackend* device_backend = nullptr;
};

class Van {
 public:
  virtual ~Van() = default;
  virtual const char* name() const = 0;
  // Binds the receive endpoint on host:port (port 0 picks a free port); returns the port.
  virtual Result<int> Bind(const std::string& host, int port) = 0;
  // Opaque address peers pass back in PeerAddress::endpoint to Connect; valid after Bind.
  virtual std::string endpoint() const = 0;
  // Starts the receive thread delivering to `receiver` (which must outlive Stop()).
  virtual Status Start(VanReceiver* receiver) = 0;
  // Whether this van can carry data to `peer` at all (same host? same fabric?), asked
  // before Connect; the status says why not. Default: every peer is reachable.
  virtual Status CanReach(const PeerAddress& peer) const { return OkStatus(); }
  virtual Status Connect(const PeerAddress& peer) = 0;
  virtual void Disconnect(int peer_id) = 0;
  // Sends to msg.meta.recipient; thread-safe. Segments are read after return only through
  // their owners (zero-copy); without an owner the caller keeps the memory valid until
  // the request that carries it completes.
  virtual Status Send(OutMessage&& msg) = 0;
  // Stops the receive thread and closes every socket; idempotent. Sends already accepted
  // get up to VanOptions::stop_drain_ms to complete first.
  virtual void Stop() = 0;
  // The mechanism used towards a connected peer (e.g. "cma" or "cma-shm" for the
  // same-host van when CMA is refused); name() unless a van distinguishes.
  virtual std::string PeerTransport(int peer_id) const { return name(); }

  // A blob peer_id's van of the same name sent through VanReceiver::SendRendezvous.
  // Malformed blobs are DataLoss and change nothing.
  virtual Status OnRendezvousBlob(int peer_id, const std::string& blob) {
    return FailedPreconditionError(std::string("van '") + name() +
                                   "' takes no rendezvous blobs (from node " +
                                   std::to_string(peer_id) + ")");
  }

  // --- memory registration (one-sided transports) ---
  // Whether peers write into registered memory through this van, so the owner should
  // tell it about destinations; false (the default) for copy-at-receiver vans, whose
  // registration calls are no-ops.
  virtual bool RegistersMemory() const { return false; }
  virtual bool SupportsMemory(MemoryKind kind) const { return kind == MemoryKind::kHost; }
  // Pushes of `key` from peer_id land in `region` (a server's receive buffer).
  virtual Status RegisterRecvBuffer(int peer_id, int64_t key, const MemoryRegion& region) {
    return OkStatus();
  }
  // Memory peers will write into on any connection (a worker's pull tensors).
  virtual Status RegisterMemory(const MemoryRegion& region) { return OkStatus(); }
  // Whether Send takes a message whose `streamed` segments are still being written
  // (OutMessage::stream, van/streamed_bytes.h): ranges go out as they become ready and the
  // receiver gets the message whole. Vans that do not stream refuse such messages.
  virtual bool SupportsStreaming() const { return false; }
  // Must be called before freeing caller-managed memory that was registered or sent.
  virtual void InvalidateMemory(const void* addr, size_t size) {}
  // Whether VanReceiver::Destination may return CUDA memory registered here (kind
  // kCudaDevice): the van then writes received bytes into it with the device backend,
  // whatever memory they come from (the cma van with CUDA IPC). False: destinations must
  // be host memory (the rdma van copies pooled bytes with the CPU).
  virtual bool WritesDeviceDestinations() const { return false; }

  // --- caller-driven progress (common/progress.h, docs/threads.md) ---
  // A van that supports it lets a caller's thread that waits for messages receive them
  // itself: between BeginProgress() (true: this thread now receives for the van; false:
  // another thread does, or the van is stopping) and EndProgress(), the van's own thread
  // leaves incoming data to the caller, and VanReceiver callbacks run on the caller's
  // thread inside Progress(). Progress waits until deadline_ns (0 = poll once) or
  // WakeProgress(), delivers what arrived and returns; false once the van stops (call
  // EndProgress). WakeProgress is thread-safe and cheap when no caller is inside.
  virtual bool SupportsProgress() const { return false; }
  virtual bool BeginProgress() { return false; }
  virtual bool Progress(uint64_t deadline_ns) { return false; }
  virtual void EndProgress() {}
  virtual void WakeProgress() {}
};

}  // namespace meshpost
