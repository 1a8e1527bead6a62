// The Postoffice facade: owns the van router and this process's part of the cluster (the
// Scheduler, or a node's Membership), is the VanReceiver of every van (dispatching what
// arrives to them or to the worker/server), and the NodeContext of the worker/server.
#include "ps/postoffice.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>

#include "common/clock.h"
#include "common/logging.h"
#include "common/net.h"
#include "ps/membership.h"
#include "ps/node.h"
#include "ps/node_context.h"
#include "ps/scheduler.h"
#include "ps/start_report.h"
#include "ps/transport_policy.h"
#include "ps/van_router.h"

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";

bool IsLoopback(const std::string& host) {
  return host.rfind("127.", 0) == 0 || host == "localhost" || host == "::1";
}

int NodeIdOf(const Options& o) {
  switch (o.role) {
    case Role::kScheduler: return kSchedulerId;
    case Role::kServer: return ServerNodeId(o.Rank());
    case Role::kWorker: return WorkerNodeId(o.num_servers, o.Rank());
  }
  return kSchedulerId;
}

}  // namespace

class Postoffice::Impl : public NodeContext, public VanReceiver {
 public:
  Impl(const Options& options, VanFactory make_van)
      : opts_(options),
        layout_(options.num_servers, options.num_workers),
        my_id_(NodeIdOf(options)),
        router_(opts_, my_id_, layout_.num_nodes(), std::move(make_van)) {
    ConfigureLogging(std::string(RoleName(opts_.role)) +
                         (opts_.role == Role::kScheduler ? "" : ":" + std::to_string(opts_.Rank())),
                     opts_.EffectiveLogLevel());
    if (opts_.role == Role::kScheduler) {
      scheduler_ = std::make_unique<Scheduler>(opts_, layout_, &router_);
    } else {
      membership_ = std::make_unique<Membership>(
          opts_, layout_, my_id_, &router_,
          [this](int id, const Status& why) {
            if (DataHandler* h = data_.load(std::memory_order_acquire)) h->OnNodeDown(id, why);
          },
          [this](int id) {
            if (DataHandler* h = data_.load(std::memory_order_acquire)) h->OnNodeUp(id);
          });
    }
    if (opts_.role == Role::kWorker) worker_ = std::make_unique<AFTensorWorker>(this);
    if (opts_.role == Role::kServer) server_ = std::make_unique<AFTensorServer>(this);
  }

  ~Impl() override {
    if (started_ && !stopped_) {
      // Destruction without Stop(): leave quickly so peers are told instead of timing out.
      Status s = Stop(1000);
      (void)s;
    }
    StopThreads();
    router_.Stop();  // no van calls back into us after this
  }

  // --- NodeContext ---
  const Options& options() const override { return opts_; }
  int node_id() const override { return my_id_; }
  Status Send(OutMessage&& msg) override { return router_.Send(std::move(msg)); }
  Status PeerStatus(int id) const override {
    return scheduler_ ? scheduler_->NodeStatus(id) : membership_->PeerStatus(id);
  }
  void SetDataHandler(DataHandler* h) override { data_.store(h, std::memory_order_release); }
  void OnRecvBufferRegistered(int worker_rank, int64_t key, void* addr, size_t size,
                              int device) override {
    router_.RegisterRecvBuffer(WorkerNodeId(opts_.num_servers, worker_rank), key, addr, size,
                               device);
  }
  void OnPullMemory(const void* addr, size_t size,
                    const std::shared_ptr<const void>& owner) override {
    router_.RegisterMemory(addr, size, owner);
  }
  bool PeerTakesMemory(int id, MemoryKind kind) const override {
    return router_.TakesMemory(id, kind);
  }
  Status RegisterDeviceMemory(const void* addr, size_t size, int device,
                              const std::shared_ptr<const void>& owner) override {
    return router_.RegisterDeviceMemory(addr, size, device, owner);
  }
  bool PeerWritesDevice(int id) const override { return router_.WritesDevice(id); }
  bool PeerStreams(int id) const override { return router_.Streams(id); }
  std::string PeerTransport(int id) const override { return router_.TransportTo(id); }
  ProgressEngine* progress_engine() override { return &router_; }
  const ClockSync* clock_sync() const override {
    return membership_ ? membership_->clock_sync() : nullptr;
  }

  int port() const { return port_; }
  AFTensorWorker* worker() { return worker_.get(); }
  AFTensorServer* server() { return server_.get(); }

