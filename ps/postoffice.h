// Postoffice: one per process role instance. Start() registers with the scheduler (or,
// for the scheduler, waits for every node), connects workers to servers, and passes a
// start barrier; Stop() leaves the cluster without waiting for peers that already left.
// Workers get worker(), servers get server(); both are owned by the Postoffice.
// Inside: ps/scheduler.h (the scheduler's part), ps/membership.h (a node's part) and
// ps/van_router.h (routing to vans), see docs/architecture.md.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/result.h"
#include "ps/af_server.h"
#include "ps/af_worker.h"
#include "ps/cluster.h"  // barrier groups
#include "ps/options.h"
#include "van/registry.h"  // VanFactory

namespace meshpost {

class Postoffice {
 public:
  // `make_van` creates vans by transport name; empty = van/registry (tests inject vans,
  // e.g. RDMA over a fake fabric, through it).
  static Result<std::unique_ptr<Postoffice>> Create(const Options& options,
                                                    VanFactory make_van = nullptr);
  ~Postoffice();

  Status Start();
  // Leaves the cluster. The scheduler waits (up to timeout_ms, < 0: no limit) until every
  // node left or was declared dead; other roles wait at most timeout_ms for the
  // scheduler's acknowledgement.
  Status Stop(int64_t timeout_ms = -1);
  // Blocks until every live node of the groups in `group_mask` arrived.
  Status Barrier(int group_mask, int64_t timeout_ms = -1);

  Role role() const;
  int rank() const;  // worker/server rank; 0 for the scheduler
  int node_id() const;
  int port() const;  // the port this process listens on
  const Options& options() const;
  AFTensorWorker* worker();  // nullptr unless role is worker
  AFTensorServer* server();  // nullptr unless role is server
  // Transport used for each peer, keyed by "server 0" / "worker 1".
  std::map<std::string, std::string> Transports() const;

  class Impl;

 private:
  explicit Postoffice(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshpost
