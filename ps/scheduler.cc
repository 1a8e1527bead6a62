#include "ps/scheduler.h"

#include <algorithm>
#include <chrono>

#include "common/clock.h"
#include "common/logging.h"
#include "ps/control.h"
#include "ps/node_context.h"
#include "ps/start_report.h"

namespace meshpost {
namespace {
constexpr const char* kLog = "ps";
}  // namespace

Scheduler::Scheduler(const Options& options, const ClusterLayout& layout, VanRouter* router)
    : opts_(options), layout_(layout), router_(router), node_status_(layout.num_nodes()) {}

Scheduler::~Scheduler() { StopLiveness(); }

void Scheduler::SetSelf(const NodeInfo& self) {
  std::lock_guard<std::mutex> lock(mu_);
  self_ = self;
}

template <typename Pred>
bool Scheduler::WaitLocked(std::unique_lock<std::mutex>& lock, Pred pred, uint64_t deadline) {
  while (!pred()) {
    const uint64_t now = GetNanosecond();
    if (now >= deadline) return false;
    cv_.wait_for(lock, std::chrono::nanoseconds(std::min<uint64_t>(deadline - now, 100'000'000)));
  }
  return true;
}

Status Scheduler::AwaitNodes(uint64_t deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  auto missing = [this] {
    std::vector<std::string> out;
    for (int id = 1; id < layout_.num_nodes(); ++id) {
      if (!registered_.count(id)) out.push_back(layout_.Describe(id));
    }
    return out;
  };
  // Every few seconds say who is still missing, so a wrong port or a dead node shows long
  // before the start timeout.
  for (;;) {
    const uint64_t report_at =
        std::min(deadline, GetNanosecond() + uint64_t{kStartProgressIntervalMs} * 1000000);
    if (WaitLocked(lock, [this] { return table_published_; }, report_at)) return OkStatus();
    if (GetNanosecond() >= deadline) break;
    MP_LOG_INFO(kLog, "{}", WaitingFor(missing(), static_cast<int>(registered_.size()),
                                       layout_.num_nodes() - 1));
  }
  std::string names;
  for (const std::string& m : missing()) names += (names.empty() ? "" : ", ") + m;
  return DeadlineExceededError("Start: scheduler waited " + std::to_string(opts_.start_timeout_ms) +
                               " ms (MESHPOST_START_TIMEOUT_MS) for nodes; missing: " + names);
}

Status Scheduler::Barrier(int mask, int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t seq = ++barrier_seq_[mask];
  const auto key = std::make_pair(mask, seq);
  barrier_arrivals_[key].insert(kSchedulerId);
  CheckBarriersLocked();
  WaitLocked(lock, [&] { return barrier_outcome_.count(key) > 0; },
             DeadlineFromTimeoutMs(timeout_ms));
  auto it = barrier_outcome_.find(key);
  if (it == barrier_outcome_.end()) {
    return DeadlineExceededError("Barrier(" + GroupNames(mask) + ", seq " + std::to_string(seq) +
                                 "): not released after " + std::to_string(timeout_ms) + " ms");
  }
  Status s = it->second;
  barrier_outcome_.erase(it);
  return s;
}

Status Scheduler::AwaitAllGone(int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (WaitLocked(lock, [this] { return AllNodesGoneLocked(); },
                 DeadlineFromTimeoutMs(timeout_ms))) {
    return OkStatus();
  }
  return DeadlineExceededError("Stop: nodes still running after " + std::to_string(timeout_ms) +
                               " ms");
}

Status Scheduler::NodeStatus(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!layout_.Contains(id)) return NotFoundError("no node " + std::to_string(id));
  return node_status_[id];
}

std::vector<NodeInfo> Scheduler::Table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

