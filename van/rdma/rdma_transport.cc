// Protocol engine of the RDMA van; the protocol is described step by step in docs/rdma.md.
// Lock discipline: every state change happens under mu_; anything that calls out (control
// blobs, receiver callbacks, failure callback, waiter notification) is collected in an
// Actions record and run by Run() after the lock is released.
#include "van/rdma/rdma_transport.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>

#include "common/clock.h"
#include "common/logging.h"
#include "van/codec.h"
#include "van/delivery.h"

namespace meshpost {
namespace rdma {
namespace {

constexpr const char* kLog = "van";
// One work request moves at most this much; larger segments are split (verbs caps a
// message at 2 GiB on most devices).
constexpr uint64_t kMaxWriteBytes = 1ull << 30;
constexpr size_t kMaxRetiredBuffers = 64;
// Unanswered requests whose pull slots are remembered per peer (> header slots in flight).
constexpr size_t kMaxRequestSlots = 4096;
constexpr uint32_t kExtraRecvs = 8;
// Largest header frame sent out of line (a Meta body is at most kMaxBodyBytes).
constexpr size_t kMaxIndirectFrameBytes = kMaxBodyBytes + (1u << 20);

std::shared_ptr<char> AllocAligned(size_t bytes) {
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded == 0 ? 4096 : rounded);
  if (p == nullptr) return nullptr;
  std::memset(p, 0, rounded == 0 ? 4096 : rounded);
  return std::shared_ptr<char>(static_cast<char*>(p), [](char* q) { std::free(q); });
}

std::string Node(int peer) { return "node " + std::to_string(peer); }

const char* WrKindWhat(int kind) {
  switch (kind) {
    case 0: return "RDMA WRITE of a payload";
    case 1: return "RDMA WRITE_WITH_IMM of a header";
    case 2: return "RDMA WRITE_WITH_IMM of credits";
    default: return "receive";
  }
}

bool IsIpv4MappedGid(const Gid& g) {
  for (int i = 0; i < 10; ++i) {
    if (g[i] != 0) return false;
  }
  return g[10] == 0xff && g[11] == 0xff;
}

}  // namespace

const char* PeerStateName(PeerState s) {
  switch (s) {
    case PeerState::kNone: return "none";
    case PeerState::kConnecting: return "connecting";
    case PeerState::kReady: return "ready";
    case PeerState::kDead: return "dead";
  }
  return "?";
}

Result<std::string> SelectDevice(VerbsApi* api, const RdmaOptions& options) {
  MESHPOST_ASSIGN_OR_RETURN(std::vector<std::string> names, api->ListDevices());
  if (names.empty()) {
    return UnavailableError(
        "no RDMA device: ibv_get_device_list found 0 devices (no RDMA NIC, no rdma-core "
        "provider for it, or the ib_uverbs kernel module is not loaded; check `ibv_devinfo`, "
        "see docs/rdma.md)");
  }
  std::string all;
  for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
  if (!options.device.empty()) {
    if (std::find(names.begin(), names.end(), options.device) == names.end()) {
      return NotFoundError("MESHPOST_RDMA_DEVICE='" + options.device +
                           "' is not an RDMA device on this host; found: " + all);
    }
    return options.device;
  }
  if (!options.interface.empty()) {
    auto dev = api->DeviceForInterface(options.interface);
    if (dev.ok() && std::find(names.begin(), names.end(), *dev) != names.end()) return *dev;
    MP_LOG_WARN(kLog,
                "DMLC_INTERFACE={} does not map to an RDMA device ({}); using {} (set "
                "MESHPOST_RDMA_DEVICE to choose; found: {})",
                options.interface, dev.ok() ? *dev : dev.status().message(), names[0], all);
  }
  return names[0];
}

Result<LocalPort> SelectPort(VerbsDevice* device, const RdmaOptions& options) {
  MESHPOST_ASSIGN_OR_RETURN(DeviceAttr attr, device->QueryDevice());
  if (options.port < 1 || options.port > attr.phys_port_cnt) {
    return InvalidArgumentError("MESHPOST_RDMA_PORT=" + std::to_string(options.port) + ": device " +
                                device->name() + " has ports 1.." +
                                std::to_string(attr.phys_port_cnt));
  }
  LocalPort lp;
  lp.device = device->name();
  lp.port = static_cast<uint8_t>(options.port);
  MESHPOST_ASSIGN_OR_RETURN(PortAttr pa, device->QueryPort(lp.port));
  if (!pa.active) {
    return UnavailableError("RDMA device " + lp.device + " port " + std::to_string(lp.port) +
                            " is " + pa.state +
                            ", not ACTIVE (check the cable/switch and "
                            "`ibv_devinfo -d " +
                            lp.device + "`)");
  }
  lp.lid = pa.lid;
  lp.link_layer = pa.link_layer;
  lp.mtu_bytes = pa.active_mtu_bytes == 0 ? 1024 : pa.active_mtu_bytes;
  if (options.gid_index >= 0) {
    if (options.gid_index >= pa.gid_tbl_len) {
      return InvalidArgumentError("MESHPOST_RDMA_GID_INDEX=" + std::to_string(options.gid_index) +
                                  ": " + lp.device + " port " + std::to_string(lp.port) + " has " +
                                  std::to_string(pa.gid_tbl_len) + " GIDs");
    }
    MESHPOST_ASSIGN_OR_RETURN(GidEntry e, device->QueryGid(lp.port, options.gid_index));
    if (GidIsZero(e.gid)) {
      return InvalidArgumentError("MESHPOST_RDMA_GID_INDEX=" + std::to_string(options.gid_index) +
                                  " is an empty GID entry on " + lp.device + " (see show_gids)");
    }
    lp.gid_index = options.gid_index;
    lp.gid = e.gid;
    return lp;
  }
  // Auto: InfiniBand addresses by LID and GID 0 is always valid. RoCE has no LID; prefer
  // a RoCE v2 GID derived from an IPv4 address (routable, what switches are configured
  // for), on DMLC_INTERFACE when given.
  int best = -1;
  int best_score = -1;
  Gid best_gid{};
  const int n = std::min(pa.gid_tbl_len, 256);
  for (int i = 0; i < n; ++i) {
    auto e = device->QueryGid(lp.port, i);
    if (!e.ok() || GidIsZero(e->gid)) continue;
    int score = 1;
    if (pa.link_layer == LinkLayer::kEthernet) {
      if (e->type == GidType::kRoceV2) score += 4;
      if (IsIpv4MappedGid(e->gid)) score += 2;
      if (!options.interface.empty() && e->netdev == options.interface) score += 8;
    } else if (i == 0) {
      score += 16;
    }
    if (score > best_score) {
      best = i;
      best_score = score;
      best_gid = e->gid;
    }
  }
  if (best < 0) {
    return NotFoundError("no usable GID on " + lp.device + " port " + std::to_string(lp.port) +
                         " (all " + std::to_string(n) +
                         " entries empty); is an IP address "
                         "configured on the RoCE interface? set MESHPOST_RDMA_GID_INDEX");
  }
  lp.gid_index = best;
  lp.gid = best_gid;
  return lp;
}

struct RdmaTransport::Conn {
  int peer = -1;
  uint64_t gen = 0;
  PeerState state = PeerState::kConnecting;
  uint32_t psn = 0;
  bool have_remote = false;
  ConnInfo remote;
  uint32_t max_inline = 0;
  uint32_t slots = 0;  // our header ring
  uint32_t slot_bytes = 0;
  std::shared_ptr<char> recv_ring;
  std::shared_ptr<VerbsMr> recv_ring_mr;
  std::shared_ptr<char> send_ring;  // staging for headers too large to inline
  std::shared_ptr<VerbsMr> send_ring_mr;
  uint32_t next_remote_slot = 0;
  uint32_t credits = 0;
  uint32_t expected_slot = 0;
  uint32_t unreturned = 0;
  // Delivered messages whose van-buffer payload Run has not copied out yet: no credit goes
  // back while any is held (credits return in order, and a credit frees the buffers of
  // every header before it for the sender to write again).
  uint32_t held = 0;
  bool credits_urgent = false;    // the sender may be waiting on them: return unbatched
  uint64_t headers_posted = 0;    // headers we wrote to the peer
  uint64_t headers_credited = 0;  // of those, how many slots the peer handed back
  uint32_t sq_used = 0;
  std::map<int64_t, RemoteBuffer> remote_buffers;  // where we may write on the peer
  std::map<int64_t, LocalBuffer> local_buffers;    // where the peer may write into us
  std::deque<LocalBuffer> retired;  // replaced buffers earlier writes may still target
  // The pull slots of each request still to be answered, by (request id, key): with
  // several requests of one worker in flight, a response goes to the slot of the request
  // it answers, not to the slot of the latest request with that key.
  std::map<std::pair<uint64_t, int64_t>, RemoteBuffer> request_slots;
  std::deque<std::pair<uint64_t, int64_t>> request_slot_order;  // bounds request_slots
  std::deque<Pending> pending;
  std::set<int64_t> awaiting;  // keys with a NeedBuffer outstanding
  std::set<uint64_t> handles;  // posted, not yet completed
  Status dead_reason;
  std::unique_ptr<VerbsQp> qp;  // last: destroyed before the rings it targets
};

Result<std::unique_ptr<RdmaTransport>> RdmaTransport::Create(std::unique_ptr<VerbsApi> api,
                                                             const RdmaOptions& options,
                                                             RdmaControlSend control_send) {
  if (options.header_slots == 0 || options.header_slots > kMaxHeaderSlots) {
    return InvalidArgumentError(
        "MESHPOST_RDMA_HEADER_SLOTS=" + std::to_string(options.header_slots) + ": expected 1.." +
        std::to_string(kMaxHeaderSlots));
  }
  if (options.header_slot_bytes < kMinSlotBytes || options.header_slot_bytes > kMaxSlotBytes) {
    return InvalidArgumentError(
        "MESHPOST_RDMA_HEADER_BYTES=" + std::to_string(options.header_slot_bytes) + ": expected " +
        std::to_string(kMinSlotBytes) + ".." + std::to_string(kMaxSlotBytes));
  }
  if (options.send_queue_depth < 4) {
    return InvalidArgumentError("RdmaOptions::send_queue_depth=" +
                                std::to_string(options.send_queue_depth) + ": expected >= 4");
  }
  MESHPOST_ASSIGN_OR_RETURN(std::string name, SelectDevice(api.get(), options));
  MESHPOST_ASSIGN_OR_RETURN(std::unique_ptr<VerbsDevice> device, api->OpenDevice(name));
  MESHPOST_ASSIGN_OR_RETURN(LocalPort local, SelectPort(device.get(), options));
  auto t = std::unique_ptr<RdmaTransport>(new RdmaTransport(
      std::move(api), std::move(device), options, local, std::move(control_send)));
  MESHPOST_ASSIGN_OR_RETURN(DeviceAttr attr, t->device_->QueryDevice());
  const int depth = std::max(256, std::min(attr.max_cqe > 0 ? attr.max_cqe : 65536, 65536));
  MESHPOST_ASSIGN_OR_RETURN(t->cq_, t->device_->CreateCq(depth));
  MP_LOG_INFO(kLog, "rdma: device {} port {} ({}), GID index {} {}, LID {}, MTU {}", local.device,
              local.port, LinkLayerName(local.link_layer), local.gid_index, GidToString(local.gid),
              local.lid, local.mtu_bytes);
  return t;
}

RdmaTransport::RdmaTransport(std::unique_ptr<VerbsApi> api, std::unique_ptr<VerbsDevice> device,
                             const RdmaOptions& options, LocalPort local,
                             RdmaControlSend control_send)
    : api_(std::move(api)),
      device_(std::move(device)),
      options_(options),
      local_(std::move(local)),
      control_send_(std::move(control_send)),
      mr_cache_(device_.get(), options.mr_cache_entries),
      copier_(options.gpu_backend != nullptr ? options.gpu_backend : CudaBackend()),
      waiter_(options.wait) {
  // RdmaOptionsFromEnv validated the name; an unknown one (set in code) means auto.
  auto gpu = ParseGpuRegistration("MESHPOST_RDMA_GPU", options.gpu);
  mr_cache_.EnableGpu(options.gpu_backend, gpu.ok() ? *gpu : GpuRegistration::kAuto);
}

RdmaTransport::~RdmaTransport() {
  Shutdown();
  // Members: QPs (in conns_) are gone; MRs in the cache go before the device (declared
  // after it), the CQ before the device too.
  std::lock_guard<std::mutex> lock(mu_);
  registered_.clear();
  inflight_.clear();
  mr_cache_.Invalidate(nullptr, UINT64_MAX);
}

void RdmaTransport::SetReceiver(VanReceiver* receiver) {
  std::lock_guard<std::mutex> lock(mu_);
  receiver_ = receiver;
}

void RdmaTransport::SetPeerFailureCallback(RdmaPeerFailure cb) {
  std::lock_guard<std::mutex> lock(mu_);
  on_failure_ = std::move(cb);
}

RdmaTransport::Conn* RdmaTransport::FindConn(int peer) const {
  auto it = conns_.find(peer);
  return it == conns_.end() ? nullptr : it->second.get();
}

uint64_t RdmaTransport::NewWrId(const WrInfo& info) {
  const uint64_t id = next_wr_id_++;
  wrs_.emplace(id, info);
  return id;
}

Result<RdmaTransport::Conn*> RdmaTransport::CreateConnLocked(int peer, Actions* acts) {
  auto c = std::make_unique<Conn>();
  c->peer = peer;
  c->gen = next_gen_++;
  c->slots = options_.header_slots;
  c->slot_bytes = options_.header_slot_bytes;
  QpCaps caps;
  caps.max_send_wr = options_.send_queue_depth;
  caps.max_recv_wr = c->slots + kExtraRecvs;
  caps.max_inline_data = options_.max_inline;
  MESHPOST_ASSIGN_OR_RETURN(c->qp, device_->CreateQp(cq_.get(), caps));
  c->max_inline = std::min(c->qp->max_inline_data(), options_.max_inline);
  MESHPOST_RETURN_IF_ERROR(c->qp->ToInit(local_.port));
  const size_t ring_bytes = size_t{c->slots} * c->slot_bytes;
  c->recv_ring = AllocAligned(ring_bytes);
  c->send_ring = AllocAligned(ring_bytes);
  if (!c->recv_ring || !c->send_ring) {
    return ResourceExhaustedError("cannot allocate " + std::to_string(ring_bytes) +
                                  "-byte RDMA header rings for " + Node(peer));
  }
  MESHPOST_ASSIGN_OR_RETURN(auto rmr,
                            device_->RegisterMemory(c->recv_ring.get(), ring_bytes,
                                                    kAccessLocalWrite | kAccessRemoteWrite));
  c->recv_ring_mr = std::move(rmr);
  MESHPOST_ASSIGN_OR_RETURN(auto smr, device_->RegisterMemory(c->send_ring.get(), ring_bytes, 0));
  c->send_ring_mr = std::move(smr);
  std::random_device rd;
  c->psn = rd() & 0xFFFFFF;
  Conn* raw = c.get();
  conns_[peer] = std::move(c);
  for (uint32_t i = 0; i < raw->slots + kExtraRecvs; ++i) {
    Status s = PostRecvLocked(raw);
    if (!s.ok()) {
      conns_.erase(peer);
      return s.Annotate("posting receives for " + Node(peer));
    }
  }
  auto reg = registered_.find(peer);
  if (reg != registered_.end()) raw->local_buffers = reg->second;
  ConnInfo me;
  me.qpn = raw->qp->qp_num();
  me.psn = raw->psn;
  me.lid = local_.lid;
  me.gid = local_.gid;
  me.mtu_bytes = local_.mtu_bytes;
  me.link_layer = local_.link_layer;
  me.ring_addr = reinterpret_cast<uint64_t>(raw->recv_ring.get());
  me.ring_rkey = raw->recv_ring_mr->info().rkey;
  me.slot_bytes = raw->slot_bytes;
  me.slots = raw->slots;
  acts->blobs.emplace_back(peer, EncodeHello(me));
  MP_LOG_DEBUG(kLog, "rdma: QP {} for {} created (max inline {})", me.qpn, Node(peer),
               raw->max_inline);
  return raw;
}

Status RdmaTransport::PostRecvLocked(Conn* c) {
  WrInfo info;
  info.peer = c->peer;
  info.conn_gen = c->gen;
  info.kind = WrKind::kRecv;
  const uint64_t id = NewWrId(info);
  Status s = c->qp->PostRecv(id);
  if (!s.ok()) wrs_.erase(id);
  return s;
}

Status RdmaTransport::BringUpLocked(Conn* c, const ConnInfo& remote, Actions* acts) {
  c->remote = remote;
  c->have_remote = true;
  QpPeer p;
  p.qpn = remote.qpn;
  p.psn = remote.psn;
  p.lid = remote.lid;
  p.gid = remote.gid;
  p.use_grh = local_.link_layer == LinkLayer::kEthernet || remote.lid == 0;
  p.mtu_bytes = std::min(local_.mtu_bytes, remote.mtu_bytes);
  p.port = local_.port;
  p.sgid_index = local_.gid_index;
  MESHPOST_RETURN_IF_ERROR(c->qp->ToRtr(p));
  MESHPOST_RETURN_IF_ERROR(c->qp->ToRts(c->psn));
  c->credits = remote.slots;
  c->state = PeerState::kReady;
  MP_LOG_DEBUG(kLog, "rdma: connected to {} (remote QP {}, MTU {}, {} header slots)", Node(c->peer),
               remote.qpn, p.mtu_bytes, remote.slots);
  std::vector<int64_t> keys;
  for (const auto& [key, lb] : c->local_buffers) {
    if (!lb.pull_slot) keys.push_back(key);
  }
  AdvertiseLocked(c, keys, acts);
  PumpLocked(c, acts);
  acts->notify = true;
  return OkStatus();
}

void RdmaTransport::AdvertiseLocked(Conn* c, const std::vector<int64_t>& keys, Actions* acts) {
  std::vector<RemoteBuffer> out;
  for (int64_t key : keys) {
    auto it = c->local_buffers.find(key);
    if (it == c->local_buffers.end() || it->second.pull_slot) continue;
    RemoteBuffer rb{key, it->second.addr, it->second.mr->info().rkey, it->second.len};
    rb.reuse_after_credit = it->second.pool != nullptr;
    out.push_back(rb);
  }
  for (size_t i = 0; i < out.size(); i += kMaxAdvertised) {
    const size_t end = std::min(out.size(), i + kMaxAdvertised);
    acts->blobs.emplace_back(
        c->peer, EncodeAdvertise(std::vector<RemoteBuffer>(out.begin() + i, out.begin() + end)));
  }
}

void RdmaTransport::CompleteLocked(uint64_t handle, const Status& s, Actions* acts) {
  auto inf = inflight_.find(handle);
  if (inf != inflight_.end()) {
    // Unsignaled writes of this message never complete on their own; forget their ids.
    for (uint64_t id : inf->second.wr_ids) wrs_.erase(id);
    inflight_.erase(inf);
  }
  auto it = handles_.find(handle);
  if (it == handles_.end() || it->second.done) return;
  if (it->second.detached) {
    handles_.erase(it);
  } else {
    it->second.done = true;
    it->second.status = s;
  }
  acts->notify = true;
}

void RdmaTransport::KillLocked(Conn* c, const Status& why, Actions* acts) {
  if (c->state == PeerState::kDead) return;
  c->state = PeerState::kDead;
  c->dead_reason = why;
  if (why.code() != StatusCode::kCancelled) {
    MP_LOG_ERROR(kLog, "rdma: connection to {} is dead: {}", Node(c->peer), why.ToString());
  }
  for (uint64_t h : c->handles) CompleteLocked(h, why, acts);
  c->handles.clear();
  for (auto& p : c->pending) CompleteLocked(p.handle, why, acts);
  c->pending.clear();
  for (auto it = wrs_.begin(); it != wrs_.end();) {
    if (it->second.peer == c->peer && it->second.conn_gen == c->gen) {
      it = wrs_.erase(it);
    } else {
      ++it;
    }
  }
  // Destroying the QP stops the NIC from touching our memory before owners are released.
  c->qp.reset();
  if (why.code() != StatusCode::kCancelled) acts->failures.emplace_back(c->peer, why);
  acts->notify = true;
}

Status RdmaTransport::Connect(int peer) {
  Actions acts;
  Status result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return CancelledError("RdmaVan::Connect: van stopped");
    Conn* c = FindConn(peer);
    if (c != nullptr && c->state != PeerState::kDead) return OkStatus();
    if (c != nullptr) conns_.erase(peer);
    auto created = CreateConnLocked(peer, &acts);
    if (!created.ok()) result = created.status().Annotate("RdmaVan::Connect(" + Node(peer) + ")");
  }
  Run(&acts);
  return result;
}