  std::map<std::string, std::string> Transports() const {
    std::map<std::string, std::string> out;
    for (const NodeInfo& n : scheduler_ ? scheduler_->Table() : membership_->Table()) {
      if (n.role == Role::kScheduler || n.role == opts_.role) continue;
      out[std::string(RoleName(n.role)) + " " + std::to_string(n.rank)] = router_.TransportTo(n.id);
    }
    return out;
  }

  Status Start() {
    if (started_) return FailedPreconditionError("Start: already started");
    MESHPOST_ASSIGN_OR_RETURN(std::string host, AdvertisedHost());
    const bool is_scheduler = opts_.role == Role::kScheduler;
    MESHPOST_ASSIGN_OR_RETURN(std::string bind_ip, CheckLaunch(host));
    const int want_port = is_scheduler ? opts_.root_port : opts_.port;
    auto bound = router_.BindControl(bind_ip, want_port);
    if (!bound.ok()) {
      return bound.status().Annotate(std::string("Start: cannot listen on port ") +
                                     std::to_string(want_port) +
                                     (is_scheduler ? " (DMLC_PS_ROOT_PORT)" : " (DMLC_PORT)"));
    }
    port_ = *bound;
    NodeInfo self;
    self.id = my_id_;
    self.role = opts_.role;
    self.rank = is_scheduler ? 0 : opts_.Rank();
    self.host = host;
    self.port = port_;
    self.pid = static_cast<int>(getpid());
    self.host_identity = HostIdentity();
    if (scheduler_) scheduler_->SetSelf(self);
    MESHPOST_RETURN_IF_ERROR(router_.StartControl(this));
    started_ = true;
    if (!is_scheduler) {
      MESHPOST_ASSIGN_OR_RETURN(self.vans, router_.StartDataVans(host, this));
    }
    MP_LOG_INFO(kLog, "{} listening on {}:{}", RoleName(opts_.role), host, port_);
    for (const std::string& w : opts_.warnings) MP_LOG_WARN(kLog, "{}", w);
    for (const std::string& note : opts_.ignored) MP_LOG_DEBUG(kLog, "{}", note);

    const uint64_t deadline = DeadlineFromTimeoutMs(opts_.start_timeout_ms);
    if (scheduler_) {
      MESHPOST_RETURN_IF_ERROR(ReportPort());
      MESHPOST_RETURN_IF_ERROR(scheduler_->AwaitNodes(deadline));
      scheduler_->StartLiveness();
    } else {
      MESHPOST_RETURN_IF_ERROR(membership_->Join(self, deadline));
      membership_->StartHeartbeats();
    }
    Status b = Barrier(kAllGroups, std::max<int64_t>(0, (deadline - GetNanosecond()) / 1000000));
    if (!b.ok()) return b.Annotate("Start: start barrier");
    if (scheduler_) {
      MP_LOG_INFO(kLog, "started: {} workers, {} servers", opts_.num_workers, opts_.num_servers);
    } else {
      if (opts_.spin_us < 0) ApplyAutoSpin(self);
      const std::map<std::string, std::string> transports = Transports();
      MP_LOG_INFO(kLog, "started: {} workers, {} servers; transports: {}", opts_.num_workers,
                  opts_.num_servers, TransportSummary(transports));
      if (opts_.enable_rdma && opts_.ForcedTransport().empty() && !router_.AnyRemotePeer()) {
        const std::string via =
            transports.empty() ? std::string("cma") : transports.begin()->second;
        MP_LOG_INFO(kLog, "{}", RdmaNotNeededNote(opts_, via));
      }
    }
    return OkStatus();
  }

  // MESHPOST_SPIN_US unset: how Wait / GetBatch spin, now that the node table says how
  // many workers and servers share this host (options.h, AutoSpinUs).
  void ApplyAutoSpin(const NodeInfo& self) {
    int local = 0;
    for (const NodeInfo& n : membership_->Table()) {
      if (n.role != Role::kScheduler && n.host_identity == self.host_identity) ++local;
    }
    WaitPolicy p = wait_policy();
    p.spin_ns = AutoSpinUs(local, router_.OffersProgress()) * 1000;
    if (DataHandler* h = data_.load(std::memory_order_acquire)) h->SetWaitPolicy(p);
    MP_LOG_DEBUG(kLog, "waits spin {} us ({} workers and servers on this host)", p.spin_ns / 1000,
                 local);
  }

  Status Stop(int64_t timeout_ms) {
    if (!started_ || stopped_) {
      stopped_ = true;
      return OkStatus();
    }
    stopped_ = true;
    Status result;
    if (scheduler_) {
      result = scheduler_->AwaitAllGone(timeout_ms);
    } else {
      membership_->Leave(timeout_ms);
    }
    StopThreads();
    router_.Stop();
    MP_LOG_INFO(kLog, "stopped");
    return result;
  }

