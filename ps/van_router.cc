#include "ps/van_router.h"

#include <algorithm>

#include "common/logging.h"
#include "common/net.h"
#include "ps/control.h"
#include "ps/transport_policy.h"
#include "van/registry.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";

VanOptions VanOptionsFor(const Options& o) {
  VanOptions v;
  v.wait.spin_ns = o.EffectiveSpinUs() * 1000;
  v.wait.busy_poll = o.busy_poll;
  v.cma_disable = o.cma_disable;
  v.cma_ring_bytes = static_cast<size_t>(o.cma_ring);
  v.cma_gpu_ipc = o.cma_gpu != "staging";
  // "auto" picks the advertised address (ps/), not a device: the rdma van then chooses.
  v.interface = o.interface == "auto" ? std::string() : o.interface;
  v.cluster_token = o.cluster_token;
  v.auth_payload = o.auth_payload;
  v.max_message_bytes = static_cast<uint64_t>(o.max_message_bytes);
  // MESHPOST_RDMA_* come with the options (keyword arguments included), not the process
  // environment; the lookup owns its copy so it outlives any Options object.
  v.env = [vars = o.rdma_env](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
  v.pinner = std::make_shared<CorePinner>(o.bind_cpu_core, o.cpu_start_offset);
  v.device_backend = o.device_backend;
  return v;
}

}  // namespace

VanRouter::VanRouter(const Options& options, int my_id, int num_nodes, VanFactory factory)
    : opts_(options),
      my_id_(my_id),
      num_nodes_(num_nodes),
      factory_(factory ? std::move(factory) : VanFactory(&CreateVan)),
      van_options_(VanOptionsFor(options)),
      route_(new std::atomic<Van*>[num_nodes]),
      route_name_(num_nodes, "tcp"),
      host_identity_(HostIdentity()) {
  van_options_.self_id = my_id;  // bound into every connection's handshake
  for (int i = 0; i < num_nodes; ++i) route_[i].store(nullptr, std::memory_order_relaxed);
}

VanRouter::~VanRouter() { Stop(); }

Result<int> VanRouter::BindControl(const std::string& ip, int port) {
  MESHPOST_ASSIGN_OR_RETURN(control_, factory_("tcp", van_options_));
  return control_->Bind(ip, port);
}

void VanRouter::DisconnectControl(int id) {
  if (control_) control_->Disconnect(id);
}

Status VanRouter::StartControl(VanReceiver* receiver) { return control_->Start(receiver); }

Result<std::vector<std::pair<std::string, std::string>>> VanRouter::StartDataVans(
    const std::string& host, VanReceiver* receiver) {
  const std::string forced = opts_.ForcedTransport();
  const std::vector<std::string> compiled = CompiledTransports();
  std::vector<std::string> wanted;
  for (const std::string& name : CandidateTransports(opts_, compiled)) {
    if (name != "tcp") wanted.push_back(name);
  }
  if (forced.empty() && opts_.enable_rdma &&
      std::find(compiled.begin(), compiled.end(), "rdma") == compiled.end()) {
    rdma_unavailable_ = UnimplementedError(
        "transport 'rdma' is not built into this meshpost (configure with "
        "-DMESHPOST_WITH_RDMA=ON and libibverbs-dev installed)");
  }
  std::vector<std::pair<std::string, std::string>> offered;
  for (const std::string& name : wanted) {
    auto van = factory_(name, van_options_);
    Status st = van.status();
    if (van.ok()) {
      auto bound = (*van)->Bind(host, 0);
      st = bound.ok() ? (*van)->Start(receiver) : bound.status();
    }
    if (!st.ok()) {
      if (!forced.empty()) {
        return st.Annotate("Start: transport '" + forced +
                           "' was forced (MESHPOST_TRANSPORT) but cannot run here");
      }
      // Debug: in automatic mode a missing device is the normal case on most machines.
      // Whether a pair needed it is judged per peer (CheckPairTransport).
      if (name == "rdma") rdma_unavailable_ = st;
      MP_LOG_DEBUG(kLog, "transport {} not used: {}", name, st.message());
      continue;
    }
    offered.emplace_back(name, (*van)->endpoint());
    if ((*van)->RegistersMemory()) registering_.push_back(van->get());
    data_vans_.emplace_back(name, std::move(van).value());
  }
  std::vector<EarlyBuffer> early;
  {
    std::lock_guard<std::mutex> lock(mu_);
    data_vans_started_ = true;
    early.swap(early_buffers_);
  }
  for (const EarlyBuffer& b : early) RegisterRecvBufferWith(registering_, b);
  return offered;
}

Status VanRouter::ConnectControl(int id, const std::string& host, int port) {
  return control_->Connect({id, host, port});
}

Van* VanRouter::DataVan(const std::string& name) const {
  for (const auto& [n, van] : data_vans_) {
    if (n == name) return van.get();
  }
  return nullptr;
}

