// Who is who in a cluster: barrier groups, the role and description of a node id, and
// which roles exchange data. Every process computes these from the launch options alone
// (node ids derive from ranks, see ps/node_context.h).
#pragma once

#include <string>

#include "ps/options.h"

namespace meshpost {

// Barrier groups; combine with |.
constexpr int kSchedulerGroup = 1;
constexpr int kServerGroup = 2;
constexpr int kWorkerGroup = 4;
constexpr int kAllGroups = kSchedulerGroup | kServerGroup | kWorkerGroup;

int GroupOf(Role role);
std::string GroupNames(int mask);  // "scheduler+servers"

// Workers exchange data with servers and servers with workers; nobody else does.
bool IsDataPeer(Role self, Role other);

class ClusterLayout {
 public:
  ClusterLayout(int num_servers, int num_workers)
      : num_servers_(num_servers), num_workers_(num_workers) {}
  int num_servers() const { return num_servers_; }
  int num_workers() const { return num_workers_; }
  int num_nodes() const { return 1 + num_servers_ + num_workers_; }
  bool Contains(int id) const { return id >= 0 && id < num_nodes(); }
  Role RoleOf(int id) const;           // id must be Contains()
  std::string Describe(int id) const;  // "scheduler", "server 1", "worker 0"

 private:
  int num_servers_;
  int num_workers_;
};

}  // namespace meshpost
