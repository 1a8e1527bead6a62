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
    if (WaitLocked(
            lock, [this] { return table_published_; }, report_at))
      return OkStatus();
    if (GetNanosecond() >= deadline) break;
    MP_LOG_INFO(
        kLog, "{}",
        WaitingFor(missing(), static_cast<int>(registered_.size()), layout_.num_nodes() - 1));
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
  auto failed = failed_barriers_.find(key);
  if (failed != failed_barriers_.end()) return failed->second;  // released before we came
  barrier_arrivals_[key].insert(kSchedulerId);
  CheckBarriersLocked();
  WaitLocked(
      lock, [&] { return barrier_outcome_.count(key) > 0; }, DeadlineFromTimeoutMs(timeout_ms));
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
  if (WaitLocked(
          lock, [this] { return AllNodesGoneLocked(); }, DeadlineFromTimeoutMs(timeout_ms))) {
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
  // stamps[2]: the sending process's incarnation. Another one than the holder's means a
  // process whose rank was given to a replacement (it was paused, not dead): tell it.
  const uint64_t incarnation = m.stamps[2];
  auto holder = incarnation_.find(m.sender);
  if (incarnation != 0 && holder != incarnation_.end() && holder->second != 0 &&
      incarnation != holder->second) {
    TellFormerHolderLocked(m.sender, incarnation);
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
      // stamps[3]: the node table version this node applied (a replacement's start
      // barrier waits for everyone to have connected to it).
      uint64_t& acked = acked_version_[m.sender];
      if (m.stamps[3] > acked && m.stamps[3] <= table_version_) {
        acked = m.stamps[3];
        ReleaseReplacementStartsLocked();
      }
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
      {
        auto start = replacement_start_.find(m.sender);
        if (start != replacement_start_.end() && std::get<0>(start->second) == 0 &&
            m.arg == kAllGroups && m.id == 1) {
          // A replacement's start barrier: the others passed theirs long ago. It is
          // released once every live node applied the table that admitted it.
          std::get<0>(start->second) = m.arg;
          std::get<1>(start->second) = m.id;
          ReleaseReplacementStartsLocked();
          break;
        }
        const uint64_t seq = ClusterSeqLocked(m.sender, m.arg, m.id);
        auto failed = failed_barriers_.find({m.arg, seq});
        if (failed != failed_barriers_.end()) {
          // Released with an error before this member arrived (a member died): the same
          // outcome, at once, instead of waiting for members that already moved on.
          ReplyLocked(m.sender, Command::kBarrierDone, m.arg, m.id, failed->second);
          break;
        }
        barrier_arrivals_[{m.arg, seq}].insert(m.sender);
        CheckBarriersLocked();
      }
      break;
    case Command::kLeave:
      if (!left_.count(m.sender)) {
        left_.insert(m.sender);
        ReplyLocked(m.sender, Command::kLeaveAck);
        MarkDownLocked(m.sender, registered_[m.sender].Describe() + " stopped",
                       NodeDownReason::kLeft);
      }
      break;
    default: MP_LOG_ERROR(kLog, "unexpected {} at the scheduler", CommandName(m.cmd));
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
    if (table_published_ && !AliveLocked(n.id)) {
      ReplaceLocked(n, m.stamps[2]);
      return;
    }
    RefuseLocked(
        n, std::string(RoleName(n.role)) + " rank " + std::to_string(n.rank) +
               " clashes: it is already taken by " + it->second.Describe() +
               (table_published_
                    ? ", which is alive (a rank can be taken over once its holder left or "
                      "missed heartbeats for MESHPOST_HEARTBEAT_TIMEOUT_MS=" +
                          std::to_string(opts_.heartbeat_timeout_ms) + " ms)"
                    : "") +
               "; ranks are DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU and must be unique");
    return;
  }
  registered_[n.id] = n;
  incarnation_[n.id] = m.stamps[2];
  // Debug: a line per node would make the scheduler's start O(nodes) at info; the wait
  // loop names who is missing instead.
  MP_LOG_DEBUG(kLog, "registered {} ({}/{})", n.Describe(), registered_.size(),
               layout_.num_nodes() - 1);
  if (static_cast<int>(registered_.size()) == layout_.num_nodes() - 1) PublishTableLocked();
}