void Scheduler::OnControl(const Meta& m) {
  if (m.cmd == Command::kRegister) {
    OnRegister(m);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (m.sender <= 0 || m.sender >= layout_.num_nodes() || !registered_.count(m.sender)) {
    MP_LOG_ERROR(kLog, "{} from unregistered node {} dropped", CommandName(m.cmd), m.sender);
    return;
  }
  if (!AliveLocked(m.sender) && !left_.count(m.sender)) {
    // A node declared dead speaks again (it was paused, not dead): everyone else already
    // failed what depended on it, so it cannot simply resume. Tell it at once.
    if (m.cmd == Command::kHeartbeat || m.cmd == Command::kBarrier || m.cmd == Command::kLeave) {
      Status s = router_->SendControl(ControlMessage(Command::kNodeDown, kSchedulerId, m.sender)
                                          .Arg(m.sender)
                                          .Reason(NodeDownReason::kEvicted)
                                          .Body(node_status_[m.sender].message())
                                          .Build());
      (void)s;
    }
    return;
  }
  switch (m.cmd) {
    case Command::kHeartbeat: {
      last_seen_[m.sender] = GetNanosecond();
      // Echo the node's send stamp and add ours: the node estimates its clock offset to
      // this one from the round trip (ps/clock_sync.h), for cross-host traces.
      OutMessage ack =
          ControlMessage(Command::kHeartbeatAck, kSchedulerId, m.sender).Seq(m.id).Build();
      ack.meta.stamps[0] = m.stamps[0];
      ack.meta.stamps[1] = GetNanosecond();
      Status s = router_->SendControl(std::move(ack));
      if (!s.ok()) MP_LOG_DEBUG(kLog, "heartbeat ack to {} failed: {}", m.sender, s.ToString());
      break;
    }
    case Command::kBarrier:
      if (m.arg <= 0 || m.arg > kAllGroups || !(m.arg & GroupOf(layout_.RoleOf(m.sender)))) {
        MP_LOG_ERROR(kLog, "bad barrier mask {} from {}", m.arg, layout_.Describe(m.sender));
        break;
      }
      barrier_arrivals_[{m.arg, m.id}].insert(m.sender);
      CheckBarriersLocked();
      break;
    case Command::kLeave:
      if (!left_.count(m.sender)) {
        left_.insert(m.sender);
        ReplyLocked(m.sender, Command::kLeaveAck);
        MarkDownLocked(m.sender, registered_[m.sender].Describe() + " stopped",
                       NodeDownReason::kLeft);
      }
      break;
    default:
      MP_LOG_ERROR(kLog, "unexpected {} at the scheduler", CommandName(m.cmd));
  }
  cv_.notify_all();
}

void Scheduler::OnRegister(const Meta& m) {
  auto nodes = DecodeNodes(m.body);
  if (!nodes.ok() || nodes->size() != 1) {
    MP_LOG_ERROR(kLog, "malformed REGISTER dropped: {}",
                 nodes.ok() ? "expected one node" : nodes.status().ToString());
    return;
  }
  NodeInfo n = (*nodes)[0];
  std::lock_guard<std::mutex> lock(mu_);
  const int count = n.role == Role::kServer ? opts_.num_servers : opts_.num_workers;
  if (n.role == Role::kScheduler) {
    RefuseLocked(n, "a second scheduler tried to register");
    return;
  }
  if (n.rank < 0 || n.rank >= count) {
    RefuseLocked(n, std::string(RoleName(n.role)) + " rank " + std::to_string(n.rank) +
                        " is out of range [0, " + std::to_string(count) + ")");
    return;
  }
  n.id = n.role == Role::kServer ? ServerNodeId(n.rank) : WorkerNodeId(opts_.num_servers, n.rank);
  auto it = registered_.find(n.id);
  if (it != registered_.end()) {
    RefuseLocked(n, std::string(RoleName(n.role)) + " rank " + std::to_string(n.rank) +
                        " clashes: it is already taken by " + it->second.Describe() +
                        "; ranks are DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU and must "
                        "be unique");
    return;
  }
  registered_[n.id] = n;
  // Debug: a line per node would make the scheduler's start O(nodes) at info; the wait
  // loop names who is missing instead.
  MP_LOG_DEBUG(kLog, "registered {} ({}/{})", n.Describe(), registered_.size(),
               layout_.num_nodes() - 1);
  if (static_cast<int>(registered_.size()) == layout_.num_nodes() - 1) PublishTableLocked();
}

void Scheduler::RefuseLocked(const NodeInfo& n, const std::string& why) {
  constexpr int kRefusalsPerSecond = 8;
  const uint64_t now = GetNanosecond();
  if (now - refusal_window_ns_ >= 1'000'000'000ull) {
    if (refusals_suppressed_ > 0) {
      MP_LOG_ERROR(kLog, "{} more registrations refused without an answer (rate limit)",
                   refusals_suppressed_);
    }
    refusal_window_ns_ = now;
    refusals_in_window_ = 0;
    refusals_suppressed_ = 0;
  }
  if (refusals_in_window_ >= kRefusalsPerSecond) {
    ++refusals_suppressed_;
    return;
  }
  ++refusals_in_window_;
  MP_LOG_ERROR(kLog, "refused node at {}:{} (pid {}): {}", n.host, n.port, n.pid, why);
  // The refused node has no id of its own: reach it through a temporary one, and close
  // that connection right after the reply (the van lets the reply drain first, bounded),
  // so refusals leave nothing behind.
  const int temp_id = 1 << 20 | next_temp_id_++;
  if (!router_->ConnectControl(temp_id, n.host, n.port).ok()) return;
  Status s = router_->SendControl(ControlMessage(Command::kRegisterReply, kSchedulerId, temp_id)
                                      .Outcome(InvalidArgumentError(why))
                                      .Build());
  (void)s;
  router_->DisconnectControl(temp_id);
}

void Scheduler::PublishTableLocked() {
  table_.clear();
  table_.push_back(self_);
  for (auto& [id, info] : registered_) table_.push_back(info);
  const std::string body = EncodeNodes(table_);
  const uint64_t now = GetNanosecond();
  for (auto& [id, info] : registered_) {
    last_seen_[id] = now;
    Status c = router_->ConnectControl(id, info.host, info.port);
    if (!c.ok()) {
      MP_LOG_ERROR(kLog, "cannot connect to {}: {}", info.Describe(), c.ToString());
      continue;
    }
    Status s = router_->SendControl(
        ControlMessage(Command::kNodeTable, kSchedulerId, id).Body(body).Build());
    (void)s;
  }
  table_published_ = true;
  MP_LOG_INFO(kLog, "all {} nodes registered; node table sent", layout_.num_nodes() - 1);
  cv_.notify_all();
}

void Scheduler::ReplyLocked(int id, Command cmd, int32_t arg, uint64_t seq,
                            const Status& outcome) {
  Status s = router_->SendControl(
      ControlMessage(cmd, kSchedulerId, id).Arg(arg).Seq(seq).Outcome(outcome).Build());
  if (!s.ok()) MP_LOG_DEBUG(kLog, "reply to {} failed: {}", layout_.Describe(id), s.ToString());
}

// A node died or left: tell every live node and settle the barriers it was part of.
void Scheduler::MarkDownLocked(int id, const std::string& why, NodeDownReason reason) {
  if (!AliveLocked(id)) return;
  node_status_[id] = UnavailableError(why);
  if (reason == NodeDownReason::kLeft) {
    MP_LOG_DEBUG(kLog, "node left: {}", why);
  } else {
    MP_LOG_WARN(kLog, "node down: {}", why);
  }
  for (auto& [other, info] : registered_) {
    if (other == id || !AliveLocked(other)) continue;
    Status s = router_->SendControl(ControlMessage(Command::kNodeDown, kSchedulerId, other)
                                        .Arg(id)
                                        .Reason(reason)
                                        .Body(why)
                                        .Build());
    (void)s;
  }
  CheckBarriersLocked();
  cv_.notify_all();
}

void Scheduler::CheckBarriersLocked() {
  for (auto it = barrier_arrivals_.begin(); it != barrier_arrivals_.end();) {
    const int mask = it->first.first;
    const uint64_t seq = it->first.second;
    std::set<int>& arrived = it->second;
    bool complete = true;
    std::string gone;
    for (int id = 0; id < layout_.num_nodes(); ++id) {
      if (!(mask & GroupOf(layout_.RoleOf(id)))) continue;
      if (arrived.count(id)) continue;
      if (!AliveLocked(id)) {
        gone += (gone.empty() ? "" : "; ") + node_status_[id].message();
      } else {
        complete = false;
      }
    }
    if (!complete && gone.empty()) {
      ++it;
      continue;
    }
    // Complete, or some members will never arrive: release the ones that did, with an
    // error in the second case.
    ReleaseBarrierLocked(mask, seq, arrived,
                         gone.empty() ? OkStatus()
                                      : UnavailableError("barrier across " + GroupNames(mask) +
                                                         " cannot complete: " + gone));
    it = barrier_arrivals_.erase(it);
  }
}

void Scheduler::ReleaseBarrierLocked(int mask, uint64_t seq, const std::set<int>& members,
                                     const Status& outcome) {
  for (int id : members) {
    if (id == kSchedulerId) {
      barrier_outcome_[{mask, seq}] = outcome;
      continue;
    }
    if (AliveLocked(id)) ReplyLocked(id, Command::kBarrierDone, mask, seq, outcome);
  }
  cv_.notify_all();
}

bool Scheduler::AllNodesGoneLocked() const {
  for (int id = 1; id < layout_.num_nodes(); ++id) {
    if (registered_.count(id) && AliveLocked(id)) return false;
  }
  return true;
}

void Scheduler::StartLiveness() {
  std::lock_guard<std::mutex> lock(mu_);
  liveness_running_ = true;
  liveness_thread_ = std::thread([this] {
    PinCurrentThread(router_->pinner(), "liveness");
    LivenessLoop();
  });
}

void Scheduler::StopLiveness() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    liveness_running_ = false;
    cv_.notify_all();
  }
  if (liveness_thread_.joinable()) liveness_thread_.join();
}