void RdmaTransport::Disconnect(int peer) {
  Actions acts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Conn* c = FindConn(peer);
    if (c == nullptr) return;
    KillLocked(c, CancelledError("disconnected from " + Node(peer)), &acts);
    conns_.erase(peer);
  }
  Run(&acts);
}

Status RdmaTransport::Drain(int64_t timeout_ms) {
  size_t left = 0;
  auto idle = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    left = inflight_.size();
    for (const auto& [peer, c] : conns_) {
      if (c->state != PeerState::kDead) left += c->pending.size();
    }
    return left == 0;
  };
  if (!waiter_.WaitUntil(idle, DeadlineFromTimeoutMs(timeout_ms))) {
    return DeadlineExceededError("RdmaVan: " + std::to_string(left) +
                                 " message(s) still queued or in flight after " +
                                 std::to_string(timeout_ms) + " ms");
  }
  return OkStatus();
}

void RdmaTransport::Shutdown() {
  Actions acts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (auto& [peer, c] : conns_) KillLocked(c.get(), CancelledError("RDMA van stopped"), &acts);
    conns_.clear();
  }
  Run(&acts);
}

Status RdmaTransport::OnControlBlob(int peer, const void* data, size_t size) {
  auto blob = DecodeBlob(data, size);
  if (!blob.ok()) {
    Status s = blob.status().Annotate("rendezvous blob from " + Node(peer));
    MP_LOG_ERROR(kLog, "rdma: dropped {}", s.ToString());
    return s;
  }
  Actions acts;
  Status result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return CancelledError("RDMA van stopped");
    Conn* c = FindConn(peer);
    switch (blob->type) {
      case BlobType::kHello: {
        const ConnInfo& h = blob->hello;
        if (c != nullptr && c->have_remote && c->remote.qpn == h.qpn && c->remote.psn == h.psn &&
            c->state == PeerState::kReady) {
          break;  // duplicate
        }
        if (c != nullptr && (c->have_remote || c->state == PeerState::kDead)) {
          // The peer restarted (or we had given up): start over on a fresh QP.
          KillLocked(c, UnavailableError(Node(peer) + " re-connected with a new queue pair"),
                     &acts);
          conns_.erase(peer);
          c = nullptr;
        }
        if (c == nullptr) {
          auto created = CreateConnLocked(peer, &acts);
          if (!created.ok()) {
            result = created.status().Annotate("answering hello from " + Node(peer));
            break;
          }
          c = *created;
        }
        Status s = BringUpLocked(c, h, &acts);
        if (!s.ok()) {
          result = s.Annotate("bringing up the queue pair to " + Node(peer));
          KillLocked(c, result, &acts);
        }
        break;
      }
      case BlobType::kAdvertise: {
        if (c == nullptr || c->state == PeerState::kDead) {
          result = FailedPreconditionError("buffer advertisement from " + Node(peer) +
                                           " without a live connection");
          break;
        }
        for (const auto& b : blob->buffers) {
          RemoteBuffer& rb = c->remote_buffers[b.key];
          // The same van buffer again: still busy until the credit of its last write.
          const uint64_t busy_until = rb.addr == b.addr ? rb.busy_until : 0;
          rb = b;
          rb.busy_until = busy_until;
          c->awaiting.erase(b.key);
        }
        PumpLocked(c, &acts);
        break;
      }
      case BlobType::kNeedBuffer: {
        if (c == nullptr || c->state == PeerState::kDead) {
          result = FailedPreconditionError("buffer request from " + Node(peer) +
                                           " without a live connection");
          break;
        }
        const int64_t key = blob->key;
        if (key == kHeaderBodyKey && blob->nbytes > kMaxIndirectFrameBytes) {
          acts.blobs.emplace_back(peer,
                                  EncodeRefuse(key, "header of " + std::to_string(blob->nbytes) +
                                                        " bytes exceeds the limit"));
          break;
        }
        auto it = c->local_buffers.find(key);
        if (it != c->local_buffers.end() && it->second.len >= blob->nbytes) {
          AdvertiseLocked(c, {key}, &acts);
          break;
        }
        if (it != c->local_buffers.end() && (it->second.pull_slot || !it->second.pool)) {
          // The destination is the caller's (a pull slot or register_recv_buffer memory):
          // growing it is not ours to do.
          acts.blobs.emplace_back(
              peer, EncodeRefuse(key, "destination for key " + std::to_string(key) + " holds " +
                                          std::to_string(it->second.len) + " bytes; " +
                                          std::to_string(blob->nbytes) + " were sent"));
          break;
        }
        LocalBuffer lb;
        auto mem = AllocAligned(blob->nbytes);
        if (!mem) {
          acts.blobs.emplace_back(peer, EncodeRefuse(key, "out of memory"));
          break;
        }
        auto mr = device_->RegisterMemory(mem.get(), blob->nbytes,
                                          kAccessLocalWrite | kAccessRemoteWrite);
        if (!mr.ok()) {
          acts.blobs.emplace_back(peer, EncodeRefuse(key, mr.status().message()));
          break;
        }
        lb.addr = reinterpret_cast<uint64_t>(mem.get());
        lb.len = blob->nbytes;
        lb.mr = std::move(mr).value();
        lb.pool = mem;
        if (it != c->local_buffers.end()) {
          c->retired.push_back(std::move(it->second));
          if (c->retired.size() > kMaxRetiredBuffers) c->retired.pop_front();
        }
        c->local_buffers[key] = std::move(lb);
        AdvertiseLocked(c, {key}, &acts);
        break;
      }
      case BlobType::kRefuse: {
        if (c == nullptr) break;
        c->awaiting.erase(blob->key);
        const Status why = FailedPreconditionError(Node(peer) + " refused a destination for key " +
                                                   std::to_string(blob->key) + ": " + blob->reason);
        for (auto it = c->pending.begin(); it != c->pending.end();) {
          bool uses = false;
          for (const auto& d : it->msg.meta.data) uses |= d.key == blob->key;
          if (uses) {
            CompleteLocked(it->handle, why, &acts);
            it = c->pending.erase(it);
          } else {
            ++it;
          }
        }
        PumpLocked(c, &acts);
        break;
      }
    }
  }
  Run(&acts);
  return result;
}

