// Routing to vans for one process: the tcp van that carries control traffic (and data
// where nothing better fits), the data vans this node offers (created by name from
// van/registry), which van carries each peer's data, rendezvous blobs relayed between
// vans over the tcp plane, and memory registration fanned out to the vans that need it.
// Knows no concrete van: every choice is a question to the Van interface. Internal to ps/.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/progress.h"
#include "common/result.h"
#include "ps/node.h"
#include "ps/options.h"
#include "van/registry.h"
#include "van/van.h"

namespace meshpost {

// Also the ProgressEngine of this process's Waiters: a caller waiting for data lends its
// thread to the data van that supports it (cma), once a peer is routed through that van.
class VanRouter : public ProgressEngine {
 public:
  VanRouter(const Options& options, int my_id, int num_nodes, VanFactory factory);
  ~VanRouter();

  // The tcp van: binds host:port (0 = OS-assigned) and starts delivering to `receiver`.
  // Listens on `ip` (the advertised address; never every interface unless asked).
  Result<int> BindControl(const std::string& ip, int port);
  // Closes the control connection to `id` after what was sent to it went out (bounded).
  void DisconnectControl(int id);
  Status StartControl(VanReceiver* receiver);
  // Creates, binds and starts every data van besides tcp this node may use (only the
  // forced one when a transport is forced). Returns the (name, endpoint) pairs to
  // advertise in the node table. A forced van that cannot run is an error; others are
  // skipped with a log line.
  Result<std::vector<std::pair<std::string, std::string>>> StartDataVans(const std::string& host,
                                                                         VanReceiver* receiver);

  // tcp connection to a node that is not a data peer (the scheduler; a refused node).
  Status ConnectControl(int id, const std::string& host, int port);
  // Connects data peer `peer`: tcp, plus the highest-priority data van both sides offer
  // that can reach it. Error when a forced transport cannot reach it.
  Status ConnectPeer(const NodeInfo& peer);
  // Data peer `peer.id` is now another process (a replacement, issue 10): closes every
  // connection to the old one on every van, connects to the new one like ConnectPeer, and
  // registers again the receive buffers registered for that peer.
  Status ReconnectPeer(const NodeInfo& old, const NodeInfo& peer);

  // Data to a peer goes over the van chosen for that pair; everything else over tcp.
  Status Send(OutMessage&& msg);
  Status SendControl(OutMessage&& msg);

  // Rendezvous relay: a local van's blob out to peer_id, and a peer's blob in. Blobs that
  // arrive before PeersConnected() are held (answering needs the tcp link to the peer,
  // which the node table brings) and delivered by it.
  Status SendRendezvous(const char* van, int peer_id, std::string blob);
  void OnRendezvous(int sender, const std::string& body);
  void PeersConnected();

  // Memory peers write into one-sidedly, for the vans that register memory. A receive
  // buffer registered before StartDataVans is replayed to the vans it creates.
  // A CUDA buffer (device >= 0) goes only to vans that write device destinations.
  void RegisterRecvBuffer(int peer_id, int64_t key, void* addr, size_t size, int device = -1);
  void RegisterMemory(const void* addr, size_t size, const std::shared_ptr<const void>& owner);
  // GPUDirect: whether the van routed to `id` moves memory of `kind` itself, and CUDA memory
  // registered with every van that does (the first failure is returned, naming the van).
  bool TakesMemory(int id, MemoryKind kind) const;
  // Whether the van carrying data from `id` writes received bytes into CUDA memory the
  // receiver names as a destination (Van::WritesDeviceDestinations).
  bool WritesDevice(int id) const;
  // Whether the van carrying data to `id` streams (Van::SupportsStreaming).
  bool Streams(int id) const;
  Status RegisterDeviceMemory(const void* addr, size_t size, int device,
                              const std::shared_ptr<const void>& owner);

  // The mechanism carrying data to `id` ("cma", "cma-shm", "rdma", "tcp").
  std::string TransportTo(int id) const;
  // Whether any connected data peer runs on another host.
  bool AnyRemotePeer() const { return remote_peers_.load(std::memory_order_relaxed) > 0; }
  // STEPMESH_BIND_CPU_CORE: shared with ps/'s own threads (heartbeat, liveness).
  const std::shared_ptr<CorePinner>& pinner() const { return van_options_.pinner; }
  void Stop();

  // ProgressEngine (common/progress.h). MESHPOST_CALLER_PROGRESS=0 turns it off.
  // Whether a peer's data goes through a van that lends progress (Begin can succeed).
  bool OffersProgress() const { return progress_van_.load(std::memory_order_acquire) != nullptr; }
  bool Begin() override;
  bool Progress(uint64_t deadline_ns) override;
  void End() override;
  void Wake() override;

 private:
  struct EarlyBuffer {
    int peer_id;
    int64_t key;
    void* addr;
    size_t size;
    int device = -1;  // >= 0: CUDA memory
  };

  Van* DataVan(const std::string& name) const;
  void RegisterRecvBufferWith(const std::vector<Van*>& vans, const EarlyBuffer& b);
  void DeliverRendezvous(int sender, const std::string& body);

  const Options& opts_;
  const int my_id_;
  const int num_nodes_;
  const VanFactory factory_;
  VanOptions van_options_;
  std::unique_ptr<Van> control_;                                         // tcp
  std::vector<std::pair<std::string, std::unique_ptr<Van>>> data_vans_;  // priority order
  // Per node id: the data van (nullptr = tcp) and its name. Written on the tcp receive
  // thread when a node table arrives (at start, and when a peer is replaced); senders
  // read route_ lock-free, route_name_ under route_mu_.
  std::unique_ptr<std::atomic<Van*>[]> route_;
  mutable std::mutex route_mu_;
  std::vector<std::string> route_name_;
  // Data vans that register memory; fixed once StartDataVans returned (read lock-free on
  // the data path afterwards).
  std::vector<Van*> registering_;
  // Why the rdma van is not running here (OK when it runs or was not wanted); written by
  // StartDataVans, read by ConnectPeer afterwards.
  Status rdma_unavailable_;
  const std::string host_identity_;
  std::atomic<int> remote_peers_{0};
  // The data van callers lend their threads to: set when the first peer is routed
  // through a van that supports progress; null until then (Begin declines).
  std::atomic<Van*> progress_van_{nullptr};

  mutable std::mutex mu_;
  bool data_vans_started_ = false;          // guarded by mu_
  std::vector<EarlyBuffer> early_buffers_;  // guarded by mu_
  // Every receive buffer registered, by (peer, key), to register again with a replaced
  // peer's new connections; guarded by mu_.
  std::map<std::pair<int, int64_t>, EarlyBuffer> recv_buffers_;
  bool peers_connected_ = false;                               // guarded by mu_
  std::vector<std::pair<int, std::string>> early_rendezvous_;  // guarded by mu_
};

}  // namespace meshpost