// Checks every half heartbeat interval that each live node was heard from within the
// heartbeat timeout.
void Scheduler::LivenessLoop() {
  const auto period = std::chrono::milliseconds(opts_.heartbeat_interval_ms) / 2;
  const uint64_t timeout_ns = static_cast<uint64_t>(opts_.heartbeat_timeout_ms) * 1000000ull;
  std::unique_lock<std::mutex> lock(mu_);
  auto next = std::chrono::steady_clock::now() + period;
  uint64_t last_tick = GetNanosecond();
  while (liveness_running_) {
    // cv_ is notified by every control message: wait for the period to elapse, not for
    // the next notification.
    if (cv_.wait_until(lock, next) != std::cv_status::timeout &&
        std::chrono::steady_clock::now() < next) {
      continue;
    }
    if (!liveness_running_) break;
    next = std::chrono::steady_clock::now() + period;
    const uint64_t now = GetNanosecond();
    // A tick far later than scheduled means the scheduler itself was not running (SIGSTOP,
    // VM pause, starvation); heartbeats sent meanwhile sit unread in its socket. Judging
    // now would declare healthy nodes dead, so every node gets a fresh timeout from now,
    // by which time what queued up has been drained.
    if (now - last_tick > timeout_ns / 2) {
      MP_LOG_WARN(kLog, "scheduler was not running for {} ms; liveness judged afresh",
                  (now - last_tick) / 1000000);
      for (auto& [id, seen] : last_seen_) seen = std::max(seen, now);
    }
    last_tick = now;
    for (auto& [id, info] : registered_) {
      if (!AliveLocked(id) || left_.count(id)) continue;
      if (now - last_seen_[id] > timeout_ns) {
        MarkDownLocked(id,
                       info.Describe() + " missed heartbeats for " +
                           std::to_string((now - last_seen_[id]) / 1000000) +
                           " ms and is presumed dead",
                       NodeDownReason::kDied);
      }
    }
  }
}

}  // namespace meshpost
