#include "ps/membership.h"

#include <algorithm>
#include <chrono>
#include <random>

#include "common/clock.h"
#include "common/logging.h"
#include "ps/control.h"
#include "ps/node_context.h"
#include "ps/start_report.h"

namespace meshpost {
namespace {
constexpr const char* kLog = "ps";

uint64_t RandomIncarnation() {
  std::random_device rd;
  uint64_t v = 0;
  while (v == 0) v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ GetNanosecond();
  return v;
}
}  // namespace

Membership::Membership(const Options& options, const ClusterLayout& layout, int my_id,
                       VanRouter* router, PeerDownFn on_peer_down, PeerUpFn on_peer_up)
    : opts_(options),
      layout_(layout),
      my_id_(my_id),
      router_(router),
      on_peer_down_(std::move(on_peer_down)),
      on_peer_up_(std::move(on_peer_up)),
      incarnation_(RandomIncarnation()),
      peer_status_(layout.num_nodes()) {}

Membership::~Membership() { StopHeartbeats(); }

OutMessage Membership::ToScheduler(ControlMessage c) const {
  OutMessage msg = c.Build();
  msg.meta.stamps[2] = incarnation_;
  msg.meta.stamps[3] = table_version_.load(std::memory_order_acquire);
  return msg;
}

namespace {
// A van names a peer by its node id and address ("node 0 at 10.0.0.1:9000 ..."); Start,
// Barrier and Stop report the scheduler's failures as they are, so say whose it was.
Status NamingTheScheduler(const Status& s) {
  if (s.ok() || s.message().find("scheduler") != std::string::npos) return s;
  return s.Annotate("the scheduler is unreachable");
}
}  // namespace

Status Membership::SendToScheduler(ControlMessage c) {
  return NamingTheScheduler(router_->SendControl(ToScheduler(std::move(c))));
}

template <typename Pred>
bool Membership::WaitLocked(std::unique_lock<std::mutex>& lock, Pred pred, uint64_t deadline) {
  while (!pred()) {
    const uint64_t now = GetNanosecond();
    if (now >= deadline) return false;
    cv_.wait_for(lock, std::chrono::nanoseconds(std::min<uint64_t>(deadline - now, 100'000'000)));
  }
  return true;
}

Status Membership::Join(const NodeInfo& self, uint64_t deadline) {
  self_ = self;
  MESHPOST_RETURN_IF_ERROR(router_->ConnectControl(kSchedulerId, opts_.root_uri, opts_.root_port));
  MESHPOST_RETURN_IF_ERROR(SendToScheduler(
      ControlMessage(Command::kRegister, my_id_, kSchedulerId).Body(EncodeNodes({self_}))));
  std::unique_lock<std::mutex> lock(mu_);
  // The scheduler knows (and logs) who is missing; a node can say whom it waits on, so a
  // wrong DMLC_PS_ROOT_URI / DMLC_PS_ROOT_PORT shows before the start timeout. The
  // scheduler's connection can also fail before any table arrives (wrong cluster token):
  // that ends the wait at once with the van's reason.
  auto joined_or_failed = [this] {
    return table_ready_ || !join_error_.ok() || !peer_status_[kSchedulerId].ok();
  };
  const uint64_t began = GetNanosecond();
  for (;;) {
    const uint64_t report_at =
        std::min(deadline, GetNanosecond() + uint64_t{kStartProgressIntervalMs} * 1000000);
    if (WaitLocked(lock, joined_or_failed, report_at) || GetNanosecond() >= deadline) {
      break;
    }
    MP_LOG_INFO(kLog,
                "waiting for the cluster: no node table from the scheduler at {}:{} after {} s "
                "(it lists who is missing; DMLC_NUM_WORKER={}, DMLC_NUM_SERVER={})",
                opts_.root_uri, opts_.root_port, (GetNanosecond() - began) / 1000000000,
                opts_.num_workers, opts_.num_servers);
  }
  if (!joined_or_failed()) {
    return DeadlineExceededError(
        "Start: no node table from the scheduler at " + opts_.root_uri + ":" +
        std::to_string(opts_.root_port) + " after " + std::to_string(opts_.start_timeout_ms) +
        " ms; is the scheduler running and are all DMLC_NUM_WORKER=" +
        std::to_string(opts_.num_workers) +
        " workers and DMLC_NUM_SERVER=" + std::to_string(opts_.num_servers) + " servers started?");
  }
  if (!join_error_.ok()) return join_error_;
  if (!table_ready_) {
    return peer_status_[kSchedulerId].Annotate("Start: cannot join the scheduler at " +
                                               opts_.root_uri + ":" +
                                               std::to_string(opts_.root_port));
  }
  last_ack_ns_ = GetNanosecond();
  return OkStatus();
}

bool Membership::Joined() const {
  std::lock_guard<std::mutex> lock(mu_);
  // An evicted node's id is no longer its own (the scheduler counts it gone): leaving
  // would only confuse whoever holds the rank next.
  return table_ready_ && join_error_.ok() && evicted_.ok();
}

std::vector<NodeInfo> Membership::Table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

Status Membership::PeerStatus(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!layout_.Contains(id)) return NotFoundError("no node " + std::to_string(id));
  auto leaving = leaving_.find(id);
  if (leaving != leaving_.end()) return UnavailableError(leaving->second.second);
  return peer_status_[id];
}