// Answers sent to an address named in a message (refusals, former holders) are bounded:
// a flood of such messages costs a bounded number of connections.
bool Scheduler::RateLimitLocked() {
  constexpr int kAnswersPerSecond = 8;
  const uint64_t now = GetNanosecond();
  if (now - refusal_window_ns_ >= 1'000'000'000ull) {
    if (refusals_suppressed_ > 0) {
      MP_LOG_ERROR(kLog, "{} more refusals left without an answer (rate limit)",
                   refusals_suppressed_);
    }
    refusal_window_ns_ = now;
    refusals_in_window_ = 0;
    refusals_suppressed_ = 0;
  }
  if (refusals_in_window_ >= kAnswersPerSecond) {
    ++refusals_suppressed_;
    return false;
  }
  ++refusals_in_window_;
  return true;
}

// A process that holds no id of its own here (refused, or replaced) is reached through a
// temporary id, and that connection is closed right after the message (the van lets it
// drain first, bounded), so it leaves nothing behind.
void Scheduler::SendToAddressLocked(const std::string& host, int port, OutMessage msg) {
  const int temp_id = 1 << 20 | (next_temp_id_++ & 0xfffff);
  if (!router_->ConnectControl(temp_id, host, port).ok()) return;
  msg.meta.recipient = temp_id;
  Status s = router_->SendControl(std::move(msg));
  (void)s;
  router_->DisconnectControl(temp_id);
}

void Scheduler::RefuseLocked(const NodeInfo& n, const std::string& why) {
  if (!RateLimitLocked()) return;
  MP_LOG_ERROR(kLog, "refused node at {}:{} (pid {}): {}", n.host, n.port, n.pid, why);
  SendToAddressLocked(n.host, n.port,
                      ControlMessage(Command::kRegisterReply, kSchedulerId, -1)
                          .Outcome(InvalidArgumentError(why))
                          .Build());
}

void Scheduler::ReplaceLocked(const NodeInfo& n, uint64_t incarnation) {
  const int id = n.id;
  const NodeInfo old = registered_[id];
  const std::string why =
      old.Describe() + " was replaced by " + n.Describe() + " after: " + node_status_[id].message();
  MP_LOG_WARN(kLog, "{}", why);
  auto inc = incarnation_.find(id);
  if (inc != incarnation_.end() && inc->second != 0) {
    constexpr size_t kMaxFormer = 256;
    if (former_.size() >= kMaxFormer) former_.erase(former_.begin());
    former_[inc->second] = Former{id, old, why};
  }
  registered_[id] = n;
  incarnation_[id] = incarnation;
  node_status_[id] = OkStatus();
  left_.erase(id);
  last_seen_[id] = GetNanosecond();
  ++table_version_;
  acked_version_[id] = table_version_;  // it gets this table as its first
  // Its barrier counts start at 1; the cluster's do not. Its start barrier (kAllGroups,
  // seq 1) is answered on its own (ReleaseReplacementStartsLocked); later barriers of
  // every mask continue the cluster's sequence.
  auto& offsets = seq_offset_[id];
  offsets.clear();
  for (int mask = 1; mask <= kAllGroups; ++mask) {
    if (!(mask & GroupOf(n.role))) continue;
    const int64_t released = static_cast<int64_t>(last_released_[mask]);
    offsets[mask] = mask == kAllGroups ? released - 1 : released;
  }
  replacement_start_[id] = std::make_tuple(0, uint64_t{0}, table_version_);
  // The id's connection reached the old holder: a fresh one (a new handshake) to the new
  // address, even when it reuses the old host:port.
  router_->DisconnectControl(id);
  Status c = router_->ConnectControl(id, n.host, n.port);
  if (!c.ok()) {
    MP_LOG_ERROR(kLog, "cannot connect to {}: {}", n.Describe(), c.ToString());
    MarkDownLocked(id, n.Describe() + " is unreachable: " + c.message(), NodeDownReason::kDied);
    return;
  }
  table_.clear();
  table_.push_back(self_);
  for (auto& [other, info] : registered_) table_.push_back(info);
  const std::string body = EncodeNodes(table_);
  for (auto& [other, info] : registered_) {
    if (!AliveLocked(other) || left_.count(other)) continue;
    Status s = router_->SendControl(ControlMessage(Command::kNodeTable, kSchedulerId, other)
                                        .Seq(table_version_)
                                        .Body(body)
                                        .Build());
    (void)s;
  }
  cv_.notify_all();
}

