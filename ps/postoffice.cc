#include "ps/postoffice.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "common/clock.h"
#include "common/logging.h"
#include "common/net.h"
#include "ps/node.h"
#include "ps/node_context.h"
#include "van/registry.h"
#include "van/van.h"
#ifdef MESHPOST_HAVE_RDMA
#include "van/rdma/rdma_van.h"
#endif

namespace meshpost {
namespace {

constexpr const char* kLog = "ps";

// Data transports in priority order. The registry (meshpost_van) knows the vans it builds;
// the RDMA van is linked into ps/ because its rendezvous rides on the postoffice's tcp plane.
std::vector<std::string> DataTransports() {
  std::vector<std::string> names = CompiledTransports();
#ifdef MESHPOST_HAVE_RDMA
  if (std::find(names.begin(), names.end(), "rdma") == names.end()) {
    names.insert(names.end() - 1, "rdma");  // before tcp
  }
#endif
  return names;
}

bool IsLoopback(const std::string& host) {
  return host.rfind("127.", 0) == 0 || host == "localhost" || host == "::1";
}

int GroupOf(Role role) {
  switch (role) {
    case Role::kScheduler: return kSchedulerGroup;
    case Role::kServer: return kServerGroup;
    case Role::kWorker: return kWorkerGroup;
  }
  return 0;
}

std::string GroupNames(int mask) {
  std::string s;
  if (mask & kSchedulerGroup) s += "scheduler";
  if (mask & kServerGroup) s += std::string(s.empty() ? "" : "+") + "servers";
  if (mask & kWorkerGroup) s += std::string(s.empty() ? "" : "+") + "workers";
  return s;
}

}  // namespace

class Postoffice::Impl : public NodeContext, public VanReceiver {
 public:
  explicit Impl(const Options& options)
      : opts_(options),
        num_nodes_(1 + options.num_servers + options.num_workers),
        route_(num_nodes_, nullptr),
        route_name_(num_nodes_, "tcp"),
        down_(num_nodes_) {
    switch (opts_.role) {
      case Role::kScheduler: my_id_ = kSchedulerId; break;
      case Role::kServer: my_id_ = ServerNodeId(opts_.Rank()); break;
      case Role::kWorker: my_id_ = WorkerNodeId(opts_.num_servers, opts_.Rank()); break;
    }
    ConfigureLogging(std::string(RoleName(opts_.role)) +
                         (opts_.role == Role::kScheduler ? "" : ":" + std::to_string(opts_.Rank())),
                     opts_.verbose);
    van_options_.wait = wait_policy();
    van_options_.cma_disable = opts_.cma_disable;
    van_ = CreateZmqVan(van_options_);
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
    StopVans();
  }

  // --- NodeContext ---
  const Options& options() const override { return opts_; }
  int node_id() const override { return my_id_; }
  // Data to a peer goes over the transport chosen for that pair; everything else over tcp.
  Status Send(OutMessage&& msg) override {
    const int to = msg.meta.recipient;
    Van* van = (to > 0 && to < num_nodes_ && route_[to] != nullptr) ? route_[to] : van_.get();
    return van->Send(std::move(msg));
  }
  Status PeerStatus(int id) const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (id < 0 || id >= num_nodes_) return NotFoundError("no node " + std::to_string(id));
    auto leaving = leaving_.find(id);
    if (leaving != leaving_.end()) return UnavailableError(leaving->second.second);
    return down_[id];
  }
  void SetDataHandler(DataHandler* h) override { data_ = h; }

  void OnRecvBufferRegistered(int worker_rank, int64_t key, void* addr, size_t size) override {
#ifdef MESHPOST_HAVE_RDMA
    RdmaVan* rdma = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!data_vans_started_) {
        // Registered before Start: the rdma van does not exist yet; StartDataVans replays
        // it, or pushes would land in a pooled buffer and be copied.
        early_recv_buffers_[{worker_rank, key}] = {addr, size};
        return;
      }
      rdma = rdma_;
    }
    if (rdma != nullptr) RegisterRdmaRecvBuffer(rdma, worker_rank, key, addr, size);
#endif
  }

#ifdef MESHPOST_HAVE_RDMA
  void RegisterRdmaRecvBuffer(RdmaVan* rdma, int worker_rank, int64_t key, void* addr,
                              size_t size) {
    Status s =
        rdma->RegisterRecvBuffer(WorkerNodeId(opts_.num_servers, worker_rank), key, addr, size);
    if (!s.ok()) MP_LOG_WARN(kLog, "rdma: receive buffer not registered: {}", s.ToString());
  }