Status Membership::Barrier(int mask, int64_t timeout_ms) {
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    seq = ++barrier_seq_[mask];
  }
  MESHPOST_RETURN_IF_ERROR(
      SendToScheduler(ControlMessage(Command::kBarrier, my_id_, kSchedulerId).Arg(mask).Seq(seq))
          .Annotate("Barrier(" + GroupNames(mask) + ")"));
  std::unique_lock<std::mutex> lock(mu_);
  const auto key = std::make_pair(mask, seq);
  const bool done = WaitLocked(
      lock, [&] { return barrier_outcome_.count(key) || !peer_status_[kSchedulerId].ok(); },
      DeadlineFromTimeoutMs(timeout_ms));
  auto it = barrier_outcome_.find(key);
  if (it != barrier_outcome_.end()) {
    Status s = it->second;
    barrier_outcome_.erase(it);
    return s;
  }
  if (!done) {
    return DeadlineExceededError("Barrier(" + GroupNames(mask) + ", seq " + std::to_string(seq) +
                                 "): not released after " + std::to_string(timeout_ms) + " ms");
  }
  return peer_status_[kSchedulerId].Annotate("Barrier(" + GroupNames(mask) + ")");
}

void Membership::Leave(int64_t timeout_ms) {
  if (!Joined()) {
    MP_LOG_INFO(kLog, "stopping without leaving: this node never joined the cluster");
    return;
  }
  // Tell data peers first, on the connection our last responses/requests used: they
  // process everything we sent before learning we are gone.
  std::vector<int> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const NodeInfo& n : table_) {
      if (IsDataPeer(opts_.role, n.role) && peer_status_[n.id].ok()) peers.push_back(n.id);
    }
  }
  for (int id : peers) {
    Status s = router_->Send(ControlMessage(Command::kPeerLeave, my_id_, id)
                                 .Body(self_.Describe() + " stopped")
                                 .Build());
    (void)s;
  }
  Status sent =
      router_->SendControl(ToScheduler(ControlMessage(Command::kLeave, my_id_, kSchedulerId)));
  if (!sent.ok()) return;
  const int64_t wait_ms = timeout_ms < 0 ? opts_.heartbeat_timeout_ms : timeout_ms;
  std::unique_lock<std::mutex> lock(mu_);
  if (!WaitLocked(
          lock, [this] { return leave_acked_ || !peer_status_[kSchedulerId].ok(); },
          DeadlineFromTimeoutMs(wait_ms))) {
    MP_LOG_WARN(kLog, "scheduler did not acknowledge leaving within {} ms", wait_ms);
  }
}

