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
#include <tuple>
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
  // A new process takes the rank of a node that died or left (issue 10, item 4).
  void ReplaceLocked(const NodeInfo& n, uint64_t incarnation);
  // A message from a process that no longer holds its rank: tell it, through a temporary
  // connection to its own address (the id's connection now reaches the new holder).
  void TellFormerHolderLocked(int id, uint64_t incarnation);
  // Sends `cmd` to `host:port` through a temporary id, then closes that connection;
  // rate-limited (the address comes from a message).
  bool RateLimitLocked();
  void SendToAddressLocked(const std::string& host, int port, OutMessage msg);
  void RefuseLocked(const NodeInfo& n, const std::string& why);
  // Barrier sequences are per node; a replacement starts counting at 1, so its arrivals
  // are shifted onto the cluster's sequence (and its releases shifted back).
  uint64_t ClusterSeqLocked(int id, int mask, uint64_t seq) const;
  void ReleaseReplacementStartsLocked();
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
  std::map<int, NodeInfo> registered_;  // admitted nodes by id
  // Per node id: a random number the holder's process chose (stamps[2] of everything it
  // sends the scheduler), which tells a replaced holder's messages from the new one's.
  std::map<int, uint64_t> incarnation_;
  struct Former {
    int id;
    NodeInfo info;
    std::string why;
  };
  std::map<uint64_t, Former> former_;      // replaced holders by incarnation (bounded)
  uint64_t table_version_ = 1;             // NODE_TABLE id; bumped by each replacement
  std::map<int, uint64_t> acked_version_;  // node id → table version its heartbeats report
  // Replacements whose start barrier waits until every live node applied the table that
  // admitted them: id → (mask, node seq, table version).
  std::map<int, std::tuple<int, uint64_t, uint64_t>> replacement_start_;
  std::map<int, std::map<int, int64_t>> seq_offset_;  // id → mask → cluster seq - node seq
  std::map<int, uint64_t> last_released_;             // mask → highest released cluster seq
  // Barriers released with an error, for members that arrive after the release (bounded).
  std::map<std::pair<int, uint64_t>, Status> failed_barriers_;
  std::vector<NodeInfo> table_;  // published node table (self first)
  bool table_published_ = false;
  std::vector<Status> node_status_;    // per node id: OK while alive, else why not
  std::map<int, uint64_t> last_seen_;  // node id → last heartbeat (ns)
  std::set<int> left_;                 // nodes that said LEAVE
  std::map<std::pair<int, uint64_t>, std::set<int>> barrier_arrivals_;  // (mask, seq) → ids
  std::map<int, uint64_t> barrier_seq_;                                 // own arrivals per mask
  std::map<std::pair<int, uint64_t>, Status> barrier_outcome_;          // own released barriers
  int next_temp_id_ = 0;  // addresses for refused nodes
  // Refusals answered in the current second: a flood of bad REGISTERs (each naming an
  // address we would have to dial) costs a bounded number of connections.
  uint64_t refusal_window_ns_ = 0;
  int refusals_in_window_ = 0;
  uint64_t refusals_suppressed_ = 0;
  bool liveness_running_ = false;
  std::thread liveness_thread_;
};

}  // namespace meshpost