#endif

  void OnPullMemory(const void* addr, size_t size,
                    const std::shared_ptr<const void>& owner) override {
#ifdef MESHPOST_HAVE_RDMA
    if (rdma_ == nullptr) return;
    Status s = rdma_->RegisterMemory(addr, size, owner);
    if (!s.ok()) MP_LOG_WARN(kLog, "rdma: pull memory not registered: {}", s.ToString());
#endif
  }

  int port() const { return port_; }
  AFTensorWorker* worker() { return worker_.get(); }
  AFTensorServer* server() { return server_.get(); }

  std::map<std::string, std::string> Transports() const {
    std::map<std::string, std::string> out;
    std::lock_guard<std::mutex> lock(mu_);
    for (const NodeInfo& n : table_) {
      if (n.role == Role::kScheduler || n.role == opts_.role) continue;
      out[std::string(RoleName(n.role)) + " " + std::to_string(n.rank)] =
          route_[n.id] != nullptr ? route_[n.id]->PeerTransport(n.id) : route_name_[n.id];
    }
    return out;
  }

  Status Start() {
    if (started_) return FailedPreconditionError("Start: already started");
    MESHPOST_ASSIGN_OR_RETURN(std::string host, AdvertisedHost());
    const int want_port = opts_.role == Role::kScheduler ? opts_.root_port : opts_.port;
    auto bound = van_->Bind("*", want_port);
    if (!bound.ok()) {
      return bound.status().Annotate(std::string("Start: cannot listen on port ") +
                                     std::to_string(want_port) +
                                     (opts_.role == Role::kScheduler ? " (DMLC_PS_ROOT_PORT)"
                                                                     : " (DMLC_PORT)"));
    }
    port_ = *bound;
    self_.id = my_id_;
    self_.role = opts_.role;
    self_.rank = opts_.role == Role::kScheduler ? 0 : opts_.Rank();
    self_.host = host;
    self_.port = port_;
    self_.pid = static_cast<int>(getpid());
    self_.host_identity = HostIdentity();
    MESHPOST_RETURN_IF_ERROR(van_->Start(this));
    started_ = true;
    MESHPOST_RETURN_IF_ERROR(StartDataVans());
    MP_LOG_INFO(kLog, "{} listening on {}:{}", RoleName(opts_.role), host, port_);

    const uint64_t deadline = DeadlineFromTimeoutMs(opts_.start_timeout_ms);
    if (opts_.role == Role::kScheduler) {
      if (opts_.port_fd >= 0) {
        const std::string line = std::to_string(port_) + "\n";
        ssize_t w = write(opts_.port_fd, line.data(), line.size());
        close(opts_.port_fd);
        if (w != static_cast<ssize_t>(line.size())) {
          return UnavailableError("Start: cannot write the port to MESHPOST_PORT_FD=" +
                                  std::to_string(opts_.port_fd));
        }
      }
      std::unique_lock<std::mutex> lock(mu_);
      if (!WaitLocked(lock, [this] { return table_ready_; }, deadline)) {
        std::string missing;
        for (int id = 1; id < num_nodes_; ++id) {
          if (!registered_.count(id)) missing += (missing.empty() ? "" : ", ") + DescribeId(id);
        }
        return DeadlineExceededError("Start: scheduler waited " +
                                     std::to_string(opts_.start_timeout_ms) +
                                     " ms (MESHPOST_START_TIMEOUT_MS) for nodes; missing: " +
                                     missing);
      }
    } else {
      MESHPOST_RETURN_IF_ERROR(van_->Connect({kSchedulerId, opts_.root_uri, opts_.root_port}));
      OutMessage reg;
      reg.meta.cmd = Command::kRegister;
      reg.meta.sender = my_id_;
      reg.meta.recipient = kSchedulerId;
      reg.meta.body = EncodeNodes({self_});
      MESHPOST_RETURN_IF_ERROR(Send(std::move(reg)));
      std::unique_lock<std::mutex> lock(mu_);
      if (!WaitLocked(lock, [this] { return table_ready_ || !start_error_.ok(); }, deadline)) {
        return DeadlineExceededError(
            "Start: no node table from the scheduler at " + opts_.root_uri + ":" +
            std::to_string(opts_.root_port) + " after " + std::to_string(opts_.start_timeout_ms) +
            " ms; is the scheduler running and are all DMLC_NUM_WORKER=" +
            std::to_string(opts_.num_workers) + " workers and DMLC_NUM_SERVER=" +
            std::to_string(opts_.num_servers) + " servers started?");
      }
      if (!start_error_.ok()) return start_error_;
      last_ack_ns_ = GetNanosecond();
    }
    threads_running_ = true;
    heartbeat_thread_ = std::thread([this] { HeartbeatLoop(); });
    Status b = Barrier(kAllGroups, std::max<int64_t>(0, (deadline - GetNanosecond()) / 1000000));
    if (!b.ok()) return b.Annotate("Start: start barrier");
    MP_LOG_INFO(kLog, "started: {} workers, {} servers", opts_.num_workers, opts_.num_servers);
    return OkStatus();
  }

  Status Stop(int64_t timeout_ms) {
    if (!started_ || stopped_) {
      stopped_ = true;
      return OkStatus();
    }
    stopped_ = true;
    Status result;
    if (opts_.role == Role::kScheduler) {
      std::unique_lock<std::mutex> lock(mu_);
      if (!WaitLocked(lock, [this] { return AllNodesGoneLocked(); },
                      DeadlineFromTimeoutMs(timeout_ms))) {
        result = DeadlineExceededError("Stop: nodes still running after " +
                                       std::to_string(timeout_ms) + " ms");
      }
    } else if (!Registered()) {
      // Never admitted (refused, or no node table): our id may belong to the node that was
      // admitted in our place, so announcing a leave would tear that node down.
      MP_LOG_INFO(kLog, "stopping without leaving: this node never joined the cluster");
    } else {
      // Tell data peers first, on the connection our last responses/requests used: they
      // process everything we sent before learning we are gone.
      std::vector<int> peers;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (const NodeInfo& n : table_) {
          if (IsDataPeer(n.role) && down_[n.id].ok()) peers.push_back(n.id);
        }
      }
      for (int id : peers) {
        OutMessage bye;
        bye.meta.cmd = Command::kPeerLeave;
        bye.meta.sender = my_id_;
        bye.meta.recipient = id;
        bye.meta.body = self_.Describe() + " stopped";
        Status s = Send(std::move(bye));
        (void)s;
      }
      OutMessage leave;
      leave.meta.cmd = Command::kLeave;
      leave.meta.sender = my_id_;
      leave.meta.recipient = kSchedulerId;
      Status sent = Send(std::move(leave));
      if (sent.ok()) {
        const int64_t wait_ms = timeout_ms < 0 ? opts_.heartbeat_timeout_ms : timeout_ms;
        std::unique_lock<std::mutex> lock(mu_);
        if (!WaitLocked(lock, [this] { return leave_acked_ || !down_[kSchedulerId].ok(); },
                        DeadlineFromTimeoutMs(wait_ms))) {
          MP_LOG_WARN(kLog, "scheduler did not acknowledge leaving within {} ms", wait_ms);
        }
      }
    }
    StopThreads();
    StopVans();
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
    uint64_t seq;
    {
      std::lock_guard<std::mutex> lock(mu_);
      seq = ++barrier_seq_[mask];
    }
    if (opts_.role == Role::kScheduler) {
      std::lock_guard<std::mutex> lock(mu_);
      barrier_arrivals_[{mask, seq}].insert(my_id_);
      CheckBarriersLocked();
    } else {
      OutMessage msg;
      msg.meta.cmd = Command::kBarrier;
      msg.meta.sender = my_id_;
      msg.meta.recipient = kSchedulerId;
      msg.meta.arg = mask;
      msg.meta.id = seq;
      MESHPOST_RETURN_IF_ERROR(Send(std::move(msg)));
    }
    std::unique_lock<std::mutex> lock(mu_);
    const auto key = std::make_pair(mask, seq);
    const bool done = WaitLocked(
        lock, [&] { return barrier_done_.count(key) || !down_[kSchedulerId].ok(); },
        DeadlineFromTimeoutMs(timeout_ms));
    auto it = barrier_done_.find(key);
    if (it != barrier_done_.end()) {
      Status s = it->second;
      barrier_done_.erase(it);
      return s;
    }
    if (!done) {
      return DeadlineExceededError("Barrier(" + GroupNames(mask) + ", seq " + std::to_string(seq) +
                                   "): not released after " + std::to_string(timeout_ms) + " ms");
    }
    return down_[kSchedulerId].Annotate("Barrier(" + GroupNames(mask) + ")");
  }

  // --- VanReceiver ---

  Result<void*> Destination(const Meta& meta, size_t index) override {
    if (meta.cmd != Command::kRequest && meta.cmd != Command::kResponse) {
      return DataLossError(std::string(CommandName(meta.cmd)) + " carries data frames");
    }
    if (data_ == nullptr) {
      return DataLossError(std::string(CommandName(meta.cmd)) + " sent to a " +
                           RoleName(opts_.role));
    }
    return data_->Destination(meta, index);
  }

  void OnDropped(const Meta& meta, const Status& why) override {
    if (data_ != nullptr) data_->OnDropped(meta, why);
  }

  void OnMessage(InMessage&& msg) override {
    Meta& m = msg.meta;
    if (m.cmd == Command::kRequest || m.cmd == Command::kResponse) {
      if (data_ == nullptr) {
        MP_LOG_ERROR(kLog, "{} from node {} dropped: this {} takes no data", CommandName(m.cmd),
                     m.sender, RoleName(opts_.role));
        return;
      }
      MP_LOG_TRACE(kLog, "{} id {} from node {}", CommandName(m.cmd), m.id, m.sender);
      data_->OnData(std::move(msg));
      return;
    }
    MP_LOG_DEBUG(kLog, "{} from node {}", CommandName(m.cmd), m.sender);
    if (m.cmd == Command::kRdmaRendezvous) {
#ifdef MESHPOST_HAVE_RDMA
      if (rdma_ != nullptr && m.sender > 0 && m.sender < num_nodes_ && IsDataPeer(RoleOfId(m.sender))) {
        {
          // A peer that got the node table first may say Hello before we have it; our
          // answer needs the tcp connection to that peer, which only the table gives us.
          // Keep the blob until then (this thread also handles the table, so none is lost).
          std::lock_guard<std::mutex> lock(mu_);
          if (!table_ready_) {
            early_rdma_blobs_.emplace_back(m.sender, std::move(m.body));
            return;
          }
        }
        DeliverRdmaBlob(m.sender, m.body);
        return;
      }
#endif
      MP_LOG_ERROR(kLog, "RDMA_RENDEZVOUS from node {} dropped: no rdma van here", m.sender);
      return;
    }
    if (m.cmd == Command::kPeerLeave) {
      if (m.sender <= 0 || m.sender >= num_nodes_ || !IsDataPeer(RoleOfId(m.sender))) {
        MP_LOG_ERROR(kLog, "PEER_LEAVE from non-peer node {} dropped", m.sender);
        return;
      }
      PeerGone(m.sender, UnavailableError(m.body));
      return;
    }
    if (opts_.role == Role::kScheduler) {
      SchedulerControl(m);
    } else {
      NodeControl(m);
    }
  }

 private:
  Result<std::string> AdvertisedHost() const {
    if (!opts_.node_host.empty()) return opts_.node_host;
    if (!opts_.interface.empty()) return InterfaceAddress(opts_.interface);
    if (opts_.role == Role::kScheduler) return opts_.root_uri;
    if (IsLoopback(opts_.root_uri)) return std::string("127.0.0.1");
    return DefaultHostAddress();
  }

  template <typename Pred>
  bool WaitLocked(std::unique_lock<std::mutex>& lock, Pred pred, uint64_t deadline) {
    while (!pred()) {
      const uint64_t now = GetNanosecond();
      if (now >= deadline) return false;
      cv_.wait_for(lock, std::chrono::nanoseconds(std::min<uint64_t>(deadline - now, 100'000'000)));
    }
    return true;
  }

  std::string DescribeId(int id) const {
    if (id == kSchedulerId) return "scheduler";
    if (id <= opts_.num_servers) return "server " + std::to_string(id - 1);
    return "worker " + std::to_string(id - 1 - opts_.num_servers);
  }

  Role RoleOfId(int id) const {
    if (id == kSchedulerId) return Role::kScheduler;
    return id <= opts_.num_servers ? Role::kServer : Role::kWorker;
  }

  // ---- node side ----

  void NodeControl(const Meta& m) {
    if (m.sender != kSchedulerId) {
      MP_LOG_ERROR(kLog, "{} from node {} dropped: control comes from the scheduler",
                   CommandName(m.cmd), m.sender);
      return;
    }
    std::vector<std::pair<int, std::string>> early;  // rendezvous blobs held for the table
    std::unique_lock<std::mutex> lock(mu_);
    switch (m.cmd) {
      case Command::kRegisterReply:
        start_error_ = Status(static_cast<StatusCode>(m.status_code ? m.status_code : 9),
                              "scheduler refused this node: " + m.body);
        break;
      case Command::kNodeTable: {
        auto nodes = DecodeNodes(m.body);
        if (!nodes.ok() || nodes->size() != static_cast<size_t>(num_nodes_)) {
          start_error_ = DataLossError("bad node table from the scheduler: " +
                                       (nodes.ok() ? std::string("wrong size") : nodes.status().message()));
          break;
        }
        table_ = std::move(nodes).value();
        for (const NodeInfo& n : table_) {
          if (!IsDataPeer(n.role)) continue;
          Status c = ConnectPeerLocked(n);
          if (!c.ok()) {
            start_error_ = c;
            break;
          }
        }
        table_ready_ = true;
        early.swap(early_rdma_blobs_);
        break;
      }
      case Command::kBarrierDone:
        barrier_done_[{m.arg, m.id}] = m.status_code == 0
                                           ? OkStatus()
                                           : Status(static_cast<StatusCode>(m.status_code), m.body);
        break;
      case Command::kHeartbeatAck:
        last_ack_ns_ = GetNanosecond();
        break;
      case Command::kLeaveAck:
        leave_acked_ = true;
        break;
      case Command::kNodeDown:
        if (m.arg > 0 && m.arg < num_nodes_) {
          if (m.id == 0) {
            lock.unlock();
            PeerGone(m.arg, UnavailableError(m.body));
            lock.lock();
          } else if (down_[m.arg].ok() && !leaving_.count(m.arg)) {
            // An orderly leave: the peer's own PEER_LEAVE follows its last data on the
            // data connection. Refuse new requests now; fail pending ones when PEER_LEAVE
            // arrives, or after a heartbeat timeout if it never does.
            leaving_[m.arg] = {GetNanosecond(), m.body};
          }
        }
        break;
      default:
        MP_LOG_ERROR(kLog, "unexpected {} from the scheduler", CommandName(m.cmd));
    }
    cv_.notify_all();
    lock.unlock();
    for (const auto& [peer, blob] : early) DeliverRdmaBlob(peer, blob);
  }

  void DeliverRdmaBlob(int peer, const std::string& blob) {
#ifdef MESHPOST_HAVE_RDMA
    Status s = rdma_->OnControlBlob(peer, blob);
    if (!s.ok()) MP_LOG_ERROR(kLog, "rdma rendezvous from node {}: {}", peer, s.ToString());
#endif
  }

  // Creates, binds and starts every data van this node may use besides tcp, and records
  // their endpoints in self_ so the scheduler's node table advertises them.
  Status StartDataVans() {
    if (opts_.role == Role::kScheduler) return OkStatus();
    const std::string forced = opts_.ForcedTransport();
    std::vector<std::string> wanted;
    if (forced.empty()) {
      for (const std::string& name : DataTransports()) {
        if (name != "tcp") wanted.push_back(name);
      }
    } else if (forced != "tcp") {
      wanted.push_back(forced);
    }
    for (const std::string& name : wanted) {
      auto van = name == "rdma" ? CreateRdma() : CreateVan(name, van_options_);
      Status st = van.status();
      if (van.ok()) {
        auto bound = (*van)->Bind(self_.host, 0);
        st = bound.ok() ? (*van)->Start(this) : bound.status();
      }
      if (!st.ok()) {
        if (!forced.empty()) {
          return st.Annotate("Start: transport '" + forced + "' was forced (" +
                             (opts_.enable_rdma ? "DMLC_ENABLE_RDMA=1" : "MESHPOST_TRANSPORT") +
                             ") but cannot run here");
        }
        MP_LOG_INFO(kLog, "transport {} not used: {}", name, st.message());
        continue;
      }
      self_.vans.emplace_back(name, (*van)->endpoint());
      data_vans_[name] = std::move(van).value();
#ifdef MESHPOST_HAVE_RDMA
      // Only a bound, started rdma van is reachable through rdma_.
      if (name == "rdma") {
        std::lock_guard<std::mutex> lock(mu_);
        rdma_ = static_cast<RdmaVan*>(data_vans_[name].get());
      }
#endif
    }
    std::map<std::pair<int, int64_t>, std::pair<void*, size_t>> early;
    {
      std::lock_guard<std::mutex> lock(mu_);
      data_vans_started_ = true;
      early.swap(early_recv_buffers_);
    }
#ifdef MESHPOST_HAVE_RDMA
    if (RdmaVan* rdma = rdma_; rdma != nullptr) {
      for (const auto& [who, where] : early) {
        RegisterRdmaRecvBuffer(rdma, who.first, who.second, where.first, where.second);
      }
    }
#endif
    return OkStatus();
  }

  // Requires mu_. Picks the transport for one data peer: the highest-priority one both
  // sides offer (same-host transports only between processes on one running kernel).
  Status ConnectPeerLocked(const NodeInfo& n) {
    MESHPOST_RETURN_IF_ERROR(van_->Connect({n.id, n.host, n.port}).Annotate("connecting to " + n.Describe()));
    const std::string forced = opts_.ForcedTransport();
    std::string why_not;
    for (const std::string& name : DataTransports()) {
      if (name == "tcp") break;
      auto mine = data_vans_.find(name);
      if (mine == data_vans_.end()) continue;
      const std::string* endpoint = nullptr;
      for (const auto& [peer_name, peer_endpoint] : n.vans) {
        if (peer_name == name) endpoint = &peer_endpoint;
      }
      if (endpoint == nullptr) {
        why_not += name + ": the peer does not offer it; ";
        continue;
      }
      if (IsSameHostTransport(name) && n.host_identity != self_.host_identity) {
        why_not += name + ": the peer runs on " + n.host_identity + ", this node on " +
                   self_.host_identity + "; ";
        continue;
      }
      PeerAddress addr{n.id, n.host, n.port, *endpoint, n.pid};
      Status c = mine->second->Connect(addr);
      if (!c.ok()) {
        why_not += name + ": " + c.message() + "; ";
        continue;
      }
      route_[n.id] = mine->second.get();
      route_name_[n.id] = name;
      break;
    }
    if (!forced.empty() && forced != route_name_[n.id]) {
      return InvalidArgumentError("transport '" + forced + "' was forced but cannot reach " +
                                  n.Describe() + ": " + why_not);
    }
    MP_LOG_INFO(kLog, "{} via {}", n.Describe(), route_name_[n.id]);
    return OkStatus();
  }

  Result<std::unique_ptr<Van>> CreateRdma() {
#ifdef MESHPOST_HAVE_RDMA
    MESHPOST_ASSIGN_OR_RETURN(RdmaOptions ro, RdmaOptionsFromEnv(ProcessEnv()));
    if (!opts_.interface.empty() && ro.interface.empty()) ro.interface = opts_.interface;
    ro.wait = wait_policy();
    if (opts_.rdma_test_verbs) ro.verbs = opts_.rdma_test_verbs->make;
    // Rendezvous blobs travel to the peer over the tcp van (already connected to it).
    auto van = CreateRdmaVan(ro, [this](int peer, std::string blob) {
      OutMessage out;
      out.meta.cmd = Command::kRdmaRendezvous;
      out.meta.sender = my_id_;
      out.meta.recipient = peer;
      out.meta.body = std::move(blob);
      return van_->Send(std::move(out));
    });
    if (!van.ok()) return van.status();
    (*van)->SetPeerFailureCallback([this](int peer, const Status& why) { PeerGone(peer, why); });
    return std::unique_ptr<Van>(std::move(van).value());
#else
    return UnimplementedError(
        "transport 'rdma' is not built into this meshpost (configure with "
        "-DMESHPOST_WITH_RDMA=ON and libibverbs-dev installed)");
#endif
  }

  void StopVans() {
    for (auto& [name, van] : data_vans_) van->Stop();
    van_->Stop();
  }

  bool Registered() const {
    std::lock_guard<std::mutex> lock(mu_);
    return table_ready_ && start_error_.ok();
  }

  bool IsDataPeer(Role other) const {
    return (opts_.role == Role::kWorker && other == Role::kServer) ||
           (opts_.role == Role::kServer && other == Role::kWorker);
  }

  // A data peer died or finished leaving: fail what depends on it, exactly once.
  void PeerGone(int id, const Status& why) {
    DataHandler* h = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      leaving_.erase(id);
      if (!down_[id].ok()) return;
      down_[id] = why;
      h = data_;
      cv_.notify_all();
    }
    MP_LOG_INFO(kLog, "peer down: {}", why.message());
    // Never call into the worker/server holding our lock.
    if (h) h->OnNodeDown(id, why);
  }

  // ---- scheduler side ----

  void SchedulerControl(const Meta& m) {
    if (m.cmd == Command::kRegister) {
      HandleRegister(m);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (m.sender <= 0 || m.sender >= num_nodes_ || !registered_.count(m.sender)) {
      MP_LOG_ERROR(kLog, "{} from unregistered node {} dropped", CommandName(m.cmd), m.sender);
      return;
    }
    switch (m.cmd) {
      case Command::kHeartbeat:
        last_seen_[m.sender] = GetNanosecond();
        ReplyLocked(m.sender, Command::kHeartbeatAck);
        break;
      case Command::kBarrier:
        if (m.arg <= 0 || m.arg > kAllGroups || !(m.arg & GroupOf(RoleOfId(m.sender)))) {
          MP_LOG_ERROR(kLog, "bad barrier mask {} from {}", m.arg, DescribeId(m.sender));
          break;
        }
        barrier_arrivals_[{m.arg, m.id}].insert(m.sender);
        CheckBarriersLocked();
        break;
      case Command::kLeave:
        if (!left_.count(m.sender)) {
          left_.insert(m.sender);
          ReplyLocked(m.sender, Command::kLeaveAck);
          MarkDownLocked(m.sender, registered_[m.sender].Describe() + " stopped", true);
        }
        break;
      default:
        MP_LOG_ERROR(kLog, "unexpected {} at the scheduler", CommandName(m.cmd));
    }
    cv_.notify_all();
  }

  void HandleRegister(const Meta& m) {
    auto nodes = DecodeNodes(m.body);
    if (!nodes.ok() || nodes->size() != 1) {
      MP_LOG_ERROR(kLog, "malformed REGISTER dropped: {}",
                   nodes.ok() ? "expected one node" : nodes.status().ToString());
      return;
    }
    NodeInfo n = (*nodes)[0];
    std::lock_guard<std::mutex> lock(mu_);
    const int count = n.role == Role::kServer ? opts_.num_servers : opts_.num_workers;
    std::string refusal;
    if (n.role == Role::kScheduler) {
      refusal = "a second scheduler tried to register";
    } else if (n.rank < 0 || n.rank >= count) {
      refusal = std::string(RoleName(n.role)) + " rank " + std::to_string(n.rank) +
                " is out of range [0, " + std::to_string(count) + ")";
    } else {
      n.id = n.role == Role::kServer ? ServerNodeId(n.rank) : WorkerNodeId(opts_.num_servers, n.rank);
      auto it = registered_.find(n.id);
      if (it != registered_.end()) {
        refusal = std::string(RoleName(n.role)) + " rank " + std::to_string(n.rank) +
                  " clashes: it is already taken by " + it->second.Describe() +
                  "; ranks are DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU and must be unique";
      }
    }
    if (!refusal.empty()) {
      MP_LOG_ERROR(kLog, "refused node at {}:{} (pid {}): {}", n.host, n.port, n.pid, refusal);
      // The refused node has no id of its own: reach it through a temporary one. The
      // connection is kept until Stop so the reply is not discarded by a close.
      const int temp_id = 1 << 20 | next_temp_id_++;
      if (van_->Connect({temp_id, n.host, n.port}).ok()) {
        OutMessage out;
        out.meta.cmd = Command::kRegisterReply;
        out.meta.sender = kSchedulerId;
        out.meta.recipient = temp_id;
        out.meta.status_code = static_cast<int32_t>(StatusCode::kInvalidArgument);
        out.meta.body = refusal;
        Status s = van_->Send(std::move(out));
        (void)s;
      }
      return;
    }
    registered_[n.id] = n;
    MP_LOG_INFO(kLog, "registered {} ({}/{})", n.Describe(), registered_.size(), num_nodes_ - 1);
    if (static_cast<int>(registered_.size()) < num_nodes_ - 1) return;

    table_.clear();
    table_.push_back(self_);
    for (auto& [id, info] : registered_) table_.push_back(info);
    const std::string body = EncodeNodes(table_);
    const uint64_t now = GetNanosecond();
    for (auto& [id, info] : registered_) {
      last_seen_[id] = now;
      Status c = van_->Connect({id, info.host, info.port});
      if (!c.ok()) {
        MP_LOG_ERROR(kLog, "cannot connect to {}: {}", info.Describe(), c.ToString());
        continue;
      }
      OutMessage out;
      out.meta.cmd = Command::kNodeTable;
      out.meta.sender = kSchedulerId;
      out.meta.recipient = id;
      out.meta.body = body;
      Status s = van_->Send(std::move(out));
      (void)s;
    }
    table_ready_ = true;
    MP_LOG_INFO(kLog, "all {} nodes registered; node table sent", num_nodes_ - 1);
    cv_.notify_all();
  }

  void ReplyLocked(int id, Command cmd, int32_t arg = 0, uint64_t seq = 0,
                   const Status& status = OkStatus()) {
    OutMessage out;
    out.meta.cmd = cmd;
    out.meta.sender = kSchedulerId;
    out.meta.recipient = id;
    out.meta.arg = arg;
    out.meta.id = seq;
    out.meta.status_code = static_cast<int32_t>(status.code());
    out.meta.body = status.message();
    Status s = van_->Send(std::move(out));
    if (!s.ok()) MP_LOG_DEBUG(kLog, "reply to {} failed: {}", DescribeId(id), s.ToString());
  }

  bool AliveLocked(int id) const { return down_[id].ok(); }

  // Scheduler: a node died or left. Tells every live node and settles barriers.
  void MarkDownLocked(int id, const std::string& why, bool left) {
    if (!down_[id].ok()) return;
    down_[id] = UnavailableError(why);
    MP_LOG_INFO(kLog, "node down: {}", why);
    for (auto& [other, info] : registered_) {
      if (other == id || !AliveLocked(other)) continue;
      OutMessage out;
      out.meta.cmd = Command::kNodeDown;
      out.meta.sender = kSchedulerId;
      out.meta.recipient = other;
      out.meta.arg = id;
      out.meta.id = left ? 1 : 0;
      out.meta.body = why;
      Status s = van_->Send(std::move(out));
      (void)s;
    }
    CheckBarriersLocked();
    cv_.notify_all();
  }

  void CheckBarriersLocked() {
    for (auto it = barrier_arrivals_.begin(); it != barrier_arrivals_.end();) {
      const int mask = it->first.first;
      const uint64_t seq = it->first.second;
      std::set<int>& arrived = it->second;
      bool complete = true;
      std::string gone;
      for (int id = 0; id < num_nodes_; ++id) {
        if (!(mask & GroupOf(RoleOfId(id)))) continue;
        if (arrived.count(id)) continue;
        if (!AliveLocked(id)) {
          gone += (gone.empty() ? "" : "; ") + down_[id].message();
        } else {
          complete = false;
        }
      }
      if (!complete && gone.empty()) {
        ++it;
        continue;
      }
      if (!gone.empty()) {
        // Some members will never arrive: release the ones that did with an error.
        ReleaseBarrierLocked(mask, seq, arrived,
                             UnavailableError("barrier across " + GroupNames(mask) +
                                              " cannot complete: " + gone));
        it = barrier_arrivals_.erase(it);
        continue;
      }
      ReleaseBarrierLocked(mask, seq, arrived, OkStatus());
      it = barrier_arrivals_.erase(it);
    }
  }

  void ReleaseBarrierLocked(int mask, uint64_t seq, const std::set<int>& members,
                            const Status& status) {
    for (int id : members) {
      if (id == my_id_) {
        barrier_done_[{mask, seq}] = status;
        continue;
      }
      if (AliveLocked(id)) ReplyLocked(id, Command::kBarrierDone, mask, seq, status);
    }
    cv_.notify_all();
  }

  bool AllNodesGoneLocked() const {
    for (int id = 1; id < num_nodes_; ++id) {
      if (registered_.count(id) && AliveLocked(id)) return false;
    }
    return true;
  }

  // ---- heartbeats ----

  void HeartbeatLoop() {
    const auto interval = std::chrono::milliseconds(opts_.heartbeat_interval_ms);
    const uint64_t timeout_ns = static_cast<uint64_t>(opts_.heartbeat_timeout_ms) * 1000000ull;
    uint64_t seq = 0;
    const auto period = opts_.role == Role::kScheduler ? interval / 2 : interval;
    std::unique_lock<std::mutex> lock(mu_);
    auto next = std::chrono::steady_clock::now() + period;
    while (threads_running_) {
      // cv_ is notified by every control message (heartbeat acks included): wait for the
      // period to elapse, not for the next notification, or acks would pace heartbeats.
      if (cv_.wait_until(lock, next) != std::cv_status::timeout &&
          std::chrono::steady_clock::now() < next) {
        continue;
      }
      if (!threads_running_) break;
      next = std::chrono::steady_clock::now() + period;
      const uint64_t now = GetNanosecond();
      if (opts_.role == Role::kScheduler) {
        for (auto& [id, info] : registered_) {
          if (!AliveLocked(id) || left_.count(id)) continue;
          if (now - last_seen_[id] > timeout_ns) {
            MarkDownLocked(id, info.Describe() + " missed heartbeats for " +
                                   std::to_string((now - last_seen_[id]) / 1000000) +
                                   " ms and is presumed dead",
                           false);
          }
        }
        continue;
      }
      std::vector<std::pair<int, std::string>> overdue;
      for (auto& [id, info] : leaving_) {
        if (now - info.first > timeout_ns) overdue.emplace_back(id, info.second);
      }
      if (!overdue.empty()) {
        lock.unlock();
        for (auto& [id, why] : overdue) PeerGone(id, UnavailableError(why));
        lock.lock();
      }
      OutMessage hb;
      hb.meta.cmd = Command::kHeartbeat;
      hb.meta.sender = my_id_;
      hb.meta.recipient = kSchedulerId;
      hb.meta.id = ++seq;
      Status s = van_->Send(std::move(hb));
      (void)s;
      if (AliveLocked(kSchedulerId) && now - last_ack_ns_ > timeout_ns) {
        down_[kSchedulerId] = UnavailableError(
            "scheduler at " + opts_.root_uri + ":" + std::to_string(opts_.root_port) +
            " has not answered heartbeats for " + std::to_string((now - last_ack_ns_) / 1000000) +
            " ms");
        MP_LOG_ERROR(kLog, "{}", down_[kSchedulerId].message());
        cv_.notify_all();
      }
    }
  }

  void StopThreads() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      threads_running_ = false;
      cv_.notify_all();
    }
    if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
  }

  const Options opts_;
  const int num_nodes_;
  int my_id_ = 0;
  int port_ = 0;
  NodeInfo self_;
  VanOptions van_options_;
  std::unique_ptr<Van> van_;  // tcp: control plane, and data where nothing better fits
  std::map<std::string, std::unique_ptr<Van>> data_vans_;  // other transports by name
  std::vector<Van*> route_;               // per node id: data van (nullptr = tcp)