void Membership::OnControl(const Meta& m) {
  if (m.sender != kSchedulerId) {
    MP_LOG_ERROR(kLog, "{} from node {} dropped: control comes from the scheduler",
                 CommandName(m.cmd), m.sender);
    return;
  }
  if (m.cmd == Command::kNodeTable) {
    OnNodeTable(m);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  switch (m.cmd) {
    case Command::kRegisterReply: {
      // A reply only ever refuses; a zero code from a confused scheduler is still a refusal.
      Status refusal = OutcomeOf(m, "scheduler refused this node: ");
      join_error_ =
          refusal.ok() ? InternalError("scheduler refused this node: " + m.body) : refusal;
      break;
    }
    case Command::kBarrierDone: barrier_outcome_[{m.arg, m.id}] = OutcomeOf(m); break;
    case Command::kHeartbeatAck: {
      const uint64_t now = GetNanosecond();
      last_ack_ns_ = now;
      // NTP-style sample for trace clock correction: stamps[0] echoes our send time,
      // stamps[1] is the scheduler's clock when it answered. An echo that is not from a
      // recent heartbeat of ours (future, or older than the liveness timeout) is ignored.
      const uint64_t sent = m.stamps[0];
      const uint64_t limit = static_cast<uint64_t>(opts_.heartbeat_timeout_ms) * 1000000ull;
      if (sent != 0 && sent <= now && now - sent <= limit) {
        clock_sync_.AddSample(sent, m.stamps[1], now);
      }
      if (scheduler_silent_ && evicted_.ok()) {
        // It was paused, not dead: barriers and leaving work again.
        scheduler_silent_ = false;
        peer_status_[kSchedulerId] = OkStatus();
        MP_LOG_INFO(kLog, "scheduler answers heartbeats again");
      }
      break;
    }
    case Command::kLeaveAck: leave_acked_ = true; break;
    case Command::kNodeDown:
      if (m.arg <= 0 || m.arg >= layout_.num_nodes()) break;
      if (m.arg == my_id_) {
        const NodeDownReason reason = NodeDownReasonOf(m);
        if ((reason == NodeDownReason::kEvicted || reason == NodeDownReason::kReplaced) &&
            evicted_.ok()) {
          lock.unlock();
          Evicted(m.body, reason == NodeDownReason::kReplaced);
          lock.lock();
        }
        break;
      }
      if (NodeDownReasonOf(m) == NodeDownReason::kDied) {
        lock.unlock();
        PeerGone(m.arg, UnavailableError(m.body));
        lock.lock();
      } else if (peer_status_[m.arg].ok() && !leaving_.count(m.arg)) {
        // An orderly leave: the peer's own PEER_LEAVE follows its last data on the data
        // connection. Refuse new requests now; fail pending ones when PEER_LEAVE arrives,
        // or after a heartbeat timeout if it never does.
        leaving_[m.arg] = {GetNanosecond(), m.body};
      }
      break;
    default: MP_LOG_ERROR(kLog, "unexpected {} from the scheduler", CommandName(m.cmd));
  }
  cv_.notify_all();
}

void Membership::OnNodeTable(const Meta& m) {
  auto nodes = DecodeNodes(m.body);
  if (!nodes.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    join_error_ = DataLossError("bad node table from the scheduler: " + nodes.status().message());
    cv_.notify_all();
    return;
  }
  if (nodes->size() != static_cast<size_t>(layout_.num_nodes())) {
    int servers = 0, workers = 0;
    for (const NodeInfo& n : *nodes) {
      servers += n.role == Role::kServer;
      workers += n.role == Role::kWorker;
    }
    std::lock_guard<std::mutex> lock(mu_);
    join_error_ = InvalidArgumentError("the scheduler's cluster has " + std::to_string(servers) +
                                       " servers and " + std::to_string(workers) +
                                       " workers, but this node was started with DMLC_NUM_SERVER=" +
                                       std::to_string(opts_.num_servers) +
                                       " and DMLC_NUM_WORKER=" + std::to_string(opts_.num_workers) +
                                       "; every process must be given the same values");
    cv_.notify_all();
    return;
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (table_ready_) {
      lock.unlock();
      OnTableUpdate(m.id, std::move(nodes).value());
      return;
    }
  }
  table_version_.store(m.id, std::memory_order_release);
  Status error;
  for (const NodeInfo& n : *nodes) {
    if (!IsDataPeer(opts_.role, n.role)) continue;
    error = router_->ConnectPeer(n);
    if (!error.ok()) break;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    table_ = std::move(nodes).value();
    table_ready_ = true;
    join_error_ = error;
    cv_.notify_all();
  }
  // Rendezvous blobs held until now can be answered: the tcp links to the peers exist.
  router_->PeersConnected();
}

// Runs on the tcp receive thread, like the first table. Every entry that names another
// process than before is a replacement: what was pending on the old holder failed when it
// was declared dead (or is failed now), its connections are replaced, and it is alive
// again. An immediate heartbeat reports the version, which releases the new holder's
// start barrier at the scheduler.
void Membership::OnTableUpdate(uint64_t version, std::vector<NodeInfo> nodes) {
  if (version <= table_version_.load(std::memory_order_acquire)) {
    MP_LOG_DEBUG(kLog, "stale node table {} ignored", version);
    return;
  }
  std::vector<std::pair<NodeInfo, NodeInfo>> replaced;  // (old, new)
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!evicted_.ok()) return;
    for (const NodeInfo& n : nodes) {
      if (n.id == my_id_ || !layout_.Contains(n.id)) continue;
      for (const NodeInfo& o : table_) {
        if (o.id != n.id) continue;
        if (o.host != n.host || o.port != n.port || o.pid != n.pid ||
            o.host_identity != n.host_identity || o.vans != n.vans) {
          replaced.emplace_back(o, n);
        }
      }
    }
  }
  for (const auto& [old, now] : replaced) {
    MP_LOG_WARN(kLog, "{} now holds the rank of {}", now.Describe(), old.Describe());
    // Normally already down (the scheduler replaces only dead or departed nodes and said
    // so first); if this node had not concluded it yet, fail what was pending now.
    PeerGone(now.id, UnavailableError(old.Describe() + " was replaced by " + now.Describe()));
    if (IsDataPeer(opts_.role, now.role)) {
      Status c = router_->ReconnectPeer(old, now);
      if (!c.ok()) {
        MP_LOG_ERROR(kLog, "cannot connect to {}: {}", now.Describe(), c.ToString());
        continue;  // it stays down here
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      leaving_.erase(now.id);
      peer_status_[now.id] = OkStatus();
    }
    if (on_peer_up_) on_peer_up_(now.id);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    table_ = std::move(nodes);
    table_version_.store(version, std::memory_order_release);
    cv_.notify_all();
  }
  Status s =
      router_->SendControl(ToScheduler(ControlMessage(Command::kHeartbeat, my_id_, kSchedulerId)));
  (void)s;
}

