// The scheduler's part of a cluster: admits nodes (REGISTER, refusing out-of-range or
// clashing ranks), publishes the node table, runs barriers, and judges liveness from
// heartbeats, telling every live node when one dies or leaves. Control messages arrive on
// the tcp van's receive thread; the liveness thread checks heartbeats. Internal to ps/.
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ps/cluster.h"
#include "ps/control.h"
#include "ps/node.h"
#include "ps/van_router.h"

namespace meshpost {

class Scheduler {
 public:
  Scheduler(const Options& options, const ClusterLayout& layout, VanRouter* router);
  ~Scheduler();

  // Before the control van starts: the scheduler's own entry in the node table.
  void SetSelf(const NodeInfo& self);
  // Waits until every node registered and got the node table.
  Status AwaitNodes(uint64_t deadline);
  void StartLiveness();
  void StopLiveness();
  // The scheduler's own arrival at a barrier of `mask` (already validated).
  Status Barrier(int mask, int64_t timeout_ms);
  // Waits until every registered node left or was declared dead.
  Status AwaitAllGone(int64_t timeout_ms);

  void OnControl(const Meta& m);
  // OK while node `id` is alive; otherwise why it is not.
  Status NodeStatus(int id) const;
  std::vector<NodeInfo> Table() const;

 private:
  void OnRegister(const Meta& m);
  void RefuseLocked(const NodeInfo& n, const std::string& why);
  void PublishTableLocked();
  void ReplyLocked(int id, Command cmd, int32_t arg = 0, uint64_t seq = 0,
                   const Status& outcome = OkStatus());
  void MarkDownLocked(int id, const std::string& why, NodeDownReason reason);
  void CheckBarriersLocked();
  void ReleaseBarrierLocked(int mask, uint64_t seq, const std::set<int>& members,
                            const Status& outcome);
  bool AliveLocked(int id) const { return node_status_[id].ok(); }
  bool AllNodesGoneLocked() const;
  template <typename Pred>
  bool WaitLocked(std::unique_lock<std::mutex>& lock, Pred pred, uint64_t deadline);
  void LivenessLoop();

  const Options& opts_;
  const ClusterLayout layout_;
  VanRouter* const router_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  NodeInfo self_;
  std::map<int, NodeInfo> registered_;   // admitted nodes by id
  std::vector<NodeInfo> table_;          // published node table (self first)
  bool table_published_ = false;
  std::vector<Status> node_status_;      // per node id: OK while alive, else why not
  std::map<int, uint64_t> last_seen_;    // node id → last heartbeat (ns)
  std::set<int> left_;                   // nodes that said LEAVE
  std::map<std::pair<int, uint64_t>, std::set<int>> barrier_arrivals_;  // (mask, seq) → ids
  std::map<int, uint64_t> barrier_seq_;  // own arrivals per mask
  std::map<std::pair<int, uint64_t>, Status> barrier_outcome_;  // own released barriers
  int next_temp_id_ = 0;                 // addresses for refused nodes
  // Refusals answered in the current second: a flood of bad REGISTERs (each naming an
  // address we would have to dial) costs a bounded number of connections.
  uint64_t refusal_window_ns_ = 0;
  int refusals_in_window_ = 0;
  uint64_t refusals_suppressed_ = 0;
  bool liveness_running_ = false;
  std::thread liveness_thread_;
};

}  // namespace meshpost