#ifdef MESHPOST_HAVE_RDMA
  RdmaVan* rdma_ = nullptr;               // owned by data_vans_["rdma"] when created
#endif
  std::vector<std::string> route_name_;   // per node id: transport name
  std::unique_ptr<AFTensorWorker> worker_;
  std::unique_ptr<AFTensorServer> server_;
  DataHandler* data_ = nullptr;
  std::atomic<bool> started_{false};
  std::atomic<bool> stopped_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<NodeInfo> table_;
  bool table_ready_ = false;
  // register_recv_buffer calls made before the data vans existed, by (worker rank, key).
  bool data_vans_started_ = false;
  std::map<std::pair<int, int64_t>, std::pair<void*, size_t>> early_recv_buffers_;
  // RDMA rendezvous blobs that arrived before the node table (delivered right after it).
  std::vector<std::pair<int, std::string>> early_rdma_blobs_;
  Status start_error_;
  std::vector<Status> down_;  // per node id: OK while alive
  std::map<int, uint64_t> barrier_seq_;
  std::map<std::pair<int, uint64_t>, Status> barrier_done_;
  bool leave_acked_ = false;
  std::map<int, std::pair<uint64_t, std::string>> leaving_;  // peer id → (notice time, why)
  uint64_t last_ack_ns_ = 0;
  bool threads_running_ = false;
  std::thread heartbeat_thread_;
  // scheduler only
  std::map<int, NodeInfo> registered_;
  std::map<int, uint64_t> last_seen_;
  std::set<int> left_;
  std::map<std::pair<int, uint64_t>, std::set<int>> barrier_arrivals_;
  int next_temp_id_ = 0;
};

Result<std::unique_ptr<Postoffice>> Postoffice::Create(const Options& options) {
  MESHPOST_RETURN_IF_ERROR(options.Validate());
  return std::unique_ptr<Postoffice>(new Postoffice(std::make_unique<Impl>(options)));
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