Status RdmaTransport::RegisterRecvBuffer(int peer, int64_t key, void* addr, size_t size,
                                         bool cuda_device, int device) {
  if (addr == nullptr || size == 0) {
    return InvalidArgumentError(
        "RdmaVan::RegisterRecvBuffer: addr=" + std::to_string(reinterpret_cast<uintptr_t>(addr)) +
        " size=" + std::to_string(size) + "; expected a non-null, non-empty buffer");
  }
  if (key == kHeaderBodyKey) {
    return InvalidArgumentError("RdmaVan::RegisterRecvBuffer: key " + std::to_string(key) +
                                " is reserved by the RDMA van for large headers");
  }
  Actions acts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cuda_device) device_dests_[reinterpret_cast<uintptr_t>(addr)] = {size, device};
    auto mr = mr_cache_.Get(addr, size, kAccessLocalWrite | kAccessRemoteWrite, {}, cuda_device);
    if (!mr.ok()) return mr.status().Annotate("RdmaVan::RegisterRecvBuffer");
    LocalBuffer lb;
    lb.addr = reinterpret_cast<uint64_t>(addr);
    lb.len = size;
    lb.mr = std::move(mr).value();
    registered_[peer][key] = lb;
    Conn* c = FindConn(peer);
    if (c != nullptr && c->state != PeerState::kDead) {
      auto it = c->local_buffers.find(key);
      if (it != c->local_buffers.end()) {
        c->retired.push_back(std::move(it->second));
        if (c->retired.size() > kMaxRetiredBuffers) c->retired.pop_front();
      }
      c->local_buffers[key] = lb;
      if (c->state == PeerState::kReady) AdvertiseLocked(c, {key}, &acts);
    }
  }
  Run(&acts);
  return OkStatus();
}