  Status Barrier(int mask, int64_t timeout_ms) {
    if (mask <= 0 || mask > kAllGroups) {
      return InvalidArgumentError("Barrier: group_mask=" + std::to_string(mask) +
                                  "; expected a non-empty combination of scheduler(1), "
                                  "servers(2), workers(4)");
    }
    if (!(mask & GroupOf(opts_.role))) {
      return InvalidArgumentError("Barrier: group_mask=" + std::to_string(mask) + " (" +
                                  GroupNames(mask) + ") does not include this " +
                                  RoleName(opts_.role));
    }
    if (!started_ || stopped_) return FailedPreconditionError("Barrier: node is not running");
    return scheduler_ ? scheduler_->Barrier(mask, timeout_ms)
                      : membership_->Barrier(mask, timeout_ms);
  }

  // --- VanReceiver (called on the vans' threads) ---

  Result<void*> Destination(const Meta& meta, size_t index) override {
    if (meta.cmd != Command::kRequest && meta.cmd != Command::kResponse) {
      return DataLossError(std::string(CommandName(meta.cmd)) + " carries data frames");
    }
    DataHandler* h = data_.load(std::memory_order_acquire);
    if (h == nullptr) {
      return DataLossError(std::string(CommandName(meta.cmd)) + " sent to a " +
                           RoleName(opts_.role));
    }
    return h->Destination(meta, index);
  }

  void OnDropped(const Meta& meta, const Status& why) override {
    if (DataHandler* h = data_.load(std::memory_order_acquire)) h->OnDropped(meta, why);
  }

  void OnStreamProgress(const Meta& meta, size_t index, size_t bytes) override {
    if (meta.cmd != Command::kRequest && meta.cmd != Command::kResponse) return;
    if (DataHandler* h = data_.load(std::memory_order_acquire)) {
      h->OnStreamProgress(meta, index, bytes);
    }
  }

  void OnPeerFailure(int peer_id, const Status& why) override {
    // Cancelled: a connection this node closed itself (Disconnect when a rank is taken
    // over, Stop). Reported later from the van's thread, it must not mark the peer's new
    // holder down.
    if (why.code() == StatusCode::kCancelled) return;
    if (membership_) membership_->PeerGone(peer_id, why);
  }

  Status SendRendezvous(const char* van, int peer_id, std::string blob) override {
    return router_.SendRendezvous(van, peer_id, std::move(blob));
  }

  void OnMessage(InMessage&& msg) override {
    const Meta& m = msg.meta;
    if (m.cmd == Command::kRequest || m.cmd == Command::kResponse || m.cmd == Command::kCancel) {
      DataHandler* h = data_.load(std::memory_order_acquire);
      if (h == nullptr) {
        MP_LOG_ERROR(kLog, "{} from node {} dropped: this {} takes no data", CommandName(m.cmd),
                     m.sender, RoleName(opts_.role));
        return;
      }
      MP_LOG_TRACE(kLog, "{} id {} from node {}", CommandName(m.cmd), m.id, m.sender);
      h->OnData(std::move(msg));
      return;
    }
    MP_LOG_DEBUG(kLog, "{} from node {}", CommandName(m.cmd), m.sender);
    if (scheduler_) {
      scheduler_->OnControl(m);
      return;
    }
    switch (m.cmd) {
      case Command::kVanRendezvous:
        if (!layout_.Contains(m.sender) || m.sender == kSchedulerId ||
            !IsDataPeer(opts_.role, layout_.RoleOf(m.sender))) {
          MP_LOG_ERROR(kLog, "VAN_RENDEZVOUS from non-peer node {} dropped", m.sender);
          return;
        }
        router_.OnRendezvous(m.sender, m.body);
        return;
      case Command::kPeerLeave: membership_->OnPeerLeave(m); return;
      default: membership_->OnControl(m);
    }
  }

 private:
  Result<std::string> AdvertisedHost() const {
    if (!opts_.node_host.empty()) return opts_.node_host;
    // DMLC_INTERFACE=auto (StepMesh's launch scripts): the rules below, which are what
    // StepMesh picks without a GPU-to-NIC map: loopback for a loopback root, else the first
    // up non-loopback IPv4 interface.
    if (!opts_.interface.empty() && opts_.interface != "auto") {
      return InterfaceAddress(opts_.interface);
    }
    if (opts_.role == Role::kScheduler) return opts_.root_uri;
    if (IsLoopback(opts_.root_uri)) return std::string("127.0.0.1");
    return DefaultHostAddress();
  }

