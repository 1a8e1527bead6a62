// A worker's or server's part of a cluster: registers with the scheduler, takes the node
// table and connects its data peers through the VanRouter, passes barriers, sends
// heartbeats and judges the scheduler's liveness, tracks data peers that died or are
// leaving, and leaves in order. Control messages arrive on the tcp van's receive thread;
// the heartbeat thread sends heartbeats and expires leaving peers. Internal to ps/.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ps/clock_sync.h"
#include "ps/cluster.h"
#include "ps/control.h"
#include "ps/node.h"
#include "ps/van_router.h"

namespace meshpost {

class Membership {
 public:
  // Told once per data peer that died or finished leaving, without any lock held.
  using PeerDownFn = std::function<void(int node_id, const Status& why)>;
  // Told when a data peer that was down is reachable again: a new process took its rank.
  using PeerUpFn = std::function<void(int node_id)>;

  Membership(const Options& options, const ClusterLayout& layout, int my_id, VanRouter* router,
             PeerDownFn on_peer_down, PeerUpFn on_peer_up = nullptr);
  ~Membership();

  // Registers `self` with the scheduler and waits for the node table (data peers
  // connected) or a refusal.
  Status Join(const NodeInfo& self, uint64_t deadline);
  void StartHeartbeats();
  void StopHeartbeats();
  // This node's arrival at a barrier of `mask` (already validated).
  Status Barrier(int mask, int64_t timeout_ms);
  // Orderly leave: PEER_LEAVE to every live data peer, LEAVE to the scheduler, then wait
  // (timeout_ms, < 0: the heartbeat timeout) for its acknowledgement. Does nothing when
  // this node never joined: its id may belong to the node admitted in its place.
  void Leave(int64_t timeout_ms);

  void OnControl(const Meta& m);    // from the scheduler
  void OnPeerLeave(const Meta& m);  // a data peer's PEER_LEAVE
  // A data peer died (van failure, scheduler's NODE_DOWN) or finished leaving.
  void PeerGone(int id, const Status& why, bool orderly = false);
  // The scheduler told this node it was evicted (or, `replaced`, that a new process holds
  // its rank now): fail everything with that reason.
  void Evicted(const std::string& why, bool replaced = false);
  // OK while node `id` is alive; otherwise why it is not (died, left, leaving).
  Status PeerStatus(int id) const;
  bool Joined() const;
  std::vector<NodeInfo> Table() const;
  // Offset of this node's clock to the scheduler's, from heartbeat round trips (traces).
  const ClockSync* clock_sync() const { return &clock_sync_; }

 private:
  void OnNodeTable(const Meta& m);
  // A later NODE_TABLE: a rank was taken over by a new process.
  void OnTableUpdate(uint64_t version, std::vector<NodeInfo> nodes);
  // Stamps what this node sends the scheduler with its incarnation and table version.
  OutMessage ToScheduler(ControlMessage c) const;
  // Sends to the scheduler; a failure's message names the scheduler.
  Status SendToScheduler(ControlMessage c);
  template <typename Pred>
  bool WaitLocked(std::unique_lock<std::mutex>& lock, Pred pred, uint64_t deadline);
  void HeartbeatLoop();

  const Options& opts_;
  const ClusterLayout layout_;
  const int my_id_;
  ClockSync clock_sync_;  // thread-safe on its own; fed by heartbeat acks
  VanRouter* const router_;
  const PeerDownFn on_peer_down_;
  const PeerUpFn on_peer_up_;
  // Random per process: tells the scheduler this process from an earlier holder of the
  // same rank (stamps[2] of REGISTER, heartbeats, barriers, leave).
  const uint64_t incarnation_;
  std::atomic<uint64_t> table_version_{0};  // NODE_TABLE id last applied (stamps[3])
  NodeInfo self_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<NodeInfo> table_;
  bool table_ready_ = false;
  Status join_error_;                // refusal or a bad node table
  std::vector<Status> peer_status_;  // per node id: OK while alive, else why not
  std::map<int, std::pair<uint64_t, std::string>> leaving_;     // id → (notice time ns, why)
  std::map<int, uint64_t> barrier_seq_;                         // per mask
  std::map<std::pair<int, uint64_t>, Status> barrier_outcome_;  // (mask, seq) → released
  bool leave_acked_ = false;
  uint64_t last_ack_ns_ = 0;  // last HEARTBEAT_ACK from the scheduler
  // The scheduler is marked down only for silence: its next ack clears the mark.
  bool scheduler_silent_ = false;
  Status evicted_;  // set once the scheduler said we were evicted
  bool heartbeats_running_ = false;
  std::thread heartbeat_thread_;
};

}  // namespace meshpost