int RdmaTransport::DeviceDestination(const void* p, size_t n) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = device_dests_.upper_bound(a);
  if (it == device_dests_.begin()) return -1;
  --it;
  const uint64_t off = a - it->first;
  return off <= it->second.first && n <= it->second.first - off ? it->second.second : -1;
}

Status RdmaTransport::RegisterMemory(const void* addr, size_t size,
                                     const std::weak_ptr<const void>& owner, bool cuda_device) {
  std::lock_guard<std::mutex> lock(mu_);
  auto mr = mr_cache_.Get(addr, size, kAccessLocalWrite | kAccessRemoteWrite, owner, cuda_device);
  if (!mr.ok()) return mr.status().Annotate("RdmaVan::RegisterMemory");
  return OkStatus();
}

void RdmaTransport::InvalidateMemory(const void* addr, size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  mr_cache_.Invalidate(addr, size);
}

Result<uint64_t> RdmaTransport::Send(OutMessage&& msg, bool detached) {
  const Meta& meta = msg.meta;
  const int peer = meta.recipient;
  MESHPOST_RETURN_IF_ERROR(ValidateSend("RdmaVan::Send", msg));
  for (const auto& d : meta.data) {
    if (d.key == kHeaderBodyKey) {
      return InvalidArgumentError("RdmaVan::Send: key " + std::to_string(d.key) +
                                  " is reserved by the RDMA van for large headers");
    }
  }
  for (const auto& s : meta.slots) {
    if (s.key == kHeaderBodyKey) {
      return InvalidArgumentError("RdmaVan::Send: pull slot key " + std::to_string(s.key) +
                                  " is reserved by the RDMA van for large headers");
    }
    if (s.nbytes > 0 && s.addr == 0) {
      return InvalidArgumentError("RdmaVan::Send: pull slot for key " + std::to_string(s.key) +
                                  " has no address");
    }
  }
  // The header must fit the peer's slot; its size does not depend on the addresses filled
  // in at post time.
  const size_t frame_bytes =
      EncodeHeaderFrame(EncodeMeta(meta), std::vector<uint32_t>(meta.slots.size())).size();
  Actions acts;
  uint64_t handle = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Conn* c = FindConn(peer);
    if (c == nullptr || shut_down_) {
      return UnavailableError("RdmaVan::Send: no RDMA connection to " + Node(peer) +
                              " (Connect first)");
    }
    if (c->state == PeerState::kDead) {
      return UnavailableError("RdmaVan::Send: connection to " + Node(peer) +
                              " is dead: " + c->dead_reason.message());
    }
    if (frame_bytes > kMaxIndirectFrameBytes) {
      return InvalidArgumentError("RdmaVan::Send: encoded header of " +
                                  std::to_string(frame_bytes) + " bytes exceeds the " +
                                  std::to_string(kMaxIndirectFrameBytes) + "-byte limit");
    }
    if (c->pending.size() >= options_.max_pending) {
      return ResourceExhaustedError("RdmaVan::Send: " + std::to_string(c->pending.size()) +
                                    " sends already queued for " + Node(peer));
    }
    handle = next_handle_++;
    handles_[handle].detached = detached;
    c->pending.push_back(Pending{handle, std::move(msg), frame_bytes});
    PumpLocked(c, &acts);
  }
  Run(&acts);
  return handle;
}