void Membership::OnPeerLeave(const Meta& m) {
  if (!layout_.Contains(m.sender) || m.sender == kSchedulerId ||
      !IsDataPeer(opts_.role, layout_.RoleOf(m.sender))) {
    MP_LOG_ERROR(kLog, "PEER_LEAVE from non-peer node {} dropped", m.sender);
    return;
  }
  PeerGone(m.sender, UnavailableError(m.body), /*orderly=*/true);
}

void Membership::PeerGone(int id, const Status& reported, bool orderly) {
  if (!layout_.Contains(id)) return;
  const Status why = id == kSchedulerId ? NamingTheScheduler(reported) : reported;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A peer the scheduler announced as leaving whose connection closes is leaving.
    orderly = orderly || leaving_.count(id) > 0;
    leaving_.erase(id);
    if (!peer_status_[id].ok()) return;
    peer_status_[id] = why;
    cv_.notify_all();
  }
  // An orderly leave is the normal end of a run: debug, so a clean stop prints nothing
  // alarming. A death is a warning here; the handles it fails carry the error.
  if (orderly) {
    MP_LOG_DEBUG(kLog, "peer left: {}", why.message());
  } else {
    MP_LOG_WARN(kLog, "peer down: {}", why.message());
  }
  // Never call into the worker/server holding our lock.
  if (on_peer_down_) on_peer_down_(id, why);
}

