// The RDMA van (libibverbs, RC queue pairs): options from the environment, device probing
// (CheckRdmaAvailable returns Unavailable "no RDMA device: ..." on hosts without one), and
// RdmaVan, a Van whose rendezvous blobs travel over its owner's control plane
// (VanReceiver::SendRendezvous out, Van::OnRendezvousBlob in). See docs/rdma.md.
// Only built in the meshpost_rdma target; ps/ reaches it by name through van/registry.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/env.h"
#include "common/result.h"
#include "van/van.h"

namespace meshpost {

namespace rdma {
class VerbsApi;  // van/rdma/verbs_api.h
}  // namespace rdma
class DeviceBackend;  // tensor/device_backend.h

// Where the van gets its verbs implementation. Empty (production) means libibverbs;
// tests substitute the in-process fake fabric (tests/van/rdma/fake_verbs.h).
using RdmaVerbsFactory = std::function<std::unique_ptr<rdma::VerbsApi>()>;

struct RdmaOptions {
  std::string device;                 // MESHPOST_RDMA_DEVICE ("mlx5_0"); "" = auto
  std::string interface;              // DMLC_INTERFACE: pick the RDMA device behind this netdev
  int port = 1;                       // MESHPOST_RDMA_PORT
  int gid_index = -1;                 // MESHPOST_RDMA_GID_INDEX; -1 = auto (RoCE v2 IPv4 GID)
  uint32_t max_inline = 256;          // MESHPOST_RDMA_INLINE: requested; the NIC may grant less
  uint32_t header_slots = 64;         // MESHPOST_RDMA_HEADER_SLOTS: in-flight messages per peer
  uint32_t header_slot_bytes = 4096;  // MESHPOST_RDMA_HEADER_BYTES: larger headers go out of line
  size_t mr_cache_entries = 1024;     // MESHPOST_RDMA_MR_CACHE
  // MESHPOST_RDMA_GPU: how CUDA memory is registered (auto, dmabuf, peermem, staging;
  // van/rdma/mr_cache.h), and the device backend for it (null: CudaBackend(); tests: fake).
  std::string gpu = "auto";
  DeviceBackend* gpu_backend = nullptr;
  uint32_t send_queue_depth = 1024;    // work requests per QP
  size_t max_pending = 4096;           // queued sends per peer (waiting for credits/buffers)
  WaitPolicy wait;                     // completion poller spin/block policy
  int64_t stop_drain_ms = 5'000;       // VanOptions::stop_drain_ms
  std::shared_ptr<CorePinner> pinner;  // VanOptions::pinner
  RdmaVerbsFactory verbs;              // tests only; empty = libibverbs
};

// Reads the variables above; a malformed value is an InvalidArgument naming it.
Result<RdmaOptions> RdmaOptionsFromEnv(const EnvLookup& env);

struct RdmaGidInfo {
  int index = 0;
  std::string gid;     // textual IPv6 form
  std::string type;    // "RoCE v2", "IB/RoCE v1"
  std::string netdev;  // for RoCE
};

struct RdmaPortInfo {
  int port = 1;
  std::string state;       // "PORT_ACTIVE", ...
  std::string link_layer;  // "InfiniBand", "Ethernet (RoCE)"
  int lid = 0;
  int active_mtu = 0;
  std::vector<RdmaGidInfo> gids;  // non-zero entries only
};

struct RdmaDeviceInfo {
  std::string name;
  uint64_t node_guid = 0;
  std::vector<RdmaPortInfo> ports;
};

// Every RDMA device on this host (an empty vector when there is none).
Result<std::vector<RdmaDeviceInfo>> ProbeRdmaDevices();
// OK when the van can open the configured device/port/GID; otherwise Unavailable
// ("no RDMA device: ibv_get_device_list found 0 devices ...") or NotFound listing what
// exists. Cheap enough to call once at start-up.
Status CheckRdmaAvailable(const RdmaOptions& options = {});

// RdmaTransport's (van/rdma internal) hooks: a rendezvous blob out to peer_id (must not
// block long nor call back into the transport), and a connection that died (completion
// error, failed post, peer re-connected). RdmaVan routes both to its VanReceiver, the
// failure on its poller thread.
using RdmaControlSend = std::function<Status(int peer_id, std::string blob)>;
using RdmaPeerFailure = std::function<void(int peer_id, const Status& why)>;

// Van: Bind opens the device (host/port are ignored, returns 0); endpoint() is
// "rdma://<device>:<port>/gid/<index>"; Connect(peer) starts rendezvous with peer.id
// through VanReceiver::SendRendezvous; Send posts asynchronously and its completion is
// tracked internally (failures reach VanReceiver::OnPeerFailure on the poller thread).
// RegistersMemory() is true: receive buffers and pull tensors are registered with the NIC.
class RdmaVan : public Van {
 public:
  // Like Send but returns a handle; WaitSend returns its final status (exactly once).
  virtual Result<uint64_t> SendAsync(OutMessage&& msg) = 0;
  virtual Status WaitSend(uint64_t handle, int64_t timeout_ms) = 0;
  virtual bool IsReady(int peer_id) const = 0;
};

Result<std::unique_ptr<RdmaVan>> CreateRdmaVan(const RdmaOptions& options);

}  // namespace meshpost