void RdmaTransport::PumpLocked(Conn* c, Actions* acts) {
  if (c->state != PeerState::kReady) return;
  ReturnCreditsLocked(c, false, acts);
  while (!c->pending.empty() && c->state == PeerState::kReady) {
    PostResult r = TryPostLocked(c, &c->pending.front(), acts);
    if (r == PostResult::kBlocked) break;
    if (c->state == PeerState::kDead) break;  // KillLocked already cleared pending
    c->pending.pop_front();
  }
}

RdmaTransport::PostResult RdmaTransport::TryPostLocked(Conn* c, Pending* p, Actions* acts) {
  Meta& meta = p->msg.meta;
  auto& segs = p->msg.segments;
  if (meta.cmd == Command::kResponse) {
    // Answer into the pull slots of the request this responds to (see request_slots).
    for (size_t i = 0; i < segs.size(); ++i) {
      auto slot = c->request_slots.find({meta.id, meta.data[i].key});
      if (slot != c->request_slots.end()) c->remote_buffers[meta.data[i].key] = slot->second;
    }
  }
  // 1. Every payload needs a destination the peer advertised that is large enough;
  //    otherwise ask for one (re-rendezvous) and wait, never overrun.
  //    A van buffer (reuse_after_credit) written by an earlier message is reused only once
  //    the peer credited that message's header back: it copies the bytes out first.
  auto destination = [&](int64_t key, uint64_t bytes) -> bool {
    auto rb = c->remote_buffers.find(key);
    if (rb == c->remote_buffers.end() || rb->second.capacity < bytes) {
      if (c->awaiting.insert(key).second) {
        if (rb != c->remote_buffers.end()) {
          MP_LOG_DEBUG(kLog, "rdma: key {} to {} needs {} bytes, buffer holds {}; re-rendezvous",
                       key, Node(c->peer), bytes, rb->second.capacity);
        }
        acts->blobs.emplace_back(c->peer, EncodeNeedBuffer(key, bytes));
      }
      return false;
    }
    return !(rb->second.reuse_after_credit && rb->second.busy_until > c->headers_credited);
  };
  const bool indirect = p->frame_bytes > c->remote.slot_bytes;
  uint32_t writes = indirect ? 1 : 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].size == 0) continue;
    if (!destination(meta.data[i].key, segs[i].size)) return PostResult::kBlocked;
    writes += static_cast<uint32_t>((segs[i].size + kMaxWriteBytes - 1) / kMaxWriteBytes);
  }
  if (indirect && !destination(kHeaderBodyKey, p->frame_bytes)) return PostResult::kBlocked;
  // 2. Flow control: a free header slot on the peer, room in our send queue.
  if (c->credits == 0) return PostResult::kBlocked;
  if (c->sq_used + writes + 1 > options_.send_queue_depth) {
    if (writes + 1 > options_.send_queue_depth) {
      CompleteLocked(
          p->handle,
          InvalidArgumentError("RdmaVan::Send: message needs " + std::to_string(writes + 1) +
                               " work requests; the send queue holds " +
                               std::to_string(options_.send_queue_depth)),
          acts);
      return PostResult::kFailed;
    }
    return PostResult::kBlocked;
  }
  // 3. Register pull slots (the peer writes its response there) and payload sources.
  Inflight inf;
  inf.peer = c->peer;
  std::vector<uint32_t> rkeys;
  for (const auto& slot : meta.slots) {
    if (slot.nbytes == 0) {
      rkeys.push_back(0);
      continue;
    }
    auto mr = mr_cache_.Get(reinterpret_cast<void*>(slot.addr), slot.nbytes,
                            kAccessLocalWrite | kAccessRemoteWrite);
    if (!mr.ok()) {
      CompleteLocked(
          p->handle,
          mr.status().Annotate("registering pull slot for key " + std::to_string(slot.key)), acts);
      return PostResult::kFailed;
    }
    LocalBuffer lb;
    lb.addr = slot.addr;
    lb.len = slot.nbytes;
    lb.mr = *mr;
    lb.pull_slot = true;
    rkeys.push_back((*mr)->info().rkey);
    auto replaced = c->local_buffers.find(slot.key);
    if (replaced != c->local_buffers.end() && replaced->second.pull_slot &&
        (replaced->second.addr != lb.addr || replaced->second.len != lb.len)) {
      // An earlier request with this pull key may still be answered into its own slot.
      c->retired.push_back(std::move(replaced->second));
      if (c->retired.size() > kMaxRetiredBuffers) c->retired.pop_front();
    }
    c->local_buffers[slot.key] = std::move(lb);
  }
  std::vector<uint32_t> lkeys(segs.size(), 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].size == 0 || ShouldInline(segs[i].size, c->max_inline)) continue;
    auto mr = mr_cache_.Get(segs[i].data, segs[i].size, 0, segs[i].owner);
    if (!mr.ok()) {
      CompleteLocked(p->handle, mr.status().Annotate("registering payload " + std::to_string(i)),
                     acts);
      return PostResult::kFailed;
    }
    lkeys[i] = (*mr)->info().lkey;
    inf.mrs.push_back(std::move(mr).value());
  }
  // 4. The header names where each payload landed.
  for (size_t i = 0; i < segs.size(); ++i) {
    meta.data[i].addr = segs[i].size == 0 ? 0 : c->remote_buffers[meta.data[i].key].addr;
  }
  std::string frame = EncodeHeaderFrame(EncodeMeta(meta), rkeys);
  // A header over the peer's slot goes out of line: written (registered, from a copy that
  // lives until completion) into the peer's kHeaderBodyKey buffer; the slot names it.
  std::shared_ptr<char> body_copy;
  std::shared_ptr<VerbsMr> body_mr;
  if (frame.size() > c->remote.slot_bytes) {
    if (frame.size() > c->remote_buffers[kHeaderBodyKey].capacity) {
      CompleteLocked(p->handle,
                     InternalError("RdmaVan::Send: header of " + std::to_string(frame.size()) +
                                   " bytes grew after its buffer was chosen"),
                     acts);
      return PostResult::kFailed;
    }
    body_copy = AllocAligned(frame.size());
    if (!body_copy) {
      CompleteLocked(p->handle,
                     ResourceExhaustedError("RdmaVan::Send: cannot allocate " +
                                            std::to_string(frame.size()) + " bytes for a header"),
                     acts);
      return PostResult::kFailed;
    }
    std::memcpy(body_copy.get(), frame.data(), frame.size());
    auto mr = device_->RegisterMemory(body_copy.get(), frame.size(), 0);
    if (!mr.ok()) {
      CompleteLocked(p->handle, mr.status().Annotate("registering a large header"), acts);
      return PostResult::kFailed;
    }
    body_mr = std::move(mr).value();
    inf.mrs.push_back(body_mr);
  }
  // 5. Post: payload writes unsignaled, then the signaled header write whose completion
  //    (in order on an RC QP) retires them all.
  const uint64_t handle = p->handle;
  c->handles.insert(handle);
  auto post = [&](WriteRequest wr, WrKind kind, uint32_t covers) -> bool {
    WrInfo info{c->peer, c->gen, kind, handle, covers};
    wr.wr_id = NewWrId(info);
    inf.wr_ids.push_back(wr.wr_id);
    Status s = c->qp->PostWrite(wr);
    if (s.ok()) return true;
    wrs_.erase(wr.wr_id);
    inflight_[handle] = std::move(inf);
    KillLocked(c, s.Annotate("posting an RDMA write to " + Node(c->peer)), acts);
    return false;
  };
  uint32_t posted = 0;
  const uint64_t header_seq = c->headers_posted + 1;
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].size == 0) continue;
    auto& rb = c->remote_buffers[meta.data[i].key];
    if (rb.reuse_after_credit) rb.busy_until = header_seq;
    for (uint64_t off = 0; off < segs[i].size; off += kMaxWriteBytes) {
      const uint64_t len = std::min<uint64_t>(kMaxWriteBytes, segs[i].size - off);
      WriteRequest wr;
      wr.local_addr = static_cast<const char*>(segs[i].data) + off;
      wr.length = static_cast<uint32_t>(len);
      wr.inline_data = ShouldInline(len, c->max_inline) && lkeys[i] == 0;
      wr.lkey = lkeys[i];
      wr.remote_addr = rb.addr + off;
      wr.rkey = rb.rkey;
      if (!post(wr, WrKind::kData, 1)) return PostResult::kFailed;
      ++posted;
    }
  }
  if (body_copy) {
    auto& rb = c->remote_buffers[kHeaderBodyKey];
    if (rb.reuse_after_credit) rb.busy_until = header_seq;
    WriteRequest wr;
    wr.local_addr = body_copy.get();
    wr.length = static_cast<uint32_t>(frame.size());
    wr.lkey = body_mr->info().lkey;
    wr.remote_addr = rb.addr;
    wr.rkey = rb.rkey;
    const std::string indirect_frame = EncodeIndirectHeader(rb.addr, frame.size());
    inf.segments.push_back(SendSegment{body_copy.get(), frame.size(), body_copy});
    if (!post(wr, WrKind::kData, 1)) return PostResult::kFailed;
    ++posted;
    frame = indirect_frame;
  }
  const uint32_t slot = c->next_remote_slot;
  WriteRequest hdr;
  hdr.with_imm = true;
  hdr.imm = MakeImm(ImmKind::kHeader, slot);
  hdr.signaled = true;
  hdr.length = static_cast<uint32_t>(frame.size());
  hdr.remote_addr = c->remote.ring_addr + uint64_t{slot} * c->remote.slot_bytes;
  hdr.rkey = c->remote.ring_rkey;
  if (ShouldInline(frame.size(), c->max_inline)) {
    hdr.inline_data = true;  // copied by the post call itself
    hdr.local_addr = frame.data();
  } else {
    // The staging slot with the same index is free: the peer returned its credit, so the
    // previous header written from it has completed.
    char* staging = c->send_ring.get() + size_t{slot % c->slots} * c->slot_bytes;
    std::memcpy(staging, frame.data(), frame.size());
    hdr.local_addr = staging;
    hdr.lkey = c->send_ring_mr->info().lkey;
  }
  for (auto& seg : segs) inf.segments.push_back(std::move(seg));
  if (!post(hdr, WrKind::kHeader, posted + 1)) return PostResult::kFailed;
  c->headers_posted = header_seq;
  c->next_remote_slot = (slot + 1) % c->remote.slots;
  --c->credits;
  c->sq_used += posted + 1;
  inflight_[handle] = std::move(inf);
  return PostResult::kPosted;
}