// The scheduler declared this node dead (it paused past the heartbeat timeout, or lost its
// connection) and the others were told so: nothing this node does can succeed any more.
// Every peer is failed with the reason, so pending handles fail and every later call
// (push_pull, get_batch, barrier) raises an error that says this node was evicted and why.
void Membership::Evicted(const std::string& why, bool replaced) {
  const Status evicted =
      replaced ? UnavailableError("this node (" + layout_.Describe(my_id_) +
                                  ") was replaced: the scheduler gave its rank to a new "
                                  "process; " +
                                  why +
                                  "; it can no longer take part in the "
                                  "cluster")
               : UnavailableError("this node (" + layout_.Describe(my_id_) +
                                  ") was evicted from the cluster by the scheduler: " + why +
                                  "; restart it to rejoin");
  std::vector<int> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!evicted_.ok()) return;
    evicted_ = evicted;
    peer_status_[kSchedulerId] = evicted;
    for (int id = 1; id < layout_.num_nodes(); ++id) {
      if (id != my_id_ && IsDataPeer(opts_.role, layout_.RoleOf(id))) peers.push_back(id);
    }
    cv_.notify_all();
  }
  MP_LOG_ERROR(kLog, "{}", evicted.message());
  for (int id : peers) {
    {
      // PeerGone keeps the first reason; the eviction must be the one callers see.
      std::lock_guard<std::mutex> lock(mu_);
      leaving_.erase(id);
      peer_status_[id] = OkStatus();
    }
    PeerGone(id, evicted);
  }
}

void Membership::StartHeartbeats() {
  std::lock_guard<std::mutex> lock(mu_);
  heartbeats_running_ = true;
  heartbeat_thread_ = std::thread([this] {
    PinCurrentThread(router_->pinner(), "heartbeat");
    HeartbeatLoop();
  });
}

void Membership::StopHeartbeats() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    heartbeats_running_ = false;
    cv_.notify_all();
  }
  if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
}

void Membership::HeartbeatLoop() {
  const auto period = std::chrono::milliseconds(opts_.heartbeat_interval_ms);
  const uint64_t timeout_ns = static_cast<uint64_t>(opts_.heartbeat_timeout_ms) * 1000000ull;
  uint64_t seq = 0;
  std::unique_lock<std::mutex> lock(mu_);
  auto next = std::chrono::steady_clock::now() + period;
  uint64_t last_tick = GetNanosecond();
  while (heartbeats_running_) {
    // cv_ is notified by every control message (heartbeat acks included): wait for the
    // period to elapse, not for the next notification, or acks would pace heartbeats.
    if (cv_.wait_until(lock, next) != std::cv_status::timeout &&
        std::chrono::steady_clock::now() < next) {
      continue;
    }
    if (!heartbeats_running_) break;
    next = std::chrono::steady_clock::now() + period;
    const uint64_t now = GetNanosecond();
    // A tick far later than scheduled means this process was not running (SIGSTOP, VM
    // pause, starvation): silence measured across that gap says nothing about the
    // scheduler, so it gets a fresh timeout from now.
    if (now - last_tick > timeout_ns / 2) last_ack_ns_ = std::max(last_ack_ns_, now);
    last_tick = now;
    std::vector<std::pair<int, std::string>> overdue;
    for (auto& [id, info] : leaving_) {
      if (now - info.first > timeout_ns) overdue.emplace_back(id, info.second);
    }
    if (!overdue.empty()) {
      lock.unlock();
      for (auto& [id, why] : overdue) PeerGone(id, UnavailableError(why));
      lock.lock();
    }
    OutMessage hb =
        ToScheduler(ControlMessage(Command::kHeartbeat, my_id_, kSchedulerId).Seq(++seq));
    hb.meta.stamps[0] = GetNanosecond();  // echoed by the ack: one clock-offset sample
    Status s = router_->SendControl(std::move(hb));
    (void)s;
    if (peer_status_[kSchedulerId].ok() && now - last_ack_ns_ > timeout_ns) {
      scheduler_silent_ = true;
      peer_status_[kSchedulerId] =
          UnavailableError("scheduler at " + opts_.root_uri + ":" +
                           std::to_string(opts_.root_port) + " has not answered heartbeats for " +
                           std::to_string((now - last_ack_ns_) / 1000000) + " ms");
      MP_LOG_ERROR(kLog, "{}", peer_status_[kSchedulerId].message());
      cv_.notify_all();
    }
  }
}

}  // namespace meshpost