void Scheduler::TellFormerHolderLocked(int id, uint64_t incarnation) {
  auto f = former_.find(incarnation);
  if (f == former_.end() || f->second.id != id) {
    MP_LOG_DEBUG(kLog, "message for node {} from an unknown incarnation dropped", id);
    return;
  }
  const NodeInfo& holder = registered_[id];
  if (holder.host == f->second.info.host && holder.port == f->second.info.port) {
    // The new holder listens where the former one did (a fixed DMLC_PORT): the former
    // holder is gone, and this is a message it sent before dying, read only now.
    return;
  }
  if (!RateLimitLocked()) return;
  SendToAddressLocked(f->second.info.host, f->second.info.port,
                      ControlMessage(Command::kNodeDown, kSchedulerId, -1)
                          .Arg(id)
                          .Reason(NodeDownReason::kReplaced)
                          .Body(f->second.why)
                          .Build());
}

uint64_t Scheduler::ClusterSeqLocked(int id, int mask, uint64_t seq) const {
  auto node = seq_offset_.find(id);
  if (node == seq_offset_.end()) return seq;
  auto off = node->second.find(mask);
  if (off == node->second.end()) return seq;
  return static_cast<uint64_t>(static_cast<int64_t>(seq) + off->second);
}

void Scheduler::ReleaseReplacementStartsLocked() {
  for (auto it = replacement_start_.begin(); it != replacement_start_.end();) {
    const int id = it->first;
    const auto [mask, seq, version] = it->second;
    if (!AliveLocked(id)) {
      it = replacement_start_.erase(it);
      continue;
    }
    if (mask == 0) {
      ++it;
      continue;
    }
    bool everyone = true;
    for (auto& [other, info] : registered_) {
      if (other == id || !AliveLocked(other) || left_.count(other)) continue;
      if (acked_version_[other] < version) everyone = false;
    }
    if (!everyone) {
      ++it;
      continue;
    }
    ReplyLocked(id, Command::kBarrierDone, mask, seq);
    it = replacement_start_.erase(it);
  }
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
    Status s = router_->SendControl(ControlMessage(Command::kNodeTable, kSchedulerId, id)
                                        .Seq(table_version_)
                                        .Body(body)
                                        .Build());
    (void)s;
  }
  table_published_ = true;
  MP_LOG_INFO(kLog, "all {} nodes registered; node table sent", layout_.num_nodes() - 1);
  cv_.notify_all();
}

void Scheduler::ReplyLocked(int id, Command cmd, int32_t arg, uint64_t seq, const Status& outcome) {
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
  ReleaseReplacementStartsLocked();
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
    if (!AliveLocked(id)) continue;
    // The member's own sequence (a replacement's differs from the cluster's).
    const uint64_t own = seq - (ClusterSeqLocked(id, mask, seq) - seq);
    ReplyLocked(id, Command::kBarrierDone, mask, own, outcome);
  }
  last_released_[mask] = std::max(last_released_[mask], seq);
  if (!outcome.ok()) {
    constexpr size_t kMaxFailed = 1024;
    if (failed_barriers_.size() >= kMaxFailed) failed_barriers_.erase(failed_barriers_.begin());
    failed_barriers_[{mask, seq}] = outcome;
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