void RdmaTransport::ReturnCreditsLocked(Conn* c, bool force, Actions* acts) {
  if (force) c->credits_urgent = true;
  if (c->state != PeerState::kReady || c->unreturned == 0) return;
  if (c->held > 0) return;  // Release() returns them once the van buffers are copied out
  const uint32_t batch = std::max<uint32_t>(1, c->slots / 4);
  if (!c->credits_urgent && c->unreturned < batch) return;
  if (c->sq_used + 1 > options_.send_queue_depth) return;  // retried after a completion
  WriteRequest wr;
  wr.with_imm = true;
  wr.imm = MakeImm(ImmKind::kCredit, c->unreturned);
  wr.signaled = true;
  wr.length = 0;  // a zero-length write carries only the immediate
  wr.remote_addr = c->remote.ring_addr;
  wr.rkey = c->remote.ring_rkey;
  WrInfo info{c->peer, c->gen, WrKind::kCredit, 0, 1};
  wr.wr_id = NewWrId(info);
  Status s = c->qp->PostWrite(wr);
  if (!s.ok()) {
    wrs_.erase(wr.wr_id);
    KillLocked(c, s.Annotate("returning credits to " + Node(c->peer)), acts);
    return;
  }
  c->sq_used += 1;
  c->unreturned = 0;
  c->credits_urgent = false;
}