Status VanRouter::ConnectPeer(const NodeInfo& n) {
  MESHPOST_RETURN_IF_ERROR(
      control_->Connect({n.id, n.host, n.port}).Annotate("connecting to " + n.Describe()));
  if (n.id <= 0 || n.id >= num_nodes_) {
    return InvalidArgumentError("ConnectPeer: node id " + std::to_string(n.id) +
                                " outside this cluster of " + std::to_string(num_nodes_));
  }
  const std::string forced = opts_.ForcedTransport();
  std::string why_not;
  for (const auto& [name, van] : data_vans_) {
    const std::string* endpoint = nullptr;
    for (const auto& [peer_name, peer_endpoint] : n.vans) {
      if (peer_name == name) endpoint = &peer_endpoint;
    }
    if (endpoint == nullptr) {
      why_not += name + ": the peer does not offer it; ";
      continue;
    }
    PeerAddress addr{n.id, n.host, n.port, *endpoint, n.pid, n.host_identity};
    Status c = van->CanReach(addr);
    if (c.ok()) c = van->Connect(addr);
    if (!c.ok()) {
      why_not += name + ": " + c.message() + "; ";
      continue;
    }
    route_[n.id].store(van.get(), std::memory_order_release);
    if (opts_.caller_progress && van->SupportsProgress()) {
      progress_van_.store(van.get(), std::memory_order_release);
    }
    std::lock_guard<std::mutex> lock(route_mu_);
    route_name_[n.id] = name;
    break;
  }
  const std::string route_name = [&] {
    std::lock_guard<std::mutex> lock(route_mu_);
    return route_name_[n.id];
  }();
  if (!forced.empty() && forced != route_name) {
    return InvalidArgumentError("transport '" + forced + "' was forced but cannot reach " +
                                n.Describe() + ": " + why_not);
  }
  const bool same_host = n.host_identity == host_identity_;
  if (!same_host) remote_peers_.fetch_add(1, std::memory_order_relaxed);
  MESHPOST_RETURN_IF_ERROR(
      CheckPairTransport(opts_, n.Describe(), same_host, route_name, rdma_unavailable_));
  // One line per peer is debug; Start logs one summary at info.
  MP_LOG_DEBUG(kLog, "{} via {}", n.Describe(), route_name);
  return OkStatus();
}

Status VanRouter::ReconnectPeer(const NodeInfo& old, const NodeInfo& n) {
  if (n.id <= 0 || n.id >= num_nodes_) {
    return InvalidArgumentError("ReconnectPeer: node id " + std::to_string(n.id) +
                                " outside this cluster of " + std::to_string(num_nodes_));
  }
  // Senders fall back to tcp (whose connection is replaced too) while this runs; the peer
  // counts as down until the caller marks it alive again, so none should be sending.
  route_[n.id].store(nullptr, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(route_mu_);
    route_name_[n.id] = "tcp";
  }
  for (auto& [name, van] : data_vans_) van->Disconnect(n.id);
  control_->Disconnect(n.id);
  if (old.host_identity != host_identity_) remote_peers_.fetch_sub(1, std::memory_order_relaxed);
  MESHPOST_RETURN_IF_ERROR(ConnectPeer(n));
  std::vector<EarlyBuffer> again;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, b] : recv_buffers_) {
      if (key.first == n.id) again.push_back(b);
    }
  }
  for (const EarlyBuffer& b : again) RegisterRecvBufferWith(registering_, b);
  return OkStatus();
}

Status VanRouter::Send(OutMessage&& msg) {
  const int to = msg.meta.recipient;
  Van* routed = (to > 0 && to < num_nodes_) ? route_[to].load(std::memory_order_acquire) : nullptr;
  Van* van = routed != nullptr ? routed : control_.get();
  return van->Send(std::move(msg));
}

Status VanRouter::SendControl(OutMessage&& msg) { return control_->Send(std::move(msg)); }

Status VanRouter::SendRendezvous(const char* van, int peer_id, std::string blob) {
  return control_->Send(ControlMessage(Command::kVanRendezvous, my_id_, peer_id)
                            .Body(EncodeRendezvous(van, blob))
                            .Build());
}

void VanRouter::OnRendezvous(int sender, const std::string& body) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!peers_connected_) {
      early_rendezvous_.emplace_back(sender, body);
      return;
    }
  }
  DeliverRendezvous(sender, body);
}

void VanRouter::PeersConnected() {
  std::vector<std::pair<int, std::string>> early;
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers_connected_ = true;
    early.swap(early_rendezvous_);
  }
  for (const auto& [sender, body] : early) DeliverRendezvous(sender, body);
}