  // Everything about the launch that can be checked locally fails Start now, naming the
  // variable, instead of surfacing as a start timeout (issue 10). Returns the IPv4
  // address to listen on: the advertised one, so a cluster advertised on loopback is not
  // reachable from the network.
  Result<std::string> CheckLaunch(const std::string& host) const {
    const bool is_scheduler = opts_.role == Role::kScheduler;
    if (is_scheduler && opts_.port_fd >= 0) {
      MESHPOST_RETURN_IF_ERROR(
          CheckWritableFd(opts_.port_fd, "MESHPOST_PORT_FD").Annotate("Start"));
    }
    if (!is_scheduler) {
      MESHPOST_RETURN_IF_ERROR(
          ResolveIPv4(opts_.root_uri, "DMLC_PS_ROOT_URI").status().Annotate("Start"));
    }
    const std::string what = !opts_.node_host.empty()   ? "DMLC_NODE_HOST"
                             : !opts_.interface.empty() ? "DMLC_INTERFACE"
                             : is_scheduler ? "DMLC_PS_ROOT_URI (the scheduler listens on it)"
                                            : "the advertised address";
    MESHPOST_ASSIGN_OR_RETURN(std::string ip, ResolveIPv4(host, what));
    MESHPOST_RETURN_IF_ERROR(CheckBindable(ip, what).Annotate("Start"));
    if (opts_.cluster_token.empty() && !IsLoopbackHost(ip)) {
      MP_LOG_WARN(kLog,
                  "this cluster is unauthenticated and listens on {}, which is reachable from "
                  "the network: anyone who can connect can join or impersonate nodes. Set "
                  "MESHPOST_CLUSTER_TOKEN (docs/security.md)",
                  ip);
    }
    return ip;
  }

  // The port-pipe protocol (MESHPOST_PORT_FD): a launcher that let the OS pick the
  // scheduler's port reads it from this descriptor.
  Status ReportPort() {
    if (opts_.port_fd < 0) return OkStatus();
    const std::string line = std::to_string(port_) + "\n";
    ssize_t w = write(opts_.port_fd, line.data(), line.size());
    close(opts_.port_fd);
    if (w != static_cast<ssize_t>(line.size())) {
      return UnavailableError("Start: cannot write the port to MESHPOST_PORT_FD=" +
                              std::to_string(opts_.port_fd));
    }
    return OkStatus();
  }

  void StopThreads() {
    if (scheduler_) scheduler_->StopLiveness();
    if (membership_) membership_->StopHeartbeats();
  }

  const Options opts_;
  const ClusterLayout layout_;
  const int my_id_;
  int port_ = 0;
  // Declared before the parts that use it, so it is destroyed after them.
  VanRouter router_;
  std::unique_ptr<Scheduler> scheduler_;    // scheduler role
  std::unique_ptr<Membership> membership_;  // worker and server roles
  std::unique_ptr<AFTensorWorker> worker_;
  std::unique_ptr<AFTensorServer> server_;
  std::atomic<DataHandler*> data_{nullptr};
  std::atomic<bool> started_{false};
  std::atomic<bool> stopped_{false};
};

Result<std::unique_ptr<Postoffice>> Postoffice::Create(const Options& options,
                                                       VanFactory make_van) {
  MESHPOST_RETURN_IF_ERROR(options.Validate());
  return std::unique_ptr<Postoffice>(
      new Postoffice(std::make_unique<Impl>(options, std::move(make_van))));
}

Postoffice::Postoffice(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Postoffice::~Postoffice() = default;
Status Postoffice::Start() { return impl_->Start(); }
Status Postoffice::Stop(int64_t timeout_ms) { return impl_->Stop(timeout_ms); }
Status Postoffice::Barrier(int group_mask, int64_t timeout_ms) {
  return impl_->Barrier(group_mask, timeout_ms);
}
Role Postoffice::role() const { return impl_->options().role; }
int Postoffice::rank() const {
  return impl_->options().role == Role::kScheduler ? 0 : impl_->options().Rank();
}
int Postoffice::node_id() const { return impl_->node_id(); }
int Postoffice::port() const { return impl_->port(); }
const Options& Postoffice::options() const { return impl_->options(); }
AFTensorWorker* Postoffice::worker() { return impl_->worker(); }
AFTensorServer* Postoffice::server() { return impl_->server(); }
std::map<std::string, std::string> Postoffice::Transports() const { return impl_->Transports(); }

}  // namespace meshpost