int RdmaTransport::Progress() {
  std::vector<Completion> wcs;
  Actions acts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return 0;
    auto n = cq_->Poll(64, &wcs);
    if (!n.ok()) {
      MP_LOG_ERROR(kLog, "rdma: polling the completion queue failed: {}", n.status().ToString());
      return 0;
    }
    for (const Completion& wc : wcs) HandleCompletionLocked(wc, &acts);
  }
  Run(&acts);
  return static_cast<int>(wcs.size());
}

Status RdmaTransport::BlockForCompletions(int timeout_ms) {
  MESHPOST_RETURN_IF_ERROR(cq_->RequestNotify());
  if (Progress() > 0) return OkStatus();
  auto woke = cq_->WaitNotify(timeout_ms);
  return woke.ok() ? OkStatus() : woke.status();
}

void RdmaTransport::HandleCompletionLocked(const Completion& wc, Actions* acts) {
  auto it = wrs_.find(wc.wr_id);
  if (it == wrs_.end()) return;  // from a connection already torn down
  const WrInfo info = it->second;
  wrs_.erase(it);
  Conn* c = FindConn(info.peer);
  if (c == nullptr || c->gen != info.conn_gen || c->state == PeerState::kDead) return;
  if (wc.status != kWcSuccess) {
    const Status why =
        UnavailableError(std::string(WrKindWhat(static_cast<int>(info.kind))) +
                         (info.kind == WrKind::kRecv ? " from " : " to ") + Node(c->peer) +
                         " failed: " + WcStatusString(wc.status) + " (wc status " +
                         std::to_string(wc.status) + ", vendor error 0x" +
                         [&] {
                           char b[16];
                           std::snprintf(b, sizeof(b), "%x", wc.vendor_err);
                           return std::string(b);
                         }() +
                         "); connection marked dead");
    if (info.handle != 0) CompleteLocked(info.handle, why, acts);
    KillLocked(c, why, acts);
    return;
  }
  switch (info.kind) {
    case WrKind::kHeader:
      c->sq_used -= std::min(c->sq_used, info.covers);
      c->handles.erase(info.handle);
      CompleteLocked(info.handle, OkStatus(), acts);
      PumpLocked(c, acts);
      break;
    case WrKind::kCredit:
      c->sq_used -= std::min(c->sq_used, info.covers);
      PumpLocked(c, acts);
      break;
    case WrKind::kData: break;  // unsignaled; only reported on error
    case WrKind::kRecv: {
      if (Status s = PostRecvLocked(c); !s.ok()) {
        KillLocked(c, s.Annotate("re-posting a receive for " + Node(c->peer)), acts);
        return;
      }
      if (!wc.has_imm || wc.opcode != WcOpcode::kRecvWithImm) {
        KillLocked(c, DataLossError(Node(c->peer) + " sent a message without an immediate"), acts);
        return;
      }
      if (ImmKindOf(wc.imm) == ImmKind::kCredit) {
        const uint64_t credits = uint64_t{c->credits} + ImmValue(wc.imm);
        if (credits > c->remote.slots) {
          KillLocked(c,
                     DataLossError(Node(c->peer) + " returned more header credits (" +
                                   std::to_string(credits) + ") than its " +
                                   std::to_string(c->remote.slots) + " slots"),
                     acts);
          return;
        }
        c->credits = static_cast<uint32_t>(credits);
        c->headers_credited += ImmValue(wc.imm);
        PumpLocked(c, acts);
      } else if (ImmKindOf(wc.imm) == ImmKind::kHeader) {
        HandleHeaderLocked(c, ImmValue(wc.imm), acts);
      } else {
        KillLocked(
            c, DataLossError(Node(c->peer) + " sent unknown immediate " + std::to_string(wc.imm)),
            acts);
      }
      break;
    }
  }
}

void RdmaTransport::HandleHeaderLocked(Conn* c, uint32_t slot, Actions* acts) {
  if (slot != c->expected_slot) {
    // RC delivers in order, so this is a broken or hostile peer; the ring is out of step.
    KillLocked(c,
               DataLossError(Node(c->peer) + " wrote header slot " + std::to_string(slot) +
                             "; expected " + std::to_string(c->expected_slot)),
               acts);
    return;
  }
  c->expected_slot = (slot + 1) % c->slots;
  const char* bytes = c->recv_ring.get() + size_t{slot} * c->slot_bytes;
  // Is [addr, addr + n) inside a buffer we advertised to this peer for key?
  auto find_buffer = [&](int64_t key, uint64_t addr, uint64_t n) -> const LocalBuffer* {
    auto inside = [&](const LocalBuffer& b) {
      return addr >= b.addr && addr - b.addr <= b.len && n <= b.len - (addr - b.addr);
    };
    auto it = c->local_buffers.find(key);
    if (it != c->local_buffers.end() && inside(it->second)) return &it->second;
    for (auto r = c->retired.rbegin(); r != c->retired.rend(); ++r) {
      if (inside(*r)) return &*r;
    }
    return nullptr;
  };
  // A van buffer was read: the sender waits for this credit before writing it again.
  bool used_van_buffer = false;
  Result<HeaderFrame> frame = DataLossError("rdma header frame: not decoded");
  if (IsIndirectHeader(bytes, c->slot_bytes)) {
    auto ind = DecodeIndirectHeader(bytes, c->slot_bytes);
    const LocalBuffer* body = nullptr;
    if (ind.ok()) body = find_buffer(kHeaderBodyKey, ind->addr, ind->len);
    if (!ind.ok()) {
      frame = ind.status();
    } else if (body == nullptr || !body->pool) {
      frame = DataLossError("rdma indirect header: " + std::to_string(ind->len) + " bytes at " +
                            std::to_string(ind->addr) +
                            " outside the header buffer advertised to " + Node(c->peer));
    } else {
      frame = DecodeHeaderFrame(reinterpret_cast<const void*>(ind->addr), ind->len);
      used_van_buffer = true;
    }
  } else {
    frame = DecodeHeaderFrame(bytes, c->slot_bytes);
  }
  // The slot's (and an out-of-line header's) bytes are copied out or rejected: hand the
  // slot back, unless payloads in van buffers still wait for Run to copy them (below).
  ++c->unreturned;
  if (!frame.ok()) {
    ReturnCreditsLocked(c, true, acts);
    MP_LOG_ERROR(kLog, "rdma: dropped malformed header from {}: {}", Node(c->peer),
                 frame.status().ToString());
    return;
  }
  Meta& meta = frame->meta;
  if (meta.sender != c->peer) {
    ReturnCreditsLocked(c, true, acts);
    acts->dropped.emplace_back(
        meta, DataLossError("header on the queue pair of " + Node(c->peer) + " claims sender " +
                            std::to_string(meta.sender)));
    return;
  }
  for (size_t i = 0; i < meta.slots.size(); ++i) {
    const auto& s = meta.slots[i];
    if (s.nbytes == 0 || s.addr == 0) continue;
    const RemoteBuffer slot{s.key, s.addr, frame->slot_rkeys[i], s.nbytes};
    c->remote_buffers[s.key] = slot;
    if (meta.cmd == Command::kRequest) {
      const auto id = std::make_pair(meta.id, s.key);
      if (c->request_slots.emplace(id, slot).second) c->request_slot_order.push_back(id);
      while (c->request_slot_order.size() > kMaxRequestSlots) {
        c->request_slots.erase(c->request_slot_order.front());
        c->request_slot_order.pop_front();
      }
    }
  }
  InMessage in;
  in.meta = meta;
  in.peer = c->peer;  // the queue pair it arrived on, whatever the header claims
  for (size_t i = 0; i < meta.data.size(); ++i) {
    const TensorDesc& d = meta.data[i];
    RecvSegment seg;
    seg.size = d.nbytes;
    if (d.nbytes > 0) {
      const LocalBuffer* lb = find_buffer(d.key, d.addr, d.nbytes);
      if (lb == nullptr) {
        ReturnCreditsLocked(c, true, acts);
        acts->dropped.emplace_back(
            meta,
            DataLossError("data segment " + std::to_string(i) + " (key " + std::to_string(d.key) +
                          ", " + std::to_string(d.nbytes) + " bytes at " + std::to_string(d.addr) +
                          ") lies outside every buffer advertised to " + Node(c->peer)));
        return;
      }
      seg.data = reinterpret_cast<void*>(d.addr);
      seg.owner = lb->pool;  // non-null: a van buffer, copied out by Run
    }
    in.segments.push_back(std::move(seg));
  }
  bool holds = false;
  for (const auto& seg : in.segments) holds |= seg.owner != nullptr;
  if (holds) {
    ++c->held;
    acts->releases.emplace_back(c->peer, c->gen);
  } else {
    ReturnCreditsLocked(c, used_van_buffer, acts);
  }
  acts->messages.push_back(std::move(in));
}