void VanRouter::DeliverRendezvous(int sender, const std::string& body) {
  auto blob = DecodeRendezvous(body);
  if (!blob.ok()) {
    MP_LOG_ERROR(kLog, "VAN_RENDEZVOUS from node {} dropped: {}", sender, blob.status().ToString());
    return;
  }
  Van* van = DataVan(blob->first);
  if (van == nullptr) {
    MP_LOG_ERROR(kLog, "VAN_RENDEZVOUS for '{}' from node {} dropped: no such van here",
                 blob->first, sender);
    return;
  }
  Status s = van->OnRendezvousBlob(sender, blob->second);
  if (!s.ok())
    MP_LOG_ERROR(kLog, "{} rendezvous from node {}: {}", blob->first, sender, s.ToString());
}

void VanRouter::RegisterRecvBuffer(int peer_id, int64_t key, void* addr, size_t size, int device) {
  const EarlyBuffer b{peer_id, key, addr, size, device};
  {
    std::lock_guard<std::mutex> lock(mu_);
    recv_buffers_[{peer_id, key}] = b;
    if (!data_vans_started_) {
      // Registered before Start: the vans do not exist yet. StartDataVans replays it, or
      // pushes would land in a pooled buffer and be copied.
      early_buffers_.push_back(b);
      return;
    }
  }
  RegisterRecvBufferWith(registering_, b);
}

void VanRouter::RegisterRecvBufferWith(const std::vector<Van*>& vans, const EarlyBuffer& b) {
  MemoryRegion region;
  region.addr = b.addr;
  region.size = b.size;
  if (b.device >= 0) {
    region.kind = MemoryKind::kCudaDevice;
    region.device = b.device;
  }
  for (Van* van : vans) {
    if (b.device >= 0 && !van->WritesDeviceDestinations()) continue;
    Status s = van->RegisterRecvBuffer(b.peer_id, b.key, region);
    if (!s.ok())
      MP_LOG_WARN(kLog, "{}: receive buffer not registered: {}", van->name(), s.ToString());
  }
}

void VanRouter::RegisterMemory(const void* addr, size_t size,
                               const std::shared_ptr<const void>& owner) {
  if (registering_.empty()) return;
  MemoryRegion region;
  region.addr = const_cast<void*>(addr);
  region.size = size;
  region.owner = owner;
  for (Van* van : registering_) {
    Status s = van->RegisterMemory(region);
    if (!s.ok()) MP_LOG_WARN(kLog, "{}: pull memory not registered: {}", van->name(), s.ToString());
  }
}

bool VanRouter::TakesMemory(int id, MemoryKind kind) const {
  if (kind == MemoryKind::kHost) return true;
  if (id <= 0 || id >= num_nodes_) return false;
  const Van* van = route_[id].load(std::memory_order_acquire);
  return van != nullptr && van->RegistersMemory() && van->SupportsMemory(kind);
}

bool VanRouter::Streams(int id) const {
  if (id <= 0 || id >= num_nodes_) return false;
  const Van* van = route_[id].load(std::memory_order_acquire);
  if (van == nullptr) van = control_.get();  // tcp data rides the control van (Send)
  return van != nullptr && van->SupportsStreaming();
}

bool VanRouter::WritesDevice(int id) const {
  if (id <= 0 || id >= num_nodes_) return false;
  const Van* van = route_[id].load(std::memory_order_acquire);
  return van != nullptr && van->WritesDeviceDestinations();
}

Status VanRouter::RegisterDeviceMemory(const void* addr, size_t size, int device,
                                       const std::shared_ptr<const void>& owner) {
  MemoryRegion region;
  region.addr = const_cast<void*>(addr);
  region.size = size;
  region.owner = owner;
  region.kind = MemoryKind::kCudaDevice;
  region.device = device;
  for (Van* van : registering_) {
    if (!van->SupportsMemory(MemoryKind::kCudaDevice)) continue;
    MESHPOST_RETURN_IF_ERROR(van->RegisterMemory(region).Annotate(van->name()));
  }
  return OkStatus();
}

std::string VanRouter::TransportTo(int id) const {
  if (id < 0 || id >= num_nodes_) return "tcp";
  Van* van = route_[id].load(std::memory_order_acquire);
  if (van != nullptr) return van->PeerTransport(id);
  std::lock_guard<std::mutex> lock(route_mu_);
  return route_name_[id];
}

void VanRouter::Stop() {
  for (auto& [name, van] : data_vans_) van->Stop();
  if (control_) control_->Stop();
}

bool VanRouter::Begin() {
  Van* van = progress_van_.load(std::memory_order_acquire);
  return van != nullptr && van->BeginProgress();
}

// Begin succeeded, so progress_van_ is set and never changes back.
bool VanRouter::Progress(uint64_t deadline_ns) {
  return progress_van_.load(std::memory_order_acquire)->Progress(deadline_ns);
}

void VanRouter::End() { progress_van_.load(std::memory_order_acquire)->EndProgress(); }

void VanRouter::Wake() {
  if (Van* van = progress_van_.load(std::memory_order_acquire)) van->WakeProgress();
}

}  // namespace meshpost