void RdmaTransport::Run(Actions* acts) {
  for (auto& [peer, blob] : acts->blobs) {
    Status s = control_send_ ? control_send_(peer, std::move(blob))
                             : FailedPreconditionError("no control channel");
    if (!s.ok()) {
      MP_LOG_ERROR(kLog, "rdma: cannot send rendezvous blob to {}: {}", Node(peer), s.ToString());
    }
  }
  VanReceiver* receiver;
  RdmaPeerFailure on_failure;
  {
    std::lock_guard<std::mutex> lock(mu_);
    receiver = receiver_;
    on_failure = on_failure_;
  }
  std::unique_lock<std::mutex> copy_lock;
  for (auto& in : acts->messages) {
    if (receiver == nullptr) {
      MP_LOG_ERROR(kLog, "rdma: no receiver; dropped {} from {}", CommandName(in.meta.cmd),
                   Node(in.meta.sender));
      continue;
    }
    // The payload is already where the peer wrote it (a registered buffer or a pool
    // buffer); the receiver may still want it elsewhere, which costs one copy (by the
    // device when that is a CUDA receive buffer).
    Status refused;
    bool device_copies = false;
    for (size_t i = 0; i < in.segments.size() && refused.ok(); ++i) {
      RecvSegment& seg = in.segments[i];
      if (seg.size == 0) continue;
      auto dest = SegmentDestination(receiver, in.meta, i, seg.size);
      const int dest_device = dest.ok() && *dest != nullptr && *dest != seg.data
                                  ? DeviceDestination(*dest, seg.size)
                                  : -1;
      if (!dest.ok()) {
        refused = dest.status();
      } else if (dest_device >= 0) {
        if (!device_copies) copy_lock = std::unique_lock<std::mutex>(copy_mu_);
        device_copies = true;
        refused = copier_.Copy(*dest, seg.data, seg.size, dest_device);
        seg.data = *dest;  // the van buffer is released with the message below
      } else if (*dest != nullptr) {
        seg = LandSegment(*dest, seg.data, seg.size, nullptr);
      } else if (seg.owner != nullptr) {
        // A van buffer the sender writes again once this message's credit is back: the
        // message gets its own copy (register_recv_buffer memory avoids it).
        std::shared_ptr<char> copy(static_cast<char*>(std::malloc(seg.size)),
                                   [](char* q) { std::free(q); });
        if (!copy) {
          refused = ResourceExhaustedError("cannot allocate " + std::to_string(seg.size) +
                                           " bytes for segment " + std::to_string(i));
        } else {
          std::memcpy(copy.get(), seg.data, seg.size);
          seg.data = copy.get();
          seg.owner = std::move(copy);
        }
      }
    }
    if (device_copies) {
      Status copied = copier_.Finish();
      copy_lock.unlock();
      if (refused.ok()) refused = copied;
      for (RecvSegment& seg : in.segments) {
        if (seg.owner != nullptr && DeviceDestination(seg.data, seg.size) >= 0) seg.owner = nullptr;
      }
    }
    Deliver(receiver, "rdma van", std::move(in), refused, refused_log_);
  }
  if (!acts->releases.empty()) {
    // Every van buffer these messages used is copied out (or dropped): credit them back.
    Actions more;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [peer, gen] : acts->releases) {
        Conn* c = FindConn(peer);
        if (c == nullptr || c->gen != gen || c->held == 0) continue;
        --c->held;
        if (c->held == 0) ReturnCreditsLocked(c, true, &more);
      }
    }
    acts->releases.clear();
    for (auto& f : more.failures) acts->failures.push_back(std::move(f));
    acts->notify |= more.notify;
  }
  for (auto& [meta, why] : acts->dropped) {
    MP_LOG_ERROR_LIMITED(refused_log_, kLog, "rdma: dropped {} from {}: {}", CommandName(meta.cmd),
                         Node(meta.sender), why.ToString());
    if (receiver != nullptr) receiver->OnDropped(meta, why);
  }
  for (auto& [peer, why] : acts->failures) {
    if (on_failure) on_failure(peer, why);
  }
  if (acts->notify || !acts->failures.empty()) waiter_.Notify();
}

Status RdmaTransport::Wait(uint64_t handle, int64_t timeout_ms) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = handles_.find(handle);
    if (it == handles_.end() || it->second.detached) {
      return NotFoundError("RdmaVan::WaitSend: unknown handle " + std::to_string(handle));
    }
  }
  auto done = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = handles_.find(handle);
    return it == handles_.end() || it->second.done;
  };
  if (!waiter_.WaitUntil(done, DeadlineFromTimeoutMs(timeout_ms))) {
    return DeadlineExceededError("RdmaVan::WaitSend: handle " + std::to_string(handle) +
                                 " not complete after " + std::to_string(timeout_ms) + " ms");
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = handles_.find(handle);
  if (it == handles_.end()) return NotFoundError("handle " + std::to_string(handle) + " taken");
  Status s = it->second.status;
  handles_.erase(it);
  return s;
}

bool RdmaTransport::IsDone(uint64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = handles_.find(handle);
  return it != handles_.end() && it->second.done;
}

PeerState RdmaTransport::state(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  Conn* c = FindConn(peer);
  return c == nullptr ? PeerState::kNone : c->state;
}

Status RdmaTransport::dead_reason(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  Conn* c = FindConn(peer);
  return c == nullptr ? OkStatus() : c->dead_reason;
}

uint32_t RdmaTransport::max_inline(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  Conn* c = FindConn(peer);
  return c == nullptr ? 0 : c->max_inline;
}

MrCacheStats RdmaTransport::mr_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mr_cache_.stats();
}

size_t RdmaTransport::pending_sends(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  Conn* c = FindConn(peer);
  return c == nullptr ? 0 : c->pending.size();
}

}  // namespace rdma
}  // namespace meshpost
